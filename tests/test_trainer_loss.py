"""The trainer's `_compute_loss` wiring: against an independent forward + formula, and against stock TRL."""

import pytest
import torch
from conftest import build_model, math_dataset, tiny_args
from trl import GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer

B, P, C = 6, 5, 7


def make_trainer(tokenizer, tmp_path, **overrides):
    args = tiny_args(tmp_path, **overrides)
    model = build_model(tokenizer, seed=1)
    trainer = MixedPolicyGRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
        train_dataset=math_dataset(), processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model.train()
    return trainer


def make_inputs(vocab, seed=0, off=(True, False, False, True, False, False)):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, vocab, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[3, 4:] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([0.75, -0.25, -0.25, 0.5, 0.0, -0.75]),
        "num_items_in_batch": completion_mask.sum(),
        "is_off_policy": torch.tensor(off),
    }


def independent_logps(model, inputs, temperature=1.0):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1] / temperature
    logp_all = torch.log_softmax(logits.float(), -1)
    logps = logp_all.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gamma", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "bnpo", "dapo"])
def test_compute_loss_matches_independent_formula(tokenizer, tmp_path, loss_type, gamma):
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, policy_shaping_gamma=gamma, entropy_coef=0.01)
    model = trainer.model
    inputs = make_inputs(len(tokenizer))
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))

    got = trainer._compute_loss(model, inputs)
    got_grads = grads_of(model, got)

    logps, entropy = independent_logps(model, inputs)
    mask = inputs["completion_mask"].float()
    a = inputs["advantages"].view(-1, 1)
    off = inputs["is_off_policy"].view(-1, 1)
    p = logps.exp()
    token = torch.where(off, -a * p / (p + gamma), -a * torch.exp(logps - inputs["old_per_token_logps"]))
    if loss_type == "dr_grpo":
        policy = (token * mask).sum() / (B * trainer.max_completion_length)
    elif loss_type == "grpo":
        policy = ((token * mask).sum(1) / mask.sum(1)).mean()
    else:  # bnpo, and dapo with one process and GA == steps_per_generation
        policy = (token * mask).sum() / mask.sum()
    expected = policy - 0.01 * (entropy * mask).sum() / mask.sum()
    expected_grads = grads_of(model, expected)

    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert got_grads.keys() == expected_grads.keys()
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def _configure(trainer, beta, top_entropy_quantile, opsm):
    trainer.beta = beta
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.off_policy_mask_threshold = opsm


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,quantile,opsm", [(0.0, 1.0, None), (0.04, 0.5, 0.05)])
def test_without_teacher_rows_the_loss_equals_stock_grpo(tokenizer, tmp_path, loss_type, beta, quantile, opsm):
    """No teacher row ⇒ the same loss, gradients and metrics as `GRPOTrainer._compute_loss` (clip on)."""
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, on_policy_clip=True, epsilon_high=0.28)
    _configure(trainer, beta, quantile, opsm)
    model = trainer.model
    inputs = make_inputs(len(tokenizer), off=(False,) * B)
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    g = torch.Generator().manual_seed(5)
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=g)
    inputs["ref_per_token_logps"] = old + 0.1 * torch.randn(old.shape, generator=g)

    ours = trainer._compute_loss(model, inputs)
    our_grads = grads_of(model, ours)
    our_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    stock = GRPOTrainer._compute_loss(trainer, model, {k: v for k, v in inputs.items() if k != "is_off_policy"})
    stock_grads = grads_of(model, stock)
    stock_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert ours.item() == pytest.approx(stock.item(), rel=1e-6, abs=1e-8)
    for name in stock_grads:
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    for key, value in stock_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert stock_metrics["clip_ratio/region_mean"] > 0  # the ratios are far enough from 1 for clipping to matter


def test_teacher_rows_are_exempt_from_vllm_is_ratio_opsm_and_entropy_mask(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, loss_type="bnpo", entropy_coef=0.0)
    model = trainer.model
    inputs = make_inputs(len(tokenizer))
    off = inputs["is_off_policy"]
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    inputs["old_per_token_logps"] = old
    baseline = trainer._compute_loss(model, inputs)
    base_grads = grads_of(model, baseline)

    # Every correction that targets stale or mismatched *samples* now zeroes or rescales on-policy rows only.
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.off_policy_mask_threshold = 1e-9
    trainer.top_entropy_quantile = 0.0
    inputs["importance_sampling_ratio"] = torch.zeros(B, C)  # would zero every token it applies to
    inputs["sampling_per_token_logps"] = old - 3.0  # KL > threshold: OPSM would drop A<0 rows
    masked = trainer._compute_loss(model, inputs)
    masked_grads = grads_of(model, masked)

    # Only the teacher rows contribute now; recompute that part independently.
    logps, _ = independent_logps(model, inputs)
    mask = inputs["completion_mask"].float()
    p = logps.exp()
    a = inputs["advantages"].view(-1, 1)
    teacher_only = ((-a * p / (p + 0.1)) * mask * off.view(-1, 1)).sum() / mask.sum()
    teacher_grads = grads_of(model, teacher_only)
    assert masked.item() == pytest.approx(teacher_only.item(), rel=1e-5)
    for name in teacher_grads:
        torch.testing.assert_close(masked_grads[name], teacher_grads[name], rtol=1e-4, atol=1e-8)
    assert any(not torch.allclose(base_grads[n], masked_grads[n]) for n in base_grads)  # on-policy part removed


class _LargestVocabTensor:
    """Records the largest tensor created whose last dimension is the vocabulary (i.e. logits-shaped)."""

    def __init__(self, vocab, ignore_numel=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab
                            and t.numel() != ignore_numel):
                        recorder.largest = max(recorder.largest, t.numel())
                return out

        self.largest, self.mode = 0, Mode()


def test_teacher_rows_reuse_trls_fused_forward_without_full_logits(tokenizer, tmp_path, monkeypatch):
    """Teacher rows add no forward pass and no full-vocabulary logits: `_compute_loss` makes the same fused
    (chunked log-prob) forward calls as stock TRL on the same batch, and no vocabulary-wide tensor is larger than
    one of TRL's token chunks (set to 16 tokens here, so that a [rows, tokens, vocab] tensor would show)."""
    import trl.kernels.chunked_logprob as chunked_logprob
    from trl.kernels import ChunkedLogProbFunction as _ChunkedLogProbFunction

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", 16)

    # TRL's padded layout, to compare call for call with stock (packed forwards: tests/test_packing*.py)
    trainer = make_trainer(tokenizer, tmp_path, pack_sequences="never")
    model, vocab = trainer.model, len(tokenizer)
    inputs = make_inputs(vocab)
    stock_inputs = {k: v for k, v in inputs.items() if k != "is_off_policy"}
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("fused_lm_head")), with_kwargs=True)
    chunked = []
    original_forward = _ChunkedLogProbFunction.forward

    def counting_forward(ctx, *args):
        chunked.append(args[0].shape[0])  # tokens scored in this call
        return original_forward(ctx, *args)

    monkeypatch.setattr(_ChunkedLogProbFunction, "forward", staticmethod(counting_forward))
    full_logits = B * C * vocab
    results = {}
    for name, fn in (("stock", lambda: GRPOTrainer._compute_loss(trainer, model, stock_inputs)),
                     ("luffy", lambda: trainer._compute_loss(model, inputs))):
        calls.clear(), chunked.clear()
        detector = _LargestVocabTensor(vocab, ignore_numel=model.lm_head.weight.numel())  # its transpose, gradient
        with detector.mode:
            fn().backward()
        results[name] = (list(calls), list(chunked))
        assert detector.largest <= 16 * vocab < full_logits, name
    hook.remove()
    assert results["luffy"] == results["stock"]
    assert results["luffy"][0] == [True]  # one forward, through TRL's fused LM head

    detector = _LargestVocabTensor(vocab)  # the detector does see a plain forward's logits
    with detector.mode:
        independent_logps(model, inputs)
    assert detector.largest >= full_logits


def test_bias_correction_kl_uses_trls_uncapped_ratio(tokenizer, tmp_path):
    """`use_bias_correction_kl` multiplies the KL by exp(logp − old), not by the `delta`-capped ratio (as TRL)."""
    trainer = make_trainer(tokenizer, tmp_path, loss_type="bnpo", on_policy_clip=True, delta=1.05)
    trainer.beta = 0.04
    trainer.args.use_bias_correction_kl = True
    model = trainer.model
    inputs = make_inputs(len(tokenizer), off=(False,) * B)
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    g = torch.Generator().manual_seed(5)
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=g)
    inputs["ref_per_token_logps"] = old + 0.1 * torch.randn(old.shape, generator=g)
    assert (torch.exp(old - inputs["old_per_token_logps"]) > 1.05).any()  # the cap acts on this batch
    ours = trainer._compute_loss(model, inputs)
    our_grads = grads_of(model, ours)
    our_kl = trainer._metrics["train"]["kl"][-1]
    stock = GRPOTrainer._compute_loss(trainer, model, {k: v for k, v in inputs.items() if k != "is_off_policy"})
    stock_grads = grads_of(model, stock)
    assert ours.item() == pytest.approx(stock.item(), rel=1e-6, abs=1e-8)
    assert our_kl == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-6)
    for name in stock_grads:
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=1e-5, atol=1e-8, msg=name)


TRL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]


def _stock_comparison(trainer, inputs):
    """Loss, gradients and metrics of `_compute_loss`, then of stock `GRPOTrainer._compute_loss`, on `inputs`."""
    model = trainer.model
    ours = trainer._compute_loss(model, inputs)
    our_grads = grads_of(model, ours)
    our_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    stock = GRPOTrainer._compute_loss(trainer, model, {k: v for k, v in inputs.items() if k != "is_off_policy"})
    stock_grads = grads_of(model, stock)
    stock_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return (ours, our_grads, our_metrics), (stock, stock_grads, stock_metrics)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_type_and_level_equals_stock_without_teacher_rows(tokenizer, tmp_path, loss_type, level):
    """No teacher row, clip on ⇒ the same loss, gradients and metrics as `GRPOTrainer._compute_loss`, for every TRL
    loss type at token and sequence level (GSPO), with KL (bias-corrected), the entropy bonus and OPSM on."""
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, on_policy_clip=True, epsilon_high=0.28,
                           importance_sampling_level=level, entropy_coef=0.01, use_bias_correction_kl=True)
    trainer.beta = 0.04
    trainer.off_policy_mask_threshold = 0.05
    inputs = make_inputs(len(tokenizer), off=(False,) * B)
    with torch.no_grad():
        old, _ = independent_logps(trainer.model, inputs)
    g = torch.Generator().manual_seed(5)
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=g)
    inputs["ref_per_token_logps"] = old + 0.1 * torch.randn(old.shape, generator=g)

    (ours, our_grads, our_metrics), (stock, stock_grads, stock_metrics) = _stock_comparison(trainer, inputs)
    assert ours.item() == pytest.approx(stock.item(), rel=1e-6, abs=1e-8)
    for name in stock_grads:
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    assert set(stock_metrics) <= set(our_metrics)
    for key, value in stock_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_a_fully_masked_micro_batch_logs_what_stock_logs(tokenizer, tmp_path, loss_type):
    """Every completion token masked (mask_truncated_completions on an all-truncated micro-batch): without teacher
    slots the metrics are TRL's (0 where no token counts), not NaN."""
    trainer = make_trainer(tokenizer, tmp_path, num_off_policy=0, loss_type=loss_type, on_policy_clip=True)
    inputs = make_inputs(len(tokenizer), off=(False,) * B)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    (ours, _, our_metrics), (stock, _, stock_metrics) = _stock_comparison(trainer, inputs)
    assert ours.item() == pytest.approx(stock.item(), abs=1e-8)
    assert set(stock_metrics) <= set(our_metrics)
    for key, value in stock_metrics.items():
        assert our_metrics[key] == pytest.approx(value, abs=1e-8, nan_ok=True), key
    assert stock_metrics["entropy"] == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_adaptive_entropy_equals_stock_without_teacher_rows(tokenizer, tmp_path, loss_type):
    """`use_adaptive_entropy`: the gate, the window statistics and the coefficient update match TRL's controller over
    two optimiser steps of two micro-batches each."""
    from accelerate.state import GradientState

    kwargs = dict(loss_type=loss_type, on_policy_clip=True, use_adaptive_entropy=True, entropy_coef=0.05,
                  entropy_target=100.0, entropy_coef_delta=0.01, gradient_accumulation_steps=2)
    ours_trainer = make_trainer(tokenizer, tmp_path / "ours", **kwargs)
    stock_trainer = make_trainer(tokenizer, tmp_path / "stock", **kwargs)
    state = GradientState()
    values = {"ours": [], "stock": []}
    for step in range(4):
        inputs = make_inputs(len(tokenizer), seed=step, off=(False,) * B)
        state._set_sync_gradients(step % 2 == 1)
        for name, trainer, fn in (("ours", ours_trainer, ours_trainer._compute_loss),
                                  ("stock", stock_trainer,
                                   lambda m, x, t=stock_trainer: GRPOTrainer._compute_loss(t, m, x))):
            loss = fn(trainer.model, {k: v for k, v in inputs.items() if name == "ours" or k != "is_off_policy"})
            values[name].append((loss.item(), trainer.entropy_coef, trainer._last_world_entropy))
    state._set_sync_gradients(True)
    for (lo, co, eo), (ls, cs, es) in zip(values["ours"], values["stock"]):
        assert lo == pytest.approx(ls, rel=1e-6, abs=1e-8)
        assert co == pytest.approx(cs) and eo == pytest.approx(es, rel=1e-6)
    assert [v[1] for v in values["ours"]] == pytest.approx([0.05, 0.06, 0.06, 0.07])  # +delta at each boundary
    assert values["ours"][0][2] == float("inf") and values["ours"][1][2] < 100.0  # no measurement before the first


def _independent_on_policy(loss_type, logps, old, a, mask, level, eps_low=0.2, eps_high=0.28):
    """Each TRL loss type's on-policy per-token loss, written out from the papers' formulas (not from TRL's code)."""
    d = logps - old
    if level == "sequence":
        d = ((d * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True))
    r = d.exp()
    if loss_type == "cispo":
        return -torch.clamp(r, max=eps_high).detach() * a * logps
    if loss_type == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05)
        return -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
    if loss_type == "vespo":
        log_w = ((logps - old).detach() * mask).sum(1, keepdim=True)
        w = log_w.exp()
        k, lam = torch.where(a >= 0, 2.0, 3.0), torch.where(a >= 0, 3.0, 2.0)
        phi = torch.exp(torch.tensor(1.0)) ** lam * w**k * torch.exp(-lam * w)  # e^λ w^k e^(−λw)
        return -phi * a * logps
    return -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)  # PPO family


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo", "luspo", "grpo"])
def test_teacher_rows_with_every_on_policy_objective(tokenizer, tmp_path, loss_type, level):
    """Teacher rows + any TRL objective: on-policy rows get the type's term, teacher rows −A·f(p) (token level) or
    −A·f(p̄) with p̄ the row's geometric-mean probability (sequence level), with the type's normaliser."""
    gamma = 0.1
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, on_policy_clip=True, epsilon_high=0.28,
                           importance_sampling_level=level, entropy_coef=0.0, policy_shaping_gamma=gamma)
    model = trainer.model
    inputs = make_inputs(len(tokenizer))
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    inputs["old_per_token_logps"] = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    got = trainer._compute_loss(model, inputs)
    got_grads = grads_of(model, got)

    logps, _ = independent_logps(model, inputs)
    mask = inputs["completion_mask"].float()
    a = inputs["advantages"].view(-1, 1)
    off = inputs["is_off_policy"].view(-1, 1)
    old_used = torch.where(off, logps.detach(), inputs["old_per_token_logps"])
    on = _independent_on_policy(loss_type, logps, old_used, a, mask, level)
    if level == "sequence":
        p = torch.exp((logps * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True))
    else:
        p = logps.exp()
    token = torch.where(off, -a * p / (p + gamma), on) * mask
    if loss_type in ("grpo", "sapo"):
        expected = (token.sum(1) / mask.sum(1)).mean()
    elif loss_type == "luspo":
        expected = token.sum(1).mean()
    else:  # cispo, vespo: TRL's global token normaliser (one process, GA = steps_per_generation)
        expected = token.sum() / mask.sum()
    expected_grads = grads_of(model, expected)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    if loss_type == "vespo":
        assert trainer._metrics["train"]["vespo/phi_seq_mean"][-1] != pytest.approx(1.0)  # the weight acted


@pytest.mark.parametrize("loss_type", ["luffy", "dr_grpo", "bnpo"])
def test_loss_term_grad_norms_are_the_gradients_of_each_rows_term(tokenizer, tmp_path, loss_type):
    """`log_loss_term_grad_norms`: the on-policy term's gradient is the loss's gradient with the teacher rows'
    advantages set to 0 (their term vanishes, the normaliser stays), and the teacher term's the other way round."""
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, log_loss_term_grad_norms=True,
                           entropy_coef=0.0)
    model = trainer.model
    inputs = make_inputs(len(tokenizer))
    off = inputs["is_off_policy"]

    def grad_norm(advantages):
        loss = trainer._compute_loss(model, {**inputs, "advantages": advantages})
        grads = grads_of(model, loss)
        return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()

    trainer._metrics["train"].clear()
    trainer.accelerator.gradient_state._set_sync_gradients(True)  # the micro-batch that ends an optimiser step
    total = trainer._compute_loss(model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("loss_terms/")}
    assert set(logged) == {"loss_terms/on_policy_grad_norm", "loss_terms/off_policy_grad_norm",
                           "loss_terms/grad_cosine"}
    trainer.args.log_loss_term_grad_norms = False
    expected_on = grad_norm(torch.where(off, 0.0, inputs["advantages"]))
    expected_off = grad_norm(torch.where(off, inputs["advantages"], 0.0))
    both = grad_norm(inputs["advantages"])  # |a + b|² = |a|² + |b|² + 2|a||b|cos: the cosine, independently
    cosine = (both ** 2 - expected_on ** 2 - expected_off ** 2) / (2 * expected_on * expected_off)
    assert logged["loss_terms/grad_cosine"] == pytest.approx(cosine, abs=1e-5) and abs(cosine) > 1e-3  # sign seen
    assert logged["loss_terms/on_policy_grad_norm"] == pytest.approx(expected_on, rel=1e-5)
    assert logged["loss_terms/off_policy_grad_norm"] == pytest.approx(expected_off, rel=1e-5)
    assert expected_on > 0 and expected_off > 0 and total.requires_grad


def test_loss_term_grad_norms_steps_computes_them_on_every_nth_optimiser_step(tokenizer, tmp_path):
    """`loss_term_grad_norms_steps=N`: the norms (and their extra backward passes) on steps 0, N, 2N… only."""
    trainer = make_trainer(tokenizer, tmp_path, log_loss_term_grad_norms=True, loss_term_grad_norms_steps=3,
                           entropy_coef=0.0)
    inputs = make_inputs(len(tokenizer))
    trainer.accelerator.gradient_state._set_sync_gradients(True)
    logged = []
    for step in range(7):
        trainer._metrics["train"].clear()
        trainer.state.global_step = step
        trainer._compute_loss(trainer.model, inputs)
        logged.append("loss_terms/on_policy_grad_norm" in trainer._metrics["train"])
    assert logged == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_loss_term_grad_norms_steps_must_be_a_positive_integer(steps, tmp_path):
    from luffy_trl import MixedPolicyGRPOConfig

    with pytest.raises(ValueError, match="loss_term_grad_norms_steps"):
        MixedPolicyGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_term_grad_norms_steps=steps)
