"""Every loss option of LUFFY's `compute_token_on_off_policy_loss`, against an independent element-by-element
computation in float64 (values and d loss / d logp), and through the trainer's `_compute_loss`."""

import math

import pytest
import torch
from test_trainer_loss import B, grads_of, independent_logps, make_inputs, make_trainer

from luffy_trl.losses import (
    ON_POLICY_SHAPINGS,
    SHAPING_FUNCTIONS,
    aggregate_loss,
    mixed_policy_per_token_loss,
    shaping_gradient_weight,
)

N, T = 5, 6


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (torch.rand(N, T, generator=g, dtype=torch.float64) * -3.0).requires_grad_(True)  # p in (0.05, 1]
    old = logps.detach() + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4
    adv = torch.tensor([0.875, -0.125, -0.5, 1.0, -1.0], dtype=torch.float64)
    off = torch.tensor([True, False, True, False, False])
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    return logps, old, adv, off, mask


def off_value(logp, shaping, gamma, w, k):
    """f and df/dlogp of one off-policy token (LUFFY's off_policy_reshape), written out by hand."""
    p = math.exp(logp)
    return {
        "luffy": (p / (p + gamma), gamma * p / (p + gamma) ** 2),
        "none": (p, p),
        "logp": (w * logp, w),
        "p_logp": (p + w * logp, p + w),
        "square_root": (math.sqrt(p), 0.5 * math.sqrt(p)),
        "pow": (p**k, k * p**k),
    }[shaping]


def on_value(logp, old, shaping, gamma, w, k):
    """r and dr/dlogp of one on-policy token (LUFFY's on_policy_reshape)."""
    d = logp - old
    if shaping == "luffy":
        p, q = math.exp(logp), math.exp(old)
        f_old = q / (q + gamma)
        return (p / (p + gamma)) / f_old, gamma * p / (p + gamma) ** 2 / f_old
    return {
        "none": (math.exp(d), math.exp(d)),
        "logp": (d, 1.0),
        "p_logp": (math.exp(d) + w * d, math.exp(d) + w),
        "square_root": (math.exp(d / 2), 0.5 * math.exp(d / 2)),
        "pow": (math.exp(k * d), k * math.exp(k * d)),
    }[shaping]


def reference(logps, old, adv, off, mask, *, off_shaping="luffy", on_shaping="none", gamma=0.1, on_gamma=0.1,
              w=1.0, k=0.5, on_w=1.0, on_k=0.5, clip=False, eps=(0.2, 0.28), max_clip=None, min_clip=None,
              max_prob=None):
    """bnpo loss (Σ ℓ·m / Σ m over kept tokens) and its gradient, token by token."""
    losses, grads, kept = {}, {}, 0
    for b in range(N):
        for t in range(T):
            if not mask[b, t]:
                continue
            logp, a = logps[b, t].item(), adv[b].item()
            if max_prob is not None and math.exp(logp) > max_prob:
                continue  # dropped: no loss, not counted
            kept += 1
            if off[b]:
                f, df = off_value(logp, off_shaping, gamma, w, k)
                if max_clip is not None and f >= max_clip:
                    f, df = max_clip, 0.0
                if min_clip is not None and f <= min_clip:
                    f, df = min_clip, 0.0
                losses[b, t], grads[b, t] = -a * f, -a * df
            else:
                r, dr = on_value(logp, old[b, t].item(), on_shaping, on_gamma, on_w, on_k)
                if clip:
                    rc = min(max(r, 1 - eps[0]), 1 + eps[1])
                    if -a * r >= -a * rc:
                        losses[b, t], grads[b, t] = -a * r, -a * dr
                    else:
                        losses[b, t], grads[b, t] = -a * rc, 0.0
                else:
                    losses[b, t], grads[b, t] = -a * r, -a * dr
    loss = sum(losses.values()) / kept
    grad = torch.zeros(N, T, dtype=torch.float64)
    for (b, t), g in grads.items():
        grad[b, t] = g / kept
    return loss, grad


def run(logps, old, adv, off, mask, **kw):
    out = mixed_policy_per_token_loss(logps, old, adv, off, **kw)
    loss = aggregate_loss(out.per_token_loss, mask * out.kept, "bnpo")
    logps.grad = None
    loss.backward()
    return out, loss.item(), logps.grad.clone()


@pytest.mark.parametrize("shaping", SHAPING_FUNCTIONS)
@pytest.mark.parametrize("w,k", [(1.0, 0.5), (0.3, 2.0)])
def test_every_off_policy_reshape(shaping, w, k):
    logps, old, adv, off, mask = make_batch()
    _, loss, grad = run(logps, old, adv, off, mask, shaping=shaping, shaping_weight=w, shaping_exponent=k)
    ref_loss, ref_grad = reference(logps, old, adv, off, mask, off_shaping=shaping, w=w, k=k)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    probs = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    expected = torch.tensor([off_value(math.log(p), shaping, 0.1, w, k)[1] for p in probs.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(shaping_gradient_weight(probs, shaping, 0.1, weight=w, exponent=k), expected)


@pytest.mark.parametrize("shaping", ON_POLICY_SHAPINGS)
@pytest.mark.parametrize("clip", [False, True])
def test_every_on_policy_reshape(shaping, clip):
    logps, old, adv, off, mask = make_batch()
    kw = dict(on_gamma=0.5 if shaping == "luffy" else 0.1, on_w=0.7, on_k=1.5)
    out, loss, grad = run(logps, old, adv, off, mask, clip=clip, epsilon_low=0.2, epsilon_high=0.28,
                          on_policy_shaping=shaping, on_policy_gamma=kw["on_gamma"], on_policy_weight=kw["on_w"],
                          on_policy_exponent=kw["on_k"])
    ref_loss, ref_grad = reference(logps, old, adv, off, mask, on_shaping=shaping, clip=clip, **kw)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    if clip and shaping == "none":
        assert out.is_low_clipped.any() or out.is_high_clipped.any()  # the clip acted on this batch
    # the unshaped importance ratio (for the KL bias correction) is exp(logp − old), exactly 1 on teacher rows
    expected = torch.where(off.view(-1, 1), torch.ones_like(old), torch.exp(logps.detach() - old))
    torch.testing.assert_close(out.importance_ratio.detach(), expected)


@pytest.mark.parametrize("max_clip,min_clip", [(0.5, None), (None, 0.6), (0.7, 0.5)])
def test_off_policy_max_and_min_clip(max_clip, min_clip):
    logps, old, adv, off, mask = make_batch()
    out, loss, grad = run(logps, old, adv, off, mask, off_policy_max_clip=max_clip, off_policy_min_clip=min_clip)
    ref_loss, ref_grad = reference(logps, old, adv, off, mask, max_clip=max_clip, min_clip=min_clip)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    # the clip fractions LUFFY logs (off_ratio_max/min_clip_frac): teacher tokens at the bound
    p = logps.detach().exp()
    f = p / (p + 0.1)
    off_tokens = off.view(-1, 1) & mask.bool()
    if max_clip is not None:
        assert torch.equal(out.off_max_clipped & off_tokens, (f >= max_clip) & off_tokens)
        assert (out.off_max_clipped & off_tokens).any()
        f = f.clamp(max=max_clip)
    if min_clip is not None:
        assert torch.equal(out.off_min_clipped & off_tokens, (f <= min_clip) & off_tokens)
        assert (out.off_min_clipped & off_tokens).any()
    assert not (out.off_max_clipped | out.off_min_clipped)[~off].any()


def test_max_token_prob_drops_tokens_from_loss_and_count():
    logps, old, adv, off, mask = make_batch()
    out, loss, grad = run(logps, old, adv, off, mask, max_token_prob=0.4, clip=True, epsilon_high=0.28)
    ref_loss, ref_grad = reference(logps, old, adv, off, mask, max_prob=0.4, clip=True)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    dropped = (~out.kept & mask.bool()).sum().item()
    assert 0 < dropped < mask.sum().item()


def test_trainer_wires_every_option(tokenizer, tmp_path):
    """`_compute_loss` with every new option set equals the formula on an independent forward pass (dr_grpo)."""
    opts = dict(off_policy_shaping="pow", off_policy_shaping_exponent=0.7, off_policy_max_clip=0.6,
                off_policy_min_clip=0.05, max_token_prob=0.2, on_policy_shaping="luffy", on_policy_shaping_gamma=0.5,
                on_policy_clip=True, entropy_coef=0.0)
    trainer = make_trainer(tokenizer, tmp_path, loss_type="dr_grpo", **opts)
    model = trainer.model
    inputs = make_inputs(len(tokenizer))
    with torch.no_grad():
        old, _ = independent_logps(model, inputs)
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    got_grads = grads_of(model, trainer._compute_loss(model, inputs))

    logps, _ = independent_logps(model, inputs)
    mask = inputs["completion_mask"].float()
    a = inputs["advantages"].view(-1, 1)
    off = inputs["is_off_policy"].view(-1, 1)
    p = logps.exp()
    f = torch.exp(0.7 * logps).clamp(0.05, 0.6)
    q = inputs["old_per_token_logps"].exp()
    r = (p / (p + 0.5)) / (q / (q + 0.5))
    on = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    token = torch.where(off, -a * f, on) * (p.detach() <= 0.2)
    expected = (token * mask).sum() / (B * trainer.max_completion_length)
    expected_grads = grads_of(model, expected)
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-8, msg=name)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    kept = (p.detach() <= 0.2).float()
    assert metrics["dropped_token_fraction"] == pytest.approx(1 - (kept * mask).sum().item() / mask.sum().item())
    assert {"off_policy/max_clip_fraction", "off_policy/min_clip_fraction"} <= metrics.keys()
