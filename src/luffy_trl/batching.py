"""Padding-aware micro-batches as plain functions (no model, no trainer): which row goes to which micro-batch.

TRL 1.16 pads every completion of a generation batch to the longest one, shuffles the rows and splits them into
`steps_per_generation` chunks of `per_device_train_batch_size` rows; chunk `s % steps_per_generation` is the
micro-batch of micro-step `s`. This module plans a cheaper layout with the same gradients (docs/batching.md):

1. `exchangeable_chunks`: which chunks feed exactly the same optimiser steps, so rows may move between them without
   changing any optimiser step's gradient (never across optimiser steps: each step keeps the random subset of rows
   TRL's shuffle gave it).
2. `plan_micro_batches`: within such a window of K chunks, a new assignment of the rows to K micro-batches (the
   Trainer and DeepSpeed count K accumulation micro-steps, so K stays fixed; the rows per micro-batch vary), sorted
   by length and cut into contiguous runs that minimise the tokens computed under a per-micro-batch token budget.
   Rows that take no part in the loss (all-zero loss mask) are left out.
3. `trim_widths`: the prompt and completion widths a micro-batch needs (its longest real prompt and completion).
4. `pack_forwards`: the no-grad forwards (old / reference log-probs) as length-sorted, budgeted batches.
5. `pack_rows`: the same forwards when rows are packed into one sequence each (`pack_sequences`): bins of
   real tokens, first-fit decreasing.
6. `choose_layout`: for one forward, the cheapest of cutting the rows to the longest one, packing them into bins no
   longer than the longest row (`bin_rows`), or one sequence, by a cost model of linear-layer tokens and attention
   pairs (`layout_tokens`; `pack_sequences="bins"`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# The exact segmentation is O(K·R²) in plain Python; above this many steps it falls back to equal-count runs.
MAX_EXACT_PLAN_WORK = 4_000_000
# Cost of one query-key pair of attention in units of one token through the linear layers, times the hidden size h:
# per layer a token meets about 12·h² weights (4·h² in the attention projections, 8·h² in a 4·h-wide MLP), 24·h² FLOPs,
# and a query-key pair costs 4·h FLOPs (its score and its share of the weighted values), so a pair costs
# 4·h / (24·h²) = 1 / (6·h) tokens. A measured calibration would replace it (docs/batching.md).
ATTENTION_PAIR_COST = 1 / 6


def exchangeable_chunks(
    generation_step: int,
    steps_per_generation: int,
    gradient_accumulation_steps: int,
    num_iterations: int = 1,
) -> list[list[int]]:
    """Partition the chunk indices 0..spg-1 into windows of chunks whose rows may be exchanged.

    A generation happens at micro-step `generation_step`; micro-steps `s` up to the next generation use chunk
    `s % spg` and belong to optimiser step `s // GA`. Two chunks are exchangeable when they are used by the same
    multiset of optimiser steps. That multiset is only certain when generation batches and optimiser steps are
    aligned: `generation_step` is a multiple of `spg·μ` (TRL's regular schedule, not a resume with an empty buffer)
    and either GA divides `spg·μ` (each optimiser step lies inside one generation batch; with the Trainer's
    end-of-epoch partial steps too, because an epoch holds whole generation batches) or `spg·μ` divides GA (the
    whole generation batch lies inside one optimiser step). Otherwise every chunk is its own window (trim only).

    Examples: spg = GA: one window of all chunks; spg = 2·GA (LUFFY's headline run): two windows of GA chunks;
    GA = 2·spg: one window; GA = 3, spg = 2: no exchange.
    """
    spg, ga, mu = steps_per_generation, gradient_accumulation_steps, num_iterations
    if spg < 1 or ga < 1 or mu < 1:
        raise ValueError(f"steps_per_generation, gradient_accumulation_steps and num_iterations must be >= 1, "
                         f"got {spg}, {ga}, {mu}.")
    every = spg * mu
    aligned = generation_step % every == 0 and (every % ga == 0 or ga % every == 0)
    if not aligned:
        return [[j] for j in range(spg)]
    signature: dict[int, list[int]] = {j: [] for j in range(spg)}
    for s in range(generation_step, generation_step + every):
        signature[s % spg].append(s // ga)
    windows: dict[tuple, list[int]] = {}
    for j in range(spg):
        windows.setdefault(tuple(signature[j]), []).append(j)
    return list(windows.values())


def plan_micro_batches(
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    num_micro_batches: int,
    *,
    active: Sequence[bool] | None = None,
    max_tokens: int | None = None,
    packed: bool = False,
    bins_hidden_size: int | None = None,
) -> list[list[int]]:
    """Assign the rows of one window to exactly `num_micro_batches` non-empty micro-batches.

    Args:
        prompt_lengths: real (unpadded) prompt length of each row.
        completion_lengths: real completion length of each row (the extent of its completion mask).
        num_micro_batches: K, the micro-steps of the window (fixed: the Trainer and DeepSpeed count them).
        active: rows that take part in the loss; inactive rows (all-zero loss mask) are left out, except that a
            micro-batch with no active row gets one inactive row (the shortest) so that every micro-step still
            runs a forward and backward on every process.
        max_tokens: budget of padded tokens (rows × (longest prompt + longest completion)) per micro-batch. Default:
            `ceil(R / K)` rows at the window's longest prompt + completion, i.e. never more than TRL's own
            micro-batch holds.
        packed: the micro-batches are packed into one sequence each (`pack_sequences`): a micro-batch costs its
            real tokens (the sum of its rows' prompt + completion), so the total is fixed and the plan minimises the
            largest micro-batch (token-balanced micro-batches).
        bins_hidden_size: the micro-batches run cut or as bins (`pack_sequences="bins"`, sdpa/eager), whichever the
            cost model prefers for a model of this hidden size (`choose_layout`): a run costs the cheaper of its cut
            rows and its rows binned first-fit decreasing into sequences no longer than its longest row, in
            token-equivalents; the budget applies to the tokens of that layout.

    Returns:
        K lists of row indices, longest micro-batch first. Active rows are sorted by total length (descending) and
        cut into K contiguous runs that minimise the total padded tokens under the budget (ties: the smaller
        largest micro-batch). Every active row appears exactly once.
    """
    n = len(prompt_lengths)
    if len(completion_lengths) != n or (active is not None and len(active) != n):
        raise ValueError("prompt_lengths, completion_lengths and active must have one entry per row.")
    k = num_micro_batches
    if k < 1 or n < k:
        raise ValueError(f"Cannot fill {k} micro-batches from {n} rows; each micro-batch needs at least one row.")
    active = [True] * n if active is None else [bool(a) for a in active]
    rows = sorted((i for i in range(n) if active[i]),
                  key=lambda i: (-(prompt_lengths[i] + completion_lengths[i]), -completion_lengths[i], i))
    spare = sorted((i for i in range(n) if not active[i]),
                   key=lambda i: (prompt_lengths[i] + completion_lengths[i], i))
    if len(rows) < k:  # one active row per micro-batch, then fill with the shortest inactive rows
        batches = [[i] for i in rows] + [[i] for i in spare[: k - len(rows)]]
        return batches
    prompt = [prompt_lengths[i] for i in rows]
    completion = [completion_lengths[i] for i in rows]
    r = len(rows)
    if max_tokens is None:
        per_batch = -(-n // k)
        max_tokens = per_batch * (max(prompt_lengths) + max(1, max(completion_lengths)))
    if k * r * r > MAX_EXACT_PLAN_WORK:
        bounds = _equal_runs(r, k)
    else:
        bounds = _optimal_runs(prompt, completion, k, max_tokens, packed, bins_hidden_size)
        if bounds is None:  # budget infeasible (a user budget below the longest rows): ignore it
            bounds = _optimal_runs(prompt, completion, k, None, packed, bins_hidden_size)
    return [[rows[i] for i in range(a, b)] for a, b in bounds]


def _equal_runs(r: int, k: int) -> list[tuple[int, int]]:
    edges = [round(j * r / k) for j in range(k + 1)]
    return list(itertools.pairwise(edges))


def _optimal_runs(prompt, completion, k, max_tokens, packed=False, bins_hidden=None) -> list[tuple[int, int]] | None:
    """Cut rows 0..r-1 (sorted) into k non-empty contiguous runs minimising (total cost, largest cost).

    A run costs its padded tokens (rows × (longest prompt + longest completion)), or with `packed` its real tokens,
    or with `bins_hidden` the cheaper of its padded rows and its bins in token-equivalents (`choose_layout`'s model).
    First-fit decreasing over rows sorted longest first extends run a..b to a..b+1 by placing row b alone, so the
    bins of every run starting at a are built incrementally.
    """
    r = len(prompt)
    inf = (float("inf"), float("inf"))
    cost = [[0] * (r + 1) for _ in range(r)]
    tokens = [[0] * (r + 1) for _ in range(r)] if bins_hidden else cost
    pair = ATTENTION_PAIR_COST / max(1, bins_hidden or 1)
    for a in range(r):
        p = c = total = 0
        fills: list[int] = []
        capacity = prompt[a] + max(1, completion[a])  # the run's longest row (rows are sorted, longest first)
        for b in range(a + 1, r + 1):
            p, c = max(p, prompt[b - 1]), max(c, completion[b - 1])
            n = prompt[b - 1] + max(1, completion[b - 1])
            total += n
            padded = (b - a) * (p + max(1, c))
            if not bins_hidden:
                cost[a][b] = total if packed else padded
                continue
            for j, fill in enumerate(fills):
                if fill + n <= capacity:
                    fills[j] += n
                    break
            else:
                fills.append(n)
            width = max(fills)
            binned = (len(fills) * width, len(fills) * width * width * pair)
            cut = (padded, padded * (p + max(1, c)) * pair)
            tokens[a][b], cost[a][b] = min((t + q, t) for t, q in (cut, binned))[::-1]
    # best[j][b]: best (total, largest) for rows 0..b-1 in j runs
    best = [[inf] * (r + 1) for _ in range(k + 1)]
    cut = [[0] * (r + 1) for _ in range(k + 1)]
    best[0][0] = (0, 0)
    for j in range(1, k + 1):
        for b in range(j, r - (k - j) + 1):
            for a in range(j - 1, b):
                prev = best[j - 1][a]
                if prev == inf:
                    continue
                seg = cost[a][b]
                if max_tokens is not None and tokens[a][b] > max_tokens:
                    continue
                cand = (prev[0] + seg, max(prev[1], seg))
                if cand < best[j][b]:
                    best[j][b], cut[j][b] = cand, a
    if best[k][r] == inf:
        return None
    bounds, b = [], r
    for j in range(k, 0, -1):
        a = cut[j][b]
        bounds.append((a, b))
        b = a
    return bounds[::-1]


def trim_widths(prompt_lengths: Sequence[int], completion_lengths: Sequence[int]) -> tuple[int, int]:
    """(prompt width, completion width) a micro-batch needs: its longest real prompt and completion (at least 1)."""
    return max(1, max(prompt_lengths)), max(1, max(completion_lengths))


def padded_tokens(batches: Sequence[Sequence[int]], prompt_lengths, completion_lengths) -> int:
    """Tokens computed when each micro-batch is cut to its own `trim_widths`."""
    total = 0
    for rows in batches:
        p, c = trim_widths([prompt_lengths[i] for i in rows], [completion_lengths[i] for i in rows])
        total += len(rows) * (p + c)
    return total


def pack_forwards(
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    rows: Sequence[int],
    max_tokens: int,
) -> list[list[int]]:
    """Length-sorted batches of `rows` for no-grad forwards, each within `max_tokens` padded tokens.

    Greedy over rows sorted by total length (descending): a row joins the current batch while rows × (longest
    prompt + longest completion) stays within the budget. A row longer than the budget gets a batch of its own.
    """
    order = sorted(rows, key=lambda i: (-(prompt_lengths[i] + completion_lengths[i]), i))
    batches: list[list[int]] = []
    p = c = 0
    for i in order:
        np_, nc = max(p, prompt_lengths[i]), max(c, max(1, completion_lengths[i]))
        if batches and (len(batches[-1]) + 1) * (np_ + nc) <= max_tokens:
            batches[-1].append(i)
            p, c = np_, nc
        else:
            batches.append([i])
            p, c = prompt_lengths[i], max(1, completion_lengths[i])
    return batches


def pack_rows(lengths: Sequence[int], rows: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of `rows` whose summed `lengths` (real tokens) stay within `max_tokens`, for packed no-grad forwards.

    First-fit decreasing over rows sorted by length (longest first): a row goes to the first bin with room, else
    opens a new one; a row longer than the budget gets a bin of its own. Bins keep the longest-first order.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(rows, key=lambda i: (-lengths[i], i)):
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


# ---------------------------------------------------------------------------------------------------------------------
# Layout of one forward: cut to the longest row, bins, or one sequence (`pack_sequences="bins"`)
# ---------------------------------------------------------------------------------------------------------------------
LAYOUTS = ("cut", "bins", "one")


def bin_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows 0..n-1 in bins of at most `capacity` tokens (first-fit decreasing; a longer row gets a bin of its own)."""
    return pack_rows(lengths, range(len(lengths)), capacity)


def layout_tokens(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], layout: str,
                  varlen: bool = False) -> tuple[int, int]:
    """(tokens through the linear layers, query-key pairs of attention) of one forward over these rows.

    `cut`: the rows padded to the longest prompt + longest completion; `bins`: the rows packed by `bin_rows` into
    sequences no longer than the longest row, right-padded to the fullest bin (one dense block-diagonal mask each);
    `one`: all rows in one sequence. With a varlen kernel (`varlen`) attention covers each row alone (Σ rowᵢ²); with
    sdpa/eager a sequence's dense mask covers all its length² pairs.
    """
    lengths = [p + max(1, c) for p, c in zip(prompt_lengths, completion_lengths)]
    if not lengths:
        return 0, 0
    own = sum(n * n for n in lengths)
    if layout == "cut":
        width = max(prompt_lengths) + max(1, max(completion_lengths))
        return len(lengths) * width, own if varlen else len(lengths) * width * width
    if layout == "bins":
        bins = bin_rows(lengths, max(lengths))
        width = max(sum(lengths[i] for i in b) for b in bins)
        return len(bins) * width, own if varlen else len(bins) * width * width
    if layout == "one":
        total = sum(lengths)
        return total, own if varlen else total * total
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def choose_layout(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], hidden_size: int,
                  varlen: bool = False, layouts: Sequence[str] = LAYOUTS,
                  pair_cost: float = ATTENTION_PAIR_COST) -> str:
    """The cheapest of `layouts` for one forward: tokens + pairs · pair_cost / hidden_size (token-equivalents; ties
    keep the earlier layout, `cut` first)."""
    def cost(layout):
        tokens, pairs = layout_tokens(prompt_lengths, completion_lengths, layout, varlen)
        return tokens + pairs * pair_cost / max(1, hidden_size)

    return min(layouts, key=cost)
