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
  refused at construction), and every model is checked once at its first packed forward (`_packing_verified`).

Collectives (see `luffy_trl.trainer`): one gather of the forward count per no-grad call, one gather of the token
counters per training generation batch, and once per run the packing check's forwards and the gather of its verdict;
all branches depend on config and mode only.
"""

from __future__ import annotations

import logging

import torch

from luffy_trl.batching import exchangeable_chunks, pack_forwards, pack_rows, plan_micro_batches
from luffy_trl.packing import (
    NOT_PACKABLE,
    PADDING_DEPENDENT,
    check_rows,
    model_type_of,
    packed_rows_agree,
    packing_support,
)
from luffy_trl.trainer.generation import IS_OFF_POLICY

# Key of the per-micro-batch normaliser information in the inputs dict (read by `_compute_loss`).
BATCHING_INFO = "_batching"
PROMPT_KEYS = ("prompt_ids", "prompt_mask")
# Attention implementations whose packed-sequence path costs the sum of the rows' squared lengths (varlen kernels or
# block-sparse masks); `pack_sequences="auto"` packs only with these.
VARLEN_ATTENTION = ("flash", "flex_attention")

logger = logging.getLogger(__name__)


def _prompt_lengths(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded prompts: columns from the first real token to the end."""
    width = prompt_mask.size(1)
    first = torch.where(prompt_mask.any(1), prompt_mask.int().argmax(1), torch.full_like(prompt_mask[:, 0], width,
                                                                                          dtype=torch.long))
    return width - first


def _completion_extents(mask: torch.Tensor) -> torch.Tensor:
    """Right-padded completions: columns up to and including the last masked-in token (0 for an all-zero row)."""
    width = mask.size(1)
    cols = torch.arange(1, width + 1, device=mask.device)
    return (mask.bool() * cols).amax(1) if width else torch.zeros(mask.size(0), dtype=torch.long, device=mask.device)


class PaddingFreeBatchingMixin:
    """Reassigns and trims TRL's buffered micro-batches; runs the no-grad forwards over the rows that need them."""

    _nograd_plan = None  # teacher flags, no-grad calls and tokens so far, while `_generate_and_score_completions` runs
    _packing_fallbacks = 0  # forwards that could not be packed (logged as `batching/packing_fallbacks`)
    _packing_verdict = None  # None until decided; then whether this model packs exactly (`_packing_verified`)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_inexact_packing()

    def _refuse_inexact_packing(self) -> None:
        """`pack_sequences="always"` on a family measured not to pack exactly: refused (it would train wrong)."""
        if getattr(self.args, "pack_sequences", "never") != "always" or not self._padding_free_enabled():
            return
        model_type = model_type_of(self.model)
        status, reason = packing_support(model_type)
        if status == NOT_PACKABLE:
            raise ValueError(
                f"pack_sequences='always' cannot train a {model_type!r} model exactly: {reason}; packed rows would "
                "read each other and the gradients would be wrong. Use pack_sequences='auto' (packs only models "
                "that pack exactly) or 'never'.")

    def _padding_free_enabled(self) -> bool:
        return bool(getattr(self.args, "padding_free_batches", False)) and not self._is_vlm

    def _prompt_cut_exact(self) -> bool:
        """Whether cutting prompt columns keeps every row's log-probs: not for a family whose results move with a
        row's left padding (absolute positions from the column index, recurrent layers reading the padding:
        `luffy_trl.packing.PADDING_DEPENDENT`); those keep TRL's prompt width and only lose completion columns."""
        return model_type_of(self.model) not in PADDING_DEPENDENT

    def _packing_requested(self) -> bool:
        """`pack_sequences`: 'always', 'never', or 'auto' = only with a varlen attention implementation."""
        mode = getattr(self.args, "pack_sequences", "never")
        if mode == "never" or not self._padding_free_enabled():
            return False
        if mode == "always":
            return True
        implementation = str(getattr(self.model.config, "_attn_implementation", None) or "")
        return any(name in implementation for name in VARLEN_ATTENTION)

    def _packing_enabled(self) -> bool:
        """Packing requested by `pack_sequences` and exact for this model (`_packing_verified`)."""
        return self._packing_requested() and self._packing_verified()

    # ------------------------------------------------------------------------------------------------------------
    # Is packing exact for this model?
    # ------------------------------------------------------------------------------------------------------------
    def _packing_verified(self) -> bool:
        """Decided once per run: never for a family measured not to pack exactly (`luffy_trl.packing.NOT_EXACT`);
        otherwise (verified families too: the check also covers the attention implementation in use) a check at the
        first call, which every process reaches at the same point (the first training generation batch): the last
        of two packed rows must not change when the row before it changes, and must equal the row run alone. When it
        fails, 'auto' falls back to the padded layout (one warning; `batching/packing_model_fallback` = 1) and
        'always' is refused."""
        if self._packing_verdict is not None:
            return self._packing_verdict
        model_type = model_type_of(self.model)
        status, reason = packing_support(model_type)
        verdict = status != NOT_PACKABLE and self._packing_check()
        if not verdict:
            if status != NOT_PACKABLE:
                reason = (f"the check at the first packed forward found that packed rows of this {model_type!r} model "
                          "do not give each row's own log-probs")
            if getattr(self.args, "pack_sequences", "never") == "always":
                raise ValueError(f"pack_sequences='always' cannot train this {model_type!r} model exactly: {reason}. "
                                 "Use pack_sequences='auto' (packs only models that pack exactly) or 'never'.")
            logger.warning("pack_sequences=%r: this %r model is not packed (%s); its micro-batches are cut to their "
                           "longest row instead (exact, only slower). Logged as batching/packing_model_fallback = 1.",
                           self.args.pack_sequences, model_type, reason)
        self._packing_verdict = verdict
        return verdict

    def _packing_check(self) -> bool:
        """Three tiny no-grad forwards on fixed tokens (the same on every process, in eval mode so that dropout
        cannot differ), the verdict gathered so that every process decides alike."""
        model = self.model
        vocab = model.get_input_embeddings().num_embeddings
        (first, last), other = check_rows(vocab)
        device = self.accelerator.device
        prompt = 3
        width = max(len(first), len(last))
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate((first, last)):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        ids, mask = ids.to(device), mask.to(device)
        swapped = ids.clone()
        swapped[0, : len(first)] = other[0].to(device)
        keep = width - prompt
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                values = []
                for batch in (ids, swapped):
                    (index, _), logps, _, _, _ = self._packed_forward(model, batch, mask, keep, [0, 1])
                    values.append(logps[index == 1])
                alone, _, _ = super()._get_per_token_logps_and_entropies(
                    model, ids[1:, : len(last)], mask[1:, : len(last)], len(last) - prompt, batch_size=1)
        finally:
            model.train(was_training)
        dtype = next(model.parameters()).dtype
        if getattr(self.args, "bf16", False) or getattr(self.args, "fp16", False):
            dtype = torch.bfloat16  # autocast computes in half precision
        tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 1e-1)  # rounding of the dtype
        agree = packed_rows_agree(values[0], values[1], alone[0], tolerance)
        verdicts = self.accelerator.gather(torch.tensor([float(agree)], device=device))
        return bool(verdicts.min().item() > 0)

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
            chunks = self._replan_chunks(chunks, windows, packing)
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
        """Tokens of the chunk's packed loss forward: its rows up to their last attended completion token."""
        return self._row_tokens(chunk, chunk["completion_mask"])

    def _chunk_real_tokens(self, chunk) -> int:
        """Real tokens: the rows with loss tokens, up to their last loss token."""
        return self._row_tokens(chunk, self._loss_mask(chunk))

    def _replan_chunks(self, chunks: list[dict], windows: list[list[int]], packed: bool = False) -> list[dict]:
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
            plan = plan_micro_batches(prompt_len, completion_len, len(window), active=active, packed=packed)
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
        if packing:
            batches = pack_rows([p + c for p, c in zip(prompt_len, completion_len)], rows, budget)
        else:
            batches = pack_forwards(prompt_len, completion_len, rows, budget)
        counts = self.accelerator.gather(torch.tensor([len(batches)], device=input_ids.device))
        num_forwards = int(counts.max())
        out = None
        computed = 0
        width = input_ids.size(1)
        for batch in batches:
            if packing:
                (index, cols), logps, _, _, tokens = self._packed_forward(model, input_ids, attention_mask,
                                                                          logits_to_keep, batch)
                if out is None:
                    out = torch.zeros(input_ids.size(0), logits_to_keep, dtype=logps.dtype, device=logps.device)
                out[index, cols] = logps
                computed += tokens
                continue
            p = max(1, max(prompt_len[i] for i in batch))
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

    # ------------------------------------------------------------------------------------------------------------
    # Packed sequences (`pack_sequences`)
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _unpackable(attention_mask, logits_to_keep: int, rows: list[int]) -> str | None:
        """Why `rows` cannot be packed (None when they can): each row's mask must be one contiguous run of real
        tokens, the prompt's ending at the prompt/completion boundary and the completion's starting there, and every
        row needs a prompt token (the first completion token is predicted from it)."""
        index = torch.tensor(rows, device=attention_mask.device)
        prompt_mask = attention_mask[index, : attention_mask.size(1) - logits_to_keep]
        completion_mask = attention_mask[index, attention_mask.size(1) - logits_to_keep:]
        prompt_len = _prompt_lengths(prompt_mask)
        if (prompt_len < 1).any():
            return "a row has an empty prompt"
        if (prompt_mask.long().sum(1) != prompt_len).any():
            return "a prompt mask has holes (not left padding only)"
        if (completion_mask.long().sum(1) != _completion_extents(completion_mask)).any():
            return "a completion mask has holes (not right padding only)"
        return None

    def _count_packing_fallback(self, reason: str | None) -> None:
        if reason is None:
            return
        if self._packing_fallbacks == 0:
            logger.warning("pack_sequences: a forward runs padded instead of packed (%s); counted in "
                           "batching/packing_fallbacks. The result is the same, only slower.", reason)
        self._packing_fallbacks += 1

    def _packed_forward(self, model, input_ids, attention_mask, logits_to_keep: int, rows: list[int],
                        compute_entropy: bool = False, compute_aux_loss: bool = False):
        """One forward over `rows` packed into a single sequence (TRL's fused log-prob head, `fused_lm_head=True`).

        The real tokens of each row (its prompt without left padding, its completion up to the last attended token)
        are concatenated; position ids restart at 0 for every row, which is how transformers recognises a packed
        batch (block-diagonal causal attention; varlen kernels with flash attention). Returns ((rows, columns) of
        the completion tokens in the (B, logits_to_keep) layout, their log-probs, their entropies or None, the MoE
        aux loss or None, the number of tokens computed). The caller checks `_unpackable` first.
        """
        device = input_ids.device
        start = input_ids.size(1) - logits_to_keep
        index = torch.tensor(rows, device=device)
        prompt_len = _prompt_lengths(attention_mask[index, :start])
        completion_len = _completion_extents(attention_mask[index, start:])
        lengths = prompt_len + completion_len
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(row_of.numel(), device=device) - offsets[row_of]
        column = (start - prompt_len)[row_of] + position  # the token's column in the padded layout
        ids = input_ids[index[row_of], column]
        in_completion = position >= prompt_len[row_of]
        labels = ids.masked_fill(~in_completion, -100)
        model_inputs = {"input_ids": ids[None], "position_ids": position[None], "labels": labels[None]}
        if compute_aux_loss:
            model_inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            outputs = model(**model_inputs, fused_lm_head=True)
        token = torch.nonzero(in_completion).squeeze(1)
        # The fused head scores labels shifted by one: position t holds the log-prob of token t + 1.
        logps = outputs.log_probs[0, token - 1]
        entropies = outputs.entropy[0, token - 1] if compute_entropy else None
        aux_loss = outputs.aux_loss if compute_aux_loss else None
        return (index[row_of[token]], column[token] - start), logps, entropies, aux_loss, row_of.numel()

    def _packed_loss_forward(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                             compute_aux_loss):
        """The loss forward of one micro-batch, packed; None to run TRL's padded forward instead (counted)."""
        completion_len = _completion_extents(attention_mask[:, input_ids.size(1) - logits_to_keep:]).tolist()
        rows = [i for i, c in enumerate(completion_len) if c > 0]
        if not rows:  # nothing to score: TRL's forward keeps the graph connected (a differentiable zero)
            return None
        reason = self._unpackable(attention_mask, logits_to_keep, rows)
        if reason is not None:
            self._count_packing_fallback(reason)
            return None
        (index, cols), logps, entropies, aux_loss, _ = self._packed_forward(
            model, input_ids, attention_mask, logits_to_keep, rows, compute_entropy, compute_aux_loss)
        shape = (input_ids.size(0), logits_to_keep)
        per_token_logps = logps.new_zeros(shape).index_put((index, cols), logps)
        if entropies is not None:
            entropies = entropies.new_zeros(shape).index_put((index, cols), entropies)
        return per_token_logps, entropies, aux_loss


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
