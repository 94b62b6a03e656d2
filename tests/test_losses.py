"""LUFFY's loss math against an independent, element-by-element computation in float64."""

import math

import pytest
import torch

from luffy_trl.losses import (
    SHAPING_FUNCTIONS,
    aggregate_loss,
    mixed_policy_per_token_loss,
    shaping_function,
    shaping_gradient_weight,
)

B, T = 5, 6


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (torch.rand(B, T, generator=g, dtype=torch.float64) * -4.0).requires_grad_(True)  # p in (0.018, 1]
    old = logps.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # ratios far from 1
    adv = torch.tensor([0.875, -0.125, -0.5, 1.0, -1.0], dtype=torch.float64)
    off = torch.tensor([True, False, True, False, False])
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    mask[4, 1:] = 0
    return logps, old, adv, off, mask


def reference_token_loss(logp, old, a, off, shaping, gamma, clip, eps_low, eps_high):
    """ℓ and dℓ/dlogp for one token, written from the formulas in luffy-method.md §3."""
    if off:
        p = math.exp(logp)
        if shaping == "luffy":
            return -a * p / (p + gamma), -a * gamma * p / (p + gamma) ** 2
        if shaping == "none":
            return -a * p, -a * p
        return -a * logp, -a
    r = math.exp(logp - old)
    if not clip:
        return -a * r, -a * r
    rc = min(max(r, 1 - eps_low), 1 + eps_high)
    unclipped, clipped = r * a, rc * a
    if unclipped <= clipped:  # min picks the unclipped term: gradient flows
        return -unclipped, -a * r
    return -clipped, 0.0


def reference_loss(logps, old, adv, off, mask, *, shaping, gamma, clip, loss_type, eps=(0.2, 0.28),
                   max_len=16, num_items=None, ga=1):
    losses = [[0.0] * T for _ in range(B)]
    grads = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                losses[b][t], grads[b][t] = reference_token_loss(
                    logps[b, t].item(), old[b, t].item(), adv[b].item(), bool(off[b]), shaping, gamma, clip, *eps
                )
    n_tok = [sum(int(mask[b, t]) for t in range(T)) for b in range(B)]
    if loss_type == "grpo":
        scale = [[1 / (B * n_tok[b] * ga)] * T for b in range(B)]
    elif loss_type == "bnpo":
        scale = [[1 / (sum(n_tok) * ga)] * T for b in range(B)]
    elif loss_type == "dr_grpo":
        scale = [[1 / (B * max_len * ga)] * T for b in range(B)]
    else:  # dapo with one process and steps_per_generation == ga
        scale = [[1 / num_items] * T for b in range(B)]
    loss = sum(losses[b][t] * scale[b][t] for b in range(B) for t in range(T))
    grad = torch.tensor([[grads[b][t] * scale[b][t] for t in range(T)] for b in range(B)], dtype=torch.float64)
    return loss, grad


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("shaping,gamma", [("luffy", 0.1), ("luffy", 0.3), ("none", 0.1), ("logp", 0.1)])
def test_loss_and_gradient_match_reference(loss_type, clip, shaping, gamma):
    logps, old, adv, off, mask = make_batch()
    ga = 2
    num_items = mask.sum()
    out = mixed_policy_per_token_loss(
        logps, old, adv, off, shaping=shaping, gamma=gamma, clip=clip, epsilon_low=0.2, epsilon_high=0.28
    )
    loss = aggregate_loss(
        out.per_token_loss, mask, loss_type, max_completion_length=16, num_items_in_batch=num_items,
        gradient_accumulation_steps=ga, steps_per_generation=ga,
    )
    loss.backward()
    expected_loss, expected_grad = reference_loss(
        logps, old, adv, off, mask, shaping=shaping, gamma=gamma, clip=clip, loss_type=loss_type,
        num_items=num_items.item(), ga=ga,
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(logps.grad, expected_grad, rtol=1e-9, atol=1e-12)
    if clip:  # the batch is built so that clipping happens on some on-policy tokens: the test can tell clip on/off
        assert (out.is_low_clipped | out.is_high_clipped).any()
        assert not (out.is_low_clipped | out.is_high_clipped)[off].any()


def test_off_policy_tokens_ignore_old_logps_and_are_never_clipped():
    logps, old, adv, off, mask = make_batch()
    a = mixed_policy_per_token_loss(logps, old, adv, off, clip=True)
    b = mixed_policy_per_token_loss(logps, old + 5.0, adv, off, clip=True)  # huge ratio change
    torch.testing.assert_close(a.per_token_loss[off], b.per_token_loss[off])
    assert torch.all(a.ratio[off] == 1.0)
    # π_φ = 1: the teacher-token loss is exactly −A·p/(p+γ)
    p = logps.detach().exp()
    torch.testing.assert_close(a.per_token_loss[off].detach(), (-adv.view(-1, 1) * p / (p + 0.1))[off])


def test_gradient_is_finite_when_teacher_tokens_have_extreme_ratios():
    logps, old, adv, off, mask = make_batch()
    old = old.clone()
    old[off] = -1e4  # would be exp(+1e4) = inf in the (unused) on-policy branch
    out = mixed_policy_per_token_loss(logps, old, adv, off)
    aggregate_loss(out.per_token_loss, mask, "bnpo").backward()
    assert torch.isfinite(logps.grad).all()


def test_no_off_policy_rows_equals_grpo_clipped_objective():
    logps, old, adv, _, mask = make_batch()
    off = torch.zeros(B, dtype=torch.bool)
    out = mixed_policy_per_token_loss(logps, old, adv, off, clip=True, epsilon_low=0.2, epsilon_high=0.2)
    r = torch.exp(logps - old)
    a = adv.view(-1, 1)
    expected = -torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a)
    torch.testing.assert_close(out.per_token_loss, expected)


def test_delta_caps_the_on_policy_ratio_and_needs_clip():
    logps, old, adv, off, mask = make_batch()
    out = mixed_policy_per_token_loss(logps, old, adv, off, clip=True, delta=1.1)
    assert out.ratio.max() <= 1.1
    with pytest.raises(ValueError, match="delta"):
        mixed_policy_per_token_loss(logps, old, adv, off, clip=False, delta=1.1)


@pytest.mark.parametrize("shaping", SHAPING_FUNCTIONS)
def test_shaping_gradient_weight_is_the_derivative(shaping):
    logp = torch.linspace(-6, 0, 25, dtype=torch.float64, requires_grad=True)
    shaping_function(logp, shaping, 0.1).sum().backward()
    torch.testing.assert_close(logp.grad, shaping_gradient_weight(logp.detach().exp(), shaping, 0.1))


def test_shaping_weight_table_from_the_paper():
    # luffy-method.md §3.3: γp/(p+γ)² is 0.083 at p=0.01 and p=1, and 1/4 (its maximum) at p=γ=0.1.
    w = shaping_gradient_weight(torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.0826, 0.25, 0.0826], dtype=torch.float64), atol=1e-4, rtol=0)
    assert shaping_function(torch.tensor(0.0)).item() == pytest.approx(1 / 1.1)


def test_unknown_loss_type_and_shaping_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "gspo")
    with pytest.raises(ValueError, match="shaping"):
        shaping_function(torch.zeros(1), "sqrt")
