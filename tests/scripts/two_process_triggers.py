"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_guidance_distributed.py.

Two short runs whose groups straddle the two processes (3 rows per process and step, GA 2: 6 local rows, 12 global
rows = 3 groups of 4; the middle group is rows 4-5 of rank 0 and rows 0-1 of rank 1):

* `trigger`: `off_policy_trigger="all_fail"`, one teacher slot (slot 3, on rank 1 for the middle group). Rewards are
  fixed per global row and generation batch, so a decision on rank 1 depends on samples scored on rank 0.
* `share`: three teacher slots (slot 1 on rank 0, slots 2-3 on rank 1 for the middle group), three traces per
  prompt chosen at random, and half of the groups get teacher traces (`group_share` schedule): the processes must
  agree on both draws without communicating.

Each process records, per generation batch, what its reward function saw and its slice of the output.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch.distributed as dist  # noqa: E402
from conftest import (  # noqa: E402
    build_model,
    build_tokenizer,
    math_dataset,
    shut_down_processes,
    tiny_args,
    train_recording_batches,
)

from luffy_trl import MixedPolicyGRPOTrainer  # noqa: E402

out_dir = sys.argv[1]
G, LOCAL = 4, 6
# On-policy reward per (generation batch, global row). Batch 0: the middle group's only success is on rank 0
# (slot 0), so rank 1's teacher must stay out; batch 1: the middle group fails everywhere, so it takes part.
ON_POLICY = {
    0: [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0],
    1: [0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
}


def run(name, dataset, **overrides):
    records = []

    def reward(completions, is_off_policy, prompts, **kwargs):
        rank = dist.get_rank()
        batch = len(records)
        rows = range(rank * LOCAL, (rank + 1) * LOCAL)
        values = [1.0 if off else float(ON_POLICY[batch % 2][r]) for r, off in zip(rows, is_off_policy)]
        records.append({"prompts": [p[-1]["content"] for p in prompts], "flags": list(is_off_policy),
                        "rewards": values, "texts": [c[0]["content"] for c in completions]})
        return values

    tokenizer = build_tokenizer()
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=reward,
        args=tiny_args(os.path.join(out_dir, name), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                       num_generations=G, max_completion_length=40, **{"max_steps": 2, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    train_recording_batches(trainer, records, os.path.join(out_dir, name + "_rank{}.json"))


run("trigger", math_dataset(), off_policy_trigger="all_fail")

dataset = math_dataset()
traces = [[f"<think>\nway {j}: {i} + {i + 1}\n</think>\nThe answer is \\boxed{{{2 * i + 1}}}." for j in range(3)]
          for i in range(len(dataset))]
dataset = dataset.remove_columns("target").add_column("target", traces)
run("share", dataset, num_off_policy=3, off_policy_trace_selection="random", off_policy_schedule_target="group_share",
    off_policy_schedule_start=0.5, max_steps=4)
shut_down_processes()
