"""Shared by tests/test_batching_trainer.py and tests/scripts/two_process_batching.py: one generation batch through
the real trainer with `padding_free_batches` on and off, returning the gradient of every optimiser step.

Completions are cut to fixed, row-dependent lengths (a random tiny model never stops by itself), so micro-batches
mix short and long rows; the model is float64 so that the two arms agree to 1e-6 relative.
"""

from __future__ import annotations

import torch
from conftest import build_model, tiny_args
from datasets import Dataset
from trl import GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer


def cut_lengths(trainer, lengths: list[int]):
    """Wrap `_generate_single_turn` so that row i's completion is cut to `lengths[i % len]` tokens + EOS."""
    original = trainer._generate_single_turn
    eos = trainer.eos_token_ids[0]

    def cut(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        ids, logprobs = original(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        offset = trainer.accelerator.process_index * 5
        out = []
        for i, row in enumerate(ids):
            n = lengths[(i + offset) % len(lengths)]
            out.append(list(row[:n]) + ([eos] if len(row) > n else []))
        if logprobs is not None:
            logprobs = [lp[: len(r)] + [0.0] * (len(r) - len(lp[: len(r)])) for lp, r in zip(logprobs, out)]
        return out, logprobs

    trainer._generate_single_turn = cut


def varied_dataset(n: int = 16) -> Dataset:
    """Addition problems whose prompts differ in length (left padding to trim) with teacher traces of two lengths."""
    rows = []
    for i in range(n):
        question = f"What is {i} + {i + 1}?" + " Think step by step." * (i % 4)
        trace = f"{i} + {i + 1} = {2 * i + 1}." + " Check: yes." * (6 * (i % 2)) + f" \\boxed{{{2 * i + 1}}}"
        rows.append({"prompt": [{"role": "user", "content": question}], "ground_truth": str(2 * i + 1),
                     "target": [{"role": "assistant", "content": trace}]})
    return Dataset.from_list(rows)


def make_trainer(tokenizer, out_dir, reward=None, peft_config=None, dataset=None, **overrides):
    args = tiny_args(out_dir, **overrides)
    model = build_model(tokenizer, seed=3).to(torch.float64)

    def default_reward(completions, is_off_policy, **kwargs):
        # Teacher rows succeed; on-policy rows alternate, so some groups are informative and (with a trigger)
        # some teacher rows are left out.
        return [1.0 if off else float(len(c[0]["content"]) % 3 == 0) for c, off in zip(completions, is_off_policy)]

    trainer = MixedPolicyGRPOTrainer(
        model=model, reward_funcs=reward or default_reward, args=args, train_dataset=dataset or varied_dataset(),
        processing_class=tokenizer, peft_config=peft_config,
    )
    trainer.model.train()
    return trainer


def cache_generation(trainer, seed: int = 0) -> None:
    """Generate each arm's batch once (seeded: both arms get the same completions) and reuse it; reseed before the
    shuffle that follows, so both arms also get the same row order."""
    original = trainer._generate_and_score_completions
    cache = {}

    def cached(inputs):
        key = trainer.args.padding_free_batches
        if key not in cache:
            torch.manual_seed(seed)
            cache[key] = original(inputs)
        torch.manual_seed(seed + 1)
        return cache[key]

    trainer._generate_and_score_completions = cached


def step_gradients(trainer, switch: bool) -> tuple[list[dict], list[dict]]:
    """Run every micro-step of one generation cycle (spg·μ micro-steps) with `padding_free_batches=switch`.

    Returns the summed gradient of each optimiser step (micro-steps grouped by GA) and the chunks it trained on.
    Needs `cache_generation(trainer)`: both arms see the same completions and the same shuffle.
    """
    args = trainer.args
    args.padding_free_batches = switch
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    generation_batch = next(iter(trainer.get_train_dataloader()))
    trainer._step = 0
    trainer._buffered_inputs = None
    model = trainer.model
    model.zero_grad()
    grads, chunks = [], []
    for s in range(args.steps_per_generation * trainer.num_iterations):
        inputs = trainer._prepare_inputs(generation_batch)
        chunks.append(inputs)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        trainer._step += 1
        if trainer._step % args.gradient_accumulation_steps == 0:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad()
    return grads, chunks


def assert_same_gradients(on: list[dict], off: list[dict], rtol: float = 1e-6) -> None:
    assert len(on) == len(off) and on
    for step, (a, b) in enumerate(zip(on, off)):
        assert a.keys() == b.keys()
        norm = sum(float(g.norm() ** 2) for g in b.values()) ** 0.5
        assert norm > 0, f"step {step}: zero gradient, the comparison would be vacuous"
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * norm, msg=f"step {step}: {name}")


__all__ = ["GRPOTrainer", "assert_same_gradients", "cache_generation", "cut_lengths", "make_trainer", "step_gradients"]
