"""Real (tiny) training runs: group composition, invariance to stock GRPO, parameter updates, LoRA, fallbacks."""

import logging

import pytest
import torch
from conftest import (
    assert_server_completions_match_prompts,
    attach_fake_vllm_server,
    build_model,
    contains_answer_reward,
    math_dataset,
    tiny_args,
)
from trl import GRPOConfig, GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer


def varied_reward(completions, **kwargs):
    """A reward with variance on random models: depends on the completion length."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 3) / 2 for t in texts]


class Recorder:
    """Reward function that records the `is_off_policy` flags and completions it is given."""

    __name__ = "recorder"

    def __init__(self, inner=contains_answer_reward):
        self.inner = inner
        self.flags, self.texts = [], []

    def __call__(self, completions, is_off_policy, **kwargs):
        self.flags.append(list(is_off_policy))
        self.texts.append([c[0]["content"] if isinstance(c, list) else c for c in completions])
        return self.inner(completions, **kwargs)


def train(tokenizer, tmp_path, reward, dataset=None, model=None, **overrides):
    trainer = MixedPolicyGRPOTrainer(
        model=model or build_model(tokenizer),
        reward_funcs=reward,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else math_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("num_generations,num_off_policy", [(4, 1), (4, 2), (8, 1)])
def test_each_group_has_exactly_num_off_policy_teacher_rows(tokenizer, tmp_path, num_generations, num_off_policy):
    recorder = Recorder()
    train(tokenizer, tmp_path, recorder, num_generations=num_generations, num_off_policy=num_off_policy,
          max_completion_length=40)
    assert recorder.flags
    for flags, texts in zip(recorder.flags, recorder.texts):
        for g in range(0, len(flags), num_generations):
            group = flags[g : g + num_generations]
            assert sum(group) == num_off_policy
            # the teacher rows carry the decoded teacher trace (ChatML: no `<think>` opener in the prompt)
            for is_teacher, text in zip(group, texts[g : g + num_generations]):
                if is_teacher:
                    assert text.startswith("<think>\n") and text.endswith("}.")


def test_num_off_policy_zero_equals_stock_grpo_trainer(tokenizer, tmp_path):
    common = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=12, max_steps=3,
        learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.001, weight_decay=0.01,
        lr_scheduler_type="constant", epsilon_high=0.28,
    )
    stock = GRPOTrainer(model=build_model(tokenizer), reward_funcs=varied_reward, args=GRPOConfig(**common),
                        train_dataset=math_dataset(), processing_class=tokenizer)
    stock.train()
    common.pop("output_dir")
    # TRL's fixed micro-batches: trimmed ones agree only up to float rounding, which AdamW (lr 1e-2) amplifies on
    # near-zero gradient entries; tests/test_batching_trainer.py compares the two layouts' gradients.
    ours = train(tokenizer, tmp_path, varied_reward, num_off_policy=0, on_policy_clip=True,
                 padding_free_batches=False, **common)

    stock_losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    our_losses = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(our_losses) == 3
    assert our_losses == pytest.approx(stock_losses, rel=1e-5, abs=1e-7)
    assert any(abs(h["reward_std"]) > 0 for h in stock.state.log_history if "reward_std" in h)
    for (name, p_stock), (_, p_ours) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p_ours, p_stock, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_unclipped_ratio_is_not_plain_grpo_and_warns(tokenizer, tmp_path, caplog):
    """With two updates per generation batch the on-policy ratio leaves 1: `num_off_policy=0` equals stock GRPO only
    with `on_policy_clip=True`; with the default (no clip) parameters differ and the trainer says so once."""
    from luffy_trl.config import on_policy_ratio_departures

    common = dict(
        use_cpu=True, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=12, max_steps=3, learning_rate=5e-2, report_to="none", save_strategy="no",
        logging_steps=1, seed=0, disable_tqdm=True, loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.0,
        weight_decay=0.0, lr_scheduler_type="constant", num_iterations=2, gradient_accumulation_steps=2,
    )
    stock = GRPOTrainer(model=build_model(tokenizer), reward_funcs=varied_reward,
                        args=GRPOConfig(output_dir=str(tmp_path / "stock"), **common), train_dataset=math_dataset(),
                        processing_class=tokenizer)
    stock.train()
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        clipped = train(tokenizer, tmp_path / "clip", varied_reward, num_off_policy=0, on_policy_clip=True,
                        padding_free_batches=False, **common)  # TRL's micro-batches: equal to stock up to rounding
    assert "on_policy_clip=False" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        unclipped = train(tokenizer, tmp_path / "noclip", varied_reward, num_off_policy=0, padding_free_batches=False,
                          **common)
    warnings = [r for r in caplog.records if "on_policy_clip=False" in r.getMessage()]
    assert len(warnings) == 1 and "NOT TRL's GRPO" in warnings[0].getMessage()
    assert on_policy_ratio_departures(unclipped.args)
    assert any(h.get("clip_ratio/region_mean", 0) > 0 for h in clipped.state.log_history)  # the clip acted
    diff = 0.0
    for (name, p_stock), (_, p_clip), (_, p_free) in zip(stock.model.named_parameters(),
                                                          clipped.model.named_parameters(),
                                                          unclipped.model.named_parameters()):
        torch.testing.assert_close(p_clip, p_stock, rtol=1e-5, atol=1e-6, msg=name)
        diff = max(diff, (p_free - p_stock).abs().max().item())
    assert diff > 1e-4


def test_ratio_departures_follow_trls_rule():
    from luffy_trl import MixedPolicyGRPOConfig
    from luffy_trl.config import on_policy_ratio_departures

    def reasons(**kw):
        return on_policy_ratio_departures(MixedPolicyGRPOConfig(output_dir="x", use_cpu=True, bf16=False, **kw))

    assert reasons() == []
    assert reasons(gradient_accumulation_steps=4) == []  # steps_per_generation defaults to GA: one step per batch
    assert reasons(num_iterations=2)
    assert reasons(gradient_accumulation_steps=2, steps_per_generation=4)
    assert reasons(use_vllm=True) and reasons(use_vllm=True, vllm_importance_sampling_correction=False) == []


def test_training_changes_every_parameter(tokenizer, tmp_path):
    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = train(tokenizer, tmp_path, contains_answer_reward, model=model, max_completion_length=40)
    # the teacher trace is correct and the random policy is not: the group has reward variance
    assert trainer.state.log_history[0]["off_policy/reward_mean"] == 1.0
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def teacher_trace_logp(trainer, dataset):
    """Mean per-token log-probability of each prompt's teacher trace under the current model."""
    tok, model = trainer.processing_class, trainer.model
    values = []
    with torch.no_grad():
        for row in dataset:
            prompt_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            if not isinstance(prompt_ids, list):
                prompt_ids = prompt_ids["input_ids"]
            ids = trainer.teacher_tokenizer.encode(row["prompt"], prompt_ids, row["target"][0]["content"]).ids
            full = torch.tensor([prompt_ids + ids])
            logp = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1 : -1], -1)
            values.append(logp.gather(-1, torch.tensor(ids).unsqueeze(-1)).mean().item())
    return sum(values) / len(values)


def test_teacher_trace_becomes_more_likely(tokenizer, tmp_path):
    """Policy shaping on correct teacher traces with positive advantage raises their likelihood.

    A random model rarely stops, so with `mask_truncated_completions` its samples are masked out (teacher rows never
    are) and the update is LUFFY's off-policy term alone; with the samples in, their push-down dominates a random
    model's first steps (the shaping weight on a p≈0.003 token is only ≈0.03).
    """
    dataset = math_dataset()
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=dataset,
        processing_class=tokenizer,
        args=tiny_args(tmp_path, max_completion_length=32, max_steps=8, learning_rate=3e-2,
                       mask_truncated_completions=True),
    )
    before = teacher_trace_logp(trainer, dataset)
    trainer.train()
    after = teacher_trace_logp(trainer, dataset)
    assert after > before + 0.3, (before, after)


def test_lora_updates_only_adapter_weights(tokenizer, tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA needs the peft extra")
    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MixedPolicyGRPOTrainer(
        model=model, reward_funcs=contains_answer_reward, train_dataset=math_dataset(), processing_class=tokenizer,
        args=tiny_args(tmp_path, max_completion_length=40, learning_rate=5e-2),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    changed_lora, changed_base = [], []
    for name, param in trainer.model.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed_lora.append(name)  # adapters start at B=0; check they moved below
        elif not torch.equal(param, before[base_name]):
            changed_base.append(name)
    assert not changed_base
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_missing_teacher_keeps_a_full_sampled_group_and_is_counted(tokenizer, tmp_path):
    dataset = math_dataset()
    targets = list(dataset["target"])
    targets[0], targets[1], targets[2] = None, [], [{"role": "assistant", "content": "   "}]
    dataset = dataset.remove_columns("target").add_column("target", targets)
    recorder = Recorder()
    trainer = train(tokenizer, tmp_path, recorder, dataset=dataset, max_steps=4, per_device_train_batch_size=8,
                    num_generations=4, max_completion_length=40)
    total_rows = sum(len(f) for f in recorder.flags)
    total_teacher = sum(sum(f) for f in recorder.flags)
    missing = sum(h.get("off_policy/missing", 0) for h in trainer.state.log_history)
    assert missing > 0  # 4 steps × 2 groups = 8 prompts of the 8-row dataset: every prompt was seen
    assert total_teacher + missing == total_rows // 4


@pytest.mark.parametrize("continuous_batching", [False, True], ids=["generate", "continuous_batching"])
def test_on_policy_generation_only(tokenizer, tmp_path, monkeypatch, continuous_batching):
    """Only the on-policy slots reach the generation backend: 7/8 of stock at G = 8 (7 + 1), with transformers'
    `generate` and with its continuous batching (`use_transformers_continuous_batching`)."""
    generated, tokens = [], []
    original = GRPOTrainer._generate_single_turn

    def counting(self, prompt_ids, *args, **kwargs):
        ids, logprobs = original(self, prompt_ids, *args, **kwargs)
        generated.append(len(prompt_ids))
        tokens.append(sum(len(c) for c in ids))
        return ids, logprobs

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", counting)
    steps = 1 if continuous_batching else 2  # transformers' continuous batching costs about 20 s a step on CPU
    trainer = train(tokenizer, tmp_path, contains_answer_reward, num_generations=8, per_device_train_batch_size=16,
                    max_steps=steps, use_transformers_continuous_batching=continuous_batching)
    assert generated == [14] * steps
    assert all(0 < t <= 14 * 12 for t in tokens)  # the backend returned one completion per on-policy row
    assert all(h["off_policy/discarded_generations"] == 0 for h in trainer.state.log_history if "loss" in h)


def test_mask_truncated_completions_never_drops_teacher_rows(tokenizer, tmp_path):
    captured = []
    original = MixedPolicyGRPOTrainer._generate_and_score_completions

    def capture(self, inputs):
        out = original(self, inputs)
        captured.append(out)
        return out

    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=math_dataset(),
        processing_class=tokenizer,
        args=tiny_args(tmp_path, max_completion_length=6, mask_truncated_completions=True, max_steps=1),
    )
    generated_lengths = []
    mask_rows = trainer._mask_truncated_on_policy_rows

    def record_lengths(output):
        generated_lengths.append(output["completion_mask"].sum(1).float())
        return mask_rows(output)

    trainer._mask_truncated_on_policy_rows = record_lengths
    trainer._generate_and_score_completions = capture.__get__(trainer)
    trainer.train()
    out = captured[0]
    off = out["is_off_policy"]
    # on_policy/completion_length_mean: lengths as generated, masked (truncated) rows included with their length
    expected = generated_lengths[0][~off].mean().item()
    assert trainer.state.log_history[0]["on_policy/completion_length_mean"] == pytest.approx(expected)
    assert expected > out["completion_mask"][~off].sum(1).float().mean().item()
    assert off.any()
    assert torch.all(out["completion_mask"][off].sum(1) == 6)  # truncated teacher traces still train
    assert trainer.state.log_history[0]["off_policy/truncated"] == off.sum().item()
    on_truncated = ~off & (out["completion_mask"].sum(1) == 0)
    assert on_truncated.any()  # random on-policy samples hit the limit and are masked as in TRL
    assert out["num_items_in_batch"].item() == out["completion_mask"].sum().item()


def test_fake_vllm_sampling_logprobs_give_teacher_rows_ratio_one(tokenizer, tmp_path, monkeypatch):
    """With vLLM-style sampling log-probs, TRL's IS ratio is exactly 1 on teacher rows (NaN log-probs)."""
    original = GRPOTrainer._generate_single_turn

    def fake_vllm(self, prompt_ids, *args, **kwargs):
        self.use_vllm = False  # generate with transformers, return vLLM-style log-probs
        try:
            ids, _ = original(self, prompt_ids, *args, **kwargs)
        finally:
            self.use_vllm = True
        return ids, [[-1.0] * len(c) for c in ids]  # wrong on purpose: IS ratios != 1 on sampled rows

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_vllm)
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=math_dataset(),
        processing_class=tokenizer,
        args=tiny_args(tmp_path, max_completion_length=20, max_steps=1, mask_truncated_completions=True),
    )
    trainer.use_vllm = True  # the trainer-side vLLM code paths, with generation faked above
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = "token_truncate"
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = None, 3.0
    trainer.model.train()
    rows = [math_dataset()[i] for i in range(2) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    off, mask = out["is_off_policy"], out["completion_mask"].bool()
    ratio = out["importance_sampling_ratio"]
    assert torch.all(ratio[off] == 1.0)
    assert not torch.all(ratio[~off][mask[~off]] == 1.0)
    # the sampling/* metrics cover the on-policy tokens that train, not the teacher rows' ratio of 1
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sampling/")}
    on_tokens = mask & ~off.unsqueeze(1)
    on_ratio = ratio[on_tokens]
    delta = (out["old_per_token_logps"] - out["sampling_per_token_logps"]).abs()[on_tokens]
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(on_ratio.mean().item(), rel=1e-6)
    assert metrics["sampling/importance_sampling_ratio/min"] == pytest.approx(on_ratio.min().item(), rel=1e-6)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(on_ratio.max().item(), rel=1e-6)
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(delta.mean().item(), rel=1e-6)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(delta.max().item(), rel=1e-6)
    diluted = ratio[mask].mean().item()  # what TRL logs: every row, teacher rows included
    assert metrics["sampling/importance_sampling_ratio/mean"] != pytest.approx(diluted, rel=1e-4)
    assert all(len(v) == 1 for k, v in trainer._metrics["train"].items() if k.startswith("sampling/"))
    assert ((out["completion_mask"].sum(1) == 0) & ~off).any()  # truncated on-policy rows are masked and left out


def test_eval_batches_are_on_policy(tokenizer, tmp_path):
    recorder = Recorder()
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=recorder, train_dataset=math_dataset(),
        eval_dataset=math_dataset(4), processing_class=tokenizer,
        args=tiny_args(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8),
    )
    trainer.train()
    eval_flags = recorder.flags[1:]
    assert eval_flags and all(not any(f) for f in eval_flags)
    assert any(recorder.flags[0])


def test_plain_text_prompts(tokenizer, tmp_path):
    recorder = Recorder()
    train(tokenizer, tmp_path, recorder, dataset=math_dataset(conversational=False), max_completion_length=40)
    teacher_texts = [t for flags, texts in zip(recorder.flags, recorder.texts) for f, t in zip(flags, texts) if f]
    assert teacher_texts and all(t.startswith("<think>\n") for t in teacher_texts)


def test_completions_table_marks_teacher_rows(tokenizer, tmp_path):
    trainer = train(tokenizer, tmp_path, contains_answer_reward, max_steps=1, log_completions=True,
                    max_completion_length=40)
    flags = list(trainer._logs["extra"]["is_off_policy"])
    rewards = list(trainer._logs["rewards"]["boxed_answer_reward"])
    assert len(flags) == len(rewards) == 8 and sum(flags) == 2
    assert all(r == 1.0 for f, r in zip(flags, rewards) if f)


def _server_mode_trainer(tokenizer, tmp_path, dataset):
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=dataset,
        processing_class=tokenizer, args=tiny_args(tmp_path, max_completion_length=12, max_steps=1),
    )
    return trainer, attach_fake_vllm_server(trainer)


def test_vllm_server_mode_generates_only_on_policy_rows(tokenizer, tmp_path):
    """vLLM server mode (TRL's own gather/dedupe/slice code, fake server): G − k completions per prompt are asked
    for (2 prompts × 3 at G = 4, k = 1), each lands on a row of its own prompt, and no sample is discarded."""
    dataset = math_dataset()
    trainer, server = _server_mode_trainer(tokenizer, tmp_path, dataset)
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    assert server.calls == [(2, 3)]
    off = out["is_off_policy"].tolist()
    assert off == [False, False, False, True] * 2
    assert_server_completions_match_prompts(out)
    assert [out["completion_ids"][i, 1].item() - 3 for i in range(8) if not off[i]] == [0, 1, 2] * 2  # sample j
    assert trainer._metrics["train"]["off_policy/discarded_generations"] == [0]


def test_vllm_server_mode_generates_every_slot_when_a_group_has_no_trace(tokenizer, tmp_path, caplog):
    """A group without a teacher trace breaks the G − k runs the server's dedupe relies on: every slot is generated
    and the other group's teacher-slot sample is discarded (counted), never misassigned."""
    dataset = math_dataset()
    dataset = dataset.map(lambda row, i: {"target": None if i == 1 else row["target"]}, with_indices=True)
    trainer, server = _server_mode_trainer(tokenizer, tmp_path, dataset)
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        out = trainer._generate_and_score_completions(rows)
    assert "vLLM server mode generates every slot" in caplog.text and "a group has no teacher trace" in caplog.text
    assert server.calls == [(2, 4)]
    assert out["is_off_policy"].tolist() == [False, False, False, True] + [False] * 4
    assert_server_completions_match_prompts(out)
    assert trainer._metrics["train"]["off_policy/discarded_generations"] == [1]
