"""Every recipe and every accelerate config loads, with no unknown or invalid field."""

import importlib.util
import pathlib
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "luffy_trl" / "configs"
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def load_script():
    spec = importlib.util.spec_from_file_location("train_luffy", ROOT / "examples" / "train_luffy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_luffy"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def parse_recipe(path, *extra):
    from luffy_trl.configs import recipe_path

    script = load_script()
    return script.make_parser().parse_args_and_config(["--config", str(recipe_path(str(path))), *extra])


def test_every_recipe_is_listed():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5-math-7b.yaml", "qwen2.5-math-1.5b.yaml", "qwen2.5-7b-instruct.yaml", "lora_24gb.yaml",
            "grpo_baseline.yaml", "demo_cpu.yaml", "smollm2_lora_cpu.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_known_fields(path):
    config = yaml.safe_load(path.read_text())
    script_args, training_args, model_args = parse_recipe(path, "--use_cpu", "true", "--bf16", "false")
    parsed = {**vars(model_args), **vars(script_args), **training_args.to_dict()}
    for key, value in config.items():
        if key in ("use_cpu", "bf16"):
            continue
        got = parsed[key]
        got = getattr(got, "value", got)
        if key == "report_to":
            assert list(got) == ([] if value == "none" else value)
        else:
            assert got == value or str(got) == str(value), (key, got, value)


def test_unknown_field_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "recipes" / "demo_cpu.yaml").read_text() + "\nnum_off_polcy: 2\n")
    with pytest.raises(ValueError, match="num_off_polcy"):
        parse_recipe(bad)


def test_invalid_value_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "recipes" / "demo_cpu.yaml").read_text().replace(
        "num_off_policy: 1", "num_off_policy: 8"))
    with pytest.raises(ValueError, match="must be smaller than num_generations"):
        parse_recipe(bad)


def test_paper_recipe_matches_luffy_geometry():
    _, args, _ = parse_recipe("qwen2.5-math-7b", "--use_cpu", "true")
    gpus = 8
    assert args.per_device_train_batch_size * args.steps_per_generation * gpus == 128 * 8  # rollout
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == 64 * 8  # mini-batch
    assert (args.num_generations, args.num_off_policy, args.policy_shaping_gamma) == (8, 1, 0.1)
    assert (args.loss_type, args.scale_rewards, args.entropy_coef, args.beta) == ("luffy", "none", 0.001, 0.0)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (1e-6, 0.01, 1.0)
    assert args.max_completion_length == 8192 and args.on_policy_clip is False


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert config.mixed_precision == "bf16"
    if "zero" in path.name:
        assert config.distributed_type == "DEEPSPEED"
        assert config.deepspeed_config["zero_stage"] == int(path.name[4])
        offload = "offload" in path.name
        assert (config.deepspeed_config["offload_param_device"] == "cpu") == offload


def test_accelerate_configs_are_present():
    assert {p.name for p in ACCELERATE} == {"single_gpu.yaml", "multi_gpu.yaml", "zero2.yaml", "zero3.yaml",
                                             "zero3_offload.yaml"}
