"""Training step of MixedPolicyGRPOTrainer vs stock GRPOTrainer, alternating in one process.

    python benchmarks/bench_step.py                                  # CPU preset: toy model, G = 8 (7 + 1)
    python benchmarks/bench_step.py --preset cpu-batch-bound         # CPU, model large enough to be batch-bound
    python benchmarks/bench_step.py --preset gpu --reps 5 --steps 3  # Qwen2-0.5B-sized random model, bf16, CUDA
    python benchmarks/bench_step.py --num_off_policy 4 --out results.jsonl   # 4 + 4, one JSON line per repetition

Both arms get the same model initialisation, data, seed and config (LUFFY's loss settings: dr_grpo, no reward
scaling, entropy bonus 0.001, weight decay 0.01, constant LR); the stock arm is `GRPOTrainer` with `GRPOConfig`.
Each repetition trains both arms (order alternating between repetitions) for `--steps` optimiser steps; the first
step of each run is a warm-up and not counted. Per arm it records, with the device synchronised around each timed
region: the training step (generation + rewards + forward + loss + backward), the generation backend
(`_generate_single_turn`), `_compute_loss` (forward pass + loss), rows and tokens sent to generation, tokens trained
per step, and the peak memory of the whole run (CUDA: `max_memory_allocated`; CPU: a separate, untimed run under
torch's memory profiler, see `--cpu_memory`). Prints the medians of each arm and the median/min/max of the
per-repetition LUFFY / stock ratios; appends one JSON line per repetition to `--out`.

With `--preset gpu` (or `--trace_tokens`), teacher traces are at least `max_completion_length` tokens long and are
cut to it, and the random model rarely stops early, so both arms train on tensors of the same shape and the peak
memory ratio compares equal batches and lengths.

Run it on an otherwise idle machine (`uptime`): another busy process on 2 cores slows torch's threaded kernels by an
order of magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

from common import PRESETS, Timer, bench_model, device, peak_memory, ratio_summary, sync, trace_dataset

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.toy import boxed_answer_reward, toy_tokenizer  # noqa: E402

MEASURES = ("step_time", "generation_time", "loss_time", "peak_memory_bytes")


def build_trainer(arm: str, args, tokenizer, dataset, steps: int):
    on_gpu = device().type == "cuda"
    common = dict(
        output_dir="/tmp/luffy-bench", use_cpu=not on_gpu, bf16=args.dtype == "bfloat16",
        gradient_checkpointing=False, per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, max_steps=steps,
        learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.001, weight_decay=0.01,
        lr_scheduler_type="constant", use_transformers_continuous_batching=args.continuous_batching,
    )
    model = bench_model(tokenizer, seed=0, **{k: getattr(args, k) for k in PRESETS["cpu"]}).to(device())
    extra = {}
    if args.lora:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear")
    if arm == "stock":
        trainer = GRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=GRPOConfig(**common),
                              train_dataset=dataset, processing_class=tokenizer, **extra)
    else:
        trainer = MixedPolicyGRPOTrainer(
            model=model, reward_funcs=boxed_answer_reward, train_dataset=dataset, processing_class=tokenizer,
            args=MixedPolicyGRPOConfig(num_off_policy=args.num_off_policy, **common), **extra,
        )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the summary
    return trainer


class _StepTimer(TrainerCallback):
    """Times whole optimiser steps (from `on_step_begin` to `on_step_end`, optimizer and scheduler included)."""

    def __init__(self, timer: Timer):
        self.timer = timer

    def on_step_begin(self, *args, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        sync()
        self.timer.times.append(time.perf_counter() - self._start)


PHASES = ("generation", "rewards", "scoring_other", "forward_loss", "backward", "optimizer")


def run_arm(arm: str, args, tokenizer, dataset) -> dict:
    gc.collect()  # free the previous run's trainer (its timing wrappers hold it in reference cycles)
    if device().type == "cuda":
        torch.cuda.empty_cache()
    trainer = build_trainer(arm, args, tokenizer, dataset, args.steps)
    timers = {name: Timer() for name in ("full_step", "step", "prepare", "generation", "rewards", "loss")}
    rows, tokens, trained_tokens = [], [], []
    original_generate = GRPOTrainer._generate_single_turn
    training_step, compute_loss = trainer.training_step, trainer._compute_loss
    prepare, rewards = trainer._generate_and_score_completions, trainer._calculate_rewards

    def timed(timer, fn):
        def wrapper(*a, **k):
            with timer:
                return fn(*a, **k)
        return wrapper

    def timed_generation(self, prompt_ids, *a, **k):
        with timers["generation"]:
            ids, logprobs = original_generate(self, prompt_ids, *a, **k)
        rows.append(len(prompt_ids))
        tokens.append(sum(len(c) for c in ids))
        return ids, logprobs

    def timed_loss(model, inputs):  # forward pass + loss (the backward pass is in the step time only)
        trained_tokens.append(int(inputs["completion_mask"].sum()))
        with timers["loss"]:
            return compute_loss(model, inputs)

    trainer.training_step, trainer._compute_loss = timed(timers["step"], training_step), timed_loss
    trainer._generate_and_score_completions = timed(timers["prepare"], prepare)
    trainer._calculate_rewards = timed(timers["rewards"], rewards)
    trainer.add_callback(_StepTimer(timers["full_step"]))
    GRPOTrainer._generate_single_turn = timed_generation
    try:  # peak memory over the run on CUDA; on CPU it is measured by `cpu_peak_memory`, untimed
        with peak_memory() if device().type == "cuda" else contextlib.nullcontext({"bytes": None}) as memory:
            start = time.perf_counter()
            trainer.train()
            sync()
            wall = time.perf_counter() - start
    finally:
        GRPOTrainer._generate_single_turn = original_generate
    median = {name: timer.median(skip=1) for name, timer in timers.items()}
    result = {
        "arm": arm, "wall": wall, "step_time": median["step"], "full_step_time": median["full_step"],
        "generation_time": median["generation"], "loss_time": median["loss"],
        "rows_generated_per_step": statistics.mean(rows),
        "tokens_generated_per_step": statistics.mean(tokens[1:] or tokens),
        "tokens_trained_per_step": statistics.mean(trained_tokens[1:] or trained_tokens),
        "peak_memory_bytes": memory["bytes"],
        "phases": {  # where one optimiser step's time goes (medians; they add up to about the full step)
            "generation": median["generation"], "rewards": median["rewards"],
            "scoring_other": median["prepare"] - median["generation"] - median["rewards"],
            "forward_loss": median["loss"], "backward": median["step"] - median["prepare"] - median["loss"],
            "optimizer": median["full_step"] - median["step"],
        },
    }
    result["generated_tokens_per_s"] = result["tokens_generated_per_step"] / result["generation_time"]
    result["trained_tokens_per_s"] = result["tokens_trained_per_step"] / result["step_time"]
    return result


def cpu_peak_memory(arm: str, args, tokenizer, dataset) -> int:
    """Peak tensor memory of a 2-step run on CPU, under torch's memory profiler (slow, so not timed)."""
    trainer = build_trainer(arm, args, tokenizer, dataset, steps=2)
    with peak_memory() as memory:
        trainer.train()
    return memory["bytes"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model and batch shape (default: gpu on CUDA, else cpu); flags below override it")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run; the first is a warm-up")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--num_off_policy", type=int, default=1)
    parser.add_argument("--continuous_batching", action="store_true",
                        help="generate with transformers' continuous batching (TRL's "
                             "use_transformers_continuous_batching) instead of generate()")
    parser.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank (PEFT, all linear "
                        "layers) instead of the full model")
    parser.add_argument("--cpu_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="on CPU, also measure each arm's peak tensor memory in an untimed 2-step run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="append one JSON line per repetition here")
    for key, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{key}", type=type(value) if value is not None else int, default=None)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("gpu" if device().type == "cuda" else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = toy_tokenizer()
    dataset = trace_dataset(tokenizer, 64, args.trace_tokens)
    name = torch.cuda.get_device_name() if device().type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; preset {args.preset}; torch {torch.__version__}", file=sys.stderr)
    results = []
    for rep in range(args.reps):
        order = ("stock", "luffy") if rep % 2 == 0 else ("luffy", "stock")  # alternate to cancel drift
        by_arm = {arm: run_arm(arm, args, tokenizer, dataset) for arm in order}
        if device().type == "cpu" and args.cpu_memory and rep == 0:
            for arm in order:
                by_arm[arm]["peak_memory_bytes"] = cpu_peak_memory(arm, args, tokenizer, dataset)
        record = {"rep": rep, "device": name, "stock": by_arm["stock"], "luffy": by_arm["luffy"],
                  "config": vars(args), "torch_threads": torch.get_num_threads()}
        record["ratio"] = {m: by_arm["luffy"][m] / by_arm["stock"][m] for m in MEASURES if by_arm["stock"][m]}
        results.append(record)
        print(f"rep {rep}: step stock {by_arm['stock']['step_time']:.3f}s luffy {by_arm['luffy']['step_time']:.3f}s"
              f" ratio {record['ratio']['step_time']:.3f}", file=sys.stderr)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    summary = {"device": name, "preset": args.preset, "reps": args.reps}
    for arm in ("stock", "luffy"):
        summary[arm] = {key: statistics.median(r[arm][key] for r in results)
                        for key in ("step_time", "full_step_time", "generation_time", "loss_time",
                                    "rows_generated_per_step", "tokens_generated_per_step", "tokens_trained_per_step",
                                    "generated_tokens_per_s", "trained_tokens_per_s")}
        summary[arm]["peak_memory_bytes"] = results[0][arm]["peak_memory_bytes"]
        summary[arm]["phases"] = {p: statistics.median(r[arm]["phases"][p] for r in results) for p in PHASES}
    for m in MEASURES:
        values = [r["ratio"][m] for r in results if m in r["ratio"]]
        if values:
            summary[f"{m}_ratio"] = ratio_summary(values)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
