"""`loss_type="luffy"`: LUFFY's per-process, per-optimiser-step loss Σ_k (Σ ℓ·m / max_len − coef · H̄_k), with no
division by rows or by the number K of micro-batches (here TRL's ordinary micro-batches, K = GA)."""

import pytest
import torch
from conftest import build_model, math_dataset, tiny_args
from transformers import TrainerCallback

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.losses import aggregate_loss


def test_luffy_normaliser_is_dr_grpo_times_rows_times_ga():
    g = torch.Generator().manual_seed(0)
    loss, mask = torch.randn(6, 9, generator=g, dtype=torch.float64), (torch.rand(6, 9, generator=g) > 0.3).double()
    luffy = aggregate_loss(loss, mask, "luffy", max_completion_length=16, gradient_accumulation_steps=4)
    assert luffy.item() == pytest.approx(((loss * mask).sum() / 16).item(), rel=1e-15)
    dr = aggregate_loss(loss, mask, "dr_grpo", max_completion_length=16, gradient_accumulation_steps=4)
    assert luffy.item() == pytest.approx(dr.item() * 6 * 4, rel=1e-12)


def reference_logps(model, batch):
    prompt_len = batch["prompt_ids"].size(1)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, prompt_len - 1 : -1].float()
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return logps, -(logp_all.exp() * logp_all).sum(-1)


class GradientAtStep(TrainerCallback):
    """Copies the accumulated gradient right before the optimiser step (before clipping)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ga", [1, 3])
def test_step_gradient_is_luffys_sum_over_micro_batches(tokenizer, tmp_path, ga):
    coef, max_len = 0.05, 12
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=lambda completions, **kw: [float(len(c[0]["content"]) % 3) / 2
                                                                            for c in completions],
        train_dataset=math_dataset(), processing_class=tokenizer,
        args=tiny_args(tmp_path, loss_type="luffy", entropy_coef=coef, max_completion_length=max_len, max_steps=1,
                       per_device_train_batch_size=4, gradient_accumulation_steps=ga, max_grad_norm=0.0,
                       learning_rate=1e-3),
    )
    micro_batches = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        micro_batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return compute(model, inputs)

    trainer._compute_loss = recording
    callback = GradientAtStep(trainer.model)
    trainer.add_callback(callback)
    reference = build_model(tokenizer)  # same seed: the parameters the step's gradient is taken at
    for (name, ours), (_, theirs) in zip(trainer.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    trainer.train()
    assert len(micro_batches) == ga  # K = gradient_accumulation_steps ordinary micro-batches
    assert any(b["is_off_policy"].any() for b in micro_batches)

    reference.train()
    total = 0.0
    for batch in micro_batches:  # LUFFY: Σ_k [Σ_tokens ℓ·m / max_len − coef · token-mean entropy of micro-batch k]
        assert "old_per_token_logps" not in batch  # one step per generation batch: ratio exactly 1
        logps, entropy = reference_logps(reference, batch)
        mask = batch["completion_mask"].float()
        a = batch["advantages"].view(-1, 1)
        p = logps.exp()
        on_policy = -a * torch.exp(logps - logps.detach())
        token = torch.where(batch["is_off_policy"].view(-1, 1), -a * p / (p + 0.1), on_policy)
        total = total + (token * mask).sum() / max_len - coef * (entropy * mask).sum() / mask.sum()
    reference.zero_grad()
    total.backward()
    expected = {n: q.grad for n, q in reference.named_parameters() if q.grad is not None}
    assert callback.grads.keys() == expected.keys()
    for name, grad in callback.grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
