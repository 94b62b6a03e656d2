"""Every metric a LUFFY training run logs is documented in docs/metrics.md."""

import pathlib
import re

from conftest import build_model, contains_answer_reward, math_dataset, tiny_args

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.rewards import luffy_math_reward

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step", "step_time", "num_tokens"}


def test_every_logged_metric_is_documented(tokenizer, tmp_path):
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=[contains_answer_reward, luffy_math_reward],
        train_dataset=math_dataset(), processing_class=tokenizer,
        args=tiny_args(tmp_path, max_steps=1, on_policy_clip=True, max_completion_length=40),
    )
    trainer.train()
    logged = set(trainer.state.log_history[0]) - TRAINER_KEYS
    logged = {re.sub(r"^rewards/[^/]+/", "rewards/<fn>/", k) for k in logged}
    documented = set(re.findall(r"`([a-z_]+(?:/[a-z_<>]+)*)`", DOCS.read_text()))
    assert {"off_policy/prob_mean", "groups/all_on_policy_failed", "on_policy/reward_mean",
            "rewards/<fn>/timeouts"} <= logged
    assert trainer.state.log_history[0]["rewards/luffy_math_reward/mean"] > 0  # the teacher traces verify
    assert not logged - documented, sorted(logged - documented)
