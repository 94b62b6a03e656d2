"""Short versions of the product commands (so they cannot rot): the CPU demo, the comparison, resuming."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "luffy_trl" / "configs" / "recipes" / "demo_cpu.yaml"
SMALL = ["--demo_train_rows", "64", "--demo_heldout_rows", "8",
         "--per_device_train_batch_size", "16"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(ROOT / "examples"))
    spec.loader.exec_module(module)
    return module


def run_train(tmp_path, *extra):
    script = load("train_luffy")
    args = script.make_parser().parse_args_and_config(
        ["--config", str(DEMO), "--output_dir", str(tmp_path), *SMALL, *extra])
    return script.main(*args)


def test_demo_recipe_trains_through_the_script(tmp_path):
    trainer = run_train(tmp_path, "--max_steps", "3", "--demo_heldout_every", "2", "--logging_steps", "1")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(h["off_policy/reward_mean"] == 1.0 for h in logs)  # the worked traces satisfy the strict format
    assert all(h["grad_norm"] > 0 for h in logs)
    assert "heldout/accuracy" in logs[1]
    assert (tmp_path / "model.safetensors").exists()


def test_demo_compare_writes_results_and_curves(tmp_path):
    compare = load("demo_compare")
    results = compare.main(["--output_dir", str(tmp_path), *SMALL, "--max_steps", "3", "--demo_heldout_every", "2"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved.keys() == {"luffy", "grpo"}
    for arm in saved.values():
        assert {"final_accuracy", "accuracy_curve", "train_reward", "grad_norm", "wall_time_s"} <= arm.keys()
        assert [s for s, _ in arm["accuracy_curve"]] == [0, 2, 3]
    # on-policy GRPO from a random init: no reward, so no advantage and no gradient at all
    assert results["grpo"]["train_reward"] == [0.0, 0.0, 0.0]
    assert results["grpo"]["grad_norm"] == [0.0, 0.0, 0.0]
    assert all(g > 0 for g in results["luffy"]["grad_norm"])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_resume_neither_repeats_nor_skips_data(tmp_path, monkeypatch):
    """Prompts seen in steps 3-4 after resuming from step 2 equal those of an uninterrupted 4-step run."""
    from luffy_trl.tasks import sorting

    seen = []
    original = sorting.sorting_reward

    def recording_reward(completions, ground_truth, prompts=None, **kwargs):
        if prompts is not None:  # the trainer's calls (held-out evaluation passes no prompts)
            seen.append([p[-1]["content"] for p in prompts])
        return original(completions, ground_truth)

    monkeypatch.setattr(sorting, "sorting_reward", recording_reward)
    common = ["--demo_heldout_every", "0", "--save_strategy", "steps", "--save_steps", "2"]
    run_train(tmp_path / "full", "--max_steps", "4", *common)
    full = list(seen)
    seen.clear()
    run_train(tmp_path / "part", "--max_steps", "2", *common)
    first_half = list(seen)
    seen.clear()
    run_train(tmp_path / "part", "--max_steps", "4", *common, "--resume_from_checkpoint",
              str(tmp_path / "part" / "checkpoint-2"))
    assert len(full) == 4 and first_half == full[:2]
    assert seen == full[2:]


@pytest.mark.slow
@pytest.mark.smollm
def test_smollm2_lora_real_model_path(tmp_path):
    """The real-model path on CPU: GGUF SmolLM2-135M-Instruct, its chat template, LoRA, math-verify reward,
    metrics, a checkpoint, and reloading base + adapter for inference."""
    from conftest import requires_smollm

    if requires_smollm.args[0]:
        pytest.skip(requires_smollm.kwargs["reason"])
    example = load("smollm2_lora_cpu")
    trainer, answer = example.main(["--max_steps", "2", "--save_steps", "1", "--output_dir", str(tmp_path),
                                    "--max_completion_length", "48", "--demo_train_rows", "16"])
    first = trainer.state.log_history[0]
    assert first["off_policy/reward_mean"] == 1.0  # the worked solutions verify with number_reward
    assert first["off_policy/tokenization_fallback"] == 0  # SmolLM2's ChatML template + trace tokenize jointly
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter_model.safetensors").exists()
    base_params = [n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not base_params
    assert isinstance(answer, str) and answer.strip()
