"""Which model families pack exactly (`pack_sequences`), as plain data and functions (no trainer).

A packed forward lays the rows of a micro-batch end to end and separates them only by position ids restarting at 0
(`luffy_trl.trainer.micro_batches`). transformers honours that in its attention layers (block-diagonal mask, varlen
flash kernels), but not everywhere: linear-attention / gated-delta-rule layers (Qwen3-Next, Qwen3.5), Mamba layers
(Granite-4.0-H, Falcon-H1, Bamba, Jamba, Nemotron-H), short convolutions (LFM2) and recurrent layers run over the
whole packed sequence, so every row reads the rows before it; some models build their causal mask without the
position ids (OPT) and never see the packing at all.

`PACKS_EXACTLY` lists the `model_type`s measured to pack exactly (packed log-probs and gradients equal to each row
run alone within 1e-6 in float64, eager and sdpa) and `NOT_EXACT` those measured not to, with the reason and the
largest |Δ log p| seen; `tests/test_packing_families.py` rebuilds every causal-LM family of the installed
transformers from a tiny config and fails when a family leaves `PACKS_EXACTLY` or joins it without being listed.
The trainer packs a family on `PACKS_EXACTLY` (and an unknown one only after a check at its first packed forward,
`packed_rows_agree`), never one on `NOT_EXACT`. docs/batching.md has the table.
"""

from __future__ import annotations

import torch

LINEAR = "its linear-attention / gated-delta-rule layers run over the whole packed sequence"
LIGHTNING = "its lightning (linear) attention layers run over the whole packed sequence"
SSM = "its Mamba / state-space layers run over the whole packed sequence"
CONV = "its short-convolution layers run over the whole packed sequence"
RECURRENT = "its recurrent layers run over the whole packed sequence"
MASK = "its causal mask ignores the restarting position ids, so the packing is not detected"
MEASURED = "a packed row reads the rows before it (measured)"

PACKS_EXACTLY = frozenset({
    "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bert", "bert-generation", "bitnet", "cohere",
    "cohere2", "cohere2_moe", "ctrl", "cwm", "diffllama", "doge", "dots1", "electra", "ergo",
    "ernie", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo", "flint", "gemma", "gemma2",
    "gemma3_text", "glm", "glm4", "glm4_moe", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_neox_japanese",
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hrm_text",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hy_v4", "hyperclovax", "internlm3", "iquestcoder", "jais2",
    "jetmoe", "kolibri1", "laguna", "llama", "llama4_text", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax_m2",
    "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "modernbert-decoder", "moshi", "nanochat",
    "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "param2moe", "persimmon", "phi", "phi3", "phimoe", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2",
    "vaultgemma",
})
NOT_EXACT = {
    "afmoe": (MEASURED, 2.8e-01),
    "bamba": (SSM, 8.3e-02),
    "big_bird": (MEASURED, 7.4e-04),
    "biogpt": (MEASURED, 1.2e-02),
    "blenderbot-small": (MEASURED, 5.3e-03),
    "bloom": (MEASURED, 4.0e-03),
    "camembert": (MEASURED, 1.5e-01),
    "cpmant": (MEASURED, 1.7e+01),
    "data2vec-text": (MEASURED, 2.0e-01),
    "deepseek_v4": (MEASURED, 1.1e-01),
    "falcon_h1": (SSM, 7.4e-05),
    "falcon_mamba": (SSM, 2.3e-01),
    "gpt_oss": (MEASURED, 5.2e-02),
    "granitemoehybrid": (SSM, 9.2e-02),
    "inkling_text": (MEASURED, 2.0e-05),
    "jamba": (SSM, 1.6e-04),
    "lara_mini": (MEASURED, 4.3e-03),
    "lfm2": (CONV, 1.2e-04),
    "lfm3": (MEASURED, 4.4e-02),
    "mamba": (SSM, 3.1e-01),
    "mamba2": (SSM, 1.1e+00),
    "megatron-bert": (MEASURED, 2.5e-02),
    "minimax": (LIGHTNING, 1.0e-02),
    "mpt": (MEASURED, 8.7e-02),
    "nemotron_h": (SSM, 7.4e-02),
    "olmo_hybrid": (LINEAR, 1.1e-02),
    "openai-gpt": (MEASURED, 4.2e-03),
    "opt": (MASK, 5.8e-02),
    "qwen3_5_moe_text": (LINEAR, 3.6e-03),
    "qwen3_5_text": (LINEAR, 6.6e-03),
    "qwen3_next": (LINEAR, 5.1e-03),
    "qwen4_exp_text": (LINEAR, 1.1e-03),
    "recurrent_gemma": (RECURRENT, 6.5e-02),
    "rembert": (MEASURED, 7.1e-03),
    "roberta": (MEASURED, 2.0e-01),
    "roberta-prelayernorm": (MEASURED, 2.0e-01),
    "roformer": (MEASURED, 4.2e-04),
    "rwkv": (RECURRENT, 2.0e+00),
    "trocr": (MEASURED, 1.6e-01),
    "xlm": (MEASURED, 1.4e-03),
    "xlm-roberta": (MEASURED, 1.5e-01),
    "xlm-roberta-xl": (MEASURED, 1.4e-01),
}

# Families whose log-probs depend on a row's left padding when no position ids are passed (TRL's padded forward):
# cutting a micro-batch's prompt columns (`padding_free_batches`) would change them, so the trainer keeps TRL's prompt
# width for them (it still cuts completion columns, which is exact for every causal model). Measured: the largest
# |Δ log p| of a row between two left paddings (float64, sdpa where it runs, else eager).
ABSOLUTE = "absolute position embeddings indexed by the column, so a row's positions move with its left padding"
MEASURED_PADDING = "a row's log-probs change with its left padding (measured)"
PADDING_DEPENDENT = {
    "beam": (MEASURED_PADDING, 7.6e-06),
    "bert": (ABSOLUTE, 2.3e-01),
    "bert-generation": (ABSOLUTE, 2.0e-01),
    "big_bird": (ABSOLUTE, 2.4e-01),
    "biogpt": (ABSOLUTE, 9.1e-02),
    "blenderbot-small": (ABSOLUTE, 1.1e-02),
    "cpmant": (MEASURED_PADDING, 2.0e01),
    "ctrl": (ABSOLUTE, 2.0e-01),
    "deepseek_v4": (MEASURED_PADDING, 1.3e-01),
    "electra": (ABSOLUTE, 6.7e-01),
    "ernie": (ABSOLUTE, 2.3e-01),
    "gpt-sw3": (ABSOLUTE, 2.3e-01),
    "gpt2": (ABSOLUTE, 2.3e-01),
    "gpt_bigcode": (ABSOLUTE, 3.5e-01),
    "megatron-bert": (ABSOLUTE, 2.2e-01),
    "openai-gpt": (ABSOLUTE, 3.3e-01),
    "recurrent_gemma": ("its recurrent layers read the left padding", 1.8e-02),
    "rembert": (ABSOLUTE, 1.9e00),
    "rwkv": ("its recurrent layers read the left padding", 1.2e00),
    "trocr": (ABSOLUTE, 1.8e-01),
    "xlm": (ABSOLUTE, 2.7e-01),
}

EXACT, NOT_PACKABLE, UNKNOWN = "exact", "not exact", "unknown"


def model_type_of(model) -> str | None:
    """The `model_type` that decides packing: the text model's for a composite config (`text_config`), reached
    through DDP / DeepSpeed (`.module`) and PEFT (`.base_model.model`) wrappers."""
    seen = 0
    while hasattr(model, "module") and seen < 8:  # DistributedDataParallel, DeepSpeedEngine
        model, seen = model.module, seen + 1
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):  # PEFT
        config = getattr(model.get_base_model(), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) or getattr(config, "model_type", None)


def packing_support(model_type: str | None) -> tuple[str, str]:
    """(EXACT | NOT_PACKABLE | UNKNOWN, reason) for a `model_type`."""
    if model_type in PACKS_EXACTLY:
        return EXACT, f"{model_type} is verified to pack exactly"
    if model_type in NOT_EXACT:
        why, delta = NOT_EXACT[model_type]
        return NOT_PACKABLE, f"{why} (max |Δ log p| {delta:.1e} packed against each row alone, float64)"
    return UNKNOWN, f"{model_type or 'this model'} has not been verified to pack exactly"


def check_rows(vocab_size: int, lengths=(9, 6), prompt=3, seed=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two fixed rows and the same rows with the first one's tokens changed (for `packed_rows_agree`)."""
    generator = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    rows = [torch.randint(low, vocab_size, (n,), generator=generator) for n in lengths]
    other = [torch.randint(low, vocab_size, (lengths[0],), generator=generator), rows[1]]
    return rows, other


def packed_rows_agree(packed: torch.Tensor, other: torch.Tensor, alone: torch.Tensor, tolerance: float) -> bool:
    """Whether the last row of a packed forward is independent of the rows before it.

    `packed` and `other`: the last row's per-token log-probs in two packed forwards whose earlier rows differ only in
    their tokens; `alone`: the same row run on its own. An exact packing gives the same values whatever comes before
    (up to rounding, not even that in practice), and the row's own values within `tolerance` (the dtype's rounding).
    """
    if not (torch.isfinite(packed).all() and torch.isfinite(other).all() and torch.isfinite(alone).all()):
        return False
    leak = (packed.double() - other.double()).abs().max().item()
    return leak <= 1e-6 and (packed.double() - alone.double()).abs().max().item() <= tolerance
