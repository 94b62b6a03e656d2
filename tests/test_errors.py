"""Bad input gets a clear error at construction time, or a counted fallback (tested in test_training.py)."""

import pytest
from conftest import build_model, contains_answer_reward, math_dataset, tiny_args
from trl import GRPOConfig

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer


def make(tokenizer, args, dataset=None, **kwargs):
    return MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, args=args,
        train_dataset=dataset if dataset is not None else math_dataset(), processing_class=tokenizer, **kwargs,
    )


@pytest.mark.parametrize("k", [4, 5])
def test_num_off_policy_must_leave_an_on_policy_slot(tmp_path, k):
    with pytest.raises(ValueError, match=r"num_off_policy \(\d\) must be smaller than num_generations \(4\)"):
        tiny_args(tmp_path, num_off_policy=k)


def test_negative_num_off_policy(tmp_path):
    with pytest.raises(ValueError, match="num_off_policy must be an integer >= 0"):
        tiny_args(tmp_path, num_off_policy=-1)


def test_invalid_shaping_and_gamma(tmp_path):
    with pytest.raises(ValueError, match="off_policy_shaping must be one of"):
        tiny_args(tmp_path, off_policy_shaping="sqrt")
    with pytest.raises(ValueError, match="policy_shaping_gamma must be > 0"):
        tiny_args(tmp_path, policy_shaping_gamma=0.0)


def test_delta_without_clip(tmp_path):
    with pytest.raises(ValueError, match="on_policy_clip=True"):
        tiny_args(tmp_path, delta=2.0)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_delta_is_ignored_outside_the_ppo_family_as_in_trl(tmp_path, loss_type):
    """TRL applies delta to the PPO family only; a TRL user's delta with cispo/sapo/vespo is not an error."""
    assert tiny_args(tmp_path, loss_type=loss_type, delta=2.0).delta == 2.0


def test_missing_column_is_named_with_the_columns_present(tokenizer, tmp_path):
    expected = r"off_policy_column='teacher'.*columns present: \['prompt', 'ground_truth', 'target'\]"
    with pytest.raises(ValueError, match=expected):
        make(tokenizer, tiny_args(tmp_path, off_policy_column="teacher"))


def test_missing_column_is_fine_for_plain_grpo(tokenizer, tmp_path):
    make(tokenizer, tiny_args(tmp_path, num_off_policy=0), dataset=math_dataset(target=False))


def test_plain_grpo_config_is_rejected(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="needs a MixedPolicyGRPOConfig, got a GRPOConfig"):
        make(tokenizer, GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss_type": "gspo"}, "loss_type='gspo'"),
        ({"remove_unused_columns": True}, "remove_unused_columns=True: it drops the teacher column 'target'"),
    ],
)
def test_unsupported_options_are_refused_at_construction(tokenizer, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(tokenizer, tiny_args(tmp_path, **overrides))


def test_reserved_is_off_policy_column(tokenizer, tmp_path):
    dataset = math_dataset().add_column("is_off_policy", [False] * 8)
    with pytest.raises(ValueError, match="column named 'is_off_policy'"):
        make(tokenizer, tiny_args(tmp_path), dataset=dataset)


def test_bad_teacher_value_is_refused_at_construction(tokenizer, tmp_path):
    dataset = math_dataset().remove_columns("target").add_column("target", [[1, 2]] * 8)
    with pytest.raises(TypeError, match=r"Column 'target' \(row 0\).*Fix the dataset"):
        make(tokenizer, tiny_args(tmp_path, max_steps=1), dataset=dataset)


def test_bad_teacher_value_mid_run_is_counted_not_fatal(tokenizer, tmp_path, monkeypatch):
    # a malformed row beyond the checked head
    monkeypatch.setattr("luffy_trl.trainer.mixed_policy.ROWS_CHECKED_AT_INIT", 0)
    dataset = math_dataset().remove_columns("target").add_column("target", [[1, 2]] * 8)
    trainer = make(tokenizer, tiny_args(tmp_path, max_steps=1), dataset=dataset)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["off_policy/invalid"] == 2 and log["off_policy/missing"] == 0
    assert log["off_policy/fraction_of_rows"] == 0


def test_default_config_needs_no_arguments():
    config = MixedPolicyGRPOConfig(output_dir="unused", use_cpu=True)
    assert (config.num_off_policy, config.num_generations) == (1, 8)
