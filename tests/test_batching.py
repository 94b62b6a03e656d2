"""The pure planning functions of `luffy_trl.batching`, without a model."""

import itertools
import random

import pytest

from luffy_trl.batching import (
    exchangeable_chunks,
    pack_forwards,
    padded_tokens,
    plan_micro_batches,
    trim_widths,
)


def optimiser_steps_of(generation_step, spg, ga, mu):
    """Independent reference: chunk -> sorted list of optimiser steps that train on it."""
    steps = {j: [] for j in range(spg)}
    for s in range(generation_step, generation_step + spg * mu):
        steps[s % spg].append(s // ga)
    return steps


@pytest.mark.parametrize("spg,ga,mu", list(itertools.product([1, 2, 3, 4, 6, 8], [1, 2, 3, 4, 8], [1, 2, 3])))
def test_windows_never_mix_optimiser_steps(spg, ga, mu):
    every = spg * mu
    for generation_step in (0, every, 5 * every, every + 1):
        windows = exchangeable_chunks(generation_step, spg, ga, mu)
        assert sorted(j for w in windows for j in w) == list(range(spg))  # a partition of the chunks
        steps = optimiser_steps_of(generation_step, spg, ga, mu)
        for window in windows:
            assert len({tuple(steps[j]) for j in window}) == 1, (window, steps)
        if generation_step % every:  # a resume with an empty buffer: no exchange
            assert all(len(w) == 1 for w in windows)


def test_windows_for_the_geometries_that_matter():
    assert exchangeable_chunks(0, 4, 4) == [[0, 1, 2, 3]]  # spg = GA: the whole generation batch
    assert exchangeable_chunks(8, 8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # LUFFY: spg = 2·GA, two optimiser steps
    assert exchangeable_chunks(0, 2, 4) == [[0, 1]]  # GA = 2·spg: the batch lies inside one step
    assert exchangeable_chunks(0, 2, 2, 2) == [[0, 1]]  # μ = 2: each step sees both chunks once more
    assert exchangeable_chunks(4, 2, 4, 2) == [[0, 1]]
    assert exchangeable_chunks(0, 4, 2, 2) == [[0, 1], [2, 3]]  # μ = 2, spg = 2·GA
    assert exchangeable_chunks(0, 2, 3) == [[0], [1]]  # GA = 3, spg = 2: steps straddle generation batches
    assert exchangeable_chunks(0, 3, 2, 2) == [[0], [1], [2]]  # spg·μ = 6 is a multiple of GA, chunks differ
    with pytest.raises(ValueError, match="must be >= 1"):
        exchangeable_chunks(0, 0, 1)


def random_rows(rng, n):
    prompt = [rng.randint(3, 30) for _ in range(n)]
    completion = [rng.choice([rng.randint(1, 40), rng.randint(100, 200)]) for _ in range(n)]
    return prompt, completion


def brute_force_best(prompt, completion, k, budget):
    """Exhaustive: the minimum total padded tokens over every assignment of the rows to k non-empty batches."""
    n = len(prompt)
    best = None
    for labels in itertools.product(range(k), repeat=n):
        if len(set(labels)) < k:
            continue
        batches = [[i for i in range(n) if labels[i] == b] for b in range(k)]
        costs = [len(b) * (max(prompt[i] for i in b) + max(completion[i] for i in b)) for b in batches]
        if max(costs) > budget:
            continue
        best = sum(costs) if best is None else min(best, sum(costs))
    return best


@pytest.mark.parametrize("seed", range(60))
def test_plan_is_a_partition_with_the_least_padding(seed):
    rng = random.Random(seed)
    n, k = rng.randint(2, 7), None
    k = rng.randint(1, min(n, 3))
    prompt, completion = random_rows(rng, n)
    plan = plan_micro_batches(prompt, completion, k)
    assert len(plan) == k and all(plan)
    assert sorted(i for b in plan for i in b) == list(range(n))
    budget = -(-n // k) * (max(prompt) + max(completion))
    for rows in plan:  # never more padded tokens than TRL's own micro-batch
        assert len(rows) * sum(trim_widths([prompt[i] for i in rows], [completion[i] for i in rows])) <= budget
    # Contiguous runs of the length-sorted rows: within 5% of the exhaustive optimum (prompt and completion widths
    # are two dimensions, so sorting by their sum is not always optimal), and exactly optimal when prompts are equal.
    assert padded_tokens(plan, prompt, completion) <= 1.05 * brute_force_best(prompt, completion, k, budget)
    same_prompt = [prompt[0]] * n
    plan = plan_micro_batches(same_prompt, completion, k)
    assert padded_tokens(plan, same_prompt, completion) == brute_force_best(same_prompt, completion, k, budget)


def test_plan_separates_long_teacher_rows_from_short_rows():
    # 4 micro-batches of 8 rows, one teacher trace (length 500) per 8 rows, on-policy rows 60-120 tokens.
    rng = random.Random(0)
    completion = [500 if i % 8 == 7 else rng.randint(60, 120) for i in range(32)]
    prompt = [rng.randint(40, 60) for _ in range(32)]
    plan = plan_micro_batches(prompt, completion, 4)
    teacher_batches = {b for b, rows in enumerate(plan) for i in rows if completion[i] == 500}
    assert len(teacher_batches) == 1  # the four traces share one micro-batch
    real = sum(p + c for p, c in zip(prompt, completion))
    trl = 32 * (max(prompt) + max(completion))
    assert padded_tokens(plan, prompt, completion) <= 1.15 * real < 0.5 * trl


def test_inactive_rows_are_dropped_but_every_micro_batch_keeps_a_row():
    prompt, completion = [5] * 8, [10, 0, 0, 7, 0, 0, 0, 3]
    active = [c > 0 for c in completion]
    plan = plan_micro_batches(prompt, completion, 2, active=active)
    assert sorted(i for b in plan for i in b) == [0, 3, 7]
    plan = plan_micro_batches(prompt, completion, 4, active=active)
    rows = [i for b in plan for i in b]
    assert len(plan) == 4 and all(len(b) == 1 for b in plan)
    assert {0, 3, 7} <= set(rows) and len(set(rows)) == 4
    plan = plan_micro_batches(prompt, completion, 3, active=[False] * 8)
    assert len(plan) == 3 and all(len(b) == 1 for b in plan)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per row"):
        plan_micro_batches([1, 2], [1], 1)
    with pytest.raises(ValueError, match="at least one row"):
        plan_micro_batches([1], [1], 2)


def test_large_windows_fall_back_to_equal_runs():
    rng = random.Random(1)
    prompt, completion = random_rows(rng, 512)
    plan = plan_micro_batches(prompt, completion, 64)
    assert len(plan) == 64 and sorted(i for b in plan for i in b) == list(range(512))
    assert {len(b) for b in plan} == {8}
    assert padded_tokens(plan, prompt, completion) < 512 * (max(prompt) + max(completion))


def test_pack_forwards_respects_the_budget_and_keeps_every_row():
    rng = random.Random(2)
    prompt, completion = random_rows(rng, 40)
    rows = [i for i in range(40) if i % 5]
    budget = 8 * (max(prompt) + max(completion))
    batches = pack_forwards(prompt, completion, rows, budget)
    assert sorted(i for b in batches for i in b) == rows
    for b in batches:
        assert len(b) * sum(trim_widths([prompt[i] for i in b], [completion[i] for i in b])) <= budget
    assert len(batches) <= -(-40 // 8)  # never more forwards than TRL's fixed-size batches
    assert pack_forwards(prompt, completion, [], budget) == []
    assert pack_forwards([10], [10], [0], 5) == [[0]]  # a row over the budget runs alone
