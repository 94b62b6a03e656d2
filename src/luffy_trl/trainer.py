"""`MixedPolicyGRPOTrainer`: LUFFY's mixed-policy GRPO as a narrow subclass of TRL's `GRPOTrainer`.

Data flow of one generation batch (docs/method.md has the formulas):

1. TRL's sampler repeats each prompt `num_generations` (G) times; global row `g` is slot `g % G` of its group.
   `_generate_and_score_completions` marks the last `num_off_policy` slots of each group as teacher rows (when the
   row has a teacher completion) and exposes the flag to reward functions as the `is_off_policy` column.
2. `_generate_single_turn` generates only the on-policy rows and puts the tokenized teacher completion in the
   teacher slots (with "unknown" sampling log-probs, so vLLM's importance-sampling ratio is exactly 1 there).
3. TRL decodes and scores every row (teacher rows with the same reward functions). `_calculate_rewards` then applies
   the trigger (`luffy_trl.guidance`) on the gathered rewards: a teacher row that does not take part (and, for the
   "RL w/ SFT loss" baseline, every teacher row) gets NaN rewards, so TRL leaves it out of the group baseline and
   gives it advantage 0. TRL computes the group advantages, pads, shuffles and splits; an `is_off_policy` (B,)
   tensor travels with the batch, and teacher rows that do not take part get an all-zero completion mask.
4. `_compute_loss` runs one forward pass and calls the pure `luffy_trl.losses` functions.

Everything else (optimiser, logging, vLLM, PEFT, DeepSpeed, checkpoints) is TRL's.
Built against TRL 1.16; `tests/test_trl_compat.py` fails loudly if the wrapped private methods change.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import gather, gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from luffy_trl.config import MixedPolicyGRPOConfig
from luffy_trl.guidance import (
    align_teacher_logprobs,
    group_gets_teacher,
    keyed_rng,
    on_policy_group_accuracy,
    participating_teacher_rows,
    schedule_value,
    trace_order,
    trigger_fired,
)
from luffy_trl.losses import SUPPORTED_LOSS_TYPES, aggregate_loss, mixed_policy_per_token_loss, sft_nll_loss
from luffy_trl.teacher import TeacherTokenizer, teacher_logprobs, teacher_texts, teacher_traces

IS_OFF_POLICY = "is_off_policy"
TEACHER_LOGPS = "teacher_per_token_logps"
# Per generation batch, summed over processes and logged as off_policy/<name>.
TEACHER_COUNTERS = ("missing", "invalid", "truncated", "tokenization_fallback", "discarded_generations")
# Logged only when `off_policy_logprobs_column` is set.
LOGPROB_COUNTERS = ("logprobs_used", "logprobs_fallback")
# Rows whose teacher value is type-checked at construction time, so a malformed column fails before training.
ROWS_CHECKED_AT_INIT = 64
logger = logging.getLogger(__name__)


def teacher_slot(global_row: int, num_generations: int, num_off_policy: int) -> int | None:
    """Index (0..num_off_policy-1) of the teacher slot that global row `global_row` occupies, or None.

    Groups are contiguous runs of `num_generations` rows in TRL's global order; the last `num_off_policy` slots
    of every group are teacher slots (any fixed slot set is equivalent: group statistics ignore order).
    """
    slot = global_row % num_generations
    first_teacher_slot = num_generations - num_off_policy
    return slot - first_teacher_slot if slot >= first_teacher_slot else None


class MixedPolicyGRPOTrainer(GRPOTrainer):
    """GRPO with LUFFY's off-policy guidance (Yan et al., 2025, "Learning to Reason under Off-Policy Guidance").

    Accepts everything `GRPOTrainer` accepts. Each group of `args.num_generations` completions holds
    `num_generations - num_off_policy` sampled completions and `num_off_policy` teacher completions read from
    `args.off_policy_column`; advantages are computed over the mixed group and teacher tokens are trained with
    the shaped, unclipped objective −A·p/(p+γ). See `MixedPolicyGRPOConfig` for the options.

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

    # ------------------------------------------------------------------------------------------------------------
    # Construction-time checks
    # ------------------------------------------------------------------------------------------------------------
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
                    "data calls it 'target'), or set num_off_policy=0 for plain GRPO."
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
    # Batch assembly
    # ------------------------------------------------------------------------------------------------------------
    def _schedule_value(self) -> float:
        """The guidance schedule at the current optimiser step (`luffy_trl.guidance.schedule_value`)."""
        args = self.args
        return schedule_value(
            self.state.global_step,
            args.off_policy_schedule,
            start=args.off_policy_schedule_start,
            end=args.off_policy_schedule_end,
            warmup_steps=args.off_policy_schedule_warmup_steps,
            decay_steps=args.off_policy_schedule_decay_steps,
            max_steps=self.state.max_steps,
        )

    def _next_generation_key(self) -> tuple[int, int]:
        """(global step, index of this generation batch within the step): the key of this batch's random draws.

        Identical on every process (they generate in lockstep) and after a resume (which starts at a step boundary).
        """
        step, index = self._generation_key
        self._generation_key = (self.state.global_step, index + 1 if step == self.state.global_step else 0)
        return self._generation_key

    def _plan_teacher_rows(self, inputs: list[dict]) -> list[str | None]:
        """Teacher text for each local row that occupies a teacher slot and has a trace, else None.

        Also decides the group share of a `group_share` schedule and which of several traces each slot takes
        (`off_policy_trace_selection`), and looks up the teacher log-probs of the chosen trace
        (`self._teacher_logprobs_plan`).
        """
        args = self.args
        column, logprobs_column = args.off_policy_column, args.off_policy_logprobs_column
        base = self.accelerator.process_index * len(inputs)
        step, generation = self._next_generation_key()
        share = 1.0
        if args.off_policy_schedule_target == "group_share":
            share = self._schedule_value()
            self._metrics["train"]["off_policy/schedule_value"].append(share)
        plan, logprobs_plan, missing, invalid = [], [], 0, 0
        for i, row in enumerate(inputs):
            logprobs_plan.append(None)
            slot = teacher_slot(base + i, self.num_generations, self.num_off_policy)
            group = (base + i) // self.num_generations
            if slot is None or not group_gets_teacher(share, seed=args.seed, step=step, generation=generation,
                                                      group=group):
                plan.append(None)  # an on-policy slot, or a group the schedule leaves without a teacher trace
                continue
            if column not in row:
                raise KeyError(
                    f"Row {i} of the generation batch has no column {column!r} (columns: {sorted(row)}). Set "
                    "off_policy_column to the teacher column, or num_off_policy=0."
                )
            try:
                traces = teacher_traces(row[column], column=column, row=i)
            except TypeError as err:  # the first rows were checked at construction: count, warn, carry on
                traces = None
                invalid += 1
                if self._invalid_teacher_warnings < 5:
                    self._invalid_teacher_warnings += 1
                    logger.warning("%s The slot is sampled from the policy instead (off_policy/invalid).", err)
            if not traces:  # no usable trace: the slot is sampled from the policy like the others
                plan.append(None)
                missing += traces is not None
                continue
            lengths = rng = None
            if args.off_policy_trace_selection == "shortest" and len(traces) > 1:
                lengths = [len(self._tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text in traces]
            elif args.off_policy_trace_selection == "random" and len(traces) > 1:
                rng = keyed_rng("trace", args.seed, step, generation, group)
            order = trace_order(len(traces), args.off_policy_trace_selection, lengths=lengths, rng=rng)
            position, text = traces[order[slot % len(traces)]]
            plan.append(text)
            if logprobs_column is not None:
                logprobs_plan[-1] = teacher_logprobs(row.get(logprobs_column), position)
        self._teacher_stats = dict.fromkeys(TEACHER_COUNTERS + LOGPROB_COUNTERS, 0)
        self._teacher_stats.update(missing=missing, invalid=invalid)
        self._teacher_logprobs_plan = logprobs_plan
        return plan

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        inputs = [dict(row) for row in inputs]  # rows may be shared objects; the flag is per completion
        self._teacher_logprobs_plan = [None] * len(inputs)
        if mode == "train" and self.num_off_policy > 0:
            plan = self._plan_teacher_rows(inputs)
        else:  # evaluation batches stay purely on-policy
            plan = [None] * len(inputs)
            self._teacher_stats = None
        for row, text in zip(inputs, plan):
            row[IS_OFF_POLICY] = text is not None
        if self.num_off_policy > 0:  # a column of the completions table (log_completions=True)
            self._log_completion_extra(IS_OFF_POLICY, [text is not None for text in plan])
        self._teacher_plan = None
        if any(plan):
            self._teacher_plan = list(zip([row["prompt"] for row in inputs], plan, self._teacher_logprobs_plan))
        self._teacher_logps_rows = {}
        self._guidance = None

        output = super()._generate_and_score_completions(inputs)
        self._teacher_plan = None

        device = self.accelerator.device
        is_off = torch.tensor([text is not None for text in plan], dtype=torch.bool, device=device)
        output[IS_OFF_POLICY] = is_off
        if self._mask_truncated_on_policy:
            self._mask_truncated_on_policy_rows(output)
        if mode == "train":
            self._log_mixed_batch_metrics(output)
            if self.num_off_policy > 0:
                self._apply_guidance(output)
                if self.args.off_policy_logprobs_column is not None:
                    output[TEACHER_LOGPS] = self._teacher_logps_tensor(output["completion_ids"])
        return output

    def _apply_guidance(self, output) -> None:
        """Zero the completion mask of teacher rows whose trigger did not fire (no loss, no tokens in normalisers).

        `_calculate_rewards` made the decisions on the gathered rewards, so every process agrees; this process owns
        global rows `[process_index · B, (process_index + 1) · B)`. With `off_policy_loss="sft"` the policy-gradient
        term covers on-policy tokens only, so `num_items_in_batch` (the `dapo` normaliser) counts only those.
        """
        decision = self._guidance
        if decision is None:
            return
        num_rows = output["completion_mask"].size(0)
        local = slice(self.accelerator.process_index * num_rows, (self.accelerator.process_index + 1) * num_rows)
        excluded = decision["excluded"]
        sft = self.args.off_policy_loss == "sft"
        if excluded.any():  # global: the same branch on every process (the gather below is collective)
            keep = (~excluded[local]).to(output["completion_mask"].device).unsqueeze(1)
            output["completion_mask"] = output["completion_mask"] * keep.to(output["completion_mask"].dtype)
        if excluded.any() or (sft and decision["is_off"].any()):
            loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
            if sft:
                loss_mask = loss_mask * (~output[IS_OFF_POLICY]).unsqueeze(1).to(loss_mask.dtype)
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

    def _teacher_logps_tensor(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(B, C) teacher log-probs aligned with the completion tokens; 0 (π_φ = 1) where there are none."""
        logps = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        for i, values in (self._teacher_logps_rows or {}).items():
            n = min(len(values), logps.size(1))
            logps[i, :n] = torch.tensor(values[:n], dtype=torch.float32, device=logps.device)
        self._teacher_logps_rows = None
        return logps

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plan, self._teacher_plan = self._teacher_plan, None  # consume once
        if plan is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        stats = self._teacher_stats
        teacher_ids = {}
        use_logprobs = self.args.off_policy_logprobs_column is not None
        for i, (prompt, text, logprobs) in enumerate(plan):
            if text is not None:
                encoded = self.teacher_tokenizer.encode(prompt, prompt_ids[i], text)
                teacher_ids[i] = encoded.ids
                stats["truncated"] += encoded.truncated
                stats["tokenization_fallback"] += encoded.used_fallback
                if use_logprobs:
                    aligned = align_teacher_logprobs(logprobs, encoded.num_tokens, len(encoded.ids))
                    if aligned is None:
                        stats["logprobs_fallback"] += 1
                    else:
                        stats["logprobs_used"] += 1
                        self._teacher_logps_rows[i] = aligned

        per_prompt = self._subset_generations_per_prompt(images, multimodal_fields, teacher_ids, len(prompt_ids),
                                                         num_generations)
        if per_prompt is not None:
            # Generate only the on-policy rows. Every process generates at least one row, so that collective
            # operations inside generation (weight gathering, synced decoding) stay aligned across processes.
            rows = [i for i in range(len(prompt_ids)) if i not in teacher_ids] or [0]
            sub_ids, sub_logprobs = super()._generate_single_turn(
                [prompt_ids[i] for i in rows], images, multimodal_fields, per_prompt, has_tool_images
            )
            completion_ids = [None] * len(prompt_ids)
            logprobs = None if sub_logprobs is None else [None] * len(prompt_ids)
            for k, i in enumerate(rows):
                completion_ids[i] = sub_ids[k]
                if logprobs is not None:
                    logprobs[i] = sub_logprobs[k]
            stats["discarded_generations"] += sum(i in teacher_ids for i in rows)
        else:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
            completion_ids, logprobs = list(completion_ids), None if logprobs is None else list(logprobs)
            stats["discarded_generations"] += len(teacher_ids)

        for i, ids in teacher_ids.items():
            completion_ids[i] = ids
            if logprobs is not None:
                logprobs[i] = [None] * len(ids)  # unknown sampling log-prob -> NaN -> vLLM IS ratio exactly 1
        return completion_ids, logprobs

    def _subset_generations_per_prompt(self, images, multimodal_fields, teacher_rows, num_rows: int,
                                       num_generations: int) -> int | None:
        """Completions per prompt to ask for when only the on-policy rows are generated; None: generate every row.

        - transformers `generate`, continuous batching and single-GPU vLLM colocate generate row by row: any subset
          works (`num_generations` is not used by them).
        - vLLM server mode gathers all processes' prompts, keeps every `num_generations`-th one, asks the server
          for that many completions of each and hands each process an equal slice; tensor-parallel colocate
          gathers its group's prompts and slices them equally too. Both stay aligned when every process holds
          whole groups with exactly `num_off_policy` teacher rows each: then the on-policy rows come in runs of
          G − k identical prompts, equally many per process, and G − k completions per prompt are asked for. All
          processes must agree, so the check is gathered (one small collective per generation). Otherwise (a
          group without a trace, a `group_share` schedule, groups split across processes) every slot is
          generated and the teacher slots' samples are discarded (`off_policy/discarded_generations`).
        - Multimodal inputs are not sliced: every slot is generated.
        """
        if images is not None or multimodal_fields:
            return None
        if not self.use_vllm or (self.args.vllm_mode == "colocate" and self.args.vllm_tensor_parallel_size == 1):
            return num_generations
        g, k = self.num_generations, self.num_off_policy
        uniform = num_rows % g == 0 and all(
            sum(i in teacher_rows for i in range(start, start + g)) == k for start in range(0, num_rows, g)
        )
        if all(gather_object([uniform])):
            return g - k
        if not self._warned_full_generation:
            self._warned_full_generation = True
            cause = (f"this process holds {num_rows} rows, not whole groups of num_generations={g} (make the "
                     "per-device batch times steps_per_generation a multiple of it)" if num_rows % g else
                     "a group has no teacher trace, a group_share schedule is on, or another process holds partial "
                     "groups")
            logger.warning(
                "vLLM %s generates every slot of this batch and discards the teacher slots' samples: %s. Counted in "
                "off_policy/discarded_generations; warned once.",
                "server mode" if self.args.vllm_mode == "server" else "tensor-parallel colocate", cause,
            )
        return None

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

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """One forward pass, LUFFY's per-token loss (`luffy_trl.losses`), TRL's normalisers and extra terms.

        Mirrors the structure of TRL 1.16's `GRPOTrainer._compute_loss` for the token-level loss types it supports
        (grpo, bnpo, dr_grpo, dapo): same forward call, KL, entropy bonus, entropy mask, off-policy sequence mask
        (OPSM), vLLM importance-sampling ratio and metrics; teacher rows get the shaped objective and are exempt from
        clipping, OPSM, the entropy mask and the vLLM IS ratio.
        """
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        is_off = inputs.get(IS_OFF_POLICY)
        if is_off is None:
            is_off = torch.zeros(completion_ids.size(0), dtype=torch.bool, device=completion_ids.device)
        off_rows = is_off.view(-1, 1)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old_per_token_logps = inputs.get("old_per_token_logps")

        # Token weights that apply to on-policy tokens only: teacher tokens keep weight 1.
        weights = torch.ones_like(per_token_logps)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            on_mask = mask * (~off_rows)
            entropy_mask = self.get_high_entropy_mask(entropies, on_mask, 1 - self.top_entropy_quantile)
            entropy_mask = torch.where(off_rows, torch.ones_like(entropy_mask), entropy_mask)
            weights = weights * entropy_mask
        if self.off_policy_mask_threshold is not None:
            old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            opsm = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            weights = weights * torch.where(off_rows, torch.ones_like(opsm), opsm)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
            weights = weights * torch.where(off_rows, torch.ones_like(is_ratio), is_ratio)

        # Guidance strength: a loss-weight schedule multiplies the off-policy term (1.0, i.e. untouched, by default).
        off_policy_weight = 1.0
        if mode == "train" and self.num_off_policy > 0 and self.args.off_policy_schedule_target == "loss_weight":
            off_policy_weight = self._schedule_value()
            self._metrics[mode]["off_policy/schedule_value"].append(off_policy_weight)
        sft = self.args.off_policy_loss == "sft"
        losses = mixed_policy_per_token_loss(
            per_token_logps,
            old_per_token_logps,
            advantages,
            is_off,
            shaping=self.args.off_policy_shaping,
            gamma=self.args.policy_shaping_gamma,
            clip=self.args.on_policy_clip,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            teacher_per_token_logps=inputs.get(TEACHER_LOGPS),
            off_policy_weight=off_policy_weight,
            off_policy_loss=self.args.off_policy_loss,
        )
        per_token_loss = losses.per_token_loss * weights
        # "RL w/ SFT loss": the policy-gradient term covers on-policy tokens only; teacher tokens get the NLL below.
        pg_mask = mask * (~off_rows) if sft else mask

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:  # the rollout ratio exists for on-policy rows only
                per_token_kl = per_token_kl * losses.ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        loss = aggregate_loss(
            per_token_loss,
            pg_mask,
            self.loss_type,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            training=mode == "train",
        )
        policy_loss = loss.detach()
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self._entropy_bonus_enabled:
            # Entropy bonus = mean token entropy over the tokens the policy term acts on, scaled only for gradient
            # accumulation (TRL's definition, L = L_policy − coef · H).
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            entropy = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
            loss = loss - self.entropy_coef * entropy / accumulation
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        sft_nll = None
        if sft:
            # Token-mean NLL over this micro-batch's teacher tokens, scaled like TRL's entropy term (÷ GA).
            sft_nll = sft_nll_loss(per_token_logps, mask, is_off)
            loss = loss + self.args.sft_loss_coef * off_policy_weight * sft_nll / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, mask, off_rows, per_token_logps, entropies, losses,
                               per_token_kl if self.beta != 0.0 else None, sft_nll is not None)
        return loss

    def _log_loss_metrics(self, mode, mask, off_rows, per_token_logps, entropies, losses, per_token_kl,
                          sft=False) -> None:
        """Token means over all processes, gathered in one all-reduce and one device-to-host copy.

        Stock TRL reduces and `.item()`s each metric on its own (a collective and a device sync per metric); with
        the teacher metrics added that would be eight of each per micro-batch.
        """
        metrics = self._metrics[mode]
        on_mask = mask * (~off_rows)
        off_mask = mask * off_rows
        low, high = losses.is_low_clipped.float(), losses.is_high_clipped.float()
        terms = {}  # metric -> (per-token values, mask); teacher tokens are never clipped
        if per_token_kl is not None:
            terms["kl"] = (per_token_kl, mask)
        terms["entropy"] = (entropies, mask)
        terms["clip_ratio/low_mean"] = (low, on_mask)
        terms["clip_ratio/high_mean"] = (high, on_mask)
        terms["clip_ratio/region_mean"] = (torch.maximum(low, high), on_mask)
        if self.num_off_policy > 0 and mode == "train":
            terms["off_policy/prob_mean"] = (per_token_logps.detach().exp(), off_mask)
            if sft:
                terms["off_policy/sft_nll"] = (-per_token_logps, off_mask)
            else:
                terms["off_policy/shaping_weight_mean"] = (losses.shaping_weight, off_mask)
        sums = torch.stack([(x.detach() * m).sum().float() for x, m in terms.values()]
                           + [m.sum().float() for _, m in terms.values()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        n = len(terms)
        means = (sums[:n] / sums[n:].clamp(min=1.0)).tolist()
        # Per-sequence clip fractions of on-policy rows (NaN for teacher rows, ignored by nanmin/nanmax).
        seq = torch.stack([(low * on_mask).sum(1), (high * on_mask).sum(1)]) / on_mask.sum(1)
        seq = self.accelerator.gather(seq.T.contiguous())  # gather concatenates along rows
        extremes = torch.stack([nanmin(seq[:, 0]), nanmax(seq[:, 1])]).tolist()
        for name, value in zip(terms, means):
            metrics[name].append(value)
        metrics["clip_ratio/low_min"].append(extremes[0])
        metrics["clip_ratio/high_max"].append(extremes[1])
