"""Throughput and worst-case latency of the math rewards.

    python benchmarks/bench_rewards.py [--groups 128] [--out results.jsonl]

Completions are synthetic but shaped like LUFFY rollouts: a ~3k-character thought with inline math, `</think>`, a
short solution with a final `\\boxed{}`; half right, half wrong, 10% cut before `</think>`. Gold answers are the
benchmark golds of LUFFY's `valid.all.parquet` (shipped with the package), 8 completions per gold (one GRPO group).
Every measurement scores the same batch, with freshly started workers (gold parses are cached per process). Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import threading
import time
from importlib.metadata import version

import pandas as pd

from luffy_trl import rewards
from luffy_trl.evaluation import benchmark_dir

BENCHMARKS = benchmark_dir()
GROUP = 8

ADVERSARIAL = {
    "huge_sum_inline (50k chars)": "</think>$" + "1+" * 25_000 + "1$",
    "nested_parens_inline (6k)": "</think>$" + "(" * 3_000 + "1" + ")" * 3_000 + "$",
    "nested_fracs_inline": "</think>$" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "$",
    "nested_braces_boxed": "</think>\\boxed{" + "{" * 5_000 + "1" + "}" * 5_000 + "}",
    "power_tower": "</think>$\\boxed{9^{9^{9^{9}}}}$",
    "huge_factorial": "</think>$\\boxed{(10^{10})!}$",
    "many_boxed (200k chars)": "</think>" + "\\boxed{1} " * 20_000,
    "binary_junk (50k)": "</think>" + bytes(random.Random(0).getrandbits(8) for _ in range(50_000)).decode("latin-1"),
}


def completion(gold: str, rng: random.Random) -> str:
    """A synthetic rollout for `gold`: right (50%), wrong, or cut before `</think>` (10%)."""
    steps = [f"Let $x_{i} = {rng.randint(2, 99)}$, so $x_{i}^2 + {i}x_{i} = \\frac{{{rng.randint(1, 9)}}}{{{i + 2}}}$. "
             f"Checking: {rng.randint(10, 99)} + {rng.randint(10, 99)} = {rng.randint(100, 199)}.\n" for i in range(30)]
    thought = "<think>\nOkay, let me work through this problem.\n" + "".join(steps)
    if rng.random() < 0.1:
        return thought
    answer = gold if rng.random() < 0.5 else f"{gold} + 1"
    solution = ("\n</think>\n\nWe set up the equations $a + b = 10$ and $ab = 21$, so $a, b$ are roots of "
                f"$t^2 - 10t + 21 = 0$.\n\nSimplifying gives the result.\n\nThe final answer is $\\boxed{{{answer}}}$.")
    return thought + solution


def batch(groups: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`groups` benchmark golds × 8 synthetic completions each."""
    frame = pd.read_parquet(BENCHMARKS / "valid.all.parquet")
    golds = sorted({rm["ground_truth"] for rm in frame.reward_model})
    rng = random.Random(seed)
    golds = [g for g in rng.sample(golds, min(groups, len(golds))) for _ in range(GROUP)]
    return [completion(g, rng) for g in golds], golds


def in_process(completions: list[str], golds: list[str]) -> tuple[list[float], list[float | None]]:
    """The scoring the workers do, serially in this (main) thread with no time limit: the overhead-free baseline.
    Returns the time and the score of each completion."""
    rewards.parse_gold.cache_clear()
    times, scores = [], []
    for text, gold in zip(completions, golds):
        seconds, score = timed(rewards.score_math, gold, rewards.prepare_answer(text, think_gate=True))
        times.append(seconds)
        scores.append(score)
    return times, scores


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def with_fresh_workers(reward, completions, golds) -> tuple[float, list, dict]:
    """Time `reward` on the batch with newly started workers (empty caches), after their startup."""
    rewards.shutdown_reward_workers()
    reward(["</think>\\boxed{1}"], ground_truth=["1"])
    time.sleep(1)  # let every worker finish starting
    metrics = {}
    seconds, scores = timed(reward, completions, ground_truth=golds, log_metric=metrics.__setitem__)
    return seconds, scores, metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=128, help="GRPO groups (of 8 completions) per batch")
    parser.add_argument("--out", help="append the JSON result line to this file")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the in-process baseline runs without time limits
    cpus = len(os.sched_getaffinity(0))
    completions, golds = batch(args.groups)
    result = {
        "cpus": cpus, "load_avg_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "math_verify": version("math-verify"), "batch": len(completions), "timeout_s": rewards.DEFAULT_TIMEOUT,
    }

    times, baseline = in_process(completions, golds)
    result["in_process_serial_per_s"] = round(len(times) / sum(times), 1)
    result["in_process_slowest_completion_s"] = round(max(times), 3)
    print(f"in-process, serial, no time limit: {result['in_process_serial_per_s']:7.1f} completions/s "
          f"(slowest completion {max(times):.3f} s)")

    for workers in sorted({1, cpus}):
        seconds, scores, metrics = with_fresh_workers(rewards.make_math_reward(num_workers=workers), completions, golds)
        assert scores == baseline, "the workers and the in-process baseline disagree"
        result[f"luffy_math_reward_{workers}_workers_per_s"] = round(len(scores) / seconds, 1)
        print(f"luffy_math_reward, {workers} worker(s):    {len(scores) / seconds:7.1f} completions/s "
              f"(timeouts {metrics['rewards/luffy_math_reward/timeouts']:.0f}, "
              f"mean reward {sum(scores) / len(scores):.2f})")
    seconds, scores, _ = with_fresh_workers(rewards.make_math_reward(think_gate=False, num_workers=cpus),
                                            completions, golds)
    result[f"math_reward_{cpus}_workers_per_s"] = round(len(scores) / seconds, 1)
    print(f"math_reward (whole completion), {cpus} worker(s): {len(scores) / seconds:7.1f} completions/s")

    reward = rewards.make_math_reward(num_workers=cpus)
    worst = {}
    for name, text in ADVERSARIAL.items():
        seconds, (score,) = timed(reward, [text], ground_truth=["3"])
        worst[name] = round(seconds, 2)
        print(f"adversarial {name:30s} {seconds:6.2f} s  score {score}")
    result["adversarial_s"] = worst
    result["adversarial_worst_s"] = max(worst.values())

    out = []
    texts = list(ADVERSARIAL.values())
    thread = threading.Thread(target=lambda: out.append(timed(reward, texts, ground_truth=["3"] * len(texts))))
    thread.start()
    thread.join()
    result["adversarial_batch_from_thread_s"] = round(out[0][0], 2)
    print(f"all {len(texts)} adversarial completions in one batch, from a worker thread: {out[0][0]:.2f} s")

    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
