"""`luffy_trl.objectives` (TRL's on-policy terms as pure functions) and their use with teacher rows in
`mixed_policy_per_token_loss`, against independent computations."""

import math

import pytest
import torch
from trl import GRPOTrainer

from luffy_trl.losses import aggregate_loss, mixed_policy_per_token_loss
from luffy_trl.objectives import log_importance_weights, on_policy_term, sequence_mean, vespo_gamma_weights


def batch(seed=0, rows=4, tokens=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(rows, tokens, generator=g) * 3).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(rows, tokens, generator=g)
    mask = torch.ones(rows, tokens)
    mask[1, 3:] = 0
    a = torch.tensor([[1.0], [-0.5], [0.25], [-1.0]])
    return logps, old, mask, a


def test_sequence_level_log_weight_is_the_masked_row_mean():
    _, old, mask, _ = batch()
    x = old.clone()
    got = log_importance_weights(x, mask, "sequence")
    assert got.shape == (4, 1)
    assert got[1, 0].item() == pytest.approx(x[1, :3].mean().item())
    assert torch.equal(log_importance_weights(x, mask, "token"), x)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(x, mask, "row")


@pytest.mark.parametrize("with_is_ratio", [False, True])
def test_vespo_weights_match_the_closed_form_and_trls(with_is_ratio):
    logps, old, mask, a = batch()
    log_ratio = (logps - old).detach()
    is_ratio = torch.rand(4, 5, generator=torch.Generator().manual_seed(2)) + 0.5 if with_is_ratio else None
    got = vespo_gamma_weights(a, log_ratio, mask, is_ratio)
    log_w = (log_ratio * mask).sum(1, keepdim=True)
    if with_is_ratio:
        log_w = log_w + is_ratio.log().sum(1, keepdim=True)
    w = log_w.exp()
    k = torch.where(a >= 0, 2.0, 3.0)
    lam = torch.where(a >= 0, 3.0, 2.0)
    expected = math.e**lam * w**k * torch.exp(-lam * w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    trl = GRPOTrainer.get_gamma_weights(a, log_ratio, mask, is_ratio)
    torch.testing.assert_close(got, trl)
    one = vespo_gamma_weights(a, torch.zeros(4, 5), mask)
    torch.testing.assert_close(one, torch.ones(4, 1))


def test_cispo_and_sapo_terms_and_their_gradients():
    logps, old, mask, a = batch()
    r = torch.exp(logps - old)
    cispo = on_policy_term("cispo", r, a, logps, epsilon_high=1.1)
    weight = torch.clamp(r, max=1.1).detach()
    torch.testing.assert_close(cispo.per_token_loss, -weight * a * logps)
    assert torch.equal(cispo.is_high_clipped, (r > 1.1) & (a > 0)) and cispo.is_high_clipped.any()
    (grad,) = torch.autograd.grad(cispo.per_token_loss.sum(), logps)
    torch.testing.assert_close(grad, (-weight * a).expand_as(grad))  # a weighted log-likelihood gradient

    sapo = on_policy_term("sapo", r, a, logps, sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
    tau = torch.where(a > 0, 1.0, 2.0)
    torch.testing.assert_close(sapo.per_token_loss, -4 / tau * torch.sigmoid(tau * (r - 1)) * a)
    (grad,) = torch.autograd.grad(sapo.per_token_loss.sum(), logps)
    s = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(grad, (-4 * s * (1 - s) * r * a).detach())  # d/dlogp of −4/τ σ(τ(r−1)) A


def test_ppo_family_clip_and_delta():
    logps, old, mask, a = batch()
    r = torch.exp(logps - old)
    term = on_policy_term("luspo", r, a, logps, clip=True, epsilon_low=0.2, epsilon_high=0.28, delta=1.5)
    capped = torch.clamp(r, max=1.5)
    expected = -torch.min(capped * a, torch.clamp(r, 0.8, 1.28) * a)
    torch.testing.assert_close(term.per_token_loss, expected)
    assert torch.equal(term.is_low_clipped, (capped < 0.8) & (a < 0))
    unclipped = on_policy_term("grpo", r, a, logps, clip=False)
    torch.testing.assert_close(unclipped.per_token_loss, -r * a)
    with pytest.raises(ValueError, match="delta"):
        on_policy_term("grpo", r, a, logps, clip=False, delta=1.5)
    with pytest.raises(ValueError, match="loss_type"):
        on_policy_term("gspo", r, a, logps)


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo", "vespo", "luspo"])
def test_sequence_level_teacher_term_is_f_of_the_geometric_mean_ratio(loss_type):
    """GSPO + teacher rows: −A·f(s) with s = exp(mean_t(logp − logp_φ)), π_φ = 1 where the teacher's log-probs are
    unknown (s is then the geometric-mean probability); its gradient spreads f'(s)·s/|y| evenly over the row."""
    logps, old, mask, a = batch()
    off = torch.tensor([True, True, False, False])
    teacher = torch.zeros(4, 5)
    teacher[1] = -0.7  # a teacher with known log-probs on row 1
    out = mixed_policy_per_token_loss(logps, old, a, off, shaping="luffy", gamma=0.1, clip=True, loss_type=loss_type,
                                      importance_sampling_level="sequence", mask=mask,
                                      teacher_per_token_logps=teacher)
    s = torch.exp(((logps - teacher) * mask).sum(1) / mask.sum(1))
    for row in (0, 1):
        expected = -a[row, 0] * s[row] / (s[row] + 0.1)
        values = out.per_token_loss[row].expand(5) if out.per_token_loss.size(1) == 1 else out.per_token_loss[row]
        assert values[0].item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.allclose(values, values[0])
    (grad,) = torch.autograd.grad((out.per_token_loss.expand(4, 5) * mask)[:2].sum(), logps)
    n = mask.sum(1)
    for row in (0, 1):  # d/dlogp_t of −A f(s) summed over the row's n tokens: −A·n·f'(s)·s/n on each masked token
        weight = -a[row, 0] * 0.1 * s[row] / (s[row] + 0.1) ** 2
        assert grad[row, : int(n[row])].tolist() == pytest.approx([weight.item()] * int(n[row]), rel=1e-5)


def test_sequence_level_rows_aggregate_like_tokens_repeated():
    """A (B, 1) sequence-level loss aggregates as if its value sat on every masked token of the row."""
    _, _, mask, _ = batch()
    per_row = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    for loss_type in ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo", "luffy"):
        a = aggregate_loss(per_row, mask, loss_type, max_completion_length=5, num_items_in_batch=mask.sum())
        b = aggregate_loss(per_row.expand(4, 5), mask, loss_type, max_completion_length=5,
                           num_items_in_batch=mask.sum())
        assert a.item() == pytest.approx(b.item()), loss_type
    assert aggregate_loss(per_row, mask, "luspo").item() == pytest.approx((5 + 6 + 15 + 20) / 4)
    assert aggregate_loss(per_row, mask, "luspo", nominal_rows=8).item() == pytest.approx((5 + 6 + 15 + 20) / 8)


def test_sequence_mean_of_an_empty_row_is_zero():
    assert sequence_mean(torch.ones(2, 3), torch.tensor([[1.0, 1, 0], [0, 0, 0]])).squeeze(1).tolist() == [1.0, 0.0]
