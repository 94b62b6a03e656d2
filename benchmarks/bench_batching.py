"""Padding-free micro-batches (`padding_free_batches`): tokens computed and training time, four arms alternating.

    python benchmarks/bench_batching.py                              # CPU preset, both length mixes, 5 reps
    python benchmarks/bench_batching.py --preset gpu --length_scale 4 --reps 5   # on a CUDA machine
    python benchmarks/bench_batching.py --reps 1 --steps 2 --mixes early         # smoke test
    python benchmarks/bench_batching.py --plan_only      # the planner's token counts at LUFFY's scale, no model

Arms (same model initialisation, data, seed, LUFFY's loss settings and geometry):
* `on`:    MixedPolicyGRPOTrainer, `padding_free_batches=True`, `pack_sequences="never"` (G = 8 = 7 + 1): rows
           reassigned by length, each micro-batch cut to its longest row;
* `off`:   the same with `padding_free_batches=False` (TRL's fixed padded micro-batches);
* `stock`: GRPOTrainer, G = 8 on-policy rows at the same on-policy lengths;
* `pack`:  `on` with `pack_sequences="always"`: each micro-batch (and each no-grad forward) packed into one sequence.
           On CPU the model's attention is sdpa, which runs a packed sequence with a dense block-diagonal mask
           (quadratic in the micro-batch's tokens); with flash attention it is a varlen kernel.
* `bins`:  `on` with `pack_sequences="bins"`: per forward the cheapest of the cut rows, bins no longer than the longest
           row (first-fit decreasing, a dense block-diagonal mask per bin) and one sequence, by the cost model of
           `luffy_trl.batching.choose_layout`.

Geometry: 8-row micro-batches, GA = 4 (four micro-batches per optimiser step), `steps_per_generation` = 2·GA (LUFFY's
two optimiser steps per rollout, so TRL computes old log-probs), 64 rows per generation batch; the `ragged` mix uses
16-row micro-batches and GA = 2 (the mix measured in issue 24), still 64 rows and spg = 2·GA.

Lengths are fixed draws, not sampled: generation is replaced by random token ids of a length drawn from the mix (the
same draws for every arm: the first rows of each call get the same lengths), ended by EOS; teacher traces are
dataset rows of a drawn length. Mixes: `early` (on-policy lengths spread over [16, 96] tokens, teacher traces 4-6×
their mean), `late` (on-policy and teacher lengths both in [200, 320]) and `ragged` (on-policy lengths lognormal,
median 48, log-spread 0.8, in [8, 240]; teacher traces 5-6× the on-policy mean, 330-400). Because generation is a
table lookup, the step time is almost all training; with real sampling the step-time ratio is diluted by
generation's share.

Measured per arm (medians over repetitions; the first optimiser step of each run is a warm-up): tokens computed by
the loss forwards and by the no-grad (old log-prob) forwards, real tokens (prompt + completion of the rows with loss
tokens), the training part (forward + loss + backward of every micro-step, plus the old-log-prob forwards) and the
whole optimiser step. Writes `benchmarks/results/bench_batching.json` and a PNG next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import PRESETS, bench_model, device, sync
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer
from luffy_trl.toy import boxed_answer_reward, toy_tokenizer

ARMS = ("on", "off", "stock", "pack", "bins")
LABELS = {"on": "on (cut to longest row)", "off": "off (TRL's layout)", "stock": "stock GRPOTrainer",
          "pack": "pack (one sequence, sdpa)", "bins": "bins (cost model)"}
RESULTS = Path(__file__).resolve().parent / "results"
# (on-policy length range, teacher length range) in tokens, before --length_scale
# A third entry makes the on-policy lengths lognormal: (low, high) clip, then (median, log-spread).
MIXES = {"early": ((16, 96), (224, 336)), "late": ((200, 320), (200, 320)),
         "ragged": ((8, 240), (330, 400), (48, 0.8))}
# (per_device_train_batch_size, gradient_accumulation_steps) per mix; steps_per_generation = 2·GA, 64 rows per batch
GEOMETRY = {"ragged": (16, 2)}


_DATASETS: dict = {}


def teacher_dataset(tokenizer, n: int, lengths: tuple[int, int], scale: int, seed: int = 0) -> Dataset:
    """n prompts whose teacher traces are random words of a drawn token length (fixed by `seed`; built once)."""
    key = (n, lengths, scale, seed)
    if key not in _DATASETS:
        _DATASETS[key] = _teacher_dataset(tokenizer, n, lengths, scale, seed)
    return _DATASETS[key]


def _teacher_dataset(tokenizer, n, lengths, scale, seed) -> Dataset:
    rng = random.Random(seed)
    words = ["step", "check", "sum", "carry", "digit", "again", "so", "then", "value", "result"]
    rows = []
    for i in range(n):
        target = rng.randint(*lengths) * scale
        text = ""
        while len(tokenizer(text)["input_ids"]) < target:
            text += " " + " ".join(rng.choice(words) for _ in range(16))
        ids = tokenizer(text)["input_ids"][:target]
        trace = tokenizer.decode(ids) + f" \\boxed{{{2 * i + 1}}}"
        rows.append({"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}], "ground_truth": str(2 * i + 1),
                     "target": [{"role": "assistant", "content": trace}]})
    return Dataset.from_list(rows)


def fixed_generation(lengths: tuple[int, int], scale: int, eos: int, vocab: int, max_len: int, lognormal=None):
    """A stand-in for `GRPOTrainer._generate_single_turn`: call k returns rows of lengths drawn with seed k
    (uniform in `lengths`, or lognormal (median, log-spread) clipped to `lengths`)."""
    state = {"call": 0}

    def draw(rng):
        if lognormal is None:
            return rng.randint(*lengths)
        median, spread = lognormal
        return min(max(int(rng.lognormvariate(0.0, spread) * median), lengths[0]), lengths[1])

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rng = random.Random(state["call"])
        state["call"] += 1
        ids = []
        for _ in prompt_ids:
            n = min(draw(rng) * scale, max_len)
            body = [rng.randrange(3, vocab) for _ in range(n - 1)]
            ids.append([t if t != eos else 3 for t in body] + [eos])
        return ids, None

    return generate, state


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, *args, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._start)


def build(arm: str, args, tokenizer, dataset, max_len: int, geometry: tuple[int, int] = (8, 4)):
    on_gpu = device().type == "cuda"
    rows, ga = geometry
    common = dict(
        output_dir="/tmp/luffy-bench-batching", use_cpu=not on_gpu, bf16=args.dtype == "bfloat16",
        gradient_checkpointing=False, per_device_train_batch_size=rows, gradient_accumulation_steps=ga,
        steps_per_generation=2 * ga, num_generations=8, max_completion_length=max_len, max_steps=args.steps,
        learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.001, weight_decay=0.01,
        lr_scheduler_type="constant",
    )
    model = bench_model(tokenizer, seed=0, **{k: getattr(args, k) for k in PRESETS["cpu"]}).to(device())
    if arm == "stock":
        trainer = GRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=GRPOConfig(**common),
                              train_dataset=dataset, processing_class=tokenizer)
    else:
        pack = {"pack": "always", "bins": "bins"}.get(arm, "never")
        config = MixedPolicyGRPOConfig(num_off_policy=1, padding_free_batches=arm != "off", pack_sequences=pack,
                                       **common)
        trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=boxed_answer_reward, args=config,
                                         train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    return trainer


def real_tokens(inputs) -> int:
    """Prompt + completion tokens of the rows with loss tokens (left-padded prompts, right-padded completions)."""
    mask = inputs["completion_mask"]
    cols = torch.arange(1, mask.size(1) + 1, device=mask.device)
    extent = (mask.bool() * cols).amax(1)
    prompt = inputs["prompt_mask"].sum(1)
    return int((prompt + extent)[extent > 0].sum())


def run_arm(arm: str, mix: str, args, tokenizer) -> dict:
    gc.collect()
    if device().type == "cuda":
        torch.cuda.empty_cache()
    on_policy, teacher, *lognormal = MIXES[mix]
    scale = args.length_scale
    max_len = max(on_policy[1], teacher[1]) * scale + 8
    dataset = teacher_dataset(tokenizer, 64, teacher, scale)
    geometry = GEOMETRY.get(mix, (8, 4))
    trainer = build(arm, args, tokenizer, dataset, max_len, geometry)
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vocab = trainer.model.config.vocab_size if args.vocab_size is None else min(args.vocab_size, len(tokenizer))
    generate, _ = fixed_generation(on_policy, scale, tokenizer.eos_token_id, min(vocab, len(tokenizer)), max_len,
                                   lognormal[0] if lognormal else None)
    counts = {"loss_computed": [], "loss_real": [], "logprob_computed": 0, "logprob_time": 0.0, "train": []}
    base_generate, base_logps = GRPOTrainer._generate_single_turn, GRPOTrainer._get_per_token_logps_and_entropies
    training_step, prepare = trainer.training_step, trainer._generate_and_score_completions
    step_state = {"train": 0.0, "prepare": 0.0, "micro": 0}

    def logps(self, model, input_ids, *a, **k):
        if torch.is_grad_enabled():
            return base_logps(self, model, input_ids, *a, **k)
        sync()
        start = time.perf_counter()
        out = base_logps(self, model, input_ids, *a, **k)
        sync()
        counts["logprob_time"] += time.perf_counter() - start
        counts["logprob_computed"] += input_ids.numel()
        return out

    def timed_prepare(inputs):
        sync()
        start = time.perf_counter()
        out = prepare(inputs)
        sync()
        step_state["prepare"] += time.perf_counter() - start
        return out

    def timed_step(model, inputs, num_items_in_batch=None):
        sync()
        start = time.perf_counter()
        before = step_state["prepare"]
        out = training_step(model, inputs, num_items_in_batch)
        sync()
        step_state["train"] += time.perf_counter() - start - (step_state["prepare"] - before)
        step_state["micro"] += 1
        if step_state["micro"] % geometry[1] == 0:  # one optimiser step: training part = micro-steps + old log-probs
            counts["train"].append(step_state["train"] + counts["logprob_time"])
            step_state["train"], counts["logprob_time"] = 0.0, 0.0
        return out

    compute_loss = trainer._compute_loss

    if arm in ("pack", "bins"):  # packed forwards call the model directly, not TRL's `_get_per_token_logps_and_...`
        packed_forward = trainer._packed_forward

        def timed_packed(model, input_ids, *a, **k):
            if torch.is_grad_enabled():
                return packed_forward(model, input_ids, *a, **k)
            sync()
            start = time.perf_counter()
            out = packed_forward(model, input_ids, *a, **k)
            sync()
            counts["logprob_time"] += time.perf_counter() - start
            counts["logprob_computed"] += out[-1]
            return out

        trainer._packed_forward = timed_packed

    def counting_loss(model, inputs):
        counts["loss_computed"].append(trainer._chunk_packed_tokens(inputs) if arm in ("pack", "bins") else
                                       inputs["prompt_ids"].numel() + inputs["completion_ids"].numel())
        counts["loss_real"].append(real_tokens(inputs))
        return compute_loss(model, inputs)

    trainer.training_step, trainer._generate_and_score_completions = timed_step, timed_prepare
    trainer._compute_loss = counting_loss
    timer = _StepTimer()
    trainer.add_callback(timer)
    GRPOTrainer._generate_single_turn, GRPOTrainer._get_per_token_logps_and_entropies = generate, logps
    try:
        trainer.train()
    finally:
        GRPOTrainer._generate_single_turn, GRPOTrainer._get_per_token_logps_and_entropies = base_generate, base_logps
    steps = len(timer.times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device().type == "cuda" else None
    loss_computed, loss_real = sum(counts["loss_computed"]), sum(counts["loss_real"])
    return {
        "arm": arm, "mix": mix, "optimiser_steps": steps,
        "loss_tokens_computed": loss_computed, "real_tokens": loss_real,
        "logprob_tokens_computed": counts["logprob_computed"],
        "computed_over_real": loss_computed / loss_real,
        "computed_with_logprobs_over_real": (loss_computed + counts["logprob_computed"]) / loss_real,
        "train_time": statistics.median(counts["train"][1:] or counts["train"]),
        # real tokens trained per second of training part (loss tokens of one optimiser step / its training part)
        "real_tokens_per_s": loss_real / max(len(counts["train"]), 1) / statistics.median(counts["train"][1:] or
                                                                                          counts["train"]),
        "peak_memory_mib": peak,
        "step_time": statistics.median(timer.times[1:] or timer.times),
    }


# LUFFY-scale length draws for `--plan_only` (tokens): prompt range; on-policy median and log-spread; teacher
# length as a multiple of the group's on-policy median. max_completion_length 8192 as in LUFFY's headline run.
# `ragged`: the issue-24 mix at 8k scale (traces 5-6× the on-policy mean = 6.9-8.3× the median at log-spread 0.8),
# with 16-row micro-batches and GA = 2 (PLAN_GEOMETRY).
PLAN_MIXES = {"early": ((100, 400), 1200, 0.6, (4.0, 6.0)), "early_narrow": ((100, 400), 1200, 0.3, (4.0, 6.0)),
              "late": ((100, 400), 3000, 0.3, (0.8, 1.2)), "ragged": ((100, 400), 1000, 0.8, (6.9, 8.3))}
PLAN_GEOMETRY = {"ragged": (16, 2)}  # (rows per micro-batch, GA); default (8, 4); steps_per_generation = 2·GA
PLAN_HIDDEN = 3584  # Qwen2.5-Math-7B, LUFFY's model: the cost model's hidden size for the `bins` choice


def plan_only(seeds: int = 20, max_len: int = 8192) -> dict:
    """Tokens computed / real tokens at LUFFY's scale from the planner alone (no model): 8 groups of 8 (7 + 1) per
    process and generation batch, 8-row micro-batches, GA = 4, steps_per_generation = 8 (`ragged`: 16-row
    micro-batches, GA = 2, spg = 4). TRL pads every row to the batch's longest prompt and completion; the switch plans
    each optimiser step's window and skips teacher rows in the old-log-prob forwards (budget: a micro-batch's rows at
    full width). `bins`: the micro-batches planned for bins (`plan_micro_batches(bins_hidden_size=...)`), each
    packed into bins no longer than its longest row; `bins_choice`: the layout `pack_sequences="bins"` then picks per
    micro-batch (sdpa, hidden size PLAN_HIDDEN)."""
    from luffy_trl.batching import (
        choose_layout,
        exchangeable_chunks,
        layout_tokens,
        pack_forwards,
        padded_tokens,
        plan_micro_batches,
    )

    out = {}
    for mix, (prompt_range, median, spread, teacher_mult) in PLAN_MIXES.items():
        rows_per_batch, ga = PLAN_GEOMETRY.get(mix, (8, 4))
        spg = 2 * ga
        ratios = {"trl": [], "on": [], "bins": [], "bins_choice": [], "logprob_trl": [], "logprob_on": [],
                  "packed_largest_over_mean": []}
        for seed in range(seeds):
            rng = random.Random(seed)
            prompt, completion, teacher = [], [], []
            for _ in range(8):
                p = rng.randint(*prompt_range)
                for slot in range(8):
                    if slot == 7:
                        c = rng.uniform(*teacher_mult) * median
                    else:
                        c = rng.lognormvariate(0.0, spread) * median
                    prompt.append(p)
                    completion.append(max(1, min(max_len, int(c))))
                    teacher.append(slot == 7)
            order = list(range(64))
            rng.shuffle(order)  # TRL's shuffle, then spg chunks of rows_per_batch rows
            real = sum(prompt) + sum(completion)
            trl = 64 * (max(prompt) + max(completion))
            planned = binned = chosen = 0
            for window in exchangeable_chunks(0, spg, ga):
                rows = [order[rows_per_batch * j + i] for j in window for i in range(rows_per_batch)]
                plan = plan_micro_batches([prompt[r] for r in rows], [completion[r] for r in rows], len(window))
                planned += padded_tokens(plan, [prompt[r] for r in rows], [completion[r] for r in rows])
                bins_plan = plan_micro_batches([prompt[r] for r in rows], [completion[r] for r in rows],
                                               len(window), bins_hidden_size=PLAN_HIDDEN)
                for batch in bins_plan:
                    p, c = [prompt[rows[i]] for i in batch], [completion[rows[i]] for i in batch]
                    binned += layout_tokens(p, c, "bins")[0]
                    chosen += layout_tokens(p, c, choose_layout(p, c, PLAN_HIDDEN))[0]
                packed = plan_micro_batches([prompt[r] for r in rows], [completion[r] for r in rows], len(window),
                                            packed=True)
                sizes = [sum(prompt[rows[i]] + completion[rows[i]] for i in b) for b in packed]
                ratios["packed_largest_over_mean"].append(max(sizes) / statistics.mean(sizes))
            on_policy = [i for i in range(64) if not teacher[i]]
            batches = pack_forwards(prompt, completion, on_policy, rows_per_batch * (max(prompt) + max(completion)))
            logprob = padded_tokens(batches, prompt, completion)
            ratios["trl"].append(trl / real)
            ratios["on"].append(planned / real)
            ratios["bins"].append(binned / real)
            ratios["bins_choice"].append(chosen / real)
            ratios["logprob_trl"].append(trl / real)
            ratios["logprob_on"].append(logprob / real)
        out[mix] = {key: statistics.median(values) for key, values in ratios.items()}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(summary["mixes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    arms = [arm for arm in ARMS if arm in summary["mixes"][mixes[0]]]
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [m + (i - (len(arms) - 1) / 2) * width for m in range(len(mixes))]
        label = LABELS.get(arm, arm)
        axes[0].bar(xs, [summary["mixes"][m][arm]["computed_over_real"] for m in mixes], width, label=label)
        axes[1].bar(xs, [summary["mixes"][m][arm]["train_time"] / summary["mixes"][m]["off"]["train_time"]
                         for m in mixes], width, label=label)
    axes[0].axhline(1.15, color="k", ls="--", lw=0.8, label="target 1.15")
    axes[0].set_title("loss-forward tokens computed / real tokens")
    axes[1].axhline(0.5, color="k", ls="--", lw=0.8, label="target 0.5 (early)")
    axes[1].axhline(1.0, color="grey", ls=":", lw=0.8)
    note = f"{summary['reps']} rep(s)" + ("; too few for timing" if summary["reps"] < 5 else "")
    axes[1].set_title(f"training part / switch-off arm\n({summary['device']}, {note})", fontsize=10)
    for ax in axes:
        ax.set_xticks(range(len(mixes)), mixes)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default: gpu on CUDA, else cpu)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run; the first is a warm-up")
    parser.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=["early", "late"])
    parser.add_argument("--length_scale", type=int, default=1, help="multiply every length (4 on a GPU)")
    parser.add_argument("--out", default=str(RESULTS / "bench_batching.json"))
    parser.add_argument("--replot", default=None, help="only redraw the PNG of an existing result JSON")
    parser.add_argument("--plan_only", action="store_true",
                        help="only the planner's token counts at LUFFY's scale (8192-token completions), no model")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("gpu" if device().type == "cuda" else "cpu")
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text())["summary"], path.with_suffix(".png"))
        return None
    if args.plan_only:
        result = {"mixes": {m: dict(zip(("prompt_range", "on_policy_median", "log_spread", "teacher_multiple"), v))
                            for m, v in PLAN_MIXES.items()}, "computed_over_real": plan_only()}
        (RESULTS / "bench_batching_plan_only.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return result
    tokenizer = toy_tokenizer()
    name = torch.cuda.get_device_name() if device().type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; preset {args.preset}; torch {torch.__version__}", file=sys.stderr)
    records = []
    for rep in range(args.reps):
        for mix in args.mixes:
            order = ARMS if rep % 2 == 0 else ARMS[::-1]  # alternate to cancel drift
            by_arm = {arm: run_arm(arm, mix, args, tokenizer) for arm in order}
            records.append({"rep": rep, "mix": mix, **{arm: by_arm[arm] for arm in ARMS}})
            print(f"rep {rep} {mix}: computed/real " + ", ".join(
                f"{a} {by_arm[a]['computed_over_real']:.3f}" for a in ARMS) + "; train time " + ", ".join(
                f"{a} {by_arm[a]['train_time']:.3f}s" for a in ARMS), file=sys.stderr, flush=True)
    summary = {"device": name, "preset": args.preset, "reps": args.reps, "steps": args.steps,
               "length_scale": args.length_scale, "mixes": {}}
    for mix in args.mixes:
        rows = [r for r in records if r["mix"] == mix]
        entry = {}
        for arm in ARMS:
            entry[arm] = {key: statistics.median(r[arm][key] for r in rows)
                          for key in ("computed_over_real", "computed_with_logprobs_over_real", "train_time",
                                      "step_time", "loss_tokens_computed", "real_tokens", "logprob_tokens_computed",
                                      "real_tokens_per_s")}
            peaks = [r[arm]["peak_memory_mib"] for r in rows if r[arm]["peak_memory_mib"] is not None]
            entry[arm]["peak_memory_mib"] = max(peaks) if peaks else None
        for arm, other in (("on", "off"), ("on", "stock"), ("pack", "off"), ("pack", "on"), ("bins", "off"),
                           ("bins", "on")):
            for key in ("train_time", "step_time"):
                values = [r[arm][key] / r[other][key] for r in rows]
                entry[f"{arm}_over_{other}_{key}"] = {"median": statistics.median(values), "min": min(values),
                                                      "max": max(values), "n": len(values)}
        summary["mixes"][mix] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    plot(summary, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
