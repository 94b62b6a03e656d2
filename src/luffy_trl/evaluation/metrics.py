"""Pure metric functions: avg@k, unbiased pass@k, and per-benchmark aggregation of scored samples.

A *sample* is one generation for one problem: its score (1.0 correct, 0.0 not), its length in tokens, whether it hit
the token limit and whether its answer is in `\\boxed{}`. A benchmark's metrics are computed from the samples of all
its problems; averages over benchmarks are unweighted (LUFFY's "Avg.").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScoredSample:
    """One scored generation."""

    score: float | None  # 1.0 correct, 0.0 incorrect, None: the gold answer did not parse (counts as incorrect)
    num_tokens: int  # generated tokens, end token included
    truncated: bool  # stopped by the token limit, not by an end token
    boxed: bool  # the scored answer contains `\boxed{`


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al., 2021): 1 − C(n−c, k) / C(n, k).

    The probability that at least one of `k` samples drawn without replacement from the `n` is correct. The binomial
    coefficients are exact Python integers and (C(n, k) − C(n−c, k)) / C(n, k) is rounded once (integer true
    division): no overflow and no cancellation for any n, and pass@1 is exactly c / n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total


def avg_at_k(scores: Sequence[float]) -> float:
    """Mean accuracy over the `k` samples of one problem (avg@k; equal to pass@1 from the same samples)."""
    if not scores:
        raise ValueError("avg@k needs at least one sample")
    return sum(scores) / len(scores)


def default_pass_ks(n: int) -> list[int]:
    """The k reported by default for `n` samples per problem: the powers of two below `n`, and `n`."""
    ks = [2**i for i in range(n.bit_length()) if 2**i < n]
    return ks + [n]


def benchmark_metrics(problems: Iterable[Sequence[ScoredSample]], pass_ks: Iterable[int] | None = None) -> dict:
    """Metrics of one benchmark from the samples of each of its problems.

    Returns `num_problems`, `k` (samples per problem; the smallest if problems differ), `accuracy` (avg@k: the mean
    over problems of each problem's mean score, which is LUFFY's mean over rows when every problem has k samples),
    `pass@j` for each j in `pass_ks` (default `default_pass_ks(k)`; every j must be <= k), `mean_length` (tokens, over
    all samples), `truncation_rate` and `boxed_rate` (fractions of all samples), and `gold_unparseable` (problems
    whose gold answer did not parse; their samples count as incorrect, as in LUFFY's mean over rows)."""
    problems = [list(samples) for samples in problems]
    if not problems or not all(problems):
        raise ValueError("every problem needs at least one sample")
    k = min(len(samples) for samples in problems)
    pass_ks = sorted(set(default_pass_ks(k) if pass_ks is None else pass_ks))
    if any(j > k for j in pass_ks):
        raise ValueError(f"pass@k needs k <= {k} (the samples per problem), got {pass_ks}")
    everything = [s for samples in problems for s in samples]
    scores = [[s.score or 0.0 for s in samples] for samples in problems]
    metrics = {
        "num_problems": len(problems),
        "k": k,
        "accuracy": sum(avg_at_k(row) for row in scores) / len(problems),
    }
    correct = [sum(score == 1.0 for score in row) for row in scores]
    for j in pass_ks:
        metrics[f"pass@{j}"] = sum(pass_at_k(len(row), c, j) for row, c in zip(scores, correct)) / len(problems)
    metrics["mean_length"] = sum(s.num_tokens for s in everything) / len(everything)
    metrics["truncation_rate"] = sum(s.truncated for s in everything) / len(everything)
    metrics["boxed_rate"] = sum(s.boxed for s in everything) / len(everything)
    metrics["gold_unparseable"] = sum(all(s.score is None for s in samples) for samples in problems)
    return metrics


def average_metrics(per_benchmark: Mapping[str, Mapping[str, float]]) -> dict:
    """Unweighted mean over benchmarks of `accuracy`, `mean_length`, `truncation_rate` and `boxed_rate`, with the
    names of the benchmarks averaged."""
    if not per_benchmark:
        raise ValueError("no benchmarks to average")
    keys = ("accuracy", "mean_length", "truncation_rate", "boxed_rate")
    values = list(per_benchmark.values())
    average = {key: sum(m[key] for m in values) / len(values) for key in keys}
    return {"benchmarks": list(per_benchmark), **average}
