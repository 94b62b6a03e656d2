"""`pack_sequences`: micro-batches packed into one sequence each give TRL's padded results and gradients."""

import itertools

import pytest
import torch
from batching_cases import (
    assert_same_gradients,
    cache_generation,
    cut_lengths,
    make_trainer,
    step_gradients,
)
from conftest import SMOLLM_GGUF, math_dataset, requires_smollm, smollm_folder, tiny_args

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.batching import pack_rows, plan_micro_batches
from luffy_trl.trainer.micro_batches import PaddingFreeBatchingMixin

LENGTHS = [3, 20, 5, 7, 2, 24, 9, 4, 11]


# ---------------------------------------------------------------------------------------------------------------------
# Planning (no model)
# ---------------------------------------------------------------------------------------------------------------------
def test_pack_rows_bins_every_row_once_within_the_budget():
    lengths = [30, 7, 12, 25, 3, 18, 40, 9, 5, 22]
    rows = [0, 1, 2, 3, 5, 6, 7, 9]  # rows 4 and 8 need no forward
    bins = pack_rows(lengths, rows, max_tokens=48)
    assert sorted(i for b in bins for i in b) == rows
    assert all(sum(lengths[i] for i in b) <= 48 for b in bins)
    # first-fit decreasing: 40+7 | 30+18 | 25+22 | 12+9 ; a lower bound is ceil(163 / 48) = 4 bins
    assert len(bins) == 4
    assert pack_rows([60, 5], [0, 1], max_tokens=48) == [[0], [1]]  # a row over the budget gets its own bin


def test_packed_plan_minimises_the_largest_micro_batch():
    prompt = [5, 9, 3, 7, 4, 6, 8, 2, 5, 3]
    completion = [40, 3, 25, 8, 60, 12, 5, 33, 9, 18]
    k = 3
    plan = plan_micro_batches(prompt, completion, k, packed=True)
    assert sorted(i for b in plan for i in b) == list(range(10))
    largest = max(sum(prompt[i] + completion[i] for i in b) for b in plan)
    # independent check: every way to cut the length-sorted rows into k non-empty contiguous runs
    order = sorted(range(10), key=lambda i: -(prompt[i] + completion[i]))
    sizes = [prompt[i] + completion[i] for i in order]
    best = min(
        max(sum(sizes[a:b]) for a, b in itertools.pairwise((0, *cuts, len(sizes))))
        for cuts in itertools.combinations(range(1, len(sizes)), k - 1)
    )
    assert largest == best
    padded = plan_micro_batches(prompt, completion, k)  # the padded plan optimises something else
    assert max(sum(prompt[i] + completion[i] for i in b) for b in padded) >= largest


# ---------------------------------------------------------------------------------------------------------------------
# The packed forward against TRL's padded one
# ---------------------------------------------------------------------------------------------------------------------
def _padded_batch(tokenizer, prompt_lengths, completion_lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width_p, width_c = max(prompt_lengths), max(completion_lengths) + 2
    rows = len(prompt_lengths)
    ids = torch.randint(5, len(tokenizer), (rows, width_p + width_c), generator=generator)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        mask[i, width_p - p: width_p + c] = 1
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return ids, mask, width_c


@pytest.fixture(scope="module")
def packed_trainer(tokenizer, tmp_path_factory):
    trainer = make_trainer(tokenizer, tmp_path_factory.mktemp("packed"), per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, steps_per_generation=4, num_generations=4,
                           max_completion_length=24, entropy_coef=0.0, off_policy_trigger="all_fail",
                           pack_sequences="always")
    cut_lengths(trainer, LENGTHS)
    return trainer


def assert_packed_forward_equals_padded(trainer, tokenizer):
    model = trainer.model
    ids, mask, keep = _padded_batch(tokenizer, [7, 3, 5, 1], [6, 9, 0, 4])
    results = {}
    for packed in (True, False):
        trainer.args.pack_sequences = "always" if packed else "never"
        model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, compute_entropy=True)
        weights = torch.linspace(0.5, 2.0, logps.numel(), dtype=logps.dtype).view_as(logps)
        ((logps + 0.1 * entropies) * weights * mask[:, -keep:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = (logps, entropies, grads)
    trainer.args.pack_sequences = "always"
    (lp_on, ent_on, g_on), (lp_off, ent_off, g_off) = results[True], results[False]
    completion = mask[:, -keep:].bool()
    assert completion.sum() == 19 and (lp_off[completion] != 0).all()
    torch.testing.assert_close(lp_on, lp_off, rtol=1e-6, atol=1e-6)  # zeros outside the completions, both
    torch.testing.assert_close(ent_on, ent_off, rtol=1e-6, atol=1e-6)
    assert_same_gradients([g_on], [g_off])
    return g_on


@pytest.mark.slow
def test_packed_forward_equals_the_padded_forward_and_its_gradient(packed_trainer, tokenizer):
    assert_packed_forward_equals_padded(packed_trainer, tokenizer)


@pytest.mark.slow
def test_packed_forward_with_lora(tokenizer, tmp_path):
    """PEFT passes the position ids through to the base model: packed LoRA gradients equal the padded ones."""
    from peft import LoraConfig

    trainer = make_trainer(tokenizer, tmp_path, per_device_train_batch_size=4, num_generations=4,
                           pack_sequences="always", peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    grads = assert_packed_forward_equals_padded(trainer, tokenizer)
    assert grads and all("lora_" in name for name in grads)


def test_unpackable_masks_are_named():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 0]])
    reason = PaddingFreeBatchingMixin._unpackable
    assert reason(mask, 3, [0, 3]) is None
    assert "prompt mask has holes" in reason(mask, 3, [1])
    assert "completion mask has holes" in reason(mask, 3, [2])
    assert "empty prompt" in reason(torch.tensor([[0, 0, 1, 1]]), 2, [0])


@pytest.mark.slow
def test_a_mask_with_holes_runs_padded_and_is_counted(packed_trainer, tokenizer, caplog):
    trainer = packed_trainer
    ids, mask, keep = _padded_batch(tokenizer, [4, 4], [5, 6], seed=1)
    mask[1, -keep + 2] = 0  # a hole inside row 1's completion: packing would attend to it
    before = trainer._packing_fallbacks
    packed_or_not, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)  # loss forward
    trainer.args.pack_sequences = "never"
    padded, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    trainer.args.pack_sequences = "always"
    assert trainer._packing_fallbacks == before + 1
    assert "completion mask has holes" in caplog.text or before > 0  # warned once, with the reason
    torch.testing.assert_close(packed_or_not, padded, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# In the trainer
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_optimiser_step_has_the_switch_off_gradient_when_packed(packed_trainer):
    trainer = packed_trainer
    cache_generation(trainer)
    fallbacks = trainer._packing_fallbacks
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        trainer.args.loss_type = trainer.loss_type = loss_type
        on, chunks = step_gradients(trainer, True)
        off, _ = step_gradients(trainer, False)
        assert_same_gradients(on, off)
    metrics = trainer._metrics["train"]
    # packed: the tokens computed are the real ones (prompt + completion of the rows with loss tokens)
    computed, real = metrics["batching/computed_tokens"][-2], metrics["batching/real_tokens"][-2]
    assert computed == real
    assert metrics["batching/computed_tokens"][-1] > 1.2 * real  # the switch-off arm, padded
    assert trainer._packing_fallbacks == fallbacks  # every forward ran packed
    assert len({c["completion_ids"].size(0) for c in chunks}) > 1  # rows moved between micro-batches
    del trainer._generate_and_score_completions  # drop the cache
    trainer.args.padding_free_batches = True


@pytest.mark.slow
def test_old_log_probs_match_when_packed(packed_trainer):
    trainer = packed_trainer  # GA % spg != 0: TRL computes old log-probs
    trainer.args.padding_free_batches = True
    batch = next(iter(trainer.get_train_dataloader()))
    outputs, tokens = {}, {}
    for mode in ("always", "never"):
        trainer.args.pack_sequences = mode
        torch.manual_seed(5)
        outputs[mode] = type(trainer)._generate_and_score_completions(trainer, batch)
        tokens[mode] = trainer._metrics["train"]["batching/logprob_computed_tokens"][-1]
    trainer.args.pack_sequences = "always"
    on, off = outputs["always"], outputs["never"]
    assert torch.equal(on["completion_ids"], off["completion_ids"])
    mask = on["completion_mask"].bool() & ~on["is_off_policy"].unsqueeze(1)
    assert mask.any()
    # TRL's fused log-prob head accumulates in float32 even for a float64 model: rounding differs with the layout
    torch.testing.assert_close(on["old_per_token_logps"][mask], off["old_per_token_logps"][mask], rtol=1e-6,
                               atol=1e-6)
    assert (on["old_per_token_logps"][on["is_off_policy"]] == 0).all()
    # packed: exactly the real tokens of the on-policy rows, fewer than the trimmed batches
    prompt = on["prompt_mask"].sum(1)
    extent = on["completion_mask"].sum(1)
    on_policy = ~on["is_off_policy"] & (extent > 0)
    assert tokens["always"] == float((prompt + extent)[on_policy].sum())
    assert tokens["always"] < tokens["never"]


def test_auto_takes_the_cheapest_layout_with_sdpa_and_one_sequence_with_a_varlen_kernel(tokenizer, tmp_path):
    """'auto' packs every model that packs exactly: with sdpa/eager as 'bins' (per forward the cheapest of the cut
    rows, bins and one sequence: measured never slower than cutting on CPU), with a varlen kernel one sequence."""
    trainer = make_trainer(tokenizer, tmp_path)
    assert trainer.args.pack_sequences == "auto"
    assert trainer.model.config._attn_implementation == "sdpa"
    assert trainer._packing_requested() and trainer._bins_mode()
    assert trainer._forward_layout([4, 4], [3, 30]) in ("cut", "bins", "one")
    trainer.model.config._attn_implementation = "flash_attention_2"
    try:
        assert trainer._packing_requested() and not trainer._bins_mode()
        assert trainer._forward_layout([4, 4], [3, 30]) == "one"
        trainer._packing_verdict = True  # as if the first-forward check had passed (it needs the kernel to run)
        assert trainer._packing_enabled()
        trainer.args.padding_free_batches = False
        assert not trainer._packing_enabled()  # packing is part of padding-free batches
        trainer.args.padding_free_batches = True
        trainer.args.pack_sequences = "never"
        assert not trainer._packing_requested()
    finally:
        trainer.model.config._attn_implementation = "sdpa"
        trainer.args.padding_free_batches = True
        trainer.args.pack_sequences = "auto"


def test_pack_sequences_rejects_unknown_values(tmp_path):
    with pytest.raises(ValueError, match="pack_sequences must be one of"):
        tiny_args(tmp_path, pack_sequences="yes")


@pytest.mark.slow
@requires_smollm
def test_packed_forward_on_a_real_llama_model(smollm_tokenizer, tmp_path):
    """SmolLM2-135M-Instruct (Llama, rotary positions, GQA) through the trainer: packed log-probs, entropies and
    gradients equal the padded forward's to float32 rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_folder(), gguf_file=SMOLLM_GGUF)
    model.hf_quantizer.remove_quantization_config(model)  # dequantised GGUF weights: plain trainable tensors
    model.model.layers = model.model.layers[:4]  # a slice of the real network keeps the test fast
    model.config.num_hidden_layers = 4
    trainer = MixedPolicyGRPOTrainer(
        model=model, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        processing_class=smollm_tokenizer,
        args=tiny_args(tmp_path, per_device_train_batch_size=4, num_generations=4, pack_sequences="always"),
        train_dataset=math_dataset(),
    )
    trainer.model.train()
    ids, mask, keep = _padded_batch(smollm_tokenizer, [20, 9, 14, 5], [30, 7, 18, 25])
    results = {}
    for mode in ("always", "never"):
        trainer.args.pack_sequences = mode
        trainer.model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                         compute_entropy=True)
        (logps * mask[:, -keep:]).sum().backward()
        results[mode] = (logps.detach(), entropies.detach(),
                         {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    (lp_on, ent_on, g_on), (lp_off, ent_off, g_off) = results["always"], results["never"]
    completion = mask[:, -keep:].bool()
    assert lp_off[completion].abs().mean() > 1.0  # real log-probs, not a degenerate model
    torch.testing.assert_close(lp_on, lp_off, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent_on, ent_off, rtol=1e-5, atol=1e-4)
    assert_same_gradients([g_on], [g_off], rtol=1e-4)
    assert trainer._packing_fallbacks == 0  # the "always" arm really ran packed
