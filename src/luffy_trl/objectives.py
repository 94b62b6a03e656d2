"""TRL 1.16's on-policy objectives as pure tensor functions: every `loss_type` and both importance-sampling levels.

`luffy_trl.losses.mixed_policy_per_token_loss` takes the on-policy term of a mixed batch from here and puts LUFFY's
shaped teacher term on the teacher rows. The formulas follow `GRPOTrainer._compute_loss` of TRL 1.16 (re-written,
not copied; `tests/test_trainer_loss.py` checks the trainer against stock TRL for every loss type and level, and
`tests/test_objectives.py` checks these functions against independent computations). With r the importance ratio
(token level: exp(logp − logp_old), (B, T); sequence level, GSPO: exp(mean_t(logp − logp_old)), (B, 1)):

* `grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`, `luffy` (the PPO family): −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), with
  r capped at `delta` when set (TRL's two-sided clipping); unclipped −r·A with `clip=False` (LUFFY's
  `loss_remove_clip`).
* `cispo`: −sg(min(r, ε_high)) · A · logp (a detached, truncated IS weight on the log-likelihood).
* `sapo`: −σ(τ(r − 1)) · 4/τ · A, with τ = `sapo_temperature_pos` where A > 0 and `sapo_temperature_neg` elsewhere.
* `vespo`: −sg(φ(w)) · A · logp, φ(w) = exp(λ + k·log w − λ·w) with w the sequence ratio
  exp(Σ_t clamp(logp − logp_old, ±20) + Σ_t log clamp(IS ratio)) clamped to [1e-8, e^20], and (k, λ) =
  (`vespo_k_pos`, `vespo_lambda_pos`) where A ≥ 0, (`vespo_k_neg`, `vespo_lambda_neg`) elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# TRL 1.16's loss types, grouped by the on-policy term they use.
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "luffy")
WEIGHTED_LOGP_LOSS_TYPES = ("cispo", "vespo")  # −sg(weight) · A · logp
ON_POLICY_LOSS_TYPES = PPO_LOSS_TYPES + ("cispo", "sapo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# VESPO's clamp of the log weight: log(1e-8) below (as TRL, which follows the paper's implementation), 20 above.
VESPO_LOG_MIN = math.log(1e-8)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1): the masked mean over each row's tokens (0 for a row without any)."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def log_importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """TRL's `log_importance_weights`: the token log-ratio (B, T), or its masked row mean (B, 1) for GSPO."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return sequence_mean(log_ratio, mask)
    raise ValueError(f"Unknown importance_sampling_level {level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}.")


@torch.no_grad()
def vespo_gamma_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                        importance_sampling_ratio: torch.Tensor | None = None, *, k_pos: float = 2.0,
                        lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's detached sequence weight φ(w) = e^λ · w^k · e^(−λw) (φ(1) = 1), (B, 1); 0 where not finite.

    log w = Σ_t clamp(log r_t, −20, 20) · m_t (+ Σ_t clamp(log IS_t, log 1e-8, 20) with vLLM's IS ratio),
    clamped to [log 1e-8, 20]. (k, λ) follow the sign of A (A ≥ 0: the positive pair).
    """
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + torch.clamp(torch.log(importance_sampling_ratio), VESPO_LOG_MIN, 20.0).sum(-1, keepdim=True)
    log_w = torch.clamp(log_w, VESPO_LOG_MIN, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class OnPolicyTerm:
    """The on-policy per-token loss of one TRL loss type and the clip indicators TRL logs for it."""

    per_token_loss: torch.Tensor
    """(B, T), or (B, 1) for the PPO family and sapo at sequence level (broadcast over the row's tokens)."""
    is_low_clipped: torch.Tensor
    """PPO family: r < 1 − ε_low and A < 0 (same shape as r); all False for the other types and without clip."""
    is_high_clipped: torch.Tensor
    """PPO family: r > 1 + ε_high and A > 0; cispo: r > ε_high and A > 0 (TRL's `cispo_clip_ratio`)."""


def on_policy_term(loss_type: str, ratio: torch.Tensor, advantages: torch.Tensor, per_token_logps: torch.Tensor, *,
                   clip: bool = True, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float | None = None,
                   sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                   vespo_weight: torch.Tensor | None = None) -> OnPolicyTerm:
    """TRL's per-token policy loss of `loss_type` for importance ratio `ratio` ((B, T) or (B, 1), with gradient).

    `clip` and `delta` apply to the PPO family only (cispo, sapo and vespo have their own treatment of the ratio, as
    in TRL); `vespo_weight` is `vespo_gamma_weights`' φ, needed for `vespo`.
    """
    false = torch.zeros_like(ratio, dtype=torch.bool)
    if loss_type in PPO_LOSS_TYPES:
        if not clip:
            if delta is not None:
                raise ValueError("delta (two-sided clipping) needs clip=True.")
            return OnPolicyTerm(-ratio * advantages, false, false)
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        loss = -torch.min(ratio * advantages, clipped * advantages)
        return OnPolicyTerm(loss, (ratio < 1 - epsilon_low) & (advantages < 0),
                            (ratio > 1 + epsilon_high) & (advantages > 0))
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=epsilon_high).detach()
        high = (ratio > epsilon_high) & (advantages > 0)
        return OnPolicyTerm(-weight * advantages * per_token_logps, torch.zeros_like(high), high)
    if loss_type == "sapo":
        temperature = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        gate = torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature
        return OnPolicyTerm(-gate * advantages, false, false)
    if loss_type == "vespo":
        if vespo_weight is None:
            raise ValueError("vespo needs vespo_weight (vespo_gamma_weights).")
        return OnPolicyTerm(-vespo_weight * advantages * per_token_logps, false, false)
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {ON_POLICY_LOSS_TYPES}.")
