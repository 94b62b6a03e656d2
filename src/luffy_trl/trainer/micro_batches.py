"""Padding-free micro-batches and no-grad forwards over the rows that need them (`padding_free_batches`).

`PaddingFreeBatchingMixin` is one of the pieces of `MixedPolicyGRPOTrainer` (`luffy_trl.trainer`). It wraps two TRL
1.16 methods with `super()` and leaves their bodies alone (docs/batching.md has the design):

* `_prepare_inputs`: after TRL has generated, shuffled and split a generation batch into `self._buffered_inputs`,
  the rows of the chunks that feed the same optimiser steps (`luffy_trl.batching.exchangeable_chunks`) are
  reassigned by length (`plan_micro_batches`), rows without loss tokens are dropped, and each chunk is cut to its
  own longest real prompt and completion. The number of chunks (micro-steps) does not change.
* `_get_per_token_logps_and_entropies`, only while `_generate_and_score_completions` runs its no-grad forwards
  (old and reference log-probs): length-sorted, trimmed batches; no old-log-prob forward over teacher rows (they
  never read it: π_φ = 1, ratio exactly 1; their value is 0). Every process runs the same number of forwards
  (ZeRO-3 gathers weights inside each): the count is gathered and a process with fewer runs tiny dummy forwards.

* With `pack_sequences` (docs/batching.md, "Packed sequences"), the loss forward of each micro-batch and the
  no-grad forwards run over the rows packed into one sequence (`_packed_forward`): no padding at all, position ids
  restarting at 0 for every row, and the per-token results scattered back into TRL's (rows, completion) layout.
  Only for a model that packs exactly (`luffy_trl.packing`): a family measured not to is never packed ('always' is
  refused at construction), and every model is checked once at its first packed forward. The packed forward and
  that decision live in the base class, `luffy_trl.trainer.packed_sequences.PackedSequencesMixin`.
* Families whose log-probs move with a row's left padding (`luffy_trl.packing.PADDING_DEPENDENT`) keep TRL's prompt
  width: only completion columns are cut (`_prompt_cut_exact`).

Collectives (see `luffy_trl.trainer`): one gather of the forward count per no-grad call, one gather of the token
counters per training generation batch, and once per run the packing check's forwards and the gather of its verdict;
all branches depend on config and mode only.
"""

from __future__ import annotations

import logging

import torch

from luffy_trl.batching import exchangeable_chunks, layout_tokens, pack_forwards, pack_rows, plan_micro_batches
from luffy_trl.packing import PADDING_DEPENDENT, model_type_of
from luffy_trl.trainer.generation import IS_OFF_POLICY
from luffy_trl.trainer.packed_sequences import PackedSequencesMixin, _completion_extents, _prompt_lengths

# Key of the per-micro-batch normaliser information in the inputs dict (read by `_compute_loss`).
BATCHING_INFO = "_batching"
PROMPT_KEYS = ("prompt_ids", "prompt_mask")

logger = logging.getLogger(__name__)


class PaddingFreeBatchingMixin(PackedSequencesMixin):
    """Reassigns and trims TRL's buffered micro-batches; runs the no-grad forwards over the rows that need them."""

    _nograd_plan = None  # teacher flags, no-grad calls and tokens so far, while `_generate_and_score_completions` runs

    def _padding_free_enabled(self) -> bool:
        return bool(getattr(self.args, "padding_free_batches", False)) and not self._is_vlm

    def _prompt_cut_exact(self) -> bool:
        """Whether cutting prompt columns keeps every row's log-probs: not for a family whose results move with a
        row's left padding (absolute positions from the column index, recurrent layers reading the padding:
        `luffy_trl.packing.PADDING_DEPENDENT`); those keep TRL's prompt width and only lose completion columns."""
        return model_type_of(self.model) not in PADDING_DEPENDENT

    # ------------------------------------------------------------------------------------------------------------
    # Training micro-batches
    # ------------------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        generate_every = spg * self.num_iterations
        step = self._step
        regenerates = step % generate_every == 0 or self._buffered_inputs is None
        inputs = super()._prepare_inputs(generation_batch)
        if not regenerates:
            return inputs
        chunks = self._buffered_inputs
        packing = self._packing_enabled()
        baseline = sum(self._chunk_tokens(chunk) for chunk in chunks)
        real = sum(self._chunk_real_tokens(chunk) for chunk in chunks)
        if self._padding_free_enabled():
            windows = [[j] for j in range(spg)]
            if self._rows_exchangeable():
                windows = exchangeable_chunks(step, spg, self.args.gradient_accumulation_steps, self.num_iterations)
            # token-balanced micro-batches for one packed sequence; with "bins" (sdpa/eager) runs that bin well
            bins = packing and self._bins_mode() and not self._varlen_attention()
            chunks = self._replan_chunks(chunks, windows, packing and not bins, self._hidden_size() if bins else None)
            self._buffered_inputs = chunks
        computed = sum(self._chunk_packed_tokens(c) if packing else self._chunk_tokens(c) for c in chunks)
        self._log_batching_metrics(baseline, computed, real)
        return self._buffered_inputs[step % spg]

    def _rows_exchangeable(self) -> bool:
        """Whether rows may move between micro-batches: not when the loss takes a statistic per micro-batch that the
        planner cannot keep (then each chunk keeps TRL's rows and is only trimmed: exactly TRL's loss)."""
        if self.top_entropy_quantile < 1.0:  # the entropy quantile is taken per micro-batch
            return False
        # bnpo with max_token_prob divides by the micro-batch's kept tokens, known only after its forward
        return not (self.loss_type == "bnpo" and self.args.max_token_prob is not None)

    @staticmethod
    def _loss_mask(chunk) -> torch.Tensor:
        mask = chunk["completion_mask"]
        return mask if chunk.get("tool_mask") is None else mask * chunk["tool_mask"]

    @staticmethod
    def _chunk_tokens(chunk) -> int:
        return chunk["prompt_ids"].numel() + chunk["completion_ids"].numel()

    @staticmethod
    def _row_tokens(chunk, mask) -> int:
        """Prompt + completion tokens up to the last masked-in column, summed over the rows with any."""
        extents = _completion_extents(mask)
        active = extents > 0
        return int((_prompt_lengths(chunk["prompt_mask"])[active] + extents[active]).sum())

    def _chunk_packed_tokens(self, chunk) -> int:
        """Tokens of the chunk's packed loss forward: its rows up to their last attended completion token (in one
        sequence), or with `pack_sequences="bins"` the tokens of the layout its forward takes (`_forward_layout`)."""
        if not self._bins_mode():
            return self._row_tokens(chunk, chunk["completion_mask"])
        extents = _completion_extents(chunk["completion_mask"])
        active = extents > 0
        if not active.any():
            return self._chunk_tokens(chunk)
        prompts = _prompt_lengths(chunk["prompt_mask"])[active].tolist()
        completions = extents[active].tolist()
        layout = self._forward_layout(prompts, completions)
        return self._chunk_tokens(chunk) if layout == "cut" else layout_tokens(prompts, completions, layout)[0]

    def _chunk_real_tokens(self, chunk) -> int:
        """Real tokens: the rows with loss tokens, up to their last loss token."""
        return self._row_tokens(chunk, self._loss_mask(chunk))

    def _replan_chunks(self, chunks: list[dict], windows: list[list[int]], packed: bool = False,
                       bins_hidden_size: int | None = None) -> list[dict]:
        """New chunks: rows reassigned within each window, rows without loss tokens dropped, columns trimmed."""
        out = [None] * len(chunks)
        for window in windows:
            merged = _concat_rows([chunks[j] for j in window])
            nominal = chunks[window[0]]["completion_ids"].size(0)
            mask = self._loss_mask(merged)
            prompt_len = _prompt_lengths(merged["prompt_mask"]).tolist()
            if not packed and not self._prompt_cut_exact():  # keep TRL's prompt width (and positions)
                prompt_len = [merged["prompt_mask"].size(1)] * len(prompt_len)
            completion_len = _completion_extents(mask).tolist()
            active = [c > 0 for c in completion_len]
            plan = plan_micro_batches(prompt_len, completion_len, len(window), active=active, packed=packed,
                                      bins_hidden_size=bins_hidden_size)
            is_off = merged.get(IS_OFF_POLICY)
            is_off = torch.zeros(mask.size(0), dtype=torch.bool, device=mask.device) if is_off is None else is_off
            row_tokens = mask.sum(1).float()
            k = len(window)
            info = {
                "nominal_rows": nominal,
                # mean loss tokens per micro-batch of the window: the per-micro-batch token-mean normaliser
                "tokens": row_tokens.sum().item() / k,
                "on_policy_tokens": row_tokens[~is_off].sum().item() / k,
                "off_policy_tokens": row_tokens[is_off].sum().item() / k,
            }
            for j, rows in zip(window, plan):
                p = max(1, max(prompt_len[i] for i in rows))
                c = max(1, max(completion_len[i] for i in rows))
                out[j] = _take_rows(merged, torch.tensor(rows, device=mask.device), p, c)
                out[j][BATCHING_INFO] = info
        return out

    def _log_batching_metrics(self, baseline: int, computed: int, real: int) -> None:
        counts = torch.tensor([float(baseline), float(computed), float(real), float(self._packing_fallbacks)],
                              device=self.accelerator.device)
        baseline, computed, real, fallbacks = self.accelerator.reduce(counts, reduction="sum").tolist()
        metrics = self._metrics["train"]
        metrics["batching/computed_tokens"].append(computed)
        metrics["batching/real_tokens"].append(real)
        metrics["batching/padding_ratio"].append(computed / max(real, 1.0))
        metrics["batching/fixed_batch_tokens"].append(baseline)
        if getattr(self.args, "pack_sequences", "never") != "never":
            metrics["batching/packing_fallbacks"].append(fallbacks)
            if self._packing_requested():
                metrics["batching/packing_model_fallback"].append(float(not self._packing_verified()))

    # ------------------------------------------------------------------------------------------------------------
    # No-grad forwards (old and reference log-probs)
    # ------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        is_off = [bool(row.get(IS_OFF_POLICY, False)) for row in inputs]
        self._nograd_plan = {"is_off": is_off, "calls": 0, "tokens": 0, "enabled": self._padding_free_enabled(),
                             "packing": self._packing_enabled()}
        try:
            output = super()._generate_and_score_completions(inputs)
            tokens = torch.tensor(float(self._nograd_plan["tokens"]), device=self.accelerator.device)
        finally:
            self._nograd_plan = None
        tokens = self.accelerator.reduce(tokens, reduction="sum").item()
        self._metrics["train"]["batching/logprob_computed_tokens"].append(tokens)
        return output

    def _old_logps_needed(self) -> bool:
        """TRL 1.16's condition for the old-log-prob forward (`_generate_and_score_completions`)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        plan = self._nograd_plan
        extra = any(v is not None for v in kwargs.values())
        if plan is None and torch.is_grad_enabled() and model.training and not extra and self._packing_enabled():
            packed = self._packed_loss_forward(model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                                               compute_aux_loss)
            if packed is not None:
                return packed
        if plan is not None and not torch.is_grad_enabled() and not plan["enabled"]:  # switch off: count only
            plan["tokens"] += input_ids.numel()
        if (plan is None or not plan["enabled"] or torch.is_grad_enabled() or compute_entropy or compute_aux_loss
                or extra):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **kwargs)
        # TRL computes the old log-probs first (when needed), then the reference log-probs (beta != 0).
        is_old = plan["calls"] == 0 and self._old_logps_needed()
        plan["calls"] += 1
        completion_mask = attention_mask[:, -logits_to_keep:]
        prompt_len = _prompt_lengths(attention_mask[:, :-logits_to_keep]).tolist()
        completion_len = _completion_extents(completion_mask).tolist()
        rows = [i for i, c in enumerate(completion_len) if c > 0 and not (is_old and plan["is_off"][i])]
        batch_size = batch_size or input_ids.size(0)
        budget = batch_size * input_ids.size(1)
        # Packable or not is this process's own data; it only changes how its forwards look, not their count below.
        packing = bool(plan["packing"] and rows)
        if packing:
            reason = self._unpackable(attention_mask, logits_to_keep, rows)
            self._count_packing_fallback(reason)
            packing = reason is None
        if not packing and not self._prompt_cut_exact():  # keep TRL's prompt width (and positions)
            prompt_len = [input_ids.size(1) - logits_to_keep] * len(prompt_len)
        bins_mode = packing and self._bins_mode()
        if packing and not bins_mode:
            batches = pack_rows([p + c for p, c in zip(prompt_len, completion_len)], rows, budget)
        else:  # with "bins", each cut batch then takes the layout the cost model prefers
            batches = pack_forwards(prompt_len, completion_len, rows, budget)
        counts = self.accelerator.gather(torch.tensor([len(batches)], device=input_ids.device))
        num_forwards = int(counts.max())
        out = None
        computed = 0
        width = input_ids.size(1)
        for batch in batches:
            layout = "one" if packing else "cut"
            if bins_mode:
                layout = self._forward_layout([prompt_len[i] for i in batch], [completion_len[i] for i in batch])
            if layout != "cut":
                capacity = max(prompt_len[i] + completion_len[i] for i in batch) if layout == "bins" else None
                (index, cols), logps, _, _, tokens = self._packed_forward(model, input_ids, attention_mask,
                                                                          logits_to_keep, batch, capacity=capacity)
                if out is None:
                    out = torch.zeros(input_ids.size(0), logits_to_keep, dtype=logps.dtype, device=logps.device)
                out[index, cols] = logps
                computed += tokens
                continue
            p = max(1, max(prompt_len[i] for i in batch))
            if not self._prompt_cut_exact():  # keep TRL's prompt width (and positions)
                p = width - logits_to_keep
            c = max(1, max(completion_len[i] for i in batch))
            index = torch.tensor(batch, device=input_ids.device)
            ids = input_ids[index][:, width - logits_to_keep - p: width - logits_to_keep + c]
            mask = attention_mask[index][:, width - logits_to_keep - p: width - logits_to_keep + c]
            logps, _, _ = super()._get_per_token_logps_and_entropies(model, ids, mask, c, batch_size=len(batch))
            if out is None:
                out = torch.zeros(input_ids.size(0), logits_to_keep, dtype=logps.dtype, device=logps.device)
            out[index, :c] = logps
            computed += ids.numel()
        for _ in range(num_forwards - len(batches)):  # keep the forward count equal on every process (ZeRO-3)
            super()._get_per_token_logps_and_entropies(model, input_ids[:1, -2:], torch.ones_like(input_ids[:1, -2:]),
                                                       1, batch_size=1)
            computed += 2
        if out is None:
            out = torch.zeros(input_ids.size(0), logits_to_keep, dtype=torch.float32, device=input_ids.device)
        plan["tokens"] += computed
        return out, None, None


def _concat_rows(chunks: list[dict]) -> dict:
    """Concatenate the per-row entries of several chunks (same keys; completions right-padded, prompts left)."""
    if len(chunks) == 1:
        return dict(chunks[0])
    rows = chunks[0]["completion_ids"].size(0)
    merged = {}
    for key, value in chunks[0].items():
        if key == BATCHING_INFO:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == rows:
            merged[key] = torch.cat([chunk[key] for chunk in chunks], dim=0)
        elif isinstance(value, list) and len(value) == rows:
            merged[key] = [item for chunk in chunks for item in chunk[key]]
        else:  # 0-dim tensors (num_items_in_batch), None and other shared entries are the same in every chunk
            merged[key] = value
    return merged


def _take_rows(merged: dict, index: torch.Tensor, prompt_width: int, completion_width: int) -> dict:
    """The rows `index` of `merged`, prompts cut to their last `prompt_width` columns (left padding) and every
    completion-aligned tensor (second dimension = the completion width) to its first `completion_width` columns."""
    total = merged["completion_ids"].size(0)
    full = merged["completion_ids"].size(1)
    chunk = {}
    rows = index.tolist()
    for key, value in merged.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == total:
            value = value[index]
            if key in PROMPT_KEYS:
                value = value[:, value.size(1) - min(prompt_width, value.size(1)):]
            elif value.dim() >= 2 and value.size(1) == full:
                value = value[:, :completion_width]
        elif isinstance(value, list) and len(value) == total:
            value = [value[i] for i in rows]
        chunk[key] = value
    return chunk
