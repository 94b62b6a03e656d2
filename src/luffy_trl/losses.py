"""LUFFY's loss as pure tensor functions (no trainer, no model).

Notation (docs/method.md): for a completion token with current log-probability `logp` (with gradient),
rollout log-probability `old_logp` and sequence advantage `A`:

* on-policy token:   ℓ = −A · r,  r = exp(logp − old_logp)          (PPO clip optional)
* off-policy token:  ℓ = −A · f(p), p = exp(logp), no clip, π_φ = 1  (LUFFY's policy shaping)

with f(p) = p / (p + γ) (`"luffy"`), f(p) = p (`"none"`, the unshaped ratio) or f = log p (`"logp"`, SFT-like).
When the teacher's own log-probs are known, p becomes the ratio π_θ/π_φ = exp(logp − logp_teacher).
The per-token losses are then reduced with one of TRL's normalisers (`aggregate_loss`). The "RL w/ SFT loss"
baseline replaces the teacher rows' policy-gradient term by a token-mean NLL (`sft_nll_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPING_FUNCTIONS = ("luffy", "none", "logp")
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def shaping_function(per_token_logps: torch.Tensor, shaping: str = "luffy", gamma: float = 0.1) -> torch.Tensor:
    """f applied to the current-policy probability of off-policy tokens; differentiable through `per_token_logps`.

    `"luffy"`: p/(p+γ), bounded by 1/(1+γ); its gradient is γp/(p+γ)² · ∇log p, largest (1/(4γ)·γ = 1/4) at p = γ.
    `"none"`:  p (the importance weight π_θ/π_φ with π_φ = 1); gradient p · ∇log p vanishes for unlikely tokens.
    `"logp"`:  log p; gradient ∇log p (weight 1), i.e. advantage-weighted maximum likelihood.
    """
    if shaping == "luffy":
        probs = per_token_logps.exp()
        return probs / (probs + gamma)
    if shaping == "none":
        return per_token_logps.exp()
    if shaping == "logp":
        return per_token_logps
    raise ValueError(f"Unknown shaping function {shaping!r}; expected one of {SHAPING_FUNCTIONS}.")


def shaping_gradient_weight(probs: torch.Tensor, shaping: str = "luffy", gamma: float = 0.1) -> torch.Tensor:
    """d f / d log p: the weight that multiplies ∇log p on an off-policy token (for docs, plots and tests)."""
    if shaping == "luffy":
        return gamma * probs / (probs + gamma) ** 2
    if shaping == "none":
        return probs
    if shaping == "logp":
        return torch.ones_like(probs)
    raise ValueError(f"Unknown shaping function {shaping!r}; expected one of {SHAPING_FUNCTIONS}.")


@dataclass
class MixedLoss:
    """Per-token results of `mixed_policy_per_token_loss`, all of shape (B, T)."""

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    """On-policy importance ratio r (after `delta` capping); exactly 1 on off-policy rows."""
    is_low_clipped: torch.Tensor
    """On-policy tokens whose ratio was clipped below (A < 0); False on off-policy rows and when clip is off."""
    is_high_clipped: torch.Tensor
    """On-policy tokens whose ratio was clipped above (A > 0); False on off-policy rows and when clip is off."""
    shaping_weight: torch.Tensor
    """f(p) on every token (meaningful on off-policy rows only), detached."""


def mixed_policy_per_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    is_off_policy: torch.Tensor,
    *,
    shaping: str = "luffy",
    gamma: float = 0.1,
    clip: bool = False,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    teacher_per_token_logps: torch.Tensor | None = None,
    off_policy_weight: float = 1.0,
    off_policy_loss: str = "luffy",
) -> MixedLoss:
    """LUFFY's per-token policy loss for a batch that mixes on-policy and off-policy (teacher) rows.

    Args:
        per_token_logps: (B, T) current-policy log-probs of the completion tokens, with gradient.
        old_per_token_logps: (B, T) rollout-policy log-probs, or None when they equal the current ones (one
            optimiser step per generation batch: the ratio is exactly 1).
        advantages: (B,) or (B, T) advantages.
        is_off_policy: (B,) bool, True for rows holding a teacher completion.
        shaping: f on off-policy tokens, one of `SHAPING_FUNCTIONS`.
        gamma: γ of LUFFY's shaping.
        clip: clip the on-policy ratio to [1 − epsilon_low, 1 + epsilon_high] (PPO/GRPO). Never applied to
            off-policy tokens.
        delta: optional upper cap of the on-policy ratio (TRL's two-sided clipping); needs `clip=True`.
        teacher_per_token_logps: optional (B, T) log π_φ of the teacher tokens; f is then applied to the ratio
            exp(logp − logp_teacher) instead of p (π_φ = 1). 0 on a token means π_φ = 1 there.
        off_policy_weight: multiplier of the off-policy per-token loss (a guidance schedule's loss weight).
        off_policy_loss: `"luffy"` (the shaped term above) or `"sft"`: teacher tokens get no policy-gradient loss
            (the caller adds `sft_nll_loss` instead).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    off = is_off_policy.to(torch.bool).view(-1, 1)
    detached = per_token_logps.detach()
    old = detached if old_per_token_logps is None else old_per_token_logps
    # Off-policy rows have no rollout log-prob (π_φ = 1). Give their unused on-policy branch a ratio of exactly 1 so
    # that the branch stays finite: torch.where's backward multiplies the unselected branch's gradient by 0, and
    # 0 · inf would be NaN.
    old = torch.where(off, detached, old)
    ratio = torch.exp(per_token_logps - old)

    false = torch.zeros_like(ratio, dtype=torch.bool)
    if clip:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        on_policy_loss = -torch.min(ratio * advantages, clipped * advantages)
        on = ~off
        is_low_clipped = (ratio < 1 - epsilon_low) & (advantages < 0) & on
        is_high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0) & on
    else:
        if delta is not None:
            raise ValueError("delta (two-sided clipping) needs clip=True.")
        on_policy_loss = -ratio * advantages
        is_low_clipped = is_high_clipped = false

    if teacher_per_token_logps is None:
        shaped = shaping_function(per_token_logps, shaping, gamma)
    else:
        shaped = shaping_function(per_token_logps - teacher_per_token_logps, shaping, gamma)
    if off_policy_loss == "luffy":
        off_token_loss = -advantages * shaped
        if off_policy_weight != 1.0:
            off_token_loss = off_token_loss * off_policy_weight
    elif off_policy_loss == "sft":
        off_token_loss = torch.zeros_like(on_policy_loss)
    else:
        raise ValueError(f"Unknown off_policy_loss {off_policy_loss!r}; expected 'luffy' or 'sft'.")
    per_token_loss = torch.where(off, off_token_loss, on_policy_loss)
    return MixedLoss(
        per_token_loss=per_token_loss,
        ratio=ratio,
        is_low_clipped=is_low_clipped,
        is_high_clipped=is_high_clipped,
        shaping_weight=shaped.detach(),
    )


def sft_nll_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, is_off_policy: torch.Tensor,
                 tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of the teacher tokens: Σ(−logp · m_off) / Σ m_off (0 without any).

    The SFT term of the "RL w/ SFT loss" baseline (LUFFY's `use_sft_multitask_loss`), per micro-batch; the trainer
    multiplies it by `sft_loss_coef` (and a schedule's loss weight) and divides by gradient accumulation, like
    TRL's entropy term. `tokens` replaces the micro-batch's teacher-token count (padding-free micro-batches: the
    mean teacher tokens per micro-batch of the optimiser step).
    """
    off_mask = mask * is_off_policy.to(mask.dtype).view(-1, 1)
    tokens = off_mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=per_token_logps.dtype)
    return (-per_token_logps * off_mask).sum() / tokens.clamp(min=1.0)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
    nominal_rows: int | None = None,
    bnpo_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar with TRL 1.16's normaliser for `loss_type`.

    Same semantics as `GRPOTrainer._compute_loss` (the test suite checks equality against it):

    * `grpo`:    mean over sequences of Σ_t ℓ·m / Σ_t m, ÷ GA
    * `bnpo`:    Σ ℓ·m / Σ m over the micro-batch, ÷ GA
    * `dr_grpo`: Σ ℓ·m / (B · max_completion_length), ÷ GA   (LUFFY: Σ / 8192, up to the constant B·GA)
    * `dapo`:    Σ ℓ·m / (num_items_in_batch / num_processes · GA / steps_per_generation)  (global token mean)

    GA is 1 outside training.

    Padding-free micro-batches (`luffy_trl.batching`) hold a varying number of rows; so that the optimiser step's
    gradient stays the same, `nominal_rows` (TRL's rows per micro-batch) replaces B in `grpo` and `dr_grpo`, and
    `bnpo_tokens` (the mean loss tokens per micro-batch of the optimiser step) replaces the micro-batch's Σ m in
    `bnpo`. Both default to the micro-batch's own values (TRL's definition).
    """
    ga = gradient_accumulation_steps if training else 1
    masked = per_token_loss * mask
    rows = per_token_loss.size(0) if nominal_rows is None else nominal_rows
    if loss_type == "grpo":
        per_row = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return (per_row.mean() if nominal_rows is None else per_row.sum() / rows) / ga
    if loss_type == "bnpo":
        tokens = mask.sum() if bnpo_tokens is None else torch.as_tensor(bnpo_tokens, dtype=per_token_loss.dtype)
        return masked.sum() / tokens.clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length.")
        return masked.sum() / (rows * max_completion_length) / ga
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("dapo needs num_items_in_batch.")
        normalizer = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype).clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return masked.sum() / normalizer
    raise ValueError(f"Unsupported loss_type {loss_type!r}; MixedPolicyGRPOTrainer supports {SUPPORTED_LOSS_TYPES}.")
