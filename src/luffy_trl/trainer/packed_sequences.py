"""Packed sequences (`pack_sequences`): one forward over a micro-batch's rows laid end to end, only for models that
pack exactly (docs/batching.md, "Packed sequences" and "Which models pack").

`PackedSequencesMixin` is the base of `PaddingFreeBatchingMixin` (`luffy_trl.trainer.micro_batches`), which decides
where packed forwards run. Here: whether packing is on (`_packing_enabled`: `pack_sequences`, the attention
implementation, and the model: `luffy_trl.packing` lists the families measured to pack exactly or not, and
`_packing_verified` checks every model once at its first packed forward), the refusal of `pack_sequences="always"` on a
family that cannot pack exactly, and the packed forward itself.

Collectives (see `luffy_trl.trainer`): once per run, the check's four forwards and the gather of its verdict, on every
process at the first training generation batch (config and mode only).
"""

from __future__ import annotations

import logging

import torch

from luffy_trl.batching import bin_rows, choose_layout
from luffy_trl.packing import NOT_PACKABLE, check_rows, model_type_of, packed_rows_agree, packing_support

# Attention implementations whose packed-sequence path costs the sum of the rows' squared lengths (varlen kernels or
# block-sparse masks); with these `pack_sequences="auto"` packs into one sequence, without them it picks the cheapest of
# cut rows, bins and one sequence per forward (as "bins").
VARLEN_ATTENTION = ("flash", "flex_attention")

logger = logging.getLogger("luffy_trl.trainer.micro_batches")  # one logger for the batching warnings


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


class PackedSequencesMixin:
    """Whether packing is on for this model, and the packed forward (see the module docstring)."""

    _packing_fallbacks = 0  # forwards that could not be packed (logged as `batching/packing_fallbacks`)
    _packing_verdict = None  # None until decided; then whether this model packs exactly (`_packing_verified`)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_inexact_packing()

    def _refuse_inexact_packing(self) -> None:
        """`pack_sequences="always"` or `"bins"` on a family measured not to pack exactly: refused (it would train
        wrong)."""
        mode = getattr(self.args, "pack_sequences", "never")
        if mode not in ("always", "bins") or not self._padding_free_enabled():
            return
        model_type = model_type_of(self.model)
        status, reason = packing_support(model_type)
        if status == NOT_PACKABLE:
            raise ValueError(
                f"pack_sequences={mode!r} cannot train a {model_type!r} model exactly: {reason}; packed rows would "
                "read each other and the gradients would be wrong. Use pack_sequences='auto' (packs only models "
                "that pack exactly) or 'never'.")

    def _varlen_attention(self) -> bool:
        implementation = str(getattr(self.model.config, "_attn_implementation", None) or "")
        return any(name in implementation for name in VARLEN_ATTENTION)

    def _packing_requested(self) -> bool:
        """`pack_sequences`: 'always', 'bins', 'never', or 'auto' (varlen attention: one packed sequence; sdpa/eager:
        as 'bins', the cheapest layout per forward). Packing still happens only for a model that packs exactly."""
        mode = getattr(self.args, "pack_sequences", "never")
        return mode != "never" and self._padding_free_enabled()

    def _bins_mode(self) -> bool:
        """Per forward the cheapest of cut / bins / one sequence: `pack_sequences='bins'`, and 'auto' without a varlen
        kernel (measured on CPU: never slower than cutting, 0.68-1.01× its training time, benchmarks/README.md)."""
        mode = getattr(self.args, "pack_sequences", "never")
        return mode == "bins" or (mode == "auto" and not self._varlen_attention())

    def _forward_layout(self, prompt_lengths: list[int], completion_lengths: list[int]) -> str:
        """'one' (one packed sequence), or with `pack_sequences="bins"` the cheapest of 'cut' (TRL's padded forward
        over the rows cut to the longest one), 'bins' (sdpa/eager) and 'one' (`luffy_trl.batching.choose_layout`)."""
        if not self._bins_mode():
            return "one"
        varlen = self._varlen_attention()
        layouts = ("cut", "one") if varlen else ("cut", "bins", "one")  # varlen kernels take one sequence only
        return choose_layout(prompt_lengths, completion_lengths, self._hidden_size(), varlen, layouts)

    def _hidden_size(self) -> int:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text, "hidden_size", 0) or 1024)

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
            mode = getattr(self.args, "pack_sequences", "never")
            if mode in ("always", "bins"):
                raise ValueError(f"pack_sequences={mode!r} cannot train this {model_type!r} model exactly: {reason}. "
                                 "Use pack_sequences='auto' (packs only models that pack exactly) or 'never'.")
            logger.warning("pack_sequences=%r: this %r model is not packed (%s); its micro-batches are cut to their "
                           "longest row instead (exact, only slower). Logged as batching/packing_model_fallback = 1.",
                           self.args.pack_sequences, model_type, reason)
        self._packing_verdict = verdict
        return verdict

    def _packing_check(self) -> bool:
        """Four tiny no-grad forwards on fixed tokens (the same on every process, in eval mode so that dropout
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
                # the bins layout (`pack_sequences="bins"`): a batch of packed sequences, the shorter one padded
                (index, _), logps, _, _, _ = self._packed_forward(model, ids, mask, keep, [1, 0], capacity=len(first))
                binned = logps[index == 1]
        finally:
            model.train(was_training)
        dtype = next(model.parameters()).dtype
        if getattr(self.args, "bf16", False) or getattr(self.args, "fp16", False):
            dtype = torch.bfloat16  # autocast computes in half precision
        tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 1e-1)  # rounding of the dtype
        agree = packed_rows_agree(values[0], values[1], alone[0], tolerance)
        agree = agree and packed_rows_agree(binned, binned, alone[0], tolerance)
        verdicts = self.accelerator.gather(torch.tensor([float(agree)], device=device))
        return bool(verdicts.min().item() > 0)

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
                        compute_entropy: bool = False, compute_aux_loss: bool = False, capacity: int | None = None):
        """One forward over `rows` packed into a single sequence (TRL's fused log-prob head, `fused_lm_head=True`), or
        with `capacity` into bins of at most that many tokens (`luffy_trl.batching.bin_rows`), one sequence each.

        The real tokens of each row (its prompt without left padding, its completion up to the last attended token)
        are concatenated; position ids restart at 0 for every row, which is how transformers recognises a packed
        batch (block-diagonal causal attention; varlen kernels with flash attention, which take one sequence only:
        bins are for sdpa/eager). Bins are right-padded to the fullest one; the padding is a segment of its own
        (positions from 0 again, no label) after every real row. Returns ((rows, columns) of the completion tokens in
        the (B, logits_to_keep) layout, their log-probs, their entropies or None, the MoE aux loss or None, the number
        of tokens computed). The caller checks `_unpackable` first.
        """
        device = input_ids.device
        start = input_ids.size(1) - logits_to_keep
        index = torch.tensor(rows, device=device)
        prompt_len = _prompt_lengths(attention_mask[index, :start])
        completion_len = _completion_extents(attention_mask[index, start:])
        lengths = prompt_len + completion_len
        if capacity is None:
            bins = [list(range(len(rows)))]
        else:
            bins = bin_rows(lengths.tolist(), capacity)
        order = torch.tensor([i for b in bins for i in b], device=device)  # rows in bin order
        bin_of = torch.tensor([j for j, b in enumerate(bins) for _ in b], device=device)
        fill = torch.zeros(len(bins), dtype=torch.long, device=device).index_add_(0, bin_of, lengths[order])
        width = int(fill.max())
        # each row's first column in its bin: the lengths of the rows before it in the same bin
        before = torch.cumsum(lengths[order], 0) - lengths[order]
        bin_start = torch.cumsum(fill, 0) - fill
        row_start = torch.empty_like(lengths)
        row_start[order] = before - bin_start[bin_of] + bin_of * width  # flat offset in the (bins, width) layout
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(row_of.numel(), device=device) - offsets[row_of]
        flat = row_start[row_of] + position
        column = (start - prompt_len)[row_of] + position  # the token's column in the padded layout
        token_ids = input_ids[index[row_of], column]
        in_completion = position >= prompt_len[row_of]
        ids = token_ids.new_full((len(bins) * width,), int(token_ids[0]))
        ids[flat] = token_ids
        # padding after a bin's rows: positions 0, 1, ... again, a segment of its own
        tail = torch.arange(width, device=device)[None, :] - fill[:, None]
        positions = tail.clamp_min(0).flatten().clone()
        positions[flat] = position
        labels = torch.full_like(ids, -100)
        labels[flat] = token_ids.masked_fill(~in_completion, -100)
        # no cache: transformers detects a packed batch from the position ids only without one (TRL's fused head
        # also turns it off; said here so that the packing never depends on that)
        model_inputs = {"input_ids": ids.view(len(bins), width), "position_ids": positions.view(len(bins), width),
                        "labels": labels.view(len(bins), width), "use_cache": False}
        if compute_aux_loss:
            model_inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            outputs = model(**model_inputs, fused_lm_head=True)
        token = torch.nonzero(in_completion).squeeze(1)
        # The fused head scores labels shifted by one: position t holds the log-prob of token t + 1.
        where = flat[token]
        logps = outputs.log_probs[where // width, where % width - 1]
        entropies = outputs.entropy[where // width, where % width - 1] if compute_entropy else None
        aux_loss = outputs.aux_loss if compute_aux_loss else None
        return (index[row_of[token]], column[token] - start), logps, entropies, aux_loss, len(bins) * width

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
        start = input_ids.size(1) - logits_to_keep
        prompt_len = _prompt_lengths(attention_mask[rows, :start]).tolist()
        layout = self._forward_layout(prompt_len, [completion_len[i] for i in rows])
        if layout == "cut":  # the cost model prefers TRL's padded forward over the cut rows (not a fallback)
            return None
        capacity = max(p + completion_len[i] for p, i in zip(prompt_len, rows)) if layout == "bins" else None
        (index, cols), logps, entropies, aux_loss, _ = self._packed_forward(
            model, input_ids, attention_mask, logits_to_keep, rows, compute_entropy, compute_aux_loss, capacity)
        shape = (input_ids.size(0), logits_to_keep)
        per_token_logps = logps.new_zeros(shape).index_put((index, cols), logps)
        if entropies is not None:
            entropies = entropies.new_zeros(shape).index_put((index, cols), entropies)
        return per_token_logps, entropies, aux_loss
