"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_batching_trainer.py.

Each process holds 3 rows per micro-step (groups of 4 straddle the processes), LUFFY's geometry spg = 2·GA (old
log-probs computed), completions cut to row-dependent lengths that differ between the ranks (so that they plan
different numbers of no-grad forwards). For grpo, dr_grpo and dapo each process records the largest
relative difference between its optimiser-step gradients with `padding_free_batches` on and off, and the number of
no-grad forwards it ran (ZeRO-3 needs the same count on every process). Then two real training steps with the
switch on (DDP, different row counts per process) must change the parameters.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch
import torch.distributed as dist
from batching_cases import cache_generation, cut_lengths, make_trainer, step_gradients
from conftest import build_tokenizer, shut_down_processes
from trl import GRPOTrainer

from luffy_trl.trainer import micro_batches as trainer_batching

out_dir = sys.argv[1]
forwards = {"count": 0}
original = GRPOTrainer._get_per_token_logps_and_entropies


def counting(self, *args, **kwargs):
    if not torch.is_grad_enabled():
        forwards["count"] += 1
    return original(self, *args, **kwargs)


GRPOTrainer._get_per_token_logps_and_entropies = counting
planned = []
original_pack = trainer_batching.pack_forwards


def recording_pack(*args, **kwargs):
    batches = original_pack(*args, **kwargs)
    planned.append(len(batches))
    return batches


trainer_batching.pack_forwards = recording_pack
# LUFFY_TEST_PACK=1: the same with `pack_sequences="always"` (one packed sequence per forward). Packed forwards call
# the model directly, so they are counted here; the dummies that equalise the count still go through TRL's method.
PACK = os.environ.get("LUFFY_TEST_PACK") == "1"
original_packed = trainer_batching.PaddingFreeBatchingMixin._packed_forward
original_bins = trainer_batching.pack_rows


def counting_packed(self, *args, **kwargs):
    if not torch.is_grad_enabled():
        forwards["count"] += 1
    return original_packed(self, *args, **kwargs)


def recording_bins(*args, **kwargs):
    bins = original_bins(*args, **kwargs)
    planned.append(len(bins))
    return bins


trainer_batching.PaddingFreeBatchingMixin._packed_forward = counting_packed
trainer_batching.pack_rows = recording_bins
tokenizer = build_tokenizer()
# Rank 0: completions as generated (up to 48 tokens); rank 1: most rows cut to 1 token, a few long ones setting its
# padded width. Rank 1 packs its old-log-prob rows into fewer forwards than rank 0 and must run dummies to match
# (the test checks that the planned counts differ).
LENGTHS = [48] if os.environ["RANK"] == "0" else [1, 48, 1, 1, 1, 48, 1, 1, 48, 1, 1]
common = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, steps_per_generation=4,
              num_generations=4, max_completion_length=48, entropy_coef=0.0, off_policy_trigger="all_fail",
              pack_sequences="always" if PACK else "never")
trainer = make_trainer(tokenizer, os.path.join(out_dir, "grads"), **common)
cut_lengths(trainer, LENGTHS)
result = {"rank": dist.get_rank(), "relative_difference": {}, "rows": {}, "packed": PACK}
batch = next(iter(trainer.get_train_dataloader()))
trainer.args.padding_free_batches = True
torch.manual_seed(0)
forwards["count"] = 0
type(trainer)._generate_and_score_completions(trainer, batch)
result["nograd_forwards"] = forwards["count"]
result["planned_forwards"] = list(planned)  # before dummies
cache_generation(trainer)
for loss_type in ("grpo", "dr_grpo", "dapo"):
    trainer.args.loss_type = trainer.loss_type = loss_type
    on, chunks = step_gradients(trainer, True)
    off, _ = step_gradients(trainer, False)
    worst = 0.0
    for a, b in zip(on, off):
        norm = sum(float(g.norm() ** 2) for g in b.values()) ** 0.5
        worst = max(worst, max(float((a[n] - b[n]).norm()) for n in a) / norm)
    result["relative_difference"][loss_type] = worst
    result["rows"][loss_type] = [c["completion_ids"].size(0) for c in chunks]

trainer = make_trainer(tokenizer, os.path.join(out_dir, "train"), max_steps=2, learning_rate=0.05,
                       **{**common, "loss_type": "dapo"})
cut_lengths(trainer, LENGTHS)
before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
trainer.train()
result["changed"] = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
result["ratios"] = [entry["batching/padding_ratio"] for entry in trainer.state.log_history
                    if "batching/padding_ratio" in entry]
result["fallbacks"] = trainer._packing_fallbacks
with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(result, f)
shut_down_processes()
