"""`MixedPolicyGRPOConfig`: TRL's `GRPOConfig` plus LUFFY's fields and LUFFY's defaults.

Every LUFFY-specific default is defined once, in `LUFFY_DEFAULTS` below; the dataclass fields, the docs table
(`docs/configuration.md`) and `tests/test_config.py` all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from luffy_trl.losses import SHAPING_FUNCTIONS

# Inherited GRPOConfig fields whose default luffy-trl changes to match LUFFY's released headline run
# (`exp_scripts/train.sh` of ElliottYan/LUFFY; see docs/configuration.md for the full mapping and the reasons).
# field -> (luffy-trl default, TRL 1.16 default, the LUFFY setting it reproduces)
LUFFY_DEFAULTS: dict[str, tuple[object, object, str]] = {
    "loss_type": ("dr_grpo", "dapo", "Σ(ℓ·mask)/max_response_length aggregation (loss_remove_token_mean=True)"),
    "scale_rewards": ("none", "group", "mean-only group advantage (grpo_use_std=False)"),
    "entropy_coef": (0.001, 0.0, "entropy_coeff=0.001"),
    "weight_decay": (0.01, 0.0, "AdamW weight_decay=0.01"),
    "lr_scheduler_type": ("constant", "linear", "constant lr, no warmup"),
    "max_completion_length": (8192, 512, "data.max_response_length=8192"),
}

# Inherited fields where TRL's default already equals LUFFY's setting (asserted by tests so a TRL change is noticed).
LUFFY_MATCHING_TRL_DEFAULTS: dict[str, tuple[object, str]] = {
    "num_generations": (8, "rollout.n=8 (7 on-policy + 1 off-policy)"),
    "learning_rate": (1e-6, "actor.optim.lr=1e-6"),
    "max_grad_norm": (1.0, "actor.grad_clip=1.0"),
    "warmup_steps": (0, "no warmup (lr_warmup_steps_ratio=0)"),
    "adam_beta1": (0.9, "AdamW betas (0.9, 0.999)"),
    "adam_beta2": (0.999, "AdamW betas (0.9, 0.999)"),
    "beta": (0.0, "no KL loss, no reference model (use_kl_loss=False, kl_coef=0)"),
    "temperature": (1.0, "rollout temperature=1.0"),
    "top_p": (1.0, "rollout top_p=1.0"),
    "num_iterations": (1, "ppo_epochs=1"),
    "epsilon": (0.2, "clip_ratio=0.2 (used only when on_policy_clip=True)"),
    "mask_truncated_completions": (False, "no truncation masking"),
}


def _default(name: str):
    return LUFFY_DEFAULTS[name][0]


def _inherited_help(name: str, extra: str) -> dict:
    value, trl_value, luffy = LUFFY_DEFAULTS[name]
    return {"help": f"{extra} luffy-trl default {value!r} follows LUFFY ({luffy}); TRL's default is {trl_value!r}."}


@dataclass
class MixedPolicyGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`MixedPolicyGRPOTrainer`]: everything [`trl.GRPOConfig`] has, plus LUFFY's mixed-policy
    fields. `num_generations` stays the **total** group size, as in LUFFY (8 = 7 on-policy + 1 off-policy).

    Parameters (new):
        num_off_policy (`int`, defaults to `1`):
            Slots of each group filled with off-policy (teacher) completions from `off_policy_column`. `0` is plain
            GRPO. Must be smaller than `num_generations`.
        off_policy_column (`str`, defaults to `"target"`):
            Dataset column holding the teacher completion: a string, LUFFY's list of
            `{"role": "assistant", "content": ...}` messages, or a list of several strings (slot `j` of a group gets
            trace `j mod n`). A missing, `None` or empty value keeps a full group of sampled completions (counted in
            `off_policy/missing`).
        policy_shaping_gamma (`float`, defaults to `0.1`):
            γ of LUFFY's policy shaping f(p) = p / (p + γ).
        off_policy_shaping (`str`, defaults to `"luffy"`):
            Per-token objective on teacher tokens: `"luffy"` = −A·p/(p+γ) (LUFFY), `"none"` = −A·p (the paper's
            "no shaping" ablation, π_φ = 1), `"logp"` = −A·log p (SFT-like, advantage-weighted log-likelihood).
        on_policy_clip (`bool`, defaults to `False`):
            Clip the on-policy ratio with `epsilon`/`epsilon_high` (PPO/GRPO). LUFFY's released script removes the
            clip (`loss_remove_clip=True`), the paper keeps it; the default follows the released code. With one
            optimiser step per generation batch (TRL's default geometry) the ratio is exactly 1 and both agree.
        success_reward_threshold (`float`, defaults to `1.0`):
            A completion counts as solved when its (weighted) total reward is at least this value. Used only for
            the `groups/*` metrics.

    LUFFY's headline run also differs from TRL in some inherited defaults, which this class changes:
    `loss_type="dr_grpo"`, `scale_rewards="none"`, `entropy_coef=0.001`, `weight_decay=0.01`,
    `lr_scheduler_type="constant"`, `max_completion_length=8192` (see `LUFFY_DEFAULTS`).
    """

    # ---- LUFFY's new fields -------------------------------------------------------------------------------------
    num_off_policy: int = field(
        default=1,
        metadata={
            "help": "Number of slots of each GRPO group filled with off-policy (teacher) completions taken from "
            "`off_policy_column`. `num_generations` stays the total group size (LUFFY: 8 = 7 on-policy + 1 "
            "off-policy). 0 is plain GRPO."
        },
    )
    off_policy_column: str = field(
        default="target",
        metadata={
            "help": "Dataset column with the teacher completion: a string, a list of {'role': 'assistant', "
            "'content': ...} messages (LUFFY's format) or a list of several strings."
        },
    )
    policy_shaping_gamma: float = field(
        default=0.1,
        metadata={"help": "γ of LUFFY's policy shaping f(p) = p / (p + γ) on off-policy tokens."},
    )
    off_policy_shaping: str = field(
        default="luffy",
        metadata={
            "help": "Objective on teacher tokens: 'luffy' (-A·p/(p+γ), LUFFY's policy shaping), 'none' (-A·p, "
            "the unshaped importance weight with π_φ=1) or 'logp' (-A·log p, SFT-like).",
            "choices": list(SHAPING_FUNCTIONS),
        },
    )
    on_policy_clip: bool = field(
        default=False,
        metadata={
            "help": "Clip the on-policy importance ratio as in PPO/GRPO. LUFFY's released script disables clipping "
            "(loss_remove_clip=True); the paper keeps it. Identical when the ratio is 1 (one optimiser step per "
            "generation batch)."
        },
    )
    success_reward_threshold: float = field(
        default=1.0,
        metadata={"help": "Total reward at or above which a completion counts as solved (for groups/* metrics)."},
    )

    # ---- inherited fields whose default follows LUFFY ---------------------------------------------------------------
    loss_type: str = field(
        default=_default("loss_type"),
        metadata=_inherited_help(
            "loss_type", "Loss normaliser: 'grpo', 'bnpo', 'dr_grpo' or 'dapo' (others are rejected)."
        ),
    )
    scale_rewards: str = field(
        default=_default("scale_rewards"),
        metadata=_inherited_help("scale_rewards", "Reward scaling in the group advantage: 'group', 'batch', 'none'."),
    )
    entropy_coef: float = field(
        default=_default("entropy_coef"),
        metadata=_inherited_help("entropy_coef", "Coefficient of the entropy bonus (mean token entropy)."),
    )
    weight_decay: float = field(
        default=_default("weight_decay"),
        metadata=_inherited_help("weight_decay", "AdamW weight decay."),
    )
    lr_scheduler_type: str = field(
        default=_default("lr_scheduler_type"),
        metadata=_inherited_help("lr_scheduler_type", "Learning-rate schedule."),
    )
    max_completion_length: int | None = field(
        default=_default("max_completion_length"),
        metadata=_inherited_help(
            "max_completion_length",
            "Maximum completion length; teacher completions are truncated to it (counted in "
            "off_policy/truncated). Also the dr_grpo normalising constant.",
        ),
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_off_policy, int) or self.num_off_policy < 0:
            raise ValueError(f"num_off_policy must be an integer >= 0, got {self.num_off_policy!r}.")
        if self.num_off_policy >= self.num_generations:
            raise ValueError(
                f"num_off_policy ({self.num_off_policy}) must be smaller than num_generations "
                f"({self.num_generations}): num_generations is the total group size (LUFFY: 8 = 7 on-policy + 1 "
                "off-policy), so at least one slot per group must be sampled from the policy."
            )
        if self.off_policy_shaping not in SHAPING_FUNCTIONS:
            raise ValueError(
                f"off_policy_shaping must be one of {sorted(SHAPING_FUNCTIONS)}, got {self.off_policy_shaping!r}."
            )
        if self.off_policy_shaping == "luffy" and not self.policy_shaping_gamma > 0:
            raise ValueError(f"policy_shaping_gamma must be > 0, got {self.policy_shaping_gamma!r}.")
        if not self.off_policy_column:
            raise ValueError("off_policy_column must name a dataset column (LUFFY's data uses 'target').")
        if self.delta is not None and not self.on_policy_clip:
            raise ValueError(
                "delta (two-sided clipping) only applies to the clipped on-policy objective: set on_policy_clip=True "
                "or delta=None."
            )
