"""Packing is exact on every model family it is used for (issue 24).

Every causal-LM family of the installed transformers is built from a tiny config in-process (`model_families`, float64,
no download) and measured for each attention implementation that runs on CPU: packed log-probs against each row run
alone, the gradient of a weighted log-likelihood packed against the rows alone, and a row's log-probs at two left
paddings (the cut layout of `padding_free_batches`). A family is either on `luffy_trl.packing.PACKS_EXACTLY` and exact
(<= 1e-6) or never packed by the trainer; the test fails the day a transformers upgrade changes that. The trainer's own
check at the first packed forward (`_packing_check`) must reach the same verdict on every family.

The default run covers the families the issue names (the hybrids, OPT) and two controls; the sweep over all of them
(~25 s on one core) is marked slow. flex_attention needs torch.compile on CPU and float32 (its own test, run with
LUFFY_TEST_FLEX=1: ~40 s cold).
"""

import logging
import math
import os
import warnings

import pytest
import torch
from batching_cases import (
    assert_same_gradients,
    cache_generation,
    cut_lengths,
    make_trainer,
    step_gradients,
    varied_dataset,
)
from conftest import tiny_args
from model_families import build, causal_lm_families, measure
from trl.trainer.utils import add_fused_lm_head

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.packing import NOT_EXACT, PACKS_EXACTLY, PADDING_DEPENDENT, model_type_of, packing_support

IGNORES_SIZES = "its config ignores the generic tiny sizes (composite, vision, audio or encoder-decoder model)"
NEEDS = "needs a package that is not installed"
MISFIT = "the generic tiny sizes break its config (it is checked by the trainer's first-forward check instead)"
# Families that cannot be built tiny in-process here, with the reason; the trainer decides for them at the first packed
# forward (`_packing_check`), or from their text model's type for composites (e.g. qwen3_5 -> qwen3_5_text).
UNBUILDABLE = {
    "axk1": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-singleton..."),
    "axk2": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-singleton..."),
    "bailing_hybrid": (MISFIT, "RuntimeError: shape '[-1, 8, 0]' is invalid for input of size 28"),
    "bart": (IGNORES_SIZES, "3315456 parameters"),
    "bigbird_pegasus": (IGNORES_SIZES, "4410944 parameters"),
    "blenderbot": (IGNORES_SIZES, "16198976 parameters"),
    "blt": (IGNORES_SIZES, "4632992512 parameters"),
    "codegen": (MISFIT, "RuntimeError: The size of tensor a (8) must match the size of tensor b (64) at non-single..."),
    "cohere_compass_text": (MISFIT, "KeyError: 'full_attention'"),
    "dbrx": (MISFIT, "AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'"),
    "deepseek_v2": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-sin..."),
    "deepseek_v3": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-sin..."),
    "deepseek_v32": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-si..."),
    "dory": (MISFIT, "KeyError: 'full_attention' (with one layer of each of its kinds)"),
    "dots3_note": (IGNORES_SIZES, "279551718016 parameters"),
    "dots3_note_text": (MISFIT, "AmbiguousGlobalPerLayerAttributeError: 'num_attention_heads' is a per-layer attri..."),
    "emu3": (IGNORES_SIZES, "8492011520 parameters"),
    "falcon": (MISFIT, "AttributeError: property 'head_dim' of 'FalconConfig' object has no setter"),
    "fuyu": (IGNORES_SIZES, "9408238592 parameters"),
    "gemma3": (IGNORES_SIZES, "3327440128 parameters"),
    "gemma3n": (NEEDS, "timm (vision tower)"),
    "gemma3n_text": (MISFIT, "ValueError: The set of layer types producing a cache is different than the set of la..."),
    "gemma4": (IGNORES_SIZES, "5681157632 parameters"),
    "gemma4_assistant": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'valid..."),
    "gemma4_text": (MISFIT, "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attribute and may va..."),
    "gemma4_unified": (IGNORES_SIZES, "3614738176 parameters"),
    "gemma4_unified_assistant": (IGNORES_SIZES, "3476120576 parameters"),
    "gemma4_unified_text": (MISFIT, "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attribute an..."),
    "git": (IGNORES_SIZES, "85857760 parameters"),
    "glm4_moe_lite": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-s..."),
    "glm_moe_dsa": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-sin..."),
    "got_ocr2": (IGNORES_SIZES, "716033280 parameters"),
    "gpt_neo": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'validate_archi..."),
    "gptj": (MISFIT, "RuntimeError: The size of tensor a (8) must match the size of tensor b (64) at non-singleton..."),
    "inkling2_loop_text": (IGNORES_SIZES, "7228288 parameters"),
    "inkling2_text": (IGNORES_SIZES, "7849600 parameters"),
    "kimi_linear": (IGNORES_SIZES, "3300960 parameters"),
    "kolibri1_1": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'validate_ar..."),
    "lfm2_moe": (MISFIT, "TypeError: 'NoneType' object is not subscriptable"),
    "llama4": (IGNORES_SIZES, "107769861120 parameters"),
    "longcat_flash": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-s..."),
    "marian": (IGNORES_SIZES, "3315328 parameters"),
    "mbart": (IGNORES_SIZES, "3315520 parameters"),
    "minicpm3": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-single..."),
    "mllama": (IGNORES_SIZES, "9775192080 parameters"),
    "moss_transcribe_diarize": (IGNORES_SIZES, "1064095744 parameters"),
    "musicgen": (MISFIT, "AttributeError: 'MusicgenConfig' object has no attribute 'dropout'"),
    "musicgen_melody": (MISFIT, "AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropout'"),
    "mvp": (IGNORES_SIZES, "3315456 parameters"),
    "pegasus": (IGNORES_SIZES, "3315392 parameters"),
    "phi4_multimodal": (IGNORES_SIZES, "869954336 parameters"),
    "plbart": (MISFIT, "ValueError: embed_dim must be divisible by num_heads (got `embed_dim`: 32 and `num_heads`:..."),
    "prophetnet": (MISFIT, "NotImplementedError: This model does not support the setting of `num_hidden_layers`. P..."),
    "qwen3_5": (IGNORES_SIZES, "8953803264 parameters"),
    "qwen3_5_moe": (IGNORES_SIZES, "34660610688 parameters"),
    "qwen4_exp_text": (MISFIT, "TypeError: // on None (NOT_EXACT from its linear-attention layers alone)"),
    "qwen4_exp": (MISFIT, "TypeError: unsupported operand type(s) for //: 'NoneType' and 'NoneType'"),
    "reformer": (MISFIT, "AssertionError: If you want to use `ReformerModelWithLMHead` make sure that `is_decoder=..."),
    "roc_bert": (IGNORES_SIZES, "13503168 parameters"),
    "sarvam_mla": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-sing..."),
    "whisper": (MISFIT, "ValueError: embed_dim must be divisible by num_heads (got `embed_dim`: 32 and `num_heads`..."),
    "xglm": (MISFIT, "RuntimeError: value cannot be converted to type float without overflow"),
    "xlnet": (MISFIT, "NotImplementedError: The model xlnet is one of the few models that has no sequence length l..."),
    "xlstm": (MISFIT, "AttributeError: property 'v_head_dim' of 'xLSTMConfig' object has no setter"),
    "xmod": (MISFIT, "ValueError: Input language unknown. Please call `XmodPreTrainedModel.set_default_language()`"),
    "youtu": (MISFIT, "RuntimeError: The size of tensor a (4) must match the size of tensor b (8) at non-singleton..."),
    "zamba": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'validate_layer_t..."),
    "zamba2": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'validate_layer_..."),
    "zaya": (MISFIT, "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec..."),
}

FAST = ["qwen2", "llama", "opt", "qwen3_next", "qwen3_5_text", "granitemoehybrid", "falcon_h1", "lfm2", "bamba", "gpt2"]
IMPLEMENTATIONS = ["eager", "sdpa"]
TOLERANCE = 1e-6


def test_every_causal_lm_family_is_classified():
    """A family added by a transformers upgrade fails here until it is measured and listed."""
    assert not PACKS_EXACTLY & set(NOT_EXACT)
    for family in causal_lm_families():
        assert family in PACKS_EXACTLY or family in NOT_EXACT or family in UNBUILDABLE, (
            f"{family}: not classified; run tests/test_packing_families.py -m slow and add it to luffy_trl.packing "
            "(PACKS_EXACTLY or NOT_EXACT) or, if it cannot be built tiny, to UNBUILDABLE with the reason")


def _assert_family(family: str, implementation: str) -> None:
    try:
        measured = measure(family, implementation)
    except (ValueError, NotImplementedError) as error:
        if "does not support" in str(error) and implementation != "eager":
            pytest.skip(f"{family} refuses {implementation}: {str(error)[:80]}")
        raise
    packed, gradient, padded = measured["packed"], measured["gradient"], measured["padded"]
    exact = max(packed, measured["bins"]) <= TOLERANCE and gradient <= TOLERANCE
    if family in PACKS_EXACTLY:
        assert exact, (f"{family} ({implementation}) no longer packs exactly: max |Δ log p| {packed:.1e} (bins "
                       f"{measured['bins']:.1e}), gradient {gradient:.1e} relative; move it to "
                       "luffy_trl.packing.NOT_EXACT with the reason")
    else:
        assert family in NOT_EXACT and packing_support(family)[0] == "not exact"
        if exact:
            warnings.warn(f"{family} ({implementation}) now packs exactly; it could join PACKS_EXACTLY", stacklevel=1)
    if math.isnan(padded):  # transformers' eager float64 mask fills fully masked (left-padding) rows with NaN
        assert implementation == "eager"
    elif family not in PADDING_DEPENDENT:
        assert padded <= TOLERANCE, (f"{family} ({implementation}): a row's log-probs move by {padded:.1e} with its "
                                     "padding; add it to luffy_trl.packing.PADDING_DEPENDENT")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAST)
def test_family_packs_exactly_or_is_not_packed(family, implementation):
    _assert_family(family, implementation)


@pytest.mark.slow  # reason: every family × eager/sdpa is about a minute on one core; FAST covers the named families
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", [f for f in causal_lm_families() if f not in UNBUILDABLE and f not in FAST])
def test_every_family_packs_exactly_or_is_not_packed(family, implementation):
    _assert_family(family, implementation)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LUFFY_TEST_FLEX"), reason="flex_attention compiles with inductor on CPU (about "
                    "40 s cold, more than the family sweep itself): run with LUFFY_TEST_FLEX=1")
@pytest.mark.parametrize("family", FAST)
def test_flex_attention_packs_exactly_or_is_not_packed(family):
    """flex_attention on CPU (torch's CPU flex kernel takes float32, not float64): packed rows against each row alone,
    with the float32 tolerance (exact families measure ~3e-8 here, the hybrids 1e-5 and more)."""
    from model_families import _logps, _rows, packed_logps

    try:
        model = build(family, "flex_attention", dtype=torch.float32)
    except ValueError as error:
        if "does not support" in str(error):
            pytest.skip(f"{family} refuses flex_attention: {str(error)[:80]}")
        raise
    rows = _rows(min(model.get_input_embeddings().num_embeddings, 128))
    with torch.no_grad():
        alone = [_logps(model(input_ids=r[None], use_cache=False).logits[0], r) for r in rows]
        # one packed sequence only: torch 2.13's CPU inductor fails to compile flex_attention for a batch of packed
        # sequences (C++ error, `cur_qSplitSize4` undeclared), so the bins layout is not checked with flex on CPU
        measured = [max((a - b).abs().max().item() for a, b in zip(packed_logps(model, rows), alone))]
    if family in PACKS_EXACTLY:
        assert max(measured) <= TOLERANCE, f"{family} (flex_attention): packed {measured}"
    elif max(measured) <= TOLERANCE:
        warnings.warn(f"{family} (flex_attention) packs exactly here", stacklevel=1)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer: its check at the first packed forward, the fallback, the refusal
# ---------------------------------------------------------------------------------------------------------------------
def _family_model(family: str, tokenizer):
    model = build(family, "sdpa" if family != "rwkv" else "eager", vocab_size=len(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for module in model.modules():  # training mode must not draw dropout masks (the arms are compared exactly)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def checker(tokenizer, tmp_path_factory):
    """A packing trainer whose model each test swaps for a family's (only `_packing_check` runs)."""
    return make_trainer(tokenizer, tmp_path_factory.mktemp("checker"), pack_sequences="always")


@pytest.mark.parametrize("family", FAST)
def test_the_first_forward_check_agrees_with_the_measurement(checker, tokenizer, family):
    model = _family_model(family, tokenizer)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    original = checker.model
    checker.model = model
    try:
        assert checker._packing_check() == (family in PACKS_EXACTLY)
    finally:
        checker.model = original
    assert not model.training  # left as it was (eval here)


def _two_prompt_lengths(n: int = 16):
    """Addition problems whose prompts are short or much longer (the long ones end up in their own micro-batches, so
    cutting prompt columns moves the short rows' positions)."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        question = f"What is {i} + {i + 1}?" + " Think step by step." * (12 * (i % 2))
        trace = f"{i} + {i + 1} = {2 * i + 1}. \\boxed{{{2 * i + 1}}}"
        rows.append({"prompt": [{"role": "user", "content": question}], "ground_truth": str(2 * i + 1),
                     "target": [{"role": "assistant", "content": trace}]})
    return Dataset.from_list(rows)


def _family_trainer(tokenizer, out_dir, family, dataset=None, **overrides):
    model = _family_model(family, tokenizer).train()
    overrides = {**dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
                        num_generations=4, max_completion_length=24, entropy_coef=0.0, off_policy_trigger="all_fail"),
                 **overrides}
    trainer = MixedPolicyGRPOTrainer(
        model=model, reward_funcs=lambda completions, is_off_policy, **kw: [
            1.0 if off else float(len(c[0]["content"]) % 3 == 0) for c, off in zip(completions, is_off_policy)],
        args=tiny_args(out_dir, **overrides), train_dataset=dataset or varied_dataset(), processing_class=tokenizer)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("mode", ["always", "bins"])
def test_always_is_refused_for_a_family_that_does_not_pack_exactly(tokenizer, tmp_path, mode):
    with pytest.raises(ValueError, match=rf"pack_sequences='{mode}'.*qwen3_5_text.*gated-delta-rule.*'auto'.*'never'"):
        _family_trainer(tokenizer, tmp_path, "qwen3_5_text", pack_sequences=mode)


def test_auto_trains_a_hybrid_model_padded_with_the_switch_off_gradients(tokenizer, tmp_path, caplog):
    """Qwen3.5 (gated delta rule) with 'auto' and a varlen attention implementation: not packed (one warning, the
    metric), so every optimiser step's gradient is the switch-off arm's; packing it anyway would not be."""
    trainer = _family_trainer(tokenizer, tmp_path, "qwen3_5_text", pack_sequences="auto")
    trainer._packing_requested = lambda: True  # what 'auto' does with flash_attention_2 / flex_attention:
    trainer._bins_mode = lambda: False  # one packed sequence per forward
    cut_lengths(trainer, [3, 20, 5, 7, 2, 24, 9, 4, 11])
    cache_generation(trainer)
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer.micro_batches"):
        on, _ = step_gradients(trainer, True)
    warnings_ = [r for r in caplog.records if "is not packed" in r.getMessage()]
    assert len(warnings_) == 1 and "qwen3_5_text" in warnings_[0].getMessage()
    assert trainer._packing_verdict is False
    assert trainer._metrics["train"]["batching/packing_model_fallback"] == [1.0]
    off, _ = step_gradients(trainer, False)
    assert_same_gradients(on, off)
    trainer._packing_verdict = True  # the old behaviour: packed by the attention implementation's name alone
    wrong, _ = step_gradients(trainer, True)
    with pytest.raises(AssertionError):
        assert_same_gradients(wrong, off)


def test_an_unverified_family_is_checked_and_always_is_refused_when_it_leaks(tokenizer, tmp_path, monkeypatch):
    """A family on neither list (here LFM2 taken off NOT_EXACT): 'always' constructs, then the first packed forward's
    check finds the leak and refuses before any step trains."""
    monkeypatch.delitem(NOT_EXACT, "lfm2")
    trainer = _family_trainer(tokenizer, tmp_path, "lfm2", pack_sequences="always")
    with pytest.raises(ValueError, match=r"'lfm2'.*check at the first packed forward"):
        trainer._packing_enabled()


def test_model_type_is_read_through_wrappers_and_composite_configs():
    from transformers import AutoConfig, Qwen2Config

    class Wrapper:  # DDP / DeepSpeed keep the model in `.module`
        def __init__(self, module):
            self.module = module

    qwen = type("Model", (), {"config": Qwen2Config()})()
    assert model_type_of(Wrapper(Wrapper(qwen))) == "qwen2"
    composite = AutoConfig.for_model("qwen3_5")
    assert model_type_of(type("Model", (), {"config": composite})()) == "qwen3_5_text"
    assert packing_support("qwen3_5_text")[0] == "not exact" and packing_support("qwen2")[0] == "exact"
    assert packing_support("some_new_family")[0] == "unknown"


def test_a_padding_dependent_family_keeps_the_switch_off_gradients_without_packing(tokenizer, tmp_path):
    """GPT-2 (absolute position embeddings by column): its log-probs move with a row's left padding, so the cut
    layout keeps TRL's prompt width; every optimiser step's gradient stays the switch-off arm's, old log-probs
    included."""
    trainer = _family_trainer(tokenizer, tmp_path, "gpt2", dataset=_two_prompt_lengths(),
                              pack_sequences="never")  # GA 2, spg 4: old log-probs
    assert not trainer._prompt_cut_exact()
    cut_lengths(trainer, [3, 20, 5, 7, 2, 24, 9, 4, 11])
    cache_generation(trainer)
    on, chunks = step_gradients(trainer, True)
    off, switch_off_chunks = step_gradients(trainer, False)
    assert sum(c["completion_ids"].numel() for c in chunks) < sum(c["completion_ids"].numel()
                                                                  for c in switch_off_chunks)  # still cut
    assert {c["prompt_ids"].size(1) for c in chunks} == {c["prompt_ids"].size(1) for c in switch_off_chunks}
    assert_same_gradients(on, off)
    trainer._prompt_cut_exact = lambda: True  # cutting prompt columns too would change them
    cut, cut_chunks = step_gradients(trainer, True)
    assert {c["prompt_ids"].size(1) for c in cut_chunks} != {c["prompt_ids"].size(1) for c in switch_off_chunks}
    with pytest.raises(AssertionError):
        assert_same_gradients(cut, off)
