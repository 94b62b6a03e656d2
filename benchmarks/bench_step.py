"""Step time of MixedPolicyGRPOTrainer vs stock GRPOTrainer, alternating in one process.

    python benchmarks/bench_step.py                      # CPU preset: tiny model, G = 8 (7 + 1)
    python benchmarks/bench_step.py --reps 7 --steps 6 --hidden_size 128 --out results.jsonl

Both arms get the same model initialisation, data, seed and config (LUFFY's defaults apart from the sizes);
the stock arm uses `GRPOConfig` with the same values. Each repetition trains both arms for `--steps` optimiser steps
(the first step is a warm-up and not counted) and records TRL's logged `step_time`, the time spent in the generation
backend (`_generate_single_turn`) and in `_compute_loss` (forward pass + loss; the backward pass is in the step
time). Prints the medians of each arm, the min/median of the per-repetition ratios, and the rows sent to generation
per step; appends one JSON line per repetition to `--out`. Run it on an otherwise idle machine (`uptime`): another
busy process on 2 cores slows torch's threaded kernels by an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.toy import boxed_answer_reward, toy_math_dataset, toy_model, toy_tokenizer  # noqa: E402


def run_arm(arm: str, args: argparse.Namespace, tokenizer, dataset) -> dict:
    common = dict(
        output_dir="/tmp/luffy-bench", use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts * args.num_generations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, max_steps=args.steps, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.001, weight_decay=0.01,
        lr_scheduler_type="constant",
    )
    model = toy_model(tokenizer, seed=0, hidden_size=args.hidden_size, num_layers=args.layers)
    rows = []
    if arm == "stock":
        trainer = GRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=GRPOConfig(**common),
                              train_dataset=dataset, processing_class=tokenizer)
    else:
        trainer = MixedPolicyGRPOTrainer(
            model=model, reward_funcs=boxed_answer_reward, train_dataset=dataset, processing_class=tokenizer,
            args=MixedPolicyGRPOConfig(num_off_policy=args.num_off_policy, **common),
        )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the summary
    original = GRPOTrainer._generate_single_turn
    generation_times, tokens, loss_times = [], [], []

    def timed_generation(self, prompt_ids, *a, **k):
        start = time.perf_counter()
        ids, logprobs = original(self, prompt_ids, *a, **k)
        generation_times.append(time.perf_counter() - start)
        rows.append(len(prompt_ids))
        tokens.append(sum(len(c) for c in ids))
        return ids, logprobs

    compute_loss = trainer._compute_loss

    def timed_loss(model, inputs):  # forward pass + loss (the backward pass is timed in step_time only)
        start = time.perf_counter()
        loss = compute_loss(model, inputs)
        loss_times.append(time.perf_counter() - start)
        return loss

    trainer._compute_loss = timed_loss
    GRPOTrainer._generate_single_turn = timed_generation
    try:
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    finally:
        GRPOTrainer._generate_single_turn = original
    step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]
    return {"arm": arm, "step_time_median": statistics.median(step_times), "wall": wall,
            "generation_time_median": statistics.median(generation_times[1:]),
            "loss_time_median": statistics.median(loss_times[1:]),
            "rows_generated_per_step": statistics.mean(rows), "tokens_generated_per_step": statistics.mean(tokens)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--num_off_policy", type=int, default=1)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="append one JSON line per repetition here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = toy_tokenizer()
    dataset = toy_math_dataset(64)
    results = []
    for rep in range(args.reps):
        order = ("stock", "luffy") if rep % 2 == 0 else ("luffy", "stock")  # alternate to cancel drift
        by_arm = {arm: run_arm(arm, args, tokenizer, dataset) for arm in order}
        record = {"rep": rep, "stock": by_arm["stock"], "luffy": by_arm["luffy"],
                  "ratio": by_arm["luffy"]["step_time_median"] / by_arm["stock"]["step_time_median"],
                  "config": vars(args), "torch_threads": torch.get_num_threads()}
        results.append(record)
        print(f"rep {rep}: stock {record['stock']['step_time_median']:.3f}s  "
              f"luffy {record['luffy']['step_time_median']:.3f}s  ratio {record['ratio']:.3f}", file=sys.stderr)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    ratios = [r["ratio"] for r in results]
    summary = {
        "stock_step_time_median": statistics.median(r["stock"]["step_time_median"] for r in results),
        "luffy_step_time_median": statistics.median(r["luffy"]["step_time_median"] for r in results),
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "rows_generated_per_step": {"stock": results[0]["stock"]["rows_generated_per_step"],
                                    "luffy": results[0]["luffy"]["rows_generated_per_step"]},
    }
    for part in ("generation_time", "loss_time"):
        part_ratios = [r["luffy"][f"{part}_median"] / r["stock"][f"{part}_median"] for r in results]
        summary[f"{part}_ratio_median"] = statistics.median(part_ratios)
        summary[f"{part}_ratio_min"] = min(part_ratios)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
