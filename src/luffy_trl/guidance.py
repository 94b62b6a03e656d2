"""When and how much off-policy guidance: triggers, schedules and trace selection, as pure functions.

The trainer (`luffy_trl.trainer`) calls these with plain tensors and numbers; nothing here needs a model.

* **Triggers** decide, per group, whether its teacher completion takes part, from the rewards of the group's
  on-policy samples (`trigger_fired`, `participating_teacher_rows`). A teacher row that does not take part is left
  out of the group baseline and of the loss.
* **Schedules** give the guidance strength as a function of the optimiser step (`schedule_value`): either a weight
  on the off-policy loss term or the share of groups that get a teacher trace (`group_gets_teacher`).
* **Trace selection** orders the several traces a prompt may have (`trace_order`); teacher slot `j` of a group
  takes the `j`-th trace of that order (cycling when there are fewer traces than slots).

Decisions that need randomness are keyed on `(seed, step, generation index, global group)` through a string-seeded
`random.Random` (SHA-512 of the key, independent of `PYTHONHASHSEED`), so every process reaches the same decision
for a group without communicating, and a resumed run repeats the decisions of an uninterrupted one (a checkpoint
inside a generation batch carries that batch, decisions applied, in `luffy_trl.trainer.checkpoint`'s state; the next
batch is generated at the same optimiser step with the same key).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

TRIGGERS = ("always", "all_fail", "accuracy_below")
SCHEDULES = ("constant", "linear", "cosine")
SCHEDULE_TARGETS = ("loss_weight", "group_share")
TRACE_SELECTIONS = ("first", "random", "shortest")
OFF_POLICY_LOSSES = ("luffy", "sft")


# ----------------------------------------------------------------------------------------------------------------
# Triggers
# ----------------------------------------------------------------------------------------------------------------
def on_policy_group_accuracy(
    total_rewards: torch.Tensor, is_off_policy: torch.Tensor, num_generations: int, success_threshold: float
) -> torch.Tensor:
    """Share of each group's on-policy samples whose total reward reaches `success_threshold`.

    Args:
        total_rewards: (N,) weighted total reward per completion in TRL's global order (NaN = unscorable, which
            counts as unsolved).
        is_off_policy: (N,) bool, True for teacher rows (they never count).
        num_generations: group size G; N must be a multiple of G.
    Returns:
        (N // G,) float accuracy over the on-policy rows of each group (0 for a group without on-policy rows).
    """
    solved = (total_rewards >= success_threshold) & ~is_off_policy  # NaN >= x is False
    on = (~is_off_policy).view(-1, num_generations).sum(1)
    return solved.view(-1, num_generations).sum(1).float() / on.clamp(min=1).float()


def trigger_fired(
    total_rewards: torch.Tensor,
    is_off_policy: torch.Tensor,
    num_generations: int,
    trigger: str = "always",
    *,
    success_threshold: float = 1.0,
    accuracy_threshold: float = 0.5,
) -> torch.Tensor:
    """(N // G,) bool: whether each group's teacher completion(s) take part under `trigger`.

    * `always`: every group (LUFFY).
    * `all_fail`: no on-policy sample of the group is solved (AMPO; HPT's `switch` with gate 0).
    * `accuracy_below`: the on-policy accuracy of the group is strictly below `accuracy_threshold`.
    """
    num_groups = total_rewards.numel() // num_generations
    if trigger == "always":
        return torch.ones(num_groups, dtype=torch.bool, device=total_rewards.device)
    accuracy = on_policy_group_accuracy(total_rewards, is_off_policy, num_generations, success_threshold)
    if trigger == "all_fail":
        return accuracy == 0
    if trigger == "accuracy_below":
        return accuracy < accuracy_threshold
    raise ValueError(f"Unknown trigger {trigger!r}; expected one of {TRIGGERS}.")


def participating_teacher_rows(is_off_policy: torch.Tensor, fired: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(N,) bool: teacher rows whose group's trigger fired."""
    return is_off_policy & fired.repeat_interleave(num_generations)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------
def schedule_value(
    step: int,
    schedule: str = "constant",
    *,
    start: float = 1.0,
    end: float = 0.0,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    max_steps: int | None = None,
) -> float:
    """Guidance strength at optimiser step `step` (0-based: the step being computed).

    Warm-up: `start · step / warmup_steps` for `step < warmup_steps` (0 at step 0, like a learning-rate warm-up).
    Then, with `t = min(1, (step − warmup_steps) / D)` and `D = decay_steps` (default: `max_steps − warmup_steps`):

    * `constant`: `start`
    * `linear`:   `start + (end − start) · t`
    * `cosine`:   `end + (start − end) · (1 + cos(π t)) / 2`

    and `end` once the decay is over.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if warmup_steps > 0 and step < warmup_steps:
        return start * step / warmup_steps
    if schedule == "constant":
        return start
    horizon = decay_steps
    if horizon is None:
        if max_steps is None or max_steps <= 0:
            raise ValueError(f"A {schedule!r} schedule without decay_steps needs max_steps.")
        horizon = max_steps - warmup_steps
    t = min(1.0, max(0.0, (step - warmup_steps) / max(horizon, 1)))
    if schedule == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def keyed_rng(purpose: str, seed: int, step: int, generation: int, index: int) -> random.Random:
    """A `random.Random` that every process builds identically from the key (string seeds hash with SHA-512)."""
    return random.Random(f"luffy-{purpose}-{seed}-{step}-{generation}-{index}")


def group_gets_teacher(share: float, *, seed: int, step: int, generation: int, group: int) -> bool:
    """Whether global group `group` of a generation batch gets its teacher trace(s) when a `share` of groups do.

    Each group is an independent Bernoulli(`share`) draw keyed on (seed, step, generation, group); `share >= 1`
    always and `share <= 0` never get one, without drawing.
    """
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    return keyed_rng("share", seed, step, generation, group).random() < share


# ----------------------------------------------------------------------------------------------------------------
# Several traces per prompt
# ----------------------------------------------------------------------------------------------------------------
def trace_order(
    num_traces: int,
    selection: str = "first",
    *,
    lengths: Sequence[int] | None = None,
    rng: random.Random | None = None,
) -> list[int]:
    """The order in which a group's teacher slots take a prompt's traces: slot `j` takes `order[j % num_traces]`.

    * `first`: column order (slot 0 takes the first trace; with one teacher slot, always the first trace).
    * `shortest`: increasing `lengths` (ties keep column order); one teacher slot takes the shortest trace.
    * `random`: a uniformly random permutation from `rng` (so `k ≤ num_traces` slots get distinct traces).
    """
    indices = list(range(num_traces))
    if selection == "first" or num_traces <= 1:
        if selection not in TRACE_SELECTIONS:
            raise ValueError(f"Unknown trace selection {selection!r}; expected one of {TRACE_SELECTIONS}.")
        return indices
    if selection == "shortest":
        if lengths is None or len(lengths) != num_traces:
            raise ValueError("trace_order(selection='shortest') needs one length per trace.")
        return sorted(indices, key=lambda i: (lengths[i], i))
    if selection == "random":
        if rng is None:
            raise ValueError("trace_order(selection='random') needs an rng.")
        rng.shuffle(indices)
        return indices
    raise ValueError(f"Unknown trace selection {selection!r}; expected one of {TRACE_SELECTIONS}.")


# ----------------------------------------------------------------------------------------------------------------
# Teacher log-probabilities
# ----------------------------------------------------------------------------------------------------------------
def align_teacher_logprobs(
    logprobs: Sequence[float] | None, num_full_tokens: int, num_kept_tokens: int
) -> list[float] | None:
    """Teacher log-probs for the `num_kept_tokens` training tokens of a trace, or None when they do not fit.

    `logprobs` must hold one float per token of the teacher completion as the trainer tokenizes it
    (`num_full_tokens`, end-of-turn token included), or one fewer: the end-of-turn token the trainer appends then
    gets log-prob 0 (π_φ = 1). A truncated trace keeps the first `num_kept_tokens` values. Any other length, a
    value that is not a finite number ≤ 0 (up to 1e-6 rounding), or a value of the wrong type returns None (the
    caller falls back to π_φ = 1 for the whole row).
    """
    if logprobs is None:
        return None
    try:
        values = [float(v) for v in logprobs]
    except (TypeError, ValueError):
        return None
    if len(values) == num_full_tokens - 1:
        values.append(0.0)
    if len(values) != num_full_tokens or not all(math.isfinite(v) and v <= 1e-6 for v in values):
        return None
    return [min(v, 0.0) for v in values[:num_kept_tokens]]
