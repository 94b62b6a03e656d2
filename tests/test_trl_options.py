"""Every TRL 1.16 GRPO option under `MixedPolicyGRPOTrainer`: at `num_off_policy=0` the same training as stock
`GRPOTrainer` (every loss type, GSPO, adaptive entropy, `evaluate()` before training with each eval-dataset shape),
and with teacher rows a real training run for every on-policy objective (docs/configuration.md has the table)."""

import logging
import math

import pytest
import torch
from conftest import build_model, contains_answer_reward, math_dataset, tiny_args
from datasets import IterableDataset
from trl import GRPOConfig, GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer


def varied_reward(completions, **kwargs):
    """A reward with variance on random models: depends on the completion length."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 3) / 2 for t in texts]


COMMON = dict(
    use_cpu=True, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=12, max_steps=3, learning_rate=1e-2, report_to="none", save_strategy="no",
    logging_steps=1, seed=0, disable_tqdm=True, loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.0,
    weight_decay=0.0, lr_scheduler_type="constant", epsilon_high=0.28, gradient_accumulation_steps=2,
    steps_per_generation=4,  # two optimiser steps per generation batch: the ratio leaves 1, clipping matters
)
# option name -> GRPOConfig overrides; every one is an option this trainer refused at num_off_policy=0 before.
OPTIONS = {
    "cispo": dict(loss_type="cispo", epsilon_high=1.05),
    "sapo": dict(loss_type="sapo"),
    "vespo": dict(loss_type="vespo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "gspo_dapo": dict(loss_type="dapo", importance_sampling_level="sequence"),
    "adaptive_entropy": dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0),
}

# Options that already worked at num_off_policy=0: kept equal to stock by the same test.
OPTIONS_KEPT = {
    "bnpo": dict(loss_type="bnpo"),
    "dapo": dict(loss_type="dapo"),
    "beta_sync_ref": dict(beta=0.04, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
    "bias_corrected_kl_delta": dict(beta=0.04, use_bias_correction_kl=True, delta=1.5),
    "entropy_filter_opsm": dict(top_entropy_quantile=0.5, off_policy_mask_threshold=0.01),
    "mask_truncated_completions": dict(mask_truncated_completions=True, max_completion_length=16),
    "num_iterations": dict(num_iterations=2, gradient_accumulation_steps=1, steps_per_generation=1),
    "scale_rewards_batch_sum": dict(scale_rewards="batch", multi_objective_aggregation="sum_then_normalize"),
    "static_entropy_bonus": dict(loss_type="grpo", entropy_coef=0.01),
}


# Token-mean metrics of a micro-batch without loss tokens: TRL logs 0 (0/1), luffy-trl NaN, left out of the logged
# average (padding-free micro-batches group such rows); the loss and the parameters are the same.
EMPTY_MICRO_BATCH_METRICS = {"mask_truncated_completions": ("entropy", "clip_ratio")}


def run_pair(tmp_path, tokenizer, overrides, **trainer_kwargs):
    """Stock GRPOTrainer and MixedPolicyGRPOTrainer (num_off_policy=0, on_policy_clip=True), same config, trained.
    The model is loaded from a saved folder (with `beta > 0` TRL loads the reference model from its name)."""
    common = {**COMMON, **overrides}
    path = tmp_path / "model"
    build_model(tokenizer).save_pretrained(path)
    stock = GRPOTrainer(model=str(path), reward_funcs=varied_reward,
                        args=GRPOConfig(output_dir=str(tmp_path / "stock"), **common), train_dataset=math_dataset(),
                        processing_class=tokenizer, **trainer_kwargs)
    stock.train()
    ours = MixedPolicyGRPOTrainer(model=str(path), reward_funcs=varied_reward,
                                  args=tiny_args(tmp_path / "ours", num_off_policy=0, on_policy_clip=True,
                                                 padding_free_batches=False, **common),
                                  train_dataset=math_dataset(), processing_class=tokenizer, **trainer_kwargs)
    ours.train()
    return stock, ours


COMPARED_METRICS = ("loss", "entropy", "entropy_coef", "cispo_clip_ratio", "vespo/phi_seq_mean", "kl", "policy_loss")


def assert_same_training(stock, ours, skip_metrics=()):
    stock_logs = [h for h in stock.state.log_history if "loss" in h]
    our_logs = [h for h in ours.state.log_history if "loss" in h]
    assert len(our_logs) == len(stock_logs) == 3
    for s, o in zip(stock_logs, our_logs):
        for key, value in s.items():
            if key.startswith(skip_metrics) and key != "loss":
                continue
            if key in COMPARED_METRICS or key.startswith("clip_ratio"):
                assert key in o, key
                assert o[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    moved = 0.0
    for (name, p_stock), (_, p_ours) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p_ours, p_stock, rtol=1e-5, atol=1e-6, msg=name)
    for p_start, p_end in zip(build_model(ours.processing_class).parameters(), ours.model.parameters()):
        moved = max(moved, (p_end - p_start).abs().max().item())
    assert moved > 1e-3  # training changed the parameters: the comparison is not vacuous


@pytest.mark.parametrize("option", list(OPTIONS) + list(OPTIONS_KEPT))
def test_option_at_num_off_policy_zero_trains_like_stock_grpo(tokenizer, tmp_path, option):
    stock, ours = run_pair(tmp_path, tokenizer, {**OPTIONS, **OPTIONS_KEPT}[option])
    assert_same_training(stock, ours, EMPTY_MICRO_BATCH_METRICS.get(option, ()))
    if option == "adaptive_entropy":
        assert ours.entropy_coef == pytest.approx(stock.entropy_coef) and ours.entropy_coef > 0.01


def test_trls_gspo_warning_with_token_summed_losses_is_kept(tokenizer, tmp_path, caplog):
    """TRL warns that a token-summed loss with sequence-level ratios weights sequences by length; the trainer lets
    TRL's own construction say it (it used to refuse before TRL could)."""
    with caplog.at_level(logging.WARNING):
        MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=varied_reward,
                               args=tiny_args(tmp_path, num_off_policy=0, loss_type="dapo",
                                              importance_sampling_level="sequence"),
                               train_dataset=math_dataset(), processing_class=tokenizer)
    assert "sums per-token contributions" in caplog.text


def _iterable(dataset):
    return IterableDataset.from_generator(lambda: iter(dataset))


EVAL_SHAPES = {
    "dataset": lambda: math_dataset(4),
    "dict": lambda: {"a": math_dataset(4), "b": math_dataset(4)},
    "iterable": lambda: _iterable(math_dataset(4)),
}


@pytest.mark.parametrize("shape", list(EVAL_SHAPES))
@pytest.mark.parametrize("num_off_policy", [0, 1])
def test_evaluate_before_training_for_every_eval_dataset_shape(tokenizer, tmp_path, shape, num_off_policy):
    """`evaluate()` before the first training step (transformers sets `current_gradient_accumulation_steps` only in
    the training loop), for a Dataset, a dict of Datasets and an IterableDataset; the loss equals stock TRL's at
    num_off_policy=0 (the same model and completions: evaluation generates with the seed set)."""
    kwargs = dict(per_device_eval_batch_size=8, dataloader_drop_last=False, loss_type="grpo")
    if shape == "iterable":
        kwargs["accelerator_config"] = {"dispatch_batches": False}
    ours = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                  args=tiny_args(tmp_path / "ours", num_off_policy=num_off_policy,
                                                 on_policy_clip=True, **{**COMMON, **kwargs}),
                                  train_dataset=math_dataset(), eval_dataset=EVAL_SHAPES[shape](),
                                  processing_class=tokenizer)
    torch.manual_seed(0)
    metrics = ours.evaluate()
    names = ["eval_a_loss", "eval_b_loss"] if shape == "dict" else ["eval_loss"]
    assert all(name in metrics for name in names), metrics
    if num_off_policy:
        return
    stock = GRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                        args=GRPOConfig(output_dir=str(tmp_path / "stock"), **{**COMMON, **kwargs}),
                        train_dataset=math_dataset(), eval_dataset=EVAL_SHAPES[shape](), processing_class=tokenizer)
    torch.manual_seed(0)
    expected = stock.evaluate()
    for name in names:
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


def test_eval_on_start(tokenizer, tmp_path):
    trainer = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                     args=tiny_args(tmp_path, eval_strategy="steps", eval_steps=1, eval_on_start=True,
                                                    per_device_eval_batch_size=8, max_steps=1),
                                     train_dataset=math_dataset(), eval_dataset=math_dataset(4),
                                     processing_class=tokenizer)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and evals[0]["step"] == 0


@pytest.mark.parametrize("option", ["cispo", "sapo", "vespo", "luspo", "gspo"])
def test_padding_free_micro_batches_keep_every_objectives_gradient(tokenizer, tmp_path, option):
    """With teacher rows, rows reassigned between micro-batches (`padding_free_batches`) give every optimiser step
    the gradient of TRL's layout, for every on-policy objective: the normalisers of sapo and luspo use TRL's nominal
    rows, those of cispo and vespo are global, the sequence-level terms are per row. (An entropy bonus, static or
    adaptive, is a token mean over the optimiser step under the switch: docs/batching.md, "Normalisers".)"""
    from batching_cases import assert_same_gradients, cache_generation, cut_lengths, make_trainer, step_gradients

    kwargs = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
                  num_generations=4, max_completion_length=24, entropy_coef=0.0, off_policy_trigger="all_fail",
                  on_policy_clip=True)
    kwargs.update(OPTIONS[option])
    trainer = make_trainer(tokenizer, tmp_path, **kwargs)
    cut_lengths(trainer, [3, 20, 5, 7, 2, 24, 9, 4, 11])
    cache_generation(trainer)
    on, chunks = step_gradients(trainer, True)
    off, _ = step_gradients(trainer, False)
    assert len({c["completion_ids"].size(0) for c in chunks}) > 1  # rows did move
    assert_same_gradients(on, off)


# More TRL options, run with teacher rows only (at num_off_policy=0 the TRL test run covers them).
OPTIONS_WITH_TEACHER = {
    "generation_and_template_kwargs": dict(generation_kwargs={"top_k": 5}, chat_template_kwargs={"unused": True},
                                           top_p=0.9, repetition_penalty=1.1),
    "cast_lm_head_to_fp32": dict(cast_lm_head_to_fp32=True),
    "num_generations_eval": dict(num_generations_eval=2, eval_strategy="steps", eval_steps=1,
                                 per_device_eval_batch_size=4),
}


@pytest.mark.parametrize("option", list(OPTIONS) + list(OPTIONS_KEPT) + list(OPTIONS_WITH_TEACHER))
def test_option_with_teacher_rows_trains(tokenizer, tmp_path, option):
    """`num_off_policy=1` with every on-policy objective and the other TRL options: a real run whose groups hold a
    teacher row; every parameter moves, the losses are finite and the teacher rows take part (their metrics are
    logged)."""
    options = {**OPTIONS, **OPTIONS_KEPT, **OPTIONS_WITH_TEACHER}[option]
    path = tmp_path / "model"  # with beta > 0 TRL loads the reference model from the model's name
    build_model(tokenizer).save_pretrained(path)
    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = {**COMMON, "max_completion_length": 40, **options, "max_steps": 2}
    model = str(path)
    trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=[contains_answer_reward, varied_reward],
                                     args=tiny_args(tmp_path, num_off_policy=1, on_policy_clip=True,
                                                    reward_weights=[1.0, 0.5], **args),
                                     train_dataset=math_dataset(), processing_class=tokenizer,
                                     eval_dataset=math_dataset(4) if "eval_strategy" in options else None)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["off_policy/fraction_of_rows"] == 0.25  # logged once per generation batch
    assert all(h["off_policy/prob_mean"] > 0 for h in logs)
    if "eval_strategy" in options:
        assert any("eval_loss" in h for h in trainer.state.log_history)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_configuration_doc_lists_every_trl_grpo_option():
    """docs/configuration.md gives the status with teacher rows of every field TRL's GRPOConfig adds, and of the
    GRPOTrainer arguments that change generation."""
    import dataclasses
    import inspect
    import pathlib

    from transformers import TrainingArguments

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    section = doc[doc.index("## TRL's GRPO options with teacher rows"):doc.index("## How teacher rows interact")]
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    fields = [f.name for f in dataclasses.fields(GRPOConfig) if f.name not in base]
    arguments = [a for a in inspect.signature(GRPOTrainer.__init__).parameters if a not in ("self", "model", "args",
                                                                                          "train_dataset",
                                                                                          "eval_dataset",
                                                                                          "processing_class")]
    missing = [name for name in fields + arguments + ["remove_unused_columns"] if f"`{name}`" not in section
               and f"`{name}=`" not in section]
    assert not missing, missing
