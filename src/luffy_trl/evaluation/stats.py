"""Means with 95% intervals for comparisons of training runs: a two-level bootstrap over seeds and problems.

A result is a (seeds, problems) array of per-problem scores (each problem's mean over its samples) of one arm on one
held-out set: the same problems for every seed. The interval resamples seeds with replacement, then problems with
replacement (the same problems for every seed of a replicate, since they are shared), and takes the percentile
interval of the replicated means: it covers both the run-to-run variation of training and the finite problem set. For
two arms evaluated on the same problems, `paired_difference` resamples the problems jointly (their difficulty is
shared) and the seeds of each arm independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    seeds: int
    problems: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _as_scores(scores) -> np.ndarray:
    array = np.asarray(scores, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"scores must be a non-empty (seeds, problems) array, got shape {array.shape}")
    return array


def _replicates(seeds: int, problems: int, reps: int, rng: np.random.Generator):
    return rng.integers(0, seeds, size=(reps, seeds)), rng.integers(0, problems, size=(reps, problems))


def _replicated_means(array: np.ndarray, seed_idx: np.ndarray, problem_idx: np.ndarray) -> np.ndarray:
    # mean over the resampled seeds and problems of each replicate: array[seed_idx[r]][:, problem_idx[r]].mean()
    per_seed_problem = array[seed_idx[:, :, None], problem_idx[:, None, :]]
    return per_seed_problem.mean(axis=(1, 2))


def bootstrap_mean(scores, reps: int = 4000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of `scores` ((seeds, problems), or (problems,) for one seed) with its bootstrap interval."""
    array = _as_scores(scores)
    rng = np.random.default_rng(seed)
    seed_idx, problem_idx = _replicates(*array.shape, reps, rng)
    means = _replicated_means(array, seed_idx, problem_idx)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(array.mean()), float(low), float(high), *array.shape)


def paired_difference(scores_a, scores_b, reps: int = 4000, level: float = 0.95, seed: int = 0) -> Interval:
    """mean(a) − mean(b) for two arms on the same problems (the columns must match), with its bootstrap interval."""
    a, b = _as_scores(scores_a), _as_scores(scores_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the arms were scored on different problem sets ({a.shape[1]} vs {b.shape[1]} problems)")
    rng = np.random.default_rng(seed)
    problem_idx = rng.integers(0, a.shape[1], size=(reps, a.shape[1]))
    seeds_a = rng.integers(0, a.shape[0], size=(reps, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(reps, b.shape[0]))
    diffs = _replicated_means(a, seeds_a, problem_idx) - _replicated_means(b, seeds_b, problem_idx)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(a.mean() - b.mean()), float(low), float(high), min(a.shape[0], b.shape[0]), a.shape[1])
