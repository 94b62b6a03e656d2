"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py.

Each process records, for every generation batch, the prompts and `is_off_policy` flags its reward function saw
and the advantages of its slice; the test then checks the groups in TRL's global order.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import (  # noqa: E402
    build_model,
    build_tokenizer,
    math_dataset,
    recording_boxed_reward,
    shut_down_processes,
    tiny_args,
    train_recording_batches,
)

from luffy_trl import MixedPolicyGRPOTrainer  # noqa: E402

out_dir = sys.argv[1]
records = []


reward = recording_boxed_reward(records)


tokenizer = build_tokenizer()
trainer = MixedPolicyGRPOTrainer(
    model=build_model(tokenizer),
    reward_funcs=reward,
    args=tiny_args(out_dir, per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=4,
                   max_completion_length=40, max_steps=2),
    train_dataset=math_dataset(),
    processing_class=tokenizer,
)
train_recording_batches(trainer, records, os.path.join(out_dir, "rank{}.json"))
shut_down_processes()
