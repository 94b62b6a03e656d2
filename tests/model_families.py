"""Tiny, randomly initialised causal LMs of every family in the installed transformers, and the packing measurements
of `tests/test_packing_families.py` (no download: each model is built in-process from its config class).

`measure(model_type, implementation)` builds one family in float64 and returns, against each row run alone:
`packed` (max |Δ log p| of the rows laid end to end with position ids restarting per row, the trainer's
`pack_sequences` forward), `bins` (the same rows as a batch of two packed sequences, `pack_sequences="bins"`),
`padded` (the rows left- and right-padded at two different paddings, no position ids: TRL's layout and the cut
layout of `padding_free_batches`; NaN where transformers' eager float64 mask fills a left-padded row with NaN), and
`gradient` (the relative difference between the gradients of a weighted log-likelihood computed packed and computed
over the rows run alone, which is what a padded batch computes when its padding is exact).
"""

from __future__ import annotations

import warnings

import torch

# Small sizes for every config field that sets one; each family takes the ones its config knows.
SHRINK = dict(
    vocab_size=128, hidden_size=32, n_embd=32, d_model=32, intermediate_size=64, n_inner=64, ffn_dim=64,
    num_hidden_layers=2, n_layer=2, num_layers=2, num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=256, n_positions=256, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, mamba_n_heads=8, mamba_d_head=8,
    mamba_d_state=8, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=4, sliding_window=8, first_k_dense_replace=1,
    n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# Families whose defaults need more than SHRINK to be small and to keep one layer of each kind.
OVERRIDES = {
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "falcon_h1": {"mamba_d_ssm": 64},
    "mamba2": {"num_heads": 8, "head_dim": 8, "expand": 2, "n_groups": 1, "state_size": 8, "chunk_size": 4},
}
MAX_PARAMETERS = 3_000_000  # a family whose config ignores SHRINK is listed as not buildable tiny
LENGTHS = (7, 11, 5)  # real tokens of the three rows (prompt + completion)
PROMPTS = (3, 4, 2)  # prompt tokens of each row (the gradient scores the completion tokens)


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **sizes):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    base = cls()
    names = set(getattr(cls.__init__, "__code__", None) and cls.__init__.__code__.co_varnames or ())
    kwargs = {k: v for k, v in {**SHRINK, **sizes}.items() if hasattr(base, k) or k in names}
    kwargs.update(OVERRIDES.get(model_type, {}))
    config = cls(**kwargs)
    types = getattr(base, "layer_types", None)  # the full-size model's kinds of layer (a short one may lose some)
    if model_type not in OVERRIDES and isinstance(types, (list, tuple)) and types:
        distinct = list(dict.fromkeys(types))  # one layer of each kind, at least two layers
        types = (distinct * 2)[: max(2, len(distinct))]
        try:
            config.layer_types, config.num_hidden_layers = types, len(types)
        except (AttributeError, TypeError, ValueError):
            pass
    return config


def build(model_type: str, implementation: str, dtype=torch.float64, **sizes):
    """The tiny model in eval mode (no dropout); raises when the family cannot be built tiny with this
    implementation. `sizes` override SHRINK (e.g. a tokenizer's vocab_size and special token ids)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **sizes)
    options = dict(attn_implementation=implementation, experts_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config, **options).parameters())
        if size > MAX_PARAMETERS:
            raise RuntimeError(f"{size} parameters with the tiny sizes (its config ignores them)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **options)
    return model.eval()


def _rows(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in LENGTHS]


def _logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t + 1] | ids[:t + 1]) for t = 0..len - 2, in float64."""
    return torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)


def packed_logps(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    ids = torch.cat(rows)[None]
    position = torch.cat([torch.arange(len(r)) for r in rows])[None]
    logits = model(input_ids=ids, position_ids=position, use_cache=False).logits[0]
    out, start = [], 0
    for r in rows:
        out.append(_logps(logits[start: start + len(r)], r))
        start += len(r)
    return out


def bins_logps(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rows 0 and 2 packed in one sequence, row 1 in a second, both right-padded to the longer one by a segment of its
    own (positions from 0 again): the layout of `pack_sequences="bins"` (a batch of packed sequences)."""
    bins = [[0, 2], [1]]
    width = max(sum(len(rows[i]) for i in b) for b in bins)
    ids = torch.zeros(len(bins), width, dtype=torch.long)
    position = torch.zeros_like(ids)
    where = {}
    for j, b in enumerate(bins):
        start = 0
        for i in b:
            ids[j, start: start + len(rows[i])] = rows[i]
            position[j, start: start + len(rows[i])] = torch.arange(len(rows[i]))
            where[i] = (j, start)
            start += len(rows[i])
        position[j, start:] = torch.arange(width - start)
    logits = model(input_ids=ids, position_ids=position, use_cache=False).logits
    return [_logps(logits[where[i][0], where[i][1]: where[i][1] + len(r)], r) for i, r in enumerate(rows)]


def padded_logps(model, rows: list[torch.Tensor], left: list[int]) -> list[torch.Tensor]:
    """Each row after `left[i]` padding columns, right-padded to a common width (attention mask, no position ids)."""
    width = max(a + len(r) for a, r in zip(left, rows)) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (a, r) in enumerate(zip(left, rows)):
        ids[i, a: a + len(r)] = r
        mask[i, a: a + len(r)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return [_logps(logits[i, a: a + len(r)], r) for i, (a, r) in enumerate(zip(left, rows))]


def _loss(logps: list[torch.Tensor]) -> torch.Tensor:
    """A weighted log-likelihood of the completion tokens (weights differ per token, as advantages do)."""
    total = 0
    for i, (lp, p) in enumerate(zip(logps, PROMPTS)):
        weights = torch.linspace(-1.0, 2.0, lp.numel(), dtype=lp.dtype) * (i + 1)
        total = total + (lp[p - 1:] * weights[p - 1:]).sum()
    return total


def _gradient(model, logps_fn) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    _loss(logps_fn()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def measure(model_type: str, implementation: str) -> dict:
    model = build(model_type, implementation)
    vocab = min(model.get_input_embeddings().num_embeddings, SHRINK["vocab_size"])
    rows = _rows(vocab)
    with torch.no_grad():
        alone = [_logps(model(input_ids=r[None], use_cache=False).logits[0], r) for r in rows]
        packed = packed_logps(model, rows)
        binned = bins_logps(model, rows)
        padded = padded_logps(model, rows, [1, 3, 0]) + padded_logps(model, rows, [4, 0, 2])
    diff = max((a - b).abs().max().item() for a, b in zip(packed, alone))
    bins_diff = max((a - b).abs().max().item() for a, b in zip(binned, alone))
    pad_diff = max((a - b).abs().max().item() for a, b in zip(padded, alone + alone))
    g_packed = _gradient(model, lambda: packed_logps(model, rows))
    g_rows = _gradient(model, lambda: [_logps(model(input_ids=r[None], use_cache=False).logits[0], r) for r in rows])
    gradient = ((g_packed - g_rows).abs().max() / g_rows.abs().max().clamp_min(1e-300)).item()
    return {"packed": diff, "bins": bins_diff, "padded": pad_diff, "gradient": gradient}
