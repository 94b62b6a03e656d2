"""`padding_free_batches` combined with the loss options merged alongside it: every optimiser step's gradient still
equals the switch-off arm's (tests/test_batching_trainer.py covers the plain loss types and geometries)."""

import math

import pytest
import torch
from batching_cases import (
    assert_same_gradients,
    cache_generation,
    cut_lengths,
    make_trainer,
    step_gradients,
    varied_dataset,
)
from conftest import attach_fake_vllm_server

from luffy_trl.trainer import generation as trainer_generation

LENGTHS = [3, 20, 5, 7, 2, 24, 9, 4, 11, 30]  # 24 and 30 reach max_completion_length: truncated rows
# The cut layout (rows cut to their longest one): these tests are about the planner's row assignment, whose unequal
# micro-batches some of them need; the packed layouts have their own tests (test_packing*.py).
COMMON = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
          "max_completion_length": 24, "entropy_coef": 0.0, "off_policy_trigger": "all_fail",
          "pack_sequences": "never"}


def set_loss(trainer, loss_type):
    trainer.args.loss_type = trainer.loss_type = loss_type


@pytest.mark.slow
def test_max_token_prob_truncation_mask_and_teacher_logprobs(tokenizer, tmp_path, monkeypatch):
    """LUFFY's geometry (spg = 2·GA, old log-probs) with `max_token_prob` dropping some tokens, truncated completions
    masked and teacher log-probs (π_θ/π_φ). bnpo with `max_token_prob` divides by the micro-batch's kept tokens,
    which no plan can know before the forward: its rows stay TRL's (trim only) and its gradient is TRL's."""
    monkeypatch.setattr(trainer_generation, "align_teacher_logprobs",
                        lambda values, full, kept: [-0.05 * (i % 7) for i in range(kept)])
    dataset = varied_dataset().add_column("teacher_logps", [[-0.1]] * 16)
    trainer = make_trainer(tokenizer, tmp_path, dataset=dataset, steps_per_generation=4, max_token_prob=0.0028,
                           mask_truncated_completions=True, off_policy_logprobs_column="teacher_logps", **COMMON)
    cut_lengths(trainer, LENGTHS)
    cache_generation(trainer)
    for loss_type in ("bnpo", "grpo", "dr_grpo", "dapo", "luffy"):
        set_loss(trainer, loss_type)
        on, chunks_on = step_gradients(trainer, True)
        dropped = trainer._metrics["train"]["dropped_token_fraction"][-4:]
        # a micro-batch without teacher tokens logs NaN (left out of the logged average), not 0
        prob_mean = trainer._metrics["train"]["off_policy/prob_mean"][-4:]
        has_teacher = [bool((c["completion_mask"][c["is_off_policy"]] > 0).any()) for c in chunks_on]
        assert [not math.isnan(p) for p in prob_mean] == has_teacher and not all(has_teacher)
        off, chunks_off = step_gradients(trainer, False)
        assert_same_gradients(on, off)
        assert 0.0 < sum(dropped) / len(dropped) < 1.0  # max_token_prob dropped some tokens, not all
        rows_on = [c["completion_ids"].size(0) for c in chunks_on]
        active_off = [int((c["completion_mask"].sum(1) > 0).sum()) for c in chunks_off]
        assert (rows_on == active_off) == (loss_type == "bnpo")  # rows moved between micro-batches, except for bnpo
    truncated = [(~c["is_off_policy"] & (c["completion_mask"].sum(1) == 0)).any() for c in chunks_off]
    assert any(truncated)
    teacher = torch.cat([c["teacher_per_token_logps"][c["is_off_policy"]].flatten() for c in chunks_on])
    assert (teacher < 0).any()


@pytest.mark.slow
def test_vllm_importance_sampling_kl_bias_correction_and_two_iterations(tokenizer, tmp_path):
    """vLLM's importance-sampling correction (fake server: the old-log-prob forward skips teacher rows), beta > 0
    with `use_bias_correction_kl` (PEFT reference) and num_iterations = 2."""
    from peft import LoraConfig

    trainer = make_trainer(tokenizer, tmp_path, steps_per_generation=2, num_iterations=2, beta=0.04,
                           use_bias_correction_kl=True, vllm_importance_sampling_mode="token_truncate",
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           **{**COMMON, "off_policy_trigger": "always"})
    attach_fake_vllm_server(trainer)
    cut_lengths(trainer, LENGTHS)
    cache_generation(trainer)
    for loss_type in ("grpo", "dapo"):
        set_loss(trainer, loss_type)
        on, chunks_on = step_gradients(trainer, True)
        off, _ = step_gradients(trainer, False)
        assert_same_gradients(on, off)
    teacher = torch.cat([c["is_off_policy"] for c in chunks_on])
    assert teacher.any() and all("importance_sampling_ratio" in c for c in chunks_on)
    assert all((c["old_per_token_logps"][c["is_off_policy"]] == 0).all() for c in chunks_on)  # never computed


def entropy_gradient(trainer, switch):
    """The entropy bonus's part of the first optimiser step's gradient (coef 5 minus coef 0)."""
    grads = []
    for coef in (5.0, 0.0):
        trainer.args.entropy_coef = trainer.entropy_coef = coef
        trainer._entropy_bonus_enabled = coef != 0.0
        grads.append(step_gradients(trainer, switch)[0][0])
    return {name: grads[0][name] - grads[1][name] for name in grads[0]}


@pytest.mark.slow
def test_luffy_loss_type_entropy_term_with_the_switch(tokenizer, tmp_path):
    """loss_type="luffy" (no ÷GA): the policy term keeps the switch-off gradient; the entropy term of a step of K = 2
    micro-batches is 2 × the step's token mean (docs/batching.md), i.e. twice that of one micro-batch holding the
    whole step, where the switch-off arm sums two per-micro-batch means (different with unequal token counts)."""
    split = make_trainer(tokenizer, tmp_path / "split", steps_per_generation=2, loss_type="luffy", **COMMON)
    whole = make_trainer(tokenizer, tmp_path / "whole", loss_type="luffy",
                         **{**COMMON, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1})
    for trainer in (split, whole):
        cut_lengths(trainer, LENGTHS)
        cache_generation(trainer)
    assert_same_gradients(step_gradients(split, True)[0], step_gradients(split, False)[0])
    chunks = step_gradients(split, True)[1]
    tokens = [int(c["completion_mask"].sum()) for c in chunks]
    assert tokens[0] != tokens[1]
    on, off, reference = entropy_gradient(split, True), entropy_gradient(split, False), entropy_gradient(whole, False)
    twice = {name: 2 * g for name, g in reference.items()}
    assert_same_gradients([on], [twice], rtol=1e-4)  # the entropy head accumulates in float32
    name = "model.embed_tokens.weight"
    assert not torch.allclose(off[name], twice[name], rtol=1e-2)
