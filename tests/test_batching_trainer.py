"""`padding_free_batches` in the real trainer: every optimiser step's gradient equals the switch-off arm's."""

import pathlib

import pytest
import torch
from batching_cases import (
    assert_same_gradients,
    cache_generation,
    cut_lengths,
    make_trainer,
    step_gradients,
)
from conftest import requires_torchrun, run_two_processes

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_batching.py"
LENGTHS = [3, 20, 5, 7, 2, 24, 9, 4, 11]  # on-policy completions cut to these lengths (+ EOS)
# (per-device rows, GA, steps_per_generation, num_iterations): no accumulation; spg = GA; LUFFY's spg = 2·GA
# (old log-probs computed, two optimiser steps per generation batch); μ = 2.
GEOMETRIES = {"no_ga": (8, 1, 1, 1), "spg_eq_ga": (4, 2, 2, 1), "luffy_spg_2ga": (4, 2, 4, 1), "mu2": (4, 2, 2, 2)}


@pytest.fixture(scope="module")
def trainers(tokenizer, tmp_path_factory):
    built = {}
    for name, (rows, ga, spg, mu) in GEOMETRIES.items():
        trainer = make_trainer(tokenizer, tmp_path_factory.mktemp(name), per_device_train_batch_size=rows,
                               gradient_accumulation_steps=ga, steps_per_generation=spg, num_iterations=mu,
                               num_generations=4, max_completion_length=24, entropy_coef=0.0,
                               off_policy_trigger="all_fail")
        cut_lengths(trainer, LENGTHS)
        cache_generation(trainer)
        built[name] = trainer
    return built


def set_loss(trainer, loss_type):
    trainer.args.loss_type = trainer.loss_type = loss_type


@pytest.mark.slow
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_every_optimiser_step_has_the_switch_off_gradient(trainers, geometry):
    trainer = trainers[geometry]
    for loss_type in ("grpo", "dr_grpo", "dapo") if geometry != "mu2" else ("dapo",):
        set_loss(trainer, loss_type)
        on, chunks_on = step_gradients(trainer, True)
        off, chunks_off = step_gradients(trainer, False)
        assert_same_gradients(on, off)
    computed = sum(c["prompt_ids"].numel() + c["completion_ids"].numel() for c in chunks_on)
    padded = sum(c["prompt_ids"].numel() + c["completion_ids"].numel() for c in chunks_off)
    assert computed < 0.8 * padded  # the comparison ran on trimmed, reassigned micro-batches
    if geometry != "no_ga":  # rows moved between micro-batches (TRL's are all the same size)
        assert len({c["completion_ids"].size(0) for c in chunks_on}) > 1
    assert any((c["completion_mask"].sum(1) == 0).any() for c in chunks_off)  # excluded teacher rows existed...
    assert not any((c["completion_mask"].sum(1) == 0).any() for c in chunks_on)  # ...and were not computed


def set_entropy(trainer, coef):
    trainer.args.entropy_coef = trainer.entropy_coef = coef
    trainer._entropy_bonus_enabled = coef != 0.0


@pytest.mark.slow
def test_token_means_are_taken_over_the_optimiser_step(trainers):
    """With the switch on, bnpo and the entropy bonus divide each micro-batch's token sum by the mean token count of
    the step's micro-batches: the step's gradient is that of the token mean over all its tokens, which is what one
    micro-batch holding the whole step computes (GA = 1, 8 rows) with the switch off, and independent of how the
    rows are assigned. TRL's own value (switch off, GA = 2) is a mean of two per-micro-batch means: different."""
    split, whole = trainers["spg_eq_ga"], trainers["no_ga"]  # the same 8 rows per optimiser step
    for loss_type, coef in (("bnpo", 0.0), ("dapo", 0.05), ("bnpo", 0.05)):
        for trainer in (split, whole):
            set_loss(trainer, loss_type)
            set_entropy(trainer, coef)
        try:
            on, _ = step_gradients(split, True)
            reference, chunks = step_gradients(whole, False)
            trl_split, _ = step_gradients(split, False)
        finally:
            for trainer in (split, whole):
                set_entropy(trainer, 0.0)
        assert chunks[0]["completion_ids"].size(0) == 8
        assert_same_gradients(on, reference)
        if loss_type == "bnpo":
            name = next(iter(on[0]))
            assert not torch.allclose(trl_split[0][name], on[0][name], rtol=1e-4)


@pytest.mark.slow
def test_old_log_probs_skip_teacher_rows_and_match_elsewhere(trainers):
    trainer = trainers["luffy_spg_2ga"]  # GA % spg != 0: TRL computes old log-probs
    batch = next(iter(trainer.get_train_dataloader()))
    outputs = {}
    for switch in (True, False):
        trainer.args.padding_free_batches = switch
        torch.manual_seed(5)
        outputs[switch] = type(trainer)._generate_and_score_completions(trainer, batch)  # not the test cache
    on, off = outputs[True], outputs[False]
    assert torch.equal(on["completion_ids"], off["completion_ids"])
    teacher = on["is_off_policy"]
    assert teacher.any() and (~teacher).any()
    mask = on["completion_mask"].bool() & ~teacher.unsqueeze(1)
    torch.testing.assert_close(on["old_per_token_logps"][mask], off["old_per_token_logps"][mask], rtol=1e-9,
                               atol=1e-9)
    assert (on["old_per_token_logps"][teacher] == 0).all()  # never computed, never read
    assert (off["old_per_token_logps"][teacher] != 0).any()
    metric = trainer._metrics["train"]["batching/logprob_computed_tokens"]
    assert metric[-2] < 0.7 * metric[-1]  # on, then off


@pytest.mark.slow
@requires_torchrun
@pytest.mark.parametrize("packed", [False, True], ids=["trimmed", "packed"])
def test_two_processes_same_gradients_and_forward_counts(tmp_path, monkeypatch, packed):
    monkeypatch.setenv("LUFFY_TEST_PACK", "1" if packed else "0")
    ranks = run_two_processes(SCRIPT, tmp_path)
    assert [r["packed"] for r in ranks] == [packed, packed]
    if packed:  # every forward ran packed: only real tokens computed
        assert all(r["fallbacks"] == 0 and all(x == 1.0 for x in r["ratios"]) for r in ranks)
    for rank in ranks:
        for loss_type, difference in rank["relative_difference"].items():
            assert difference < 1e-6, (rank["rank"], loss_type, difference)
        assert rank["changed"] > 0 and rank["ratios"]
    assert ranks[0]["nograd_forwards"] == ranks[1]["nograd_forwards"] > 0
    # the ranks planned different numbers of forwards: the one with fewer ran dummies to match
    assert ranks[0]["planned_forwards"] != ranks[1]["planned_forwards"]
    assert ranks[0]["rows"] != ranks[1]["rows"] or any(len(set(r["rows"]["dapo"])) > 1 for r in ranks)


@pytest.mark.slow
def test_reference_log_probs_cover_teacher_rows(tokenizer, tmp_path):
    """beta > 0 (PEFT: the reference is the model with its adapter disabled): TRL's second no-grad call. The old
    log-probs skip teacher rows, the reference ones must not (the KL covers teacher tokens)."""
    from peft import LoraConfig

    trainer = make_trainer(tokenizer, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           steps_per_generation=4, num_generations=4, max_completion_length=24, beta=0.04,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cut_lengths(trainer, LENGTHS)
    batch = next(iter(trainer.get_train_dataloader()))
    outputs = {}
    for switch in (True, False):
        trainer.args.padding_free_batches = switch
        torch.manual_seed(1)
        outputs[switch] = trainer._generate_and_score_completions(batch)
    on, off = outputs[True], outputs[False]
    mask = on["completion_mask"].bool()
    teacher = on["is_off_policy"].unsqueeze(1) & mask
    assert teacher.any()
    torch.testing.assert_close(on["ref_per_token_logps"][mask], off["ref_per_token_logps"][mask], rtol=1e-9, atol=1e-9)
    assert (on["old_per_token_logps"][teacher] == 0).all() and (on["ref_per_token_logps"][teacher] != 0).all()
