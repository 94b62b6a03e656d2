"""Evaluation harness: loading and copies, scoring, cache and resume, backends, the script, the training callback."""

import json
import pathlib
import sys
import types

import pytest
import torch
from conftest import (
    SMOLLM_GGUF,
    build_model,
    math_dataset,
    requires_smollm,
    requires_torchrun,
    run_two_processes,
    smollm_folder,
    tiny_args,
)

from luffy_trl.evaluation import benchmark_dir, cli
from luffy_trl.evaluation.backends import Generation, TransformersBackend, VLLMBackend
from luffy_trl.evaluation.callback import LuffyEvalCallback
from luffy_trl.evaluation.protocols import LUFFY
from luffy_trl.evaluation.runner import (
    BenchmarkSpec,
    GenerationCache,
    Problem,
    build_requests,
    evaluate,
    load_problems,
    luffy_benchmark,
    run_evaluation,
    score,
    summarize,
)

BENCHMARKS = benchmark_dir()  # LUFFY's benchmark files, shipped with the package
TWO_PROCESS_SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_eval_callback.py"


class FakeBackend:
    """Deterministic per request: a correct boxed answer after `</think>` when the seed is divisible by 3, else a
    wrong one; 7 tokens, never truncated. `fail_after` generate calls, it raises (an interruption)."""

    name = "fake"
    default_batch_size = 3

    def __init__(self, tokenizer, golds, fail_after=None):
        self.tokenizer, self.golds, self.fail_after = tokenizer, golds, fail_after
        self.prompts = []

    def generate(self, prompts, protocol, seeds):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.prompts.append(prompts)
        answers = [self.golds[p] if s % 3 == 0 else "-1" for p, s in zip(prompts, seeds)]
        return [Generation(f"<think>\nhm\n</think>\nSo \\boxed{{{a}}}.", 7, False) for a in answers]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def toy_bench(tmp_path):
    """A custom benchmark file: three problems, the first repeated 4 times (as LUFFY repeats AIME rows)."""
    rows = [{"question": "What is 1 + 1?", "answer": "2"}] * 4 + [
        {"question": "What is 2 + 2?", "answer": "4"}, {"question": "Half of 3?", "answer": "\\frac{3}{2}"}]
    return BenchmarkSpec("toy", write_jsonl(tmp_path / "toy.jsonl", rows), prompt_column="question",
                         gold_column="answer")


def fake_for(tokenizer, problems, protocol, **kwargs):
    golds = {r.prompt_text: r.problem.gold for r in build_requests(problems, protocol, tokenizer)}
    return FakeBackend(tokenizer, golds, **kwargs)


def test_custom_dataset_copies_become_samples_of_one_problem(toy_bench, tokenizer):
    problems = load_problems(toy_bench)
    assert [(p.gold, p.copies) for p in problems] == [("2", 4), ("4", 1), ("\\frac{3}{2}", 1)]
    assert problems[0].prompt == ({"role": "user", "content": "What is 1 + 1?"},)
    requests = build_requests(problems, LUFFY, tokenizer)
    assert [r.sample for r in requests] == [0, 1, 2, 3, 0, 0]  # copies are samples; no entry in LUFFY.samples
    assert len({r.seed for r in requests}) == 6 and not any(r.gated for r in requests)
    assert len(build_requests(problems, LUFFY.with_overrides(num_samples=2), tokenizer)) == 6
    assert len(load_problems(toy_bench, max_problems=2)) == 2


def test_luffy_files_group_the_32_copies_and_drop_the_system_prompt():
    aime = load_problems(luffy_benchmark("aime", BENCHMARKS), max_problems=2)
    assert [p.copies for p in aime] == [32, 32] and aime[0].benchmark == "aime"
    assert [m["role"] for m in aime[0].prompt] == ["user"]
    assert len(load_problems(luffy_benchmark("aime25", BENCHMARKS))) == 30
    gpqa = load_problems(luffy_benchmark("gpqa", BENCHMARKS), "keep", max_problems=1)
    assert gpqa[0].scorer == "choice" and gpqa[0].gold == "A" and gpqa[0].prompt[0]["role"] == "system"
    with pytest.raises(FileNotFoundError):
        luffy_benchmark("aime", BENCHMARKS.parent / "missing")


def test_scoring_hand_made_generations(think_tokenizer, tokenizer):
    problems = [Problem("m", "p1", ({"role": "user", "content": "1+1?"},), "2", 3),
                Problem("mc", "p2", ({"role": "user", "content": "Pick"},), "C", 1, "choice"),
                Problem("bad", "p3", ({"role": "user", "content": "?"},), "t(0,4]", 1)]
    texts = ["I think \\boxed{2}", "\\boxed{3}</think> no, 2", "</think>\\boxed{2}", "ANSWER: C", "\\boxed{1}"]
    generations = [Generation(t, i + 1, i == 1) for i, t in enumerate(texts)]

    gated = build_requests(problems, LUFFY, think_tokenizer)  # the template opens <think>: LUFFY's gate applies
    assert all(r.gated for r in gated) and gated[0].prompt_text.endswith("<think>\n")
    assert not any(r.gated for r in build_requests(problems, LUFFY.with_overrides(think_gate="never"), think_tokenizer))
    samples = score(gated, generations, LUFFY)
    assert [s.score for s in samples] == [0.0, 1.0, 1.0, 0.0, None]  # without </think>: 0 (MC too)
    assert [s.boxed for s in samples] == [False, False, True, False, False]  # boxed in the scored part

    plain = build_requests(problems, LUFFY, tokenizer)
    samples = score(plain, generations, LUFFY)
    assert [s.score for s in samples] == [1.0, 0.0, 1.0, 1.0, None]  # whole text: \boxed{3} comes first
    assert [s.boxed for s in samples] == [True, True, True, False, True]
    summary = summarize(plain, samples)
    assert summary["benchmarks"]["m"] == {
        "num_problems": 1, "k": 3, "accuracy": 2 / 3, "pass@1": 2 / 3, "pass@2": 1.0, "pass@3": 1.0,
        "mean_length": 2.0, "truncation_rate": 1 / 3, "boxed_rate": 1.0, "gold_unparseable": 0}
    assert summary["benchmarks"]["bad"]["accuracy"] == 0.0 and summary["benchmarks"]["bad"]["gold_unparseable"] == 1
    assert summary["averages"]["math"]["benchmarks"] == ["m", "bad"]
    assert summary["averages"]["math"]["accuracy"] == pytest.approx(1 / 3)
    assert summary["averages"]["ood"]["accuracy"] == 1.0
    assert "pass@2" not in summarize(plain, samples, pass_ks=[2])["benchmarks"]["mc"]  # 1 sample: k=2 left out


class ExpressionBackend(FakeBackend):
    """Answers each problem with an expression that equals its gold (`\\boxed{(g + 1) - 1}`), every third seed with
    the number itself."""

    def generate(self, prompts, protocol, seeds):
        texts = [f"So \\boxed{{{self.golds[p]}}}." if s % 3 == 0 else f"So \\boxed{{({self.golds[p]} + 1) - 1}}."
                 for p, s in zip(prompts, seeds)]
        return [Generation(text, 7, False) for text in texts]


def test_number_scored_benchmark_refuses_expressions_and_reports(tokenizer, tmp_path):
    """`scorer="number"`: the expression answers math-verify accepts score 0; the benchmark counts in the math
    average and gets its table row and chart (a `number` benchmark alone once crashed the chart)."""
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((1, 1), (20, 3), (7, 8))]
    path = write_jsonl(tmp_path / "sums.jsonl", rows)
    protocol = LUFFY.with_overrides(num_samples="sums=3")
    results = {}
    for scorer in ("math", "number"):
        problems = load_problems(BenchmarkSpec("sums", path, prompt_column="question", gold_column="answer",
                                               scorer=scorer))
        golds = {r.prompt_text: r.problem.gold for r in build_requests(problems, protocol, tokenizer)}
        results[scorer] = run_evaluation(ExpressionBackend(tokenizer, golds), problems, protocol,
                                         tmp_path / scorer, model_name="fake", progress=False)
    seeds = [r.seed for r in build_requests(problems, protocol, tokenizer)]
    assert results["math"]["benchmarks"]["sums"]["accuracy"] == 1.0
    assert results["number"]["benchmarks"]["sums"]["accuracy"] == pytest.approx(sum(s % 3 == 0 for s in seeds) / 9)
    assert results["number"]["averages"]["math"]["benchmarks"] == ["sums"]
    assert (tmp_path / "number" / "results.png").stat().st_size > 1000
    assert "| sums |" in (tmp_path / "number" / "results.md").read_text()


def test_interrupted_run_resumes_to_the_same_files(toy_bench, tokenizer, tmp_path):
    problems = load_problems(toy_bench)
    protocol = LUFFY.with_overrides(num_samples="toy=5")  # 15 samples, batches of 3
    full = run_evaluation(fake_for(tokenizer, problems, protocol), problems, protocol, tmp_path / "a",
                          model_name="fake", progress=False)

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(fake_for(tokenizer, problems, protocol, fail_after=2), problems, protocol, tmp_path / "b",
                       model_name="fake", progress=False)
    with (tmp_path / "b" / "generations.jsonl").open("a") as cache:
        cache.write('{"run": "half a line')  # killed in the middle of a write
    backend = fake_for(tokenizer, problems, protocol)
    resumed = run_evaluation(backend, problems, protocol, tmp_path / "b", model_name="fake", progress=False)
    assert sum(map(len, backend.prompts)) == 9 and resumed["run"]["from_cache"] == 6

    def without_run(path):
        results = json.loads(path.read_text())
        results.pop("run")
        return results

    assert without_run(tmp_path / "a" / "results.json") == without_run(tmp_path / "b" / "results.json")
    assert (tmp_path / "a" / "results.md").read_text() == (tmp_path / "b" / "results.md").read_text()
    assert full["benchmarks"]["toy"]["k"] == 5 and (tmp_path / "b" / "results.png").stat().st_size > 1000

    rescoring = fake_for(tokenizer, problems, protocol, fail_after=0)  # must not generate
    again = run_evaluation(rescoring, problems, protocol, tmp_path / "b", model_name="fake", progress=False)
    assert again["run"]["generated"] == 0 and again["benchmarks"] == full["benchmarks"]
    other = GenerationCache(tmp_path / "b" / "generations.jsonl", run_hash="another model")
    assert not other.entries  # generations of another model or sampling setting are not reused


def test_transformers_backend_left_pads_and_keeps_the_random_state(tokenizer):
    model = build_model(tokenizer)
    backend = TransformersBackend(model, tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False) for text in ("Hi", "What is 3 + 4? Solve it.")]
    state = torch.get_rng_state()
    greedy = LUFFY.with_overrides(temperature=0.0, max_new_tokens=6)
    batched = backend.generate(prompts, greedy, [1, 2])
    assert torch.equal(torch.get_rng_state(), state)
    assert batched == [backend.generate([p], greedy, [0])[0] for p in prompts]  # left padding changes nothing
    for g in batched + backend.generate(prompts, LUFFY.with_overrides(max_new_tokens=6), [1, 2]):
        assert 1 <= g.num_tokens <= 6 and (g.num_tokens == 6 or not g.truncated)
    sampled = LUFFY.with_overrides(max_new_tokens=6)
    assert backend.generate(prompts, sampled, [5, 9]) == backend.generate(prompts, sampled, [5, 9])


def test_vllm_backend_with_a_fake_llm(monkeypatch, tokenizer, toy_bench, tmp_path):
    calls = []

    class FakeLLM:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def generate(self, prompts, params, use_tqdm, lora_request=None):
            calls.append(("generate", prompts, params, lora_request))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text="So \\boxed{2}.", token_ids=[1] * (3 + p.seed % 4), finish_reason="length" if p.seed % 2 else
                "stop")]) for p in params]

    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda *args: ("lora", *args)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 64}')

    backend = VLLMBackend("some/model", tokenizer, adapter_path=str(tmp_path / "adapter"), tensor_parallel_size=4)
    problems = load_problems(toy_bench)
    summary = evaluate(backend, problems, LUFFY.with_overrides(max_new_tokens=64))
    (_, init), (_, prompts, params, lora_request) = calls
    assert init["tensor_parallel_size"] == 4 and init["enable_lora"] and init["max_lora_rank"] == 64
    assert lora_request == ("lora", "adapter", 1, str(tmp_path / "adapter"))
    requests = build_requests(problems, LUFFY, tokenizer)
    assert [p["prompt_token_ids"] for p in prompts] == [
        tokenizer(r.prompt_text, add_special_tokens=False)["input_ids"] for r in requests]
    assert [p.seed for p in params] == [r.seed for r in requests]
    assert {(p.n, p.temperature, p.top_p, p.max_tokens) for p in params} == {(1, 0.6, 1.0, 64)}
    toy = summary["benchmarks"]["toy"]
    assert toy["accuracy"] == pytest.approx((1 + 0 + 0) / 3)
    assert toy["truncation_rate"] == pytest.approx(sum(r.seed % 2 for r in requests) / 6)
    assert toy["mean_length"] == pytest.approx(sum(3 + r.seed % 4 for r in requests) / 6)


def test_yaml_config_and_command_line(tmp_path):
    from trl import TrlParser

    config = tmp_path / "eval.yaml"
    config.write_text("model_name_or_path: some/model\nbenchmarks: [aime, gpqa]\nnum_samples: aime=4\n"
                      "max_new_tokens: 512\n")
    (args,) = TrlParser((cli.EvalArguments,)).parse_args_and_config(
        ["--config", str(config), "--temperature", "0.0", "--pass_k", "1", "2"])
    assert (args.model_name_or_path, args.benchmarks, args.num_samples) == ("some/model", ["aime", "gpqa"], "aime=4")
    assert (args.max_new_tokens, args.temperature, args.pass_k, args.protocol) == (512, 0.0, [1, 2], "luffy")
    assert args.data_dir is None  # LUFFY's files shipped with the package

    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    config.write_text(docs.split("```yaml\n", 1)[1].split("```", 1)[0])  # the docs' example parses as written
    (args,) = TrlParser((cli.EvalArguments,)).parse_args_and_config(["--config", str(config)])
    assert args.num_samples == "aime=16,aime25=16,amc=8" and args.tensor_parallel_size == 4


def test_cli_picks_each_custom_benchmarks_scorer(tmp_path):
    from trl import TrlParser

    (args,) = TrlParser((cli.EvalArguments,)).parse_args_and_config(
        ["--model_name_or_path", "m", "--benchmarks", "sums=a.jsonl", "quiz=b.jsonl", "free=c.jsonl", "aime",
         "--number_benchmarks", "sums", "--choice_benchmarks", "quiz"])
    specs = {spec.name: spec.scorer for spec in cli.benchmark_specs(args)}
    assert specs == {"sums": "number", "quiz": "choice", "free": "math", "aime": "math"}
    args.number_benchmarks = ["quiz"]
    with pytest.raises(ValueError, match=r"\['quiz'\] named in both --choice_benchmarks and --number_benchmarks"):
        cli.benchmark_specs(args)


def test_tiny_model_end_to_end_on_every_benchmark(tokenizer, tmp_path):
    build_model(tokenizer).save_pretrained(tmp_path / "toy")
    tokenizer.save_pretrained(tmp_path / "toy")
    args = cli.EvalArguments(model_name_or_path=str(tmp_path / "toy"), data_dir=str(BENCHMARKS),
                             benchmarks=["aime", "aime25", "amc", "math", "minerva", "olympiad_bench", "arc_c",
                                         "gpqa", f"custom={write_jsonl(tmp_path / 'c.jsonl', [{'q': '1+1', 'a': 2}])}"],
                             prompt_column="q", gold_column="a", max_problems_per_benchmark=2,
                             num_samples="aime=2,aime25=2,amc=2", max_new_tokens=8, backend="transformers",
                             output_dir=str(tmp_path / "out"))
    results = cli.main(args)
    assert list(results["benchmarks"]) == ["aime", "aime25", "amc", "math", "minerva", "olympiad_bench", "arc_c",
                                           "gpqa", "custom"]
    assert results["benchmarks"]["aime"]["k"] == 2 and results["benchmarks"]["math"]["k"] == 1
    assert results["run"] == {**results["run"], "generated": 2 * 3 * 2 + 2 * 5 + 1, "backend": "transformers"}
    assert results["averages"]["ood"]["benchmarks"] == ["arc_c", "gpqa"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert ("| model | AIME24 | AIME25 | AMC | MATH-500 | Minerva | Olympiad | custom | Avg | ARC-c | GPQA-d | "
            "OOD avg |") in table and "| toy |" in table
    assert (tmp_path / "out" / "results.png").exists()


def toy_problems(n):
    return [Problem("toy", str(i), tuple(row["prompt"]), row["ground_truth"]) for i, row in enumerate(math_dataset(n))]


def test_callback_logs_metrics_during_training_and_changes_nothing_else(tokenizer, tmp_path):
    from luffy_trl import MixedPolicyGRPOTrainer
    from luffy_trl.toy import boxed_answer_reward

    def trainer_for(folder):
        return MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=boxed_answer_reward,
                                      args=tiny_args(tmp_path / folder), train_dataset=math_dataset(),
                                      processing_class=tokenizer)

    trainer = trainer_for("with")
    trainer.add_callback(LuffyEvalCallback(trainer, toy_problems(3), eval_steps=1, batch_size=4,
                                           protocol=LUFFY.with_overrides(num_samples=2, max_new_tokens=8)))
    trainer.train()
    entries = [h for h in trainer.state.log_history if "eval_bench/toy/avg@2" in h]
    assert [h["step"] for h in entries] == [1, 2]
    expected = {"eval_bench/toy/avg@2", "eval_bench/toy/pass@1", "eval_bench/toy/pass@2", "eval_bench/avg",
                "eval_bench/toy/mean_length", "eval_bench/toy/truncation_rate", "eval_bench/toy/boxed_rate"}
    assert set(entries[0]) == expected | {"epoch", "step"}  # no training metrics flushed into the entry
    assert 1 <= entries[0]["eval_bench/toy/mean_length"] <= 8
    assert trainer.model.training

    plain = trainer_for("without")
    plain.train()
    def training_entries(t):
        return [{k: v for k, v in h.items() if k != "step_time"} for h in t.state.log_history if "loss" in h]

    assert len(training_entries(trainer)) == 2  # the trainer still logs every step, with all its metrics
    assert "off_policy/prob_mean" in training_entries(trainer)[0]
    assert training_entries(trainer) == training_entries(plain)  # same random state, same training


@pytest.mark.slow
@requires_torchrun
def test_callback_on_two_processes(tmp_path):
    ranks = run_two_processes(TWO_PROCESS_SCRIPT, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["entries"] == ranks[1]["entries"]  # every process logs the same, complete metrics
    assert [h["step"] for h in ranks[0]["entries"]] == [1, 2]
    assert all(0 <= h["eval_bench/toy/avg@1"] <= 1 for h in ranks[0]["entries"])


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded two-core machine, two threads made this generation 25 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@requires_smollm
def test_smollm2_on_two_math_problems(one_thread):
    backend = TransformersBackend.from_pretrained(smollm_folder(), gguf_file=SMOLLM_GGUF)
    problems = load_problems(luffy_benchmark("math", BENCHMARKS), max_problems=2)
    summary = evaluate(backend, problems, LUFFY.with_overrides(max_new_tokens=24, temperature=0.0))
    math = summary["benchmarks"]["math"]
    assert math["num_problems"] == 2 and 1 <= math["mean_length"] <= 24
    assert backend.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_equal_shares_pad_every_process_to_the_same_number_of_generate_calls(tokenizer):
    """ZeRO-3 generates with synced_gpus: every process must make as many `generate` calls as the others."""
    from luffy_trl.evaluation.callback import equal_shares

    requests = build_requests(toy_problems(5), LUFFY.with_overrides(num_samples=1), tokenizer)
    for processes in (1, 2, 3, 8):
        shares = [equal_shares(requests, processes, i) for i in range(processes)]
        assert {len(padded) for padded, _ in shares} == {-(-5 // processes)}
        real = [r for padded, n in shares for r in padded[:n]]
        assert real == requests  # contiguous, in order, each once: gather_object restores the global order
        for padded, n in shares:
            assert all(r.sample < 0 for r in padded[n:])  # dummies: keys no real request has
            assert len({r.key for r in padded}) == len(padded)
    padded, n = equal_shares(requests, 8, 7)  # 5 requests on 8 processes: an empty share still generates once
    assert n == 0 and len(padded) == 1 and padded[0].prompt_text == requests[0].prompt_text
