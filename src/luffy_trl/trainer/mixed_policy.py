"""`MixedPolicyGRPOTrainer` assembled from its mixins, with construction, rewards, guidance and batch metrics.

The data flow, the mixins and the TRL methods each overrides, and the collectives rule are in the package
docstring (`luffy_trl.trainer`).
"""

from __future__ import annotations

import logging
import textwrap

import torch
from accelerate.utils import gather
from trl import GRPOConfig, GRPOTrainer

from luffy_trl.config import MixedPolicyGRPOConfig, on_policy_ratio_departures
from luffy_trl.guidance import on_policy_group_accuracy, participating_teacher_rows, trigger_fired
from luffy_trl.losses import SUPPORTED_LOSS_TYPES
from luffy_trl.teacher import TeacherTokenizer, missing_trace_warning, teacher_texts
from luffy_trl.trainer.checkpoint import GenerationCheckpointMixin
from luffy_trl.trainer.generation import (
    IS_OFF_POLICY,
    LOGPROB_COUNTERS,
    TEACHER_COUNTERS,
    TEACHER_LOGPS,
    TeacherGenerationMixin,
    teacher_slot,
)
from luffy_trl.trainer.live_teacher import LiveTeacherMixin
from luffy_trl.trainer.loss import MixedLossMixin
from luffy_trl.trainer.micro_batches import PaddingFreeBatchingMixin

__all__ = ["IS_OFF_POLICY", "TEACHER_LOGPS", "MixedPolicyGRPOTrainer", "teacher_slot"]
# Rows whose teacher value is type-checked at construction time, so a malformed column fails before training.
ROWS_CHECKED_AT_INIT = 64
logger = logging.getLogger("luffy_trl.trainer")

class MixedPolicyGRPOTrainer(
    GenerationCheckpointMixin, LiveTeacherMixin, TeacherGenerationMixin, MixedLossMixin, PaddingFreeBatchingMixin,
    GRPOTrainer,
):
    """GRPO with LUFFY's off-policy guidance (Yan et al., 2025, "Learning to Reason under Off-Policy Guidance").

    Accepts everything `GRPOTrainer` accepts. Each group of `args.num_generations` completions holds
    `num_generations - num_off_policy` sampled completions and `num_off_policy` teacher completions read from
    `args.off_policy_column`; advantages are computed over the mixed group and teacher tokens are trained with
    the shaped, unclipped objective −A·p/(p+γ). See `MixedPolicyGRPOConfig` for the options. `live_teacher=` (a
    `luffy_trl.traces` teacher) turns on the live teacher of `luffy_trl.trainer.live_teacher` without
    `live_teacher_url`.

    Example:
        ```python
        trainer = MixedPolicyGRPOTrainer(
            model="Qwen/Qwen2.5-Math-1.5B",
            reward_funcs=luffy_math_reward,
            args=MixedPolicyGRPOConfig(output_dir="luffy", max_completion_length=4096),
            train_dataset=dataset,  # columns: prompt, target (teacher trace), ground_truth
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "grpo", "luffy"]
    _name = "MixedPolicyGRPO"
    # TRL's model card (`create_model_card`, `push_to_hub`) names the method's paper and prints `citation` under
    # "Cite MixedPolicyGRPO as": LUFFY's paper, then GRPO's entry, which TRL's GRPOTrainer cites.
    _paper = {
        "title": "Learning to Reason under Off-Policy Guidance",
        "id": "2504.14945",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{yan2025learning,
                title        = {{Learning to Reason under Off-Policy Guidance}},
                author       = {Jianhao Yan and Yafu Li and Zican Hu and Zhi Wang and Ganqu Cui and Xiaoye Qu and
                                Yu Cheng and Yue Zhang},
                year         = 2025,
                eprint       = {arXiv:2504.14945},
            }""") + "\n\n" + GRPOTrainer._paper["citation"],
    }

    def __init__(self, model, reward_funcs=None, args: MixedPolicyGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = MixedPolicyGRPOConfig(f"{str(name).split('/')[-1]}-LUFFY")
        elif not isinstance(args, MixedPolicyGRPOConfig):
            kind = "GRPOConfig" if isinstance(args, GRPOConfig) else type(args).__name__
            raise TypeError(
                f"MixedPolicyGRPOTrainer needs a MixedPolicyGRPOConfig, got a {kind}. Build the config with "
                "luffy_trl.MixedPolicyGRPOConfig(...) (it accepts every GRPOConfig field)."
            )
        self._check_supported(args, train_dataset, kwargs)
        if args.num_off_policy > 0 and (warning := missing_trace_warning(train_dataset, args.off_policy_column)):
            logger.warning(warning)
        self._warn_unclipped_ratio(args)
        live_teacher = kwargs.pop("live_teacher", None)  # luffy_trl.trainer.live_teacher
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         **kwargs)
        if self._is_vlm and args.num_off_policy > 0:
            raise ValueError(
                "MixedPolicyGRPOTrainer does not support vision-language processors with num_off_policy > 0 yet."
            )
        self.num_off_policy = args.num_off_policy
        # TRL masks truncated completions before scoring; a truncated teacher trace must still be trained on, so
        # luffy-trl applies `mask_truncated_completions` itself, to on-policy rows only.
        self._mask_truncated_on_policy = self.mask_truncated_completions
        self.mask_truncated_completions = False
        self.teacher_tokenizer = TeacherTokenizer(
            self._tokenizer,
            self.eos_token_ids,
            self.max_completion_length,
            chat_template=self.chat_template,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        self._invalid_teacher_warnings = 0
        self._warned_full_generation = False
        # per local row: (prompt, teacher text or None, teacher log-probs or None), consumed by _generate_single_turn
        self._teacher_plan = None
        self._teacher_stats = None
        self._batch_rewards = None  # (total reward, is_off_policy), gathered; set by _calculate_rewards
        self._teacher_logprobs_plan = None
        self._teacher_logps_rows = None  # local row -> aligned teacher log-probs (off_policy_logprobs_column)
        self._guidance = None  # the trigger's decisions for the current generation batch (global tensors)
        self._generation_key = (-1, -1)  # (global step, index of the generation batch within that step)
        self._setup_live_teacher(live_teacher)

    # ------------------------------------------------------------------------------------------------------------
    # Construction-time checks
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _warn_unclipped_ratio(args: MixedPolicyGRPOConfig) -> None:
        """Warn (once per trainer) when the on-policy ratio can leave 1 while `on_policy_clip=False`."""
        reasons = on_policy_ratio_departures(args)
        if args.on_policy_clip or not reasons:
            return
        baseline = ("num_off_policy=0 is therefore NOT TRL's GRPO (which clips); " if args.num_off_policy == 0
                    else "")
        logger.warning(
            "on_policy_clip=False and the on-policy importance ratio can depart from 1 here: %s. On-policy tokens get "
            "the unclipped objective -A·r, as in LUFFY's released script (loss_remove_clip=True); %sset "
            "on_policy_clip=True for the clipped PPO/GRPO objective (the paper's, and the on-policy baseline's).",
            "; ".join(reasons), baseline,
        )

    @staticmethod
    def _check_supported(args: MixedPolicyGRPOConfig, train_dataset, kwargs) -> None:
        unsupported = []
        if args.loss_type not in SUPPORTED_LOSS_TYPES:
            unsupported.append(f"loss_type={args.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
        if args.importance_sampling_level != "token":
            unsupported.append("importance_sampling_level='sequence' (GSPO): use 'token'")
        if args.use_adaptive_entropy:
            unsupported.append("use_adaptive_entropy=True: use a constant entropy_coef")
        if args.num_off_policy > 0:
            for name in ("tools", "rollout_func", "environment_factory"):
                if kwargs.get(name):
                    unsupported.append(f"{name} with num_off_policy > 0 (teacher rows are single-turn completions)")
            if args.remove_unused_columns:
                unsupported.append(
                    f"remove_unused_columns=True: it drops the teacher column {args.off_policy_column!r}; set False"
                )
        if unsupported:
            raise ValueError("MixedPolicyGRPOTrainer does not support: " + "; ".join(unsupported) + ".")

        columns = getattr(train_dataset, "column_names", None)
        if columns is not None:
            if IS_OFF_POLICY in columns:
                raise ValueError(
                    f"train_dataset has a column named {IS_OFF_POLICY!r}; the trainer sets this column itself (one "
                    "bool per completion, passed to reward functions). Rename the dataset column."
                )
            if args.num_off_policy > 0 and args.off_policy_column not in columns:
                raise ValueError(
                    f"off_policy_column={args.off_policy_column!r} is not a column of train_dataset; columns present: "
                    f"{list(columns)}. Point off_policy_column at the column with the teacher completions (LUFFY's "
                    "data calls it 'target'), or set num_off_policy=0 (with on_policy_clip=True) for plain GRPO."
                )
            logprobs_column = args.off_policy_logprobs_column
            if args.num_off_policy > 0 and logprobs_column is not None and logprobs_column not in columns:
                raise ValueError(
                    f"off_policy_logprobs_column={logprobs_column!r} is not a column of train_dataset; columns "
                    f"present: {list(columns)}. Point it at the column with the teacher's per-token log-probs, or set "
                    "it to None (π_φ = 1, LUFFY's default)."
                )
            if args.num_off_policy > 0 and hasattr(train_dataset, "select"):
                head = train_dataset.select(range(min(ROWS_CHECKED_AT_INIT, len(train_dataset))))
                for i, value in enumerate(head[args.off_policy_column]):
                    teacher_texts(value, column=args.off_policy_column, row=i)

    # ------------------------------------------------------------------------------------------------------------
    # Rewards, guidance decisions and batch metrics
    # ------------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._guidance = self._batch_rewards = None
        if self.model.training:
            # Gathered over processes: the weighted total reward per completion (NaN if unscorable) and the teacher
            # flags, in TRL's global order; read by the trigger below and by the batch metrics.
            device = rewards_per_func.device
            total = (rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
            total[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
            local_off = torch.tensor([bool(row.get(IS_OFF_POLICY, False)) for row in inputs], device=device)
            self._batch_rewards = (total, gather(local_off))
            if self.num_off_policy > 0:
                rewards_per_func = self._decide_guidance(rewards_per_func)
        return rewards_per_func

    def _decide_guidance(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Apply `off_policy_trigger` to the gathered rewards; NaN the rewards of teacher rows kept out of the baseline.

        Teacher rows whose group's trigger did not fire, and with `off_policy_loss="sft"` every teacher row, get NaN
        for every reward function: TRL then treats them as unscorable (left out of the group mean and std, advantage
        0). The rewards are gathered, so every process computes the same decisions.
        """
        args = self.args
        total, is_off = self._batch_rewards
        fired = trigger_fired(
            total, is_off, self.num_generations, args.off_policy_trigger,
            success_threshold=args.success_reward_threshold, accuracy_threshold=args.off_policy_trigger_threshold,
        )
        takes_part = participating_teacher_rows(is_off, fired, self.num_generations)
        excluded = is_off & ~takes_part
        self._guidance = {
            "is_off": is_off,
            "fired": fired,
            "takes_part": takes_part,
            "excluded": excluded,
            "has_teacher": is_off.view(-1, self.num_generations).any(dim=1),
        }
        out_of_baseline = is_off if args.off_policy_loss == "sft" else excluded
        if out_of_baseline.any():
            rewards_per_func = rewards_per_func.clone()
            rewards_per_func[out_of_baseline] = torch.nan
        return rewards_per_func

    def _mask_truncated_on_policy_rows(self, output) -> None:
        """`mask_truncated_completions` for on-policy rows only (teacher rows are never dropped)."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        last = (mask.sum(1) - 1).clamp(min=0)
        last_ids = ids.gather(1, last.unsqueeze(1)).squeeze(1)
        stop = torch.tensor([*self.eos_token_ids, self._tokenizer.pad_token_id], device=ids.device)
        truncated = ~torch.isin(last_ids, stop) & ~output[IS_OFF_POLICY]
        output["completion_mask"] = mask * (~truncated).unsqueeze(1).to(mask.dtype)
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

    def _log_on_policy_sampling_metrics(self, mode: str, output) -> None:
        """Recompute TRL's `sampling/*` metrics over the tokens they describe: on-policy rows, final loss mask.

        TRL logs them inside `_generate_and_score_completions`, over every row: teacher rows (IS ratio exactly 1)
        and rows masked afterwards (truncated on-policy rows with `mask_truncated_completions`, teacher rows whose
        trigger did not fire) dilute them. This replaces the value TRL appended for this batch with the global
        mean / min / max over the on-policy tokens that train (sums and counts are gathered, so the mean is a token
        mean over all processes, where TRL averages per-process means). No value when no such token exists.
        """
        metrics = self._metrics[mode]
        mask = (output["completion_mask"] * output.get("tool_mask", 1)).bool()
        on_rows = ~output[IS_OFF_POLICY]
        tokens = mask & on_rows.unsqueeze(1)
        delta = (output["old_per_token_logps"] - output["sampling_per_token_logps"]).abs()
        valid = tokens & ~torch.isnan(delta)
        ratio = output["importance_sampling_ratio"]
        flat = ratio[:, 0][on_rows & mask.any(1)] if ratio.size(1) == 1 else ratio[tokens]
        inf = torch.tensor(float("inf"), device=delta.device)

        def stats(x):
            x = x.float()
            if not x.numel():
                return [x.new_zeros(()), x.new_zeros(()), inf, -inf]
            return [x.sum(), x.new_tensor(float(x.numel())), x.min(), x.max()]

        local = torch.stack(stats(delta[valid]) + stats(flat)).unsqueeze(0)
        table = self.accelerator.gather(local)  # (processes, 8)
        sums, counts = table[:, [0, 4]].sum(0), table[:, [1, 5]].sum(0)
        lows, highs = table[:, [2, 6]].min(0).values, table[:, [3, 7]].max(0).values
        values = {
            "sampling/sampling_logp_difference/mean": (0, sums[0] / counts[0].clamp(min=1)),
            "sampling/sampling_logp_difference/max": (0, highs[0]),
            "sampling/importance_sampling_ratio/min": (1, lows[1]),
            "sampling/importance_sampling_ratio/mean": (1, sums[1] / counts[1].clamp(min=1)),
            "sampling/importance_sampling_ratio/max": (1, highs[1]),
        }
        for name, (which, value) in values.items():
            if metrics.get(name):
                metrics[name].pop()  # TRL's value for this batch
            if counts[which] > 0:
                metrics[name].append(value.item())

    def _log_mixed_batch_metrics(self, output) -> None:
        metrics = self._metrics["train"]
        total, is_off = self._batch_rewards
        lengths = gather(output["completion_mask"].sum(1).float())
        on = ~is_off

        def mean(x):
            return torch.nanmean(x).item() if x.numel() else float("nan")

        metrics["on_policy/reward_mean"].append(mean(total[on]))
        metrics["on_policy/completion_length_mean"].append(mean(lengths[on]))
        if self.num_off_policy > 0:
            metrics["off_policy/reward_mean"].append(mean(total[is_off]))
            metrics["off_policy/completion_length_mean"].append(mean(lengths[is_off]))
            metrics["off_policy/fraction_of_rows"].append(is_off.float().mean().item())

        accuracy = on_policy_group_accuracy(total, is_off, self.num_generations, self.args.success_reward_threshold)
        metrics["groups/all_on_policy_failed"].append((accuracy == 0).float().mean().item())
        metrics["groups/all_on_policy_solved"].append((accuracy == 1).float().mean().item())

        if self._teacher_stats is not None:
            keys = TEACHER_COUNTERS
            if self.args.off_policy_logprobs_column is not None:
                keys = keys + LOGPROB_COUNTERS
            local = torch.tensor([self._teacher_stats[k] for k in keys], device=self.accelerator.device)
            counts = gather(local.unsqueeze(0)).sum(0).tolist()
            for key, count in zip(keys, counts):
                metrics[f"off_policy/{key}"].append(float(count))

        decision = self._guidance
        if decision is not None:
            metrics["off_policy/used"].append(decision["takes_part"].sum().item())
            if decision["has_teacher"].any():
                metrics["off_policy/trigger_fired"].append(
                    decision["fired"][decision["has_teacher"]].float().mean().item()
                )
