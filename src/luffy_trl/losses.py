"""LUFFY's loss as pure tensor functions (no trainer, no model).

Notation (docs/method.md): for a completion token with current log-probability `logp` (with gradient),
rollout log-probability `old_logp` and sequence advantage `A`:

* on-policy token:   ℓ = −A · r,  r = g(logp, old_logp), by default exp(logp − old_logp)   (PPO clip optional)
* off-policy token:  ℓ = −A · f(p), p = exp(logp), no clip, π_φ = 1  (LUFFY's policy shaping)

with f(p) = p / (p + γ) (`"luffy"`), f(p) = p (`"none"`, the unshaped ratio) or f = log p (`"logp"`, SFT-like), and
the other reshapes of LUFFY's `compute_token_on_off_policy_loss` (`p_logp`, `square_root`, `pow`; on-policy
reshapes through `on_policy_ratio`). Optional clamps of f (LUFFY's `off_policy_max_clip` / `off_policy_min_clip`)
and a drop of every token whose current probability exceeds a threshold (LUFFY's `all_max_clip`).
When the teacher's own log-probs are known, p becomes the ratio π_θ/π_φ = exp(logp − logp_teacher).
The per-token losses are then reduced with one of TRL's normalisers (`aggregate_loss`). The "RL w/ SFT loss"
baseline replaces the teacher rows' policy-gradient term by a token-mean NLL (`sft_nll_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from luffy_trl.objectives import (
    PPO_LOSS_TYPES,
    log_importance_weights,
    on_policy_term,
    sequence_mean,
    vespo_gamma_weights,
)

# LUFFY's off_policy_reshape: no_reshape -> "none", p_div_p_<γ> -> "luffy" with γ, the others by their own name.
SHAPING_FUNCTIONS = ("luffy", "none", "logp", "p_logp", "square_root", "pow")
# LUFFY's on_policy_reshape: no_reshape -> "none", p_div_p_<γ> -> "luffy" (f(p)/f(p_old)), the others by name.
ON_POLICY_SHAPINGS = ("none", "luffy", "logp", "p_logp", "square_root", "pow")
# TRL 1.16's loss types (`luffy_trl.objectives` has their on-policy terms) and luffy-trl's `luffy` (LUFFY's scale).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luffy", "cispo", "sapo", "vespo", "luspo")
# Loss types whose extra per-micro-batch terms (entropy bonus, SFT term, aux loss) are not divided by gradient
# accumulation: LUFFY sums its micro-batch losses (`mix_actor.py`).
SUMMED_LOSS_TYPES = ("luffy",)


def shaping_function(per_token_logps: torch.Tensor, shaping: str = "luffy", gamma: float = 0.1, *,
                     weight: float = 1.0, exponent: float = 0.5) -> torch.Tensor:
    """f applied to the current-policy probability of off-policy tokens; differentiable through `per_token_logps`.

    `"luffy"`:       p/(p+γ), bounded by 1/(1+γ); its gradient is γp/(p+γ)² · ∇log p, largest (1/4) at p = γ.
    `"none"`:        p (the importance weight π_θ/π_φ with π_φ = 1); gradient p · ∇log p vanishes for unlikely tokens.
    `"logp"`:        w · log p; gradient w · ∇log p, i.e. advantage-weighted maximum likelihood (w = `weight`).
    `"p_logp"`:      p + w · log p.
    `"square_root"`: √p.
    `"pow"`:         p^k (k = `exponent`).
    """
    if shaping == "luffy":
        probs = per_token_logps.exp()
        return probs / (probs + gamma)
    if shaping == "none":
        return per_token_logps.exp()
    if shaping == "logp":
        return per_token_logps if weight == 1.0 else weight * per_token_logps
    if shaping == "p_logp":
        return per_token_logps.exp() + weight * per_token_logps
    if shaping == "square_root":
        return torch.exp(0.5 * per_token_logps)
    if shaping == "pow":
        return torch.exp(exponent * per_token_logps)
    raise ValueError(f"Unknown shaping function {shaping!r}; expected one of {SHAPING_FUNCTIONS}.")


def shaping_gradient_weight(probs: torch.Tensor, shaping: str = "luffy", gamma: float = 0.1, *,
                            weight: float = 1.0, exponent: float = 0.5) -> torch.Tensor:
    """d f / d log p: the weight that multiplies ∇log p on an off-policy token (for docs, plots and tests)."""
    if shaping == "luffy":
        return gamma * probs / (probs + gamma) ** 2
    if shaping == "none":
        return probs
    if shaping == "logp":
        return torch.full_like(probs, weight)
    if shaping == "p_logp":
        return probs + weight
    if shaping == "square_root":
        return 0.5 * probs.sqrt()
    if shaping == "pow":
        return exponent * probs**exponent
    raise ValueError(f"Unknown shaping function {shaping!r}; expected one of {SHAPING_FUNCTIONS}.")


def on_policy_ratio(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, shaping: str = "none",
                    gamma: float = 0.1, *, weight: float = 1.0, exponent: float = 0.5,
                    log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The on-policy "ratio" r that −A·r (and the PPO clip) acts on, for LUFFY's `on_policy_reshape` variants.

    With d = logp − logp_old: `"none"` exp(d) (PPO's ratio, LUFFY's `no_reshape`); `"logp"` d; `"p_logp"`
    exp(d) + w·d; `"square_root"` exp(d)^½; `"pow"` exp(d)^k; `"luffy"` f(p)/f(p_old) with f(p) = p/(p+γ)
    (LUFFY's `p_div_p_<γ>`). Every variant equals its value at d = 0 when logp = logp_old, but their gradients differ.
    `log_ratio` replaces d when given (GSPO's masked row mean, computed as TRL does); `"luffy"` always reads the
    log-probs themselves (at sequence level, row means: f of the geometric-mean probabilities).
    """
    if shaping == "luffy":
        probs, old_probs = per_token_logps.exp(), old_per_token_logps.exp()
        return (probs / (probs + gamma)) / (old_probs / (old_probs + gamma))
    if log_ratio is None:
        log_ratio = per_token_logps - old_per_token_logps
    if shaping == "none":
        return torch.exp(log_ratio)
    if shaping == "logp":
        return log_ratio
    if shaping == "p_logp":
        return torch.exp(log_ratio) + weight * log_ratio
    if shaping == "square_root":
        return torch.exp(0.5 * log_ratio)
    if shaping == "pow":
        return torch.exp(exponent * log_ratio)
    raise ValueError(f"Unknown on-policy shaping {shaping!r}; expected one of {ON_POLICY_SHAPINGS}.")


@dataclass
class MixedLoss:
    """Per-token results of `mixed_policy_per_token_loss`: (B, T), or (B, 1) for per-row values at sequence level."""

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    """On-policy ratio r as the loss uses it (after on-policy shaping and `delta` capping); on off-policy rows, the
    shaping's value at logp_old = logp (1 except for the `logp` shapings). (B, 1) at sequence level."""
    importance_ratio: torch.Tensor
    """exp(logp − logp_old) (its row mean's exp at sequence level), uncapped and unshaped, with gradient (TRL's
    `coef_1`, used by `use_bias_correction_kl`); the constant 1 on off-policy rows."""
    is_low_clipped: torch.Tensor
    """On-policy tokens whose ratio was clipped below (A < 0); False on off-policy rows and when clip is off."""
    is_high_clipped: torch.Tensor
    """On-policy tokens whose ratio was clipped above (A > 0; cispo: r > ε_high); False on off-policy rows."""
    shaping_weight: torch.Tensor
    """f(p) on every token after the max/min clips (meaningful on off-policy rows only), detached (LUFFY's
    `off_ratio`); f of the row's geometric-mean ratio, (B, 1), at sequence level."""
    off_max_clipped: torch.Tensor
    """Tokens whose f(p) was clamped to `off_policy_max_clip` (False everywhere when unset)."""
    off_min_clipped: torch.Tensor
    """Tokens whose f(p) was clamped to `off_policy_min_clip` (False everywhere when unset)."""
    kept: torch.Tensor
    """Tokens kept by `max_token_prob` (all True when unset); dropped tokens have loss 0 and leave the normaliser."""
    vespo_weight: torch.Tensor | None = None
    """VESPO's detached φ(w) per row, (B, 1) (`loss_type="vespo"` only; 1 on off-policy rows, which do not use it)."""


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
    shaping_weight: float = 1.0,
    shaping_exponent: float = 0.5,
    off_policy_max_clip: float | None = None,
    off_policy_min_clip: float | None = None,
    max_token_prob: float | None = None,
    on_policy_shaping: str = "none",
    on_policy_gamma: float = 0.1,
    on_policy_weight: float = 1.0,
    on_policy_exponent: float = 0.5,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    mask: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    importance_sampling_ratio: torch.Tensor | None = None,
) -> MixedLoss:
    """LUFFY's per-token policy loss for a batch that mixes on-policy and off-policy (teacher) rows.

    On-policy rows get the on-policy objective of `loss_type` (`luffy_trl.objectives.on_policy_term`: the PPO family,
    cispo, sapo or vespo, at token or sequence level); teacher rows get the shaped, unclipped term −A·f(p) whatever
    the loss type (docs/method.md, "Every on-policy objective").

    Args:
        per_token_logps: (B, T) current-policy log-probs of the completion tokens, with gradient.
        old_per_token_logps: (B, T) rollout-policy log-probs, or None when they equal the current ones (one
            optimiser step per generation batch: the ratio is exactly 1).
        advantages: (B,) or (B, T) advantages.
        is_off_policy: (B,) bool, True for rows holding a teacher completion.
        shaping: f on off-policy tokens, one of `SHAPING_FUNCTIONS`.
        gamma: γ of LUFFY's shaping.
        clip: clip the on-policy ratio to [1 − epsilon_low, 1 + epsilon_high] (PPO/GRPO). Never applied to
            off-policy tokens. PPO-family loss types only (cispo, sapo and vespo treat the ratio their own way).
        delta: optional upper cap of the on-policy ratio (TRL's two-sided clipping); needs `clip=True`.
        teacher_per_token_logps: optional (B, T) log π_φ of the teacher tokens; f is then applied to the ratio
            exp(logp − logp_teacher) instead of p (π_φ = 1). 0 on a token means π_φ = 1 there.
        off_policy_weight: multiplier of the off-policy per-token loss (a guidance schedule's loss weight).
        off_policy_loss: `"luffy"` (the shaped term above) or `"sft"`: teacher tokens get no policy-gradient loss
            (the caller adds `sft_nll_loss` instead).
        shaping_weight, shaping_exponent: w of the `logp`/`p_logp` shapings and k of `pow` (LUFFY's
            `off_policy_reshape_weight`, `off_policy_reshape_pow_exp`).
        off_policy_max_clip, off_policy_min_clip: clamp f on off-policy tokens from above / below (no gradient where
            clamped); None disables (LUFFY's −1).
        max_token_prob: drop every token (on- and off-policy) whose current probability exceeds it: loss 0, and
            `kept` is False there so the caller removes it from the normaliser (LUFFY's `all_max_clip`).
        on_policy_shaping, on_policy_gamma, on_policy_weight, on_policy_exponent: the on-policy ratio
            (`on_policy_ratio`; LUFFY's `on_policy_reshape`, `_weight`, `_pow_exp`).
        loss_type: the on-policy objective (`luffy_trl.objectives.ON_POLICY_LOSS_TYPES`).
        importance_sampling_level: `"token"`, or `"sequence"` (GSPO): the on-policy ratio is exp of the row's mean
            log-ratio, and the teacher term is f of the row's geometric-mean probability (ratio to π_φ),
            exp(mean_t(logp − logp_φ)), broadcast over the row's tokens.
        mask: (B, T) loss mask; needed at sequence level and for vespo (ones when None).
        sapo_temperature_pos, sapo_temperature_neg, vespo_params: TRL's sapo temperatures and vespo's
            (k_pos, λ_pos, k_neg, λ_neg).
        importance_sampling_ratio: vLLM's per-token IS ratio, folded into vespo's weight (as TRL does); other loss
            types leave it to the caller.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    off = is_off_policy.to(torch.bool).view(-1, 1)
    if mask is None:
        mask = torch.ones_like(per_token_logps)
    detached = per_token_logps.detach()
    old = detached if old_per_token_logps is None else old_per_token_logps
    # Off-policy rows have no rollout log-prob (π_φ = 1). Give their unused on-policy branch a ratio of exactly 1 so
    # that the branch stays finite: torch.where's backward multiplies the unselected branch's gradient by 0, and
    # 0 · inf would be NaN.
    old = torch.where(off, detached, old)
    log_ratio = per_token_logps - old
    level_log_ratio = log_importance_weights(log_ratio, mask, importance_sampling_level)
    importance_ratio = torch.where(off, torch.ones_like(level_log_ratio.detach()), torch.exp(level_log_ratio))
    if importance_sampling_level == "sequence":
        ratio = on_policy_ratio(sequence_mean(per_token_logps, mask), sequence_mean(old, mask), on_policy_shaping,
                                on_policy_gamma, weight=on_policy_weight, exponent=on_policy_exponent,
                                log_ratio=level_log_ratio)
    else:
        ratio = on_policy_ratio(per_token_logps, old, on_policy_shaping, on_policy_gamma, weight=on_policy_weight,
                                exponent=on_policy_exponent, log_ratio=log_ratio)

    vespo_weight = None
    if loss_type == "vespo":
        is_ratio = None
        if importance_sampling_ratio is not None:
            is_ratio = torch.where(off, torch.ones_like(importance_sampling_ratio), importance_sampling_ratio)
        vespo_weight = vespo_gamma_weights(advantages, log_ratio.detach(), mask, is_ratio, k_pos=vespo_params[0],
                                           lambda_pos=vespo_params[1], k_neg=vespo_params[2],
                                           lambda_neg=vespo_params[3])
        vespo_weight = torch.where(off, torch.ones_like(vespo_weight), vespo_weight)
    term = on_policy_term(loss_type, ratio, advantages, per_token_logps, clip=clip, epsilon_low=epsilon_low,
                          epsilon_high=epsilon_high, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
                          sapo_temperature_neg=sapo_temperature_neg, vespo_weight=vespo_weight)
    is_low_clipped = term.is_low_clipped & ~off
    is_high_clipped = term.is_high_clipped & ~off
    if loss_type in PPO_LOSS_TYPES and clip and delta is not None:
        ratio = torch.clamp(ratio, max=delta)  # reported as the loss used it (TRL's two-sided clipping)

    shaped_input = per_token_logps if teacher_per_token_logps is None else per_token_logps - teacher_per_token_logps
    if importance_sampling_level == "sequence":  # π_θ(y)^(1/|y|) / π_φ(y)^(1/|y|): the geometric-mean ratio
        shaped_input = sequence_mean(shaped_input, mask)
    shaped = shaping_function(shaped_input, shaping, gamma, weight=shaping_weight, exponent=shaping_exponent)
    false = torch.zeros_like(shaped, dtype=torch.bool)
    off_max_clipped = off_min_clipped = false
    if off_policy_max_clip is not None:
        off_max_clipped = (shaped.detach() >= off_policy_max_clip) & off
        shaped = torch.clamp(shaped, max=off_policy_max_clip)
    if off_policy_min_clip is not None:
        off_min_clipped = (shaped.detach() <= off_policy_min_clip) & off
        shaped = torch.clamp(shaped, min=off_policy_min_clip)
    if off_policy_loss == "luffy":
        off_token_loss = -advantages * shaped
        if off_policy_weight != 1.0:
            off_token_loss = off_token_loss * off_policy_weight
    elif off_policy_loss == "sft":
        off_token_loss = torch.zeros_like(term.per_token_loss)
    else:
        raise ValueError(f"Unknown off_policy_loss {off_policy_loss!r}; expected 'luffy' or 'sft'.")
    per_token_loss = torch.where(off, off_token_loss, term.per_token_loss)
    kept = torch.ones_like(detached, dtype=torch.bool)
    if max_token_prob is not None:
        kept = detached.exp() <= max_token_prob
        per_token_loss = torch.where(kept, per_token_loss, torch.zeros_like(per_token_loss))
    return MixedLoss(
        per_token_loss=per_token_loss,
        ratio=ratio,
        importance_ratio=importance_ratio,
        is_low_clipped=is_low_clipped,
        is_high_clipped=is_high_clipped,
        shaping_weight=shaped.detach(),
        off_max_clipped=off_max_clipped,
        off_min_clipped=off_min_clipped,
        kept=kept,
        vespo_weight=vespo_weight,
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

    * `grpo`, `sapo`: mean over sequences of Σ_t ℓ·m / Σ_t m, ÷ GA
    * `bnpo`:    Σ ℓ·m / Σ m over the micro-batch, ÷ GA
    * `dr_grpo`: Σ ℓ·m / (B · max_completion_length), ÷ GA   (LUFFY: Σ / 8192, up to the constant B·GA)
    * `dapo`, `cispo`, `vespo`: Σ ℓ·m / (num_items_in_batch / num_processes · GA / steps_per_generation)  (global
      token mean)
    * `luspo`:   mean over sequences of Σ_t ℓ·m (each sequence weighted by its length), ÷ GA
    * `luffy`:   Σ ℓ·m / max_completion_length, with no ÷B and no ÷GA: LUFFY's exact scale. Summed over the K
      micro-batches of an optimiser step (and averaged over processes by DDP/FSDP/ZeRO), the policy term is
      Σ_{tokens of the process's step} ℓ / max_len, as in LUFFY's `loss_remove_token_mean=True` actor. Not one of
      TRL's; the trainer then also leaves the entropy bonus undivided (`SUMMED_LOSS_TYPES`).

    GA is 1 outside training.

    Padding-free micro-batches (`luffy_trl.batching`) hold a varying number of rows; so that the optimiser step's
    gradient stays the same, `nominal_rows` (TRL's rows per micro-batch) replaces B in `grpo` and `dr_grpo`, and
    `bnpo_tokens` (the mean loss tokens per micro-batch of the optimiser step) replaces the micro-batch's Σ m in
    `bnpo`. Both default to the micro-batch's own values (TRL's definition). `nominal_rows` also replaces B in
    `sapo` and `luspo`. `per_token_loss` may be (B, 1): a sequence-level loss, broadcast over the row's tokens.
    """
    ga = gradient_accumulation_steps if training else 1
    masked = per_token_loss * mask
    rows = masked.size(0) if nominal_rows is None else nominal_rows
    if loss_type in ("grpo", "sapo"):
        per_row = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return (per_row.mean() if nominal_rows is None else per_row.sum() / rows) / ga
    if loss_type == "luspo":
        per_row = masked.sum(-1)
        return (per_row.mean() if nominal_rows is None else per_row.sum() / rows) / ga
    if loss_type == "bnpo":
        tokens = mask.sum() if bnpo_tokens is None else torch.as_tensor(bnpo_tokens, dtype=per_token_loss.dtype)
        return masked.sum() / tokens.clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length.")
        return masked.sum() / (rows * max_completion_length) / ga
    if loss_type == "luffy":
        if max_completion_length is None:
            raise ValueError("luffy needs max_completion_length.")
        return masked.sum() / max_completion_length
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"{loss_type} needs num_items_in_batch.")
        normalizer = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype).clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return masked.sum() / normalizer
    raise ValueError(f"Unsupported loss_type {loss_type!r}; MixedPolicyGRPOTrainer supports {SUPPORTED_LOSS_TYPES}.")
