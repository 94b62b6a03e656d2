"""`MixedPolicyGRPOConfig`: TRL's `GRPOConfig` plus LUFFY's fields and LUFFY's defaults.

Every LUFFY-specific default is defined once, in `LUFFY_DEFAULTS` below; the dataclass fields, the docs table
(`docs/configuration.md`) and `tests/test_config.py` all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from luffy_trl.guidance import OFF_POLICY_LOSSES, SCHEDULE_TARGETS, SCHEDULES, TRACE_SELECTIONS, TRIGGERS
from luffy_trl.losses import ON_POLICY_SHAPINGS, SHAPING_FUNCTIONS
from luffy_trl.objectives import PPO_LOSS_TYPES

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


def on_policy_ratio_departures(args) -> list[str]:
    """Why the on-policy ratio r = exp(logp − logp_old) can differ from 1 under `args` ([] when it is exactly 1).

    TRL 1.16 computes rollout log-probs (so r is not identically 1) when generation and optimiser steps are not
    aligned, `gradient_accumulation_steps % (steps_per_generation · num_iterations) != 0`, or when vLLM's
    importance-sampling correction is on (the trainer re-scores vLLM's samples; r then differs from 1 by numerical
    noise at the first update and by the policy change at later ones). With `on_policy_clip=False` that r is used
    unclipped, so `num_off_policy=0` is then not TRL's (clipped) GRPO.
    """
    reasons = []
    ga = args.gradient_accumulation_steps
    spg = args.steps_per_generation or ga
    if ga % (spg * args.num_iterations):
        reasons.append(
            f"gradient_accumulation_steps={ga} is not a multiple of steps_per_generation × num_iterations = "
            f"{spg} × {args.num_iterations} (several optimiser steps per generation batch)"
        )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        reasons.append("use_vllm with vllm_importance_sampling_correction (the trainer re-scores vLLM's samples)")
    return reasons


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
            Slots of each group filled with off-policy (teacher) completions from `off_policy_column`. `0` with
            `on_policy_clip=True` is TRL's GRPO exactly; with the default `on_policy_clip=False` it is GRPO without
            the clip, which equals it only while the on-policy ratio is exactly 1 (see `on_policy_ratio_departures`).
            Must be smaller than `num_generations`.
        off_policy_column (`str`, defaults to `"target"`):
            Dataset column holding the teacher completion: a string, LUFFY's list of
            `{"role": "assistant", "content": ...}` messages, or a list of several strings (teacher slot `j` of a group
            takes the `j`-th trace in the order of `off_policy_trace_selection`, cycling; by default trace `j mod n`).
            A missing, `None` or empty value keeps a full group of sampled completions (counted in
            `off_policy/missing`).
        policy_shaping_gamma (`float`, defaults to `0.1`):
            γ of LUFFY's policy shaping f(p) = p / (p + γ).
        off_policy_shaping (`str`, defaults to `"luffy"`):
            Per-token objective on teacher tokens: `"luffy"` = −A·p/(p+γ) (LUFFY), `"none"` = −A·p (the paper's
            "no shaping" ablation, π_φ = 1), `"logp"` = −A·w·log p (SFT-like, advantage-weighted log-likelihood),
            `"p_logp"` = −A·(p + w·log p), `"square_root"` = −A·√p, `"pow"` = −A·p^k (LUFFY's `off_policy_reshape`).
        off_policy_shaping_weight (`float`, defaults to `1.0`):
            w of the `"logp"` and `"p_logp"` shapings (LUFFY's `off_policy_reshape_weight`).
        off_policy_shaping_exponent (`float`, defaults to `0.5`):
            k of the `"pow"` shaping (LUFFY's `off_policy_reshape_pow_exp`).
        off_policy_max_clip (`float` or `None`, defaults to `None`):
            Clamp the shaped weight f(p) of teacher tokens from above (no gradient where clamped; LUFFY's
            `off_policy_max_clip`, −1 there = `None`).
        off_policy_min_clip (`float` or `None`, defaults to `None`):
            Clamp f(p) of teacher tokens from below (LUFFY's `off_policy_min_clip`).
        max_token_prob (`float` or `None`, defaults to `None`):
            Drop every completion token (on- and off-policy) whose current probability exceeds this from the
            policy loss and from the normaliser's token count (LUFFY's `all_max_clip`).
        on_policy_shaping (`str`, defaults to `"none"`):
            The on-policy ratio r in −A·r, with d = logp − logp_old: `"none"` exp(d) (PPO/GRPO), `"luffy"`
            f(p)/f(p_old) with f(p) = p/(p+γ_on), `"logp"` d, `"p_logp"` exp(d) + w·d, `"square_root"` exp(d)^½,
            `"pow"` exp(d)^k (LUFFY's `on_policy_reshape`; the clip, when on, acts on this r).
        on_policy_shaping_gamma (`float`, defaults to `0.1`):
            γ_on of the `"luffy"` on-policy shaping (LUFFY's `p_div_p_0.1` / `p_div_p_0.5`).
        on_policy_shaping_weight (`float`, defaults to `1.0`):
            w of the `"p_logp"` on-policy shaping (LUFFY's `on_policy_reshape_weight`).
        on_policy_shaping_exponent (`float`, defaults to `0.5`):
            k of the `"pow"` on-policy shaping (LUFFY's `on_policy_reshape_pow_exp`).
        on_policy_clip (`bool`, defaults to `False`):
            Clip the on-policy ratio with `epsilon`/`epsilon_high` (PPO/GRPO). LUFFY's released script removes the
            clip (`loss_remove_clip=True`), the paper keeps it; the default follows the released code. With one
            optimiser step per generation batch (TRL's default geometry, `num_iterations=1`, no vLLM) the ratio is
            exactly 1 and both agree; otherwise the unclipped ratio is used and the trainer warns once.
        success_reward_threshold (`float`, defaults to `1.0`):
            A completion counts as solved when its (weighted) total reward is at least this value. Used by the
            `groups/*` metrics and by `off_policy_trigger`.
        off_policy_trigger (`str`, defaults to `"always"`):
            When a group's teacher completion takes part: `"always"` (LUFFY), `"all_fail"` (only when no on-policy
            sample of the group is solved; AMPO, HPT's switch) or `"accuracy_below"` (when the on-policy accuracy
            of the group is below `off_policy_trigger_threshold`). A teacher row that does not take part is left
            out of the group baseline and contributes no loss (its trace is still tokenized and scored).
        off_policy_trigger_threshold (`float`, defaults to `0.5`):
            Accuracy threshold of the `"accuracy_below"` trigger (strictly below fires), in (0, 1].
        off_policy_schedule (`str`, defaults to `"constant"`):
            Shape of the guidance schedule over optimiser steps: `"constant"`, `"linear"` or `"cosine"` decay from
            `off_policy_schedule_start` to `off_policy_schedule_end`, after `off_policy_schedule_warmup_steps`
            steps of linear warm-up from 0.
        off_policy_schedule_target (`str`, defaults to `"loss_weight"`):
            What the schedule controls: `"loss_weight"` multiplies the off-policy loss term (the shaped teacher term,
            or the SFT term with `off_policy_loss="sft"`); `"group_share"` is the probability that a group gets
            its teacher trace(s) (the other groups are sampled in full from the policy).
        off_policy_schedule_start (`float`, defaults to `1.0`):
            Schedule value after warm-up (the constant value for `"constant"`).
        off_policy_schedule_end (`float`, defaults to `0.0`):
            Value the `"linear"`/`"cosine"` decay reaches after `off_policy_schedule_decay_steps` steps.
        off_policy_schedule_warmup_steps (`int`, defaults to `0`):
            Steps of linear warm-up from 0 to `off_policy_schedule_start`.
        off_policy_schedule_decay_steps (`int` or `None`, defaults to `None`):
            Length of the decay after warm-up; `None` decays until the last training step (`max_steps`, or the step
            count the Trainer derives from `num_train_epochs`).
        off_policy_trace_selection (`str`, defaults to `"first"`):
            With several traces per prompt (a list in `off_policy_column`), the order in which a group's teacher
            slots take them; slot `j` takes the `j`-th (cycling): `"first"` (column order), `"shortest"` (fewest
            policy tokens first) or `"random"` (a random permutation per group and step, seeded by `seed`).
        off_policy_logprobs_column (`str` or `None`, defaults to `None`):
            Dataset column with the teacher's per-token log-probs: one float per token of the teacher completion
            as the trainer tokenizes it with the policy tokenizer (end-of-turn token included, or omitted: it then
            gets log-prob 0). When set, the shaping uses the ratio π_θ/π_φ instead of π_φ = 1. A row whose values
            do not fit falls back to π_φ = 1 (counted in `off_policy/logprobs_fallback`).
        off_policy_loss (`str`, defaults to `"luffy"`):
            How teacher rows train: `"luffy"` (group member with the shaped policy-gradient term) or `"sft"` (the
            paper's "RL w/ SFT loss" baseline: teacher rows are left out of the group baseline and trained with
            `sft_loss_coef` × token-mean NLL).
        sft_loss_coef (`float`, defaults to `1.0`):
            Coefficient of the SFT term with `off_policy_loss="sft"` (LUFFY's `sft_loss_coef`).
        log_loss_term_grad_norms (`bool`, defaults to `False`):
            Log the gradient norms of the loss's on-policy term and of its teacher term separately
            (`loss_terms/on_policy_grad_norm`, `loss_terms/off_policy_grad_norm`): a diagnostic costing two extra
            backward passes per micro-batch; one process only.
        loss_term_grad_norms_steps (`int`, defaults to `1`):
            With `log_loss_term_grad_norms`, compute the norms on every N-th optimiser step only (the first, then every
            N).
        live_teacher_url (`str` or `None`, defaults to `None`):
            An OpenAI-compatible endpoint asked in the background for traces of prompts that have none (not in
            LUFFY: its data has a trace per prompt). See docs/traces.md; the other `live_teacher_*` fields configure
            it (`live_teacher_when`, `live_teacher_num_samples`, `live_teacher_max_new_tokens`,
            `live_teacher_concurrency`, `live_teacher_timeout`, `live_teacher_model`, `live_teacher_api_key_env`).

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
            "off-policy). 0 with on_policy_clip=True is TRL's GRPO exactly; with on_policy_clip=False it is GRPO "
            "without the clip (identical only while the on-policy ratio is 1)."
        },
    )
    off_policy_column: str = field(
        default="target",
        metadata={
            "help": "Dataset column with the teacher completion: a string, a list of {'role': 'assistant', "
            "'content': ...} messages (LUFFY's format) or a list of several strings; with tools=, a tool-calling "
            "conversation (assistant turns with 'tool_calls' and {'role': 'tool', ...} results, ending with an "
            "answer) or a list of them."
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
            "the unshaped importance weight with π_φ=1), 'logp' (-A·w·log p, SFT-like), 'p_logp' (-A·(p + w·log p)), "
            "'square_root' (-A·√p) or 'pow' (-A·p^k). LUFFY's off_policy_reshape.",
            "choices": list(SHAPING_FUNCTIONS),
        },
    )
    off_policy_shaping_weight: float = field(
        default=1.0,
        metadata={"help": "w of the 'logp' and 'p_logp' off-policy shapings (LUFFY's off_policy_reshape_weight)."},
    )
    off_policy_shaping_exponent: float = field(
        default=0.5,
        metadata={"help": "k of the 'pow' off-policy shaping p^k (LUFFY's off_policy_reshape_pow_exp)."},
    )
    off_policy_max_clip: float | None = field(
        default=None,
        metadata={"help": "Clamp the shaped weight f(p) of teacher tokens to at most this (no gradient where "
                          "clamped). None disables (LUFFY's off_policy_max_clip=-1)."},
    )
    off_policy_min_clip: float | None = field(
        default=None,
        metadata={"help": "Clamp the shaped weight f(p) of teacher tokens to at least this. None disables (LUFFY's "
                          "off_policy_min_clip=-1)."},
    )
    max_token_prob: float | None = field(
        default=None,
        metadata={"help": "Drop completion tokens (on- and off-policy) whose current probability exceeds this from "
                          "the policy loss and the normaliser's token count. None disables (LUFFY's all_max_clip=-1)."},
    )
    on_policy_shaping: str = field(
        default="none",
        metadata={
            "help": "On-policy ratio r in -A·r, d = logp - logp_old: 'none' exp(d) (PPO/GRPO), 'luffy' "
            "f(p)/f(p_old) with f(p) = p/(p+γ_on), 'logp' d, 'p_logp' exp(d) + w·d, 'square_root' exp(d)^0.5, 'pow' "
            "exp(d)^k. LUFFY's on_policy_reshape; the clip, when on, acts on this r.",
            "choices": list(ON_POLICY_SHAPINGS),
        },
    )
    on_policy_shaping_gamma: float = field(
        default=0.1, metadata={"help": "γ_on of the 'luffy' on-policy shaping (LUFFY's on_policy_reshape=p_div_p_<γ>)."}
    )
    on_policy_shaping_weight: float = field(
        default=1.0, metadata={"help": "w of the 'p_logp' on-policy shaping (LUFFY's on_policy_reshape_weight)."}
    )
    on_policy_shaping_exponent: float = field(
        default=0.5, metadata={"help": "k of the 'pow' on-policy shaping (LUFFY's on_policy_reshape_pow_exp)."}
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
        metadata={
            "help": "Total reward at or above which a completion counts as solved (groups/* metrics and "
            "off_policy_trigger)."
        },
    )

    # ---- guidance beyond LUFFY: triggers, schedules, several traces, teacher log-probs, baselines ------------------
    off_policy_trigger: str = field(
        default="always",
        metadata={
            "help": "When a group's teacher completion takes part: 'always' (LUFFY), 'all_fail' (no on-policy "
            "sample of the group is solved) or 'accuracy_below' (on-policy group accuracy < "
            "off_policy_trigger_threshold). A teacher row that does not take part is left out of the group baseline "
            "and of the loss.",
            "choices": list(TRIGGERS),
        },
    )
    off_policy_trigger_threshold: float = field(
        default=0.5,
        metadata={"help": "On-policy group accuracy below which the 'accuracy_below' trigger fires, in (0, 1]."},
    )
    off_policy_schedule: str = field(
        default="constant",
        metadata={
            "help": "Guidance schedule over optimiser steps: 'constant', 'linear' or 'cosine' decay from "
            "off_policy_schedule_start to off_policy_schedule_end (after a linear warm-up from 0).",
            "choices": list(SCHEDULES),
        },
    )
    off_policy_schedule_target: str = field(
        default="loss_weight",
        metadata={
            "help": "What the schedule controls: 'loss_weight' (multiplier of the off-policy loss term) or "
            "'group_share' (probability that a group gets its teacher trace).",
            "choices": list(SCHEDULE_TARGETS),
        },
    )
    off_policy_schedule_start: float = field(
        default=1.0, metadata={"help": "Schedule value after warm-up (the value of a 'constant' schedule)."}
    )
    off_policy_schedule_end: float = field(
        default=0.0, metadata={"help": "Value a 'linear' or 'cosine' schedule decays to."}
    )
    off_policy_schedule_warmup_steps: int = field(
        default=0, metadata={"help": "Optimiser steps of linear warm-up from 0 to off_policy_schedule_start."}
    )
    off_policy_schedule_decay_steps: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps of decay after warm-up; None decays until max_steps."},
    )
    off_policy_trace_selection: str = field(
        default="first",
        metadata={
            "help": "With several traces per prompt, the order in which teacher slots take them (slot j takes the "
            "j-th, cycling): 'first' (column order), 'shortest' (fewest tokens first) or 'random' (a random "
            "permutation per group and step).",
            "choices": list(TRACE_SELECTIONS),
        },
    )
    off_policy_logprobs_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column with the teacher's per-token log-probs (one float per teacher token under the "
            "policy tokenizer). When set, the shaping uses π_θ/π_φ instead of π_φ = 1."
        },
    )
    off_policy_loss: str = field(
        default="luffy",
        metadata={
            "help": "How teacher rows train: 'luffy' (group member, shaped policy gradient) or 'sft' (the paper's "
            "'RL w/ SFT loss' baseline: on-policy-only baseline, sft_loss_coef × token-mean NLL on the trace).",
            "choices": list(OFF_POLICY_LOSSES),
        },
    )
    sft_loss_coef: float = field(
        default=1.0, metadata={"help": "Coefficient of the SFT term with off_policy_loss='sft'."}
    )
    log_loss_term_grad_norms: bool = field(
        default=False,
        metadata={
            "help": "Log, per optimiser step, the gradient norm of the loss's on-policy term and of its teacher term "
            "separately (loss_terms/on_policy_grad_norm, loss_terms/off_policy_grad_norm; the entropy bonus and the "
            "MoE aux loss are in neither). A diagnostic of what drives training: two extra backward passes per "
            "micro-batch over the trainable parameters and two gradient-sized buffers (small with LoRA). One process "
            "only."
        },
    )
    loss_term_grad_norms_steps: int = field(
        default=1,
        metadata={
            "help": "With log_loss_term_grad_norms: compute the two norms on every N-th optimiser step only (the "
            "first, then every N), so that the diagnostic's extra backward passes cost 1/N of them per step. 1: every "
            "step."
        },
    )

    padding_free_batches: bool = field(
        default=True,
        metadata={
            "help": "Train on real tokens only: reassign rows among the micro-batches of each optimiser step by "
            "length, drop rows without loss tokens, cut each micro-batch to its longest real prompt and completion, "
            "and skip the old-log-prob forward over teacher rows. Gradients are unchanged for grpo, dr_grpo and "
            "dapo; bnpo and the entropy/SFT token means use the optimiser step's token count (docs/batching.md). "
            "False: TRL's fixed padded micro-batches."
        },
    )
    pack_sequences: str = field(
        default="auto",
        metadata={
            "help": "With padding_free_batches: pack each micro-batch's rows into one sequence (position ids restart "
            "per row, no padding at all; verl's use_remove_padding) for the loss and the no-grad forwards, with "
            "micro-batches balanced by real tokens. Only for models that pack exactly (luffy_trl.packing; "
            "docs/batching.md 'Which models pack'): hybrid models whose linear-attention, Mamba, convolution or "
            "recurrent layers run over the whole packed sequence (Qwen3-Next, Qwen3.5, Granite-4.0-H, Falcon-H1, "
            "LFM2, ...) and OPT are never packed, and every model is checked once at its first packed forward. "
            "'auto': for a model that packs exactly, one packed sequence when the attention implementation is a "
            "varlen kernel (flash_attention_2/3, a kernels-hub flash kernel, flex_attention), otherwise as 'bins' "
            "(measured never slower than cutting on CPU); other models cut to the longest row; 'always': "
            "packed with any attention implementation (refused for a model that cannot pack exactly); 'bins': per "
            "forward the cheapest of cutting the rows to the longest one, packing them into bins no longer than "
            "the longest row (sdpa/eager; a dense block-diagonal mask per bin) or one sequence, by a cost model of "
            "linear-layer tokens and attention pairs (luffy_trl.batching.choose_layout); 'never'.",
            "choices": ["auto", "always", "bins", "never"],
        },
    )

    # ---- a live teacher (luffy_trl.trainer.live_teacher; docs/traces.md) -----------------------------------------
    live_teacher_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) asked, in a background "
            "thread, for traces of prompts that have none; verified traces fill their teacher slots the next time the "
            "prompt is drawn. None: off (a teacher object can also be passed as MixedPolicyGRPOTrainer(live_teacher=))."
        },
    )
    live_teacher_model: str | None = field(
        default=None, metadata={"help": "Model name sent to the live teacher endpoint."}
    )
    live_teacher_when: str = field(
        default="all_fail",
        metadata={
            "help": "Which trace-less prompts are sent: 'all_fail' (their group's on-policy samples all failed) or "
            "'missing' (every trace-less prompt drawn).",
            "choices": ["all_fail", "missing"],
        },
    )
    live_teacher_num_samples: int = field(
        default=4, metadata={"help": "Teacher samples per prompt; the correct ones are kept (shortest first)."}
    )
    live_teacher_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation limit of the live teacher; None: max_completion_length."}
    )
    live_teacher_concurrency: int = field(
        default=8, metadata={"help": "Requests to the live teacher endpoint in flight at once."}
    )
    live_teacher_timeout: float = field(
        default=600.0, metadata={"help": "Seconds per live teacher request (then retried, at most 3 times)."}
    )
    live_teacher_api_key_env: str | None = field(
        default=None, metadata={"help": "Environment variable holding the live teacher endpoint's API key."}
    )

    # ---- inherited fields whose default follows LUFFY ---------------------------------------------------------------
    loss_type: str = field(
        default=_default("loss_type"),
        metadata=_inherited_help(
            "loss_type", "On-policy objective and normaliser: TRL's 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', "
            "'sapo', 'vespo', 'luspo', or 'luffy' (LUFFY's exact scale: Σℓ/max_completion_length per micro-batch and "
            "the entropy bonus per micro-batch, neither divided by rows nor by gradient accumulation; the paper "
            "recipes use it). Teacher rows get the shaped term −A·f(p) with the same normaliser whatever the type "
            "(docs/method.md, 'Every on-policy objective'); on_policy_clip and delta apply to the PPO family only."
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
    mask_truncated_completions: bool = field(
        default=False,
        metadata={
            "help": "TRL's option: exclude truncated completions (no end-of-sequence token) from the loss. "
            "With teacher rows it applies to sampled rows only: a truncated teacher trace is still trained on, so a "
            "batch whose sampled rows are all truncated still trains on its teacher rows (TRL alone would train on "
            "nothing)."
        },
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
        self._check_shaping()
        if not self.off_policy_column:
            raise ValueError("off_policy_column must name a dataset column (LUFFY's data uses 'target').")
        self._check_guidance()
        if self.delta is not None and not self.on_policy_clip and self.loss_type in PPO_LOSS_TYPES:
            raise ValueError(
                f"delta (two-sided clipping) only applies to the clipped on-policy objective of loss_type="
                f"{self.loss_type!r}: set on_policy_clip=True or delta=None. (cispo, sapo and vespo ignore delta, "
                "as in TRL.)"
            )

    def _check_shaping(self) -> None:
        """Validation of LUFFY's other reshapes and clamps (`compute_token_on_off_policy_loss`'s options)."""
        import math

        if self.on_policy_shaping not in ON_POLICY_SHAPINGS:
            raise ValueError(
                f"on_policy_shaping must be one of {list(ON_POLICY_SHAPINGS)}, got {self.on_policy_shaping!r}."
            )
        if self.on_policy_shaping != "none" and self.loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(
                f"on_policy_shaping={self.on_policy_shaping!r} reshapes the PPO ratio of −A·r (LUFFY's "
                f"on_policy_reshape); loss_type={self.loss_type!r} has no such term (cispo and vespo weight log p "
                "by a detached, truncated or gamma-shaped ratio; sapo gates the ratio with a sigmoid), so the "
                "reshape has no defined meaning there. Use on_policy_shaping='none' with this loss type, or a "
                "PPO-family loss type (grpo, bnpo, dr_grpo, dapo, luspo, luffy) for the reshape."
            )
        if self.on_policy_shaping == "luffy" and not self.on_policy_shaping_gamma > 0:
            raise ValueError(f"on_policy_shaping_gamma must be > 0, got {self.on_policy_shaping_gamma!r}.")
        for name in ("off_policy_shaping_exponent", "on_policy_shaping_exponent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name in ("off_policy_max_clip", "off_policy_min_clip", "max_token_prob"):
            value = getattr(self, name)
            if value is not None and value == -1:
                raise ValueError(f"{name}=-1 is LUFFY's 'disabled'; here write {name}=None (the default).")
        low, high = self.off_policy_min_clip, self.off_policy_max_clip
        if low is not None and high is not None and not low < high:
            raise ValueError(f"off_policy_min_clip ({low}) must be smaller than off_policy_max_clip ({high}).")
        if self.max_token_prob is not None and not 0 < self.max_token_prob <= 1:
            raise ValueError(
                f"max_token_prob must be in (0, 1] (a probability above which tokens are dropped), got "
                f"{self.max_token_prob!r}."
            )

    def _check_guidance(self) -> None:
        """Validation of the trigger, schedule, trace-selection, log-prob and baseline fields."""
        import math

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}.")

        choice("off_policy_trigger", TRIGGERS)
        choice("off_policy_schedule", SCHEDULES)
        choice("off_policy_schedule_target", SCHEDULE_TARGETS)
        choice("off_policy_trace_selection", TRACE_SELECTIONS)
        choice("off_policy_loss", OFF_POLICY_LOSSES)
        choice("pack_sequences", ("auto", "always", "bins", "never"))
        threshold = self.off_policy_trigger_threshold
        if self.off_policy_trigger == "accuracy_below" and not (0.0 < threshold <= 1.0):
            raise ValueError(
                f"off_policy_trigger_threshold must be in (0, 1] for the 'accuracy_below' trigger, got {threshold!r} "
                "(an on-policy group accuracy strictly below it makes the teacher take part)."
            )
        start, end = self.off_policy_schedule_start, self.off_policy_schedule_end
        for name, value in (("off_policy_schedule_start", start), ("off_policy_schedule_end", end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
            if self.off_policy_schedule_target == "group_share" and value > 1:
                raise ValueError(
                    f"{name} is a probability with off_policy_schedule_target='group_share' and must be in [0, 1], "
                    f"got {value!r}."
                )
        if not isinstance(self.off_policy_schedule_warmup_steps, int) or self.off_policy_schedule_warmup_steps < 0:
            raise ValueError(
                "off_policy_schedule_warmup_steps must be an integer >= 0, got "
                f"{self.off_policy_schedule_warmup_steps!r}."
            )
        decay = self.off_policy_schedule_decay_steps
        if decay is not None and (not isinstance(decay, int) or decay <= 0):
            raise ValueError(f"off_policy_schedule_decay_steps must be None or an integer > 0, got {decay!r}.")
        column = self.off_policy_logprobs_column
        if column is not None:
            if not column:
                raise ValueError("off_policy_logprobs_column must name a dataset column or be None.")
            if column == self.off_policy_column:
                raise ValueError(
                    f"off_policy_logprobs_column ({column!r}) must differ from off_policy_column: one holds the "
                    "traces, the other their per-token log-probs."
                )
            if self.off_policy_loss == "sft":
                raise ValueError(
                    "off_policy_logprobs_column has no effect with off_policy_loss='sft' (the SFT term is the plain "
                    "NLL of the trace); unset one of them."
                )
        if self.live_teacher_when not in ("all_fail", "missing"):
            raise ValueError(f"live_teacher_when must be 'all_fail' or 'missing', got {self.live_teacher_when!r}.")
        if self.live_teacher_num_samples < 1 or self.live_teacher_concurrency < 1:
            raise ValueError("live_teacher_num_samples and live_teacher_concurrency must be at least 1.")
        if self.live_teacher_url is not None and self.num_off_policy == 0:
            raise ValueError("live_teacher_url fills teacher slots: it needs num_off_policy > 0.")
        if not (isinstance(self.loss_term_grad_norms_steps, int) and self.loss_term_grad_norms_steps >= 1):
            raise ValueError("loss_term_grad_norms_steps must be an integer >= 1 (1: every optimiser step), got "
                             f"{self.loss_term_grad_norms_steps!r}.")
        coef = self.sft_loss_coef
        if not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"sft_loss_coef must be a finite number >= 0, got {coef!r}.")
