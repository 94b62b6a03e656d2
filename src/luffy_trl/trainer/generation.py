"""Teacher slots: which rows of a generation batch are teacher rows, and generation of the on-policy rows only.

`TeacherGenerationMixin` is one of the pieces of `MixedPolicyGRPOTrainer` (`luffy_trl.trainer`); it wraps TRL's
`_generate_and_score_completions` and `_generate_single_turn` with `super()`. Collective calls made here follow the
rule in `luffy_trl.trainer`'s docstring: every process takes the same branch.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import gather_object

from luffy_trl.guidance import align_teacher_logprobs, group_gets_teacher, keyed_rng, schedule_value, trace_order
from luffy_trl.teacher import TeacherTrajectory, teacher_logprobs, teacher_traces

IS_OFF_POLICY = "is_off_policy"
TEACHER_LOGPS = "teacher_per_token_logps"
# Per generation batch, summed over processes and logged as off_policy/<name>.
TEACHER_COUNTERS = ("missing", "invalid", "truncated", "tokenization_fallback", "discarded_generations")
# Logged only when `off_policy_logprobs_column` is set.
LOGPROB_COUNTERS = ("logprobs_used", "logprobs_fallback")
logger = logging.getLogger("luffy_trl.trainer")


def teacher_slot(global_row: int, num_generations: int, num_off_policy: int) -> int | None:
    """Index (0..num_off_policy-1) of the teacher slot that global row `global_row` occupies, or None.

    Groups are contiguous runs of `num_generations` rows in TRL's global order; the last `num_off_policy` slots
    of every group are teacher slots (any fixed slot set is equivalent: group statistics ignore order).
    """
    slot = global_row % num_generations
    first_teacher_slot = num_generations - num_off_policy
    return slot - first_teacher_slot if slot >= first_teacher_slot else None


class TeacherGenerationMixin:
    """Plans the teacher slots of each generation batch and generates only the on-policy rows."""

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
            if traces and not self.tools and any(isinstance(t, TeacherTrajectory) for _, t in traces):
                traces = None  # a tool-calling trajectory needs tools= (checked at construction on the first rows)
                invalid += 1
                if self._invalid_teacher_warnings < 5:
                    self._invalid_teacher_warnings += 1
                    logger.warning("Row %d of %r is a tool-calling trajectory but the trainer has no tools; the slot "
                                   "is sampled from the policy instead (off_policy/invalid).", i, column)
            if not traces:  # no usable trace: the slot is sampled from the policy like the others
                plan.append(None)
                missing += traces is not None
                continue
            lengths = rng = None
            if args.off_policy_trace_selection == "shortest" and len(traces) > 1:
                measured = [getattr(text, "length_text", text) for _, text in traces]  # tool turns count too
                lengths = [len(ids) for ids in self._tokenizer(measured, add_special_tokens=False)["input_ids"]]
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
        # Set on every process of a training batch, whether or not this process holds a teacher row: the branch
        # `_generate_single_turn` takes may contain a collective (`_subset_generations_per_prompt`), so it must not
        # depend on local rows. `mode` and `num_off_policy` are the same on every process.
        self._teacher_plan = None
        if mode == "train" and self.num_off_policy > 0:
            self._teacher_plan = list(zip([row["prompt"] for row in inputs], plan, self._teacher_logprobs_plan))
        self._teacher_logps_rows = {}
        self._teacher_rows = {}  # local row -> None (a teacher text) or (tool mask, messages) of a trajectory
        self._guidance = None

        output = super()._generate_and_score_completions(inputs)
        self._teacher_plan = None

        device = self.accelerator.device
        is_off = torch.tensor([text is not None for text in plan], dtype=torch.bool, device=device)
        output[IS_OFF_POLICY] = is_off
        if mode == "train":  # lengths as generated, before truncated rows are masked
            self._log_mixed_batch_metrics(output)
        if self._mask_truncated_on_policy:
            self._mask_truncated_on_policy_rows(output)
        if mode == "train" and self.num_off_policy > 0:
            self._apply_guidance(output)
            if self.args.off_policy_logprobs_column is not None:
                output[TEACHER_LOGPS] = self._teacher_logps_tensor(output["completion_ids"])
        if self.use_vllm and self.vllm_importance_sampling_correction:  # config: the same on every process
            self._log_on_policy_sampling_metrics(mode, output)
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
        if plan is None:  # evaluation, plain GRPO (num_off_policy=0): the same on every process
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        stats = self._teacher_stats
        teacher_ids = {}
        use_logprobs = self.args.off_policy_logprobs_column is not None
        self._teacher_rows = {}
        for i, (prompt, text, logprobs) in enumerate(plan):
            if isinstance(text, TeacherTrajectory):  # tools= only (checked at construction and when planning)
                encoded, tool_mask = self.teacher_tokenizer.encode_trajectory(text, self._get_tool_suffix_ids)
                teacher_ids[i] = encoded.ids
                self._teacher_rows[i] = (tool_mask, list(text.messages))
                stats["truncated"] += encoded.truncated
                stats["logprobs_fallback"] += use_logprobs  # per-token teacher log-probs of a conversation: unused
                continue
            if text is not None:
                self._teacher_rows[i] = None
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

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        """TRL's tool loop over the sampled rows only: teacher rows never execute tools nor get policy turns.

        A teacher row enters TRL's loop as an answer without tool calls (so the loop leaves it alone); afterwards it
        gets its own tool mask (a trajectory's tool results 0, as TRL masks a sampled rollout's) and, for reward
        functions, its messages (a trajectory's assistant turns and tool results, like a sampled rollout's).
        """
        teacher = self._teacher_rows or {}
        saved = {i: completions[i] for i in teacher}
        for i in teacher:
            completions[i] = [{"role": "assistant", "content": ""}]
        out = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, logprobs, images,
                                      multimodal_fields)
        tool_mask, completions = out[0], out[1]
        for i, trajectory in teacher.items():
            if trajectory is None:  # a one-turn teacher text
                completions[i] = saved[i]
                tool_mask[i] = [1] * len(out[2][i])
            else:
                tool_mask[i], completions[i] = list(trajectory[0]), trajectory[1]
        return out

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
