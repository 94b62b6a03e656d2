"""`luffy-trl convert`: LUFFY / verl launch-script flags -> a recipe, every flag mapped or listed with its reason.

Inputs: a launch script written for these tests (tests/fixtures/verl_launch.sh) and scripts assembled from the flag
lists of LUFFY's four published launch scripts (tests/fixtures/luffy-launch-flags/)."""

import pathlib
import re

import pytest
import yaml
from conftest import FIXTURES

from luffy_trl.cli import main
from luffy_trl.configs import recipe_path
from luffy_trl.convert import convert_overrides, read_overrides, render

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "verl_launch.sh"
FLAGS = FIXTURES / "luffy-launch-flags"


def as_script(flag_file: pathlib.Path) -> str:
    """A launch script around a flag list, in the shape of LUFFY's (shell variables assigned, one override a line)."""
    lines = [line for line in flag_file.read_text().splitlines() if line.strip()]
    return ("#!/bin/bash\nMODEL_PATH=/models/base\nDATA_DIR=/data\nWANDB_PROJECT=luffy\nEXP_NAME=run\n\n"
            "python3 -m verl.mix_src.main_mix_ppo \\\n    " + " \\\n    ".join(lines) + "\n")


def convert_script(text: str):
    overrides, variables = read_overrides(text)
    return overrides, convert_overrides(overrides)


def fields(converted):
    return {name: value for name, (value, _) in converted.fields.items()}


def assert_every_flag_is_accounted_for(overrides, converted):
    text = render(converted)
    for key, _ in overrides:
        assert re.search(rf"(#\s+|, ){re.escape(key)}=", text), f"{key} is neither mapped nor listed"


def parse_recipe(text: str, tmp_path):
    """The converted recipe through the training entry point's parser (unknown or invalid fields raise)."""
    from luffy_trl.train import make_parser

    path = tmp_path / "converted.yaml"
    path.write_text(text)
    return make_parser().parse_args_and_config(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])


def test_reads_a_launch_script():
    overrides, variables = read_overrides(FIXTURE.read_text())
    assert variables["MODEL_PATH"] == "/models/qwen2.5-math-7b-16k-think" and variables["EXP_NAME"] == "luffy-test"
    flags = dict(overrides)
    assert len(overrides) == 28 and "VLLM_ATTENTION_BACKEND" not in flags  # env assignments are not overrides
    assert flags["actor_rollout_ref.model.path"] == "/models/qwen2.5-math-7b-16k-think"  # $VAR substituted
    assert flags["data.train_files"] == "./data/openr1.parquet"  # ${VAR} substituted
    assert flags["actor_rollout_ref.actor.off_policy_reshape"] == "p_div_p_0.5"  # shell quotes removed
    assert flags["trainer.logger"] == "[console,wandb]"
    assert flags["trainer.val_before_train"] == "False"  # Hydra's + prefix
    assert flags["trainer.total_epochs"] == "2"  # the trailing comment is not a flag


def test_loss_options_and_geometry_of_a_script(tmp_path):
    overrides, converted = convert_script(FIXTURE.read_text())
    got = fields(converted)
    assert got["model_name_or_path"] == "/models/qwen2.5-math-7b-16k-think"
    assert (got["num_generations"], got["num_off_policy"], got["off_policy_loss"]) == (8, 1, "luffy")
    assert (got["off_policy_shaping"], got["policy_shaping_gamma"]) == ("luffy", 0.5)
    assert (got["on_policy_shaping"], got["on_policy_shaping_exponent"]) == ("pow", 0.7)
    assert (got["off_policy_max_clip"], got["off_policy_min_clip"], got["max_token_prob"]) == (0.8, None, 0.99)
    assert (got["epsilon"], got["epsilon_high"]) == (0.2, 0.5)  # upper clip max(1.5, 1.2) = 1 + 0.5
    assert got["on_policy_clip"] is True and got["loss_type"] == "bnpo"  # LUFFY's defaults when the flags are absent
    assert (got["scale_rewards"], got["beta"]) == ("group", 0.001)
    # 16 prompts × 8 = 128 sequences per step on 4 GPUs = 8 × GA 4 × 4; 32 × 8 = 256 per rollout: 2 steps
    assert (got["per_device_train_batch_size"], got["gradient_accumulation_steps"], got["steps_per_generation"]) == \
        (8, 4, 8)
    assert got["report_to"] == ["wandb"] and got["run_name"] == "luffy-test"
    unmapped = {flag: reason for flag, _, reason in converted.unmapped}
    assert "unknown to the converter" in unmapped["actor_rollout_ref.rollout.mystery_knob"]
    assert "Ray placement" in unmapped["trainer.n_gpus_per_node"]
    assert_every_flag_is_accounted_for(overrides, converted)
    _, args, _ = parse_recipe(render(converted), tmp_path)
    assert args.max_token_prob == 0.99 and args.on_policy_shaping == "pow"


# converted field -> the packaged recipe that reproduces each published script
SCRIPTS = {
    "train.flags": "qwen2.5-math-7b",
    "train_on_policy.flags": "grpo_baseline",
    "train_rl_sft_loss.flags": "rl_sft_loss",
    "train_sft_rl.flags": "grpo_baseline",
}
SAME_AS_RECIPE = ["num_generations", "num_off_policy", "off_policy_loss", "on_policy_clip", "loss_type",
                  "scale_rewards", "entropy_coef", "beta", "learning_rate", "lr_scheduler_type",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                  "max_completion_length", "max_prompt_length", "temperature", "save_steps", "reward_funcs",
                  "gradient_checkpointing", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_luffys_published_scripts_convert_to_the_packaged_recipes(name, tmp_path):
    overrides, converted = convert_script(as_script(FLAGS / name))
    got = fields(converted)
    recipe = yaml.safe_load(recipe_path(SCRIPTS[name]).read_text())
    for key in SAME_AS_RECIPE:
        assert got[key] == recipe.get(key, got[key] if key == "off_policy_loss" else None), key
    if name == "train.flags":
        assert (got["off_policy_shaping"], got["policy_shaping_gamma"]) == ("luffy", 0.1)
    else:
        assert "off_policy_shaping" not in got  # no shaped teacher term in the baselines
    assert got["model_name_or_path"] == "/models/base"
    assert_every_flag_is_accounted_for(overrides, converted)
    assert len(converted.fields) + len(converted.unmapped) >= 40
    assert not converted.unknown and not converted.differs, (converted.unknown, converted.differs)  # exit status 0
    parse_recipe(render(converted, source=name), tmp_path)


def test_refusals_name_the_reason():
    overrides = [("actor_rollout_ref.rollout.min_prefix_ratio", "0.5"), ("actor_rollout_ref.rollout.max_prefix_ratio",
                                                                         "0.8"),
                 ("actor_rollout_ref.actor.off_policy_loss_impl", "seq"), ("data.reward_impl_version", "1"),
                 ("algorithm.kl_ctrl.kl_coef", "0.01"), ("actor_rollout_ref.actor.use_off_policy_probs", "True")]
    converted = convert_overrides(overrides)
    reasons = " | ".join(f"{flag}={value}: {reason}" for flag, value, reason in converted.unmapped)
    assert "partial prefixes" in reasons
    assert "off_policy_loss_impl=seq: only the token-level off-policy loss exists (refused)" in reasons
    assert "reward_impl_version=3" in reasons and "kl_coef=0.01: reward-level KL penalty" in reasons
    assert "off_policy_logprobs_column" in reasons
    # partial prefixes: the recipe says what it trains (whole traces) and the conversion is flagged as differing
    assert converted.fields["num_off_policy"][0] == 1 and "WHOLE traces" in converted.fields["num_off_policy"][1]
    differs = " | ".join(f"{flag}: {reason}" for flag, reason in converted.differs)
    for refused in ("partial prefixes", "off_policy_loss_impl=seq", "reward_impl_version=1", "kl_coef=0.01",
                    "use_off_policy_probs=True"):
        assert refused in differs, refused


def test_cli_convert(tmp_path, capsys):
    # the fixture has one flag the converter does not know: exit 1, said on stderr and in the recipe's header
    assert main(["convert", str(FIXTURE)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("# Converted from") and "\nmax_token_prob: 0.99" in captured.out
    assert "# UNKNOWN FLAG: actor_rollout_ref.rollout.mystery_knob=3" in captured.out
    assert "1 unknown" in captured.err and "UNKNOWN: actor_rollout_ref.rollout.mystery_knob=3" in captured.err
    assert "does NOT train what the script trains" in captured.err
    target = tmp_path / "recipe.yaml"
    assert main(["convert", str(FIXTURE), "-o", str(target), "--gpus", "8", "--allow_differences", "--check"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {target}" in err and "check: recipe parses: model /models/qwen2.5-math-7b-16k-think" in err
    recipe = yaml.safe_load(target.read_text())
    assert recipe["gradient_accumulation_steps"] == 2
    assert (recipe["dtype"], recipe["seed"], recipe["output_dir"]) == ("bfloat16", 47, "outputs/luffy-test")
    empty = tmp_path / "empty.sh"
    empty.write_text("echo hello\n")
    assert main(["convert", str(empty)]) == 2


# The arguments of LUFFY's compute_token_on_off_policy_loss (mix_core_alg.py), as the actor config names them.
LOSS_ARGUMENTS = ["clip_ratio", "clip_upper_bound", "loss_remove_clip", "loss_remove_token_mean", "prefix_mask",
                  "off_policy_reshape", "off_policy_reshape_weight", "off_policy_reshape_pow_exp",
                  "off_policy_max_clip", "off_policy_min_clip", "all_max_clip", "on_policy_reshape",
                  "on_policy_reshape_weight", "on_policy_reshape_pow_exp", "target_probs", "off_policy_cliprange",
                  "off_policy_normalize", "off_abs_cliprange", "use_off_policy_loss", "off_policy_loss_impl"]


def test_migrating_doc_lists_every_flag_and_loss_option():
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md").read_text()
    for flag_file in sorted(FLAGS.glob("*.flags")):
        overrides, _ = read_overrides(flag_file.read_text())
        for key, _ in overrides:
            assert f"| `{key}` |" in doc, f"docs/migrating.md has no row for {key} ({flag_file.name})"
    for name in LOSS_ARGUMENTS:
        assert f"`{name}`" in doc or f"({name})" in doc or f"`{name} " in doc, name


def run_convert(tmp_path, script: str, *extra) -> tuple[int, dict, str]:
    path = tmp_path / "script.sh"
    path.write_text(script)
    target = tmp_path / "recipe.yaml"
    status = main(["convert", str(path), "-o", str(target), *extra])
    return status, yaml.safe_load(target.read_text()), target.read_text()


PLAIN_GRPO = """ROOT=/home/me
DATA=$ROOT/data
gsm8k_train_path=$DATA/gsm8k/train.parquet
math_train_path=${DATA}/math/train.parquet
train_files="['$gsm8k_train_path', '$math_train_path']"
python3 -m verl.trainer.main_ppo algorithm.adv_estimator=grpo data.train_files="$train_files" \\
    data.val_files=${VAL:-/val.parquet} actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B \\
    actor_rollout_ref.actor.entropy_coef=0.001 actor_rollout_ref.rollout.n=5
"""


def test_plain_verl_grpo_script_is_said_to_be_plain_grpo(tmp_path, capsys):
    status, recipe, text = run_convert(tmp_path, PLAIN_GRPO)
    err = capsys.readouterr().err
    assert status == 1  # a list of train files and a mistyped flag: the recipe differs from the script
    assert (recipe["num_off_policy"], recipe["on_policy_clip"], recipe["num_generations"]) == (0, True, 5)
    assert "no LUFFY flag in the script" in err and "# NOTE: no LUFFY flag in the script" in text
    # variables built from variables, ${VAR}, and the list of files
    assert recipe["dataset_name"] == "/home/me/data/gsm8k/train.parquet"
    assert "DIFFERS: data.train_files=['/home/me/data/gsm8k/train.parquet', '/home/me/data/math/train.parquet']: " \
           "2 training files" in err
    assert "data.val_files=/val.parquet" in text  # ${VAR:-default} takes its default
    assert "UNKNOWN: actor_rollout_ref.actor.entropy_coef=0.001 (did you mean actor.entropy_coeff?)" in err
    assert "defaulted: loss_type='bnpo' (not set in the script: verl's default" in err


def test_unresolved_variables_and_missing_group_size_are_reported(tmp_path, capsys):
    script = ("python3 -m verl.mix_src.main_mix_ppo data.train_files=$ROOT/data//openr1.parquet "
              "actor_rollout_ref.rollout.n_prefix=1 actor_rollout_ref.actor.use_off_policy_loss=True\n")
    status, recipe, _ = run_convert(tmp_path, script)
    err = capsys.readouterr().err
    assert status == 1 and recipe["num_off_policy"] == 1
    assert "DIFFERS: data.train_files=$ROOT/data//openr1.parquet: unresolved shell variable(s) $ROOT" in err
    assert "the script does not set rollout.n" in err
    assert run_convert(tmp_path, "ROOT=/x\n" + script.replace("n_prefix=1", "n_prefix=1 "
                                                                "actor_rollout_ref.rollout.n=8"))[0] == 0


def test_check_fails_on_a_recipe_the_trainer_refuses(tmp_path, capsys):
    script = ("python3 -m verl.mix_src.main_mix_ppo actor_rollout_ref.rollout.n=8 actor_rollout_ref.rollout.n_prefix=8 "
              "actor_rollout_ref.actor.use_off_policy_loss=True\n")
    status, _, _ = run_convert(tmp_path, script, "--check")
    assert status == 1 and "check FAILED" in capsys.readouterr().err  # num_off_policy must stay below the group
