"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_live_teacher.py.

Six prompts, three without a trace (the teacher answers one of them wrongly); groups of 4 straddle the two processes
(3 rows per process per micro-batch, 2 micro-batches per generation). Each process records, per generation batch, the
prompts and teacher flags its reward function saw, and finally its live trace cache.
"""

import json
import os
import re
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
)

from luffy_trl import MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.evaluation.backends import Generation  # noqa: E402

out_dir = sys.argv[1]
records = []


class Teacher:
    name, tokenizer = "scripted", None

    def stream(self, requests, protocol):
        for request in requests:
            a, b = map(int, re.findall(r"\d+", request.problem.prompt[-1]["content"]))
            answer = a + b + (a == 4)  # "What is 4 + 5?" gets a wrong answer
            yield request, Generation(f"{a} + {b} = {answer}. The answer is \\boxed{{{answer}}}.", 9, False)


reward = recording_boxed_reward(records)


dataset = math_dataset(6).map(lambda row, i: {"target": [] if i in (1, 3, 4) else row["target"]}, with_indices=True)
tokenizer = build_tokenizer()
trainer = MixedPolicyGRPOTrainer(
    model=build_model(tokenizer), reward_funcs=reward, train_dataset=dataset, processing_class=tokenizer,
    args=tiny_args(out_dir, per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=4,
                   max_completion_length=32, max_steps=4, live_teacher_num_samples=1),
    live_teacher=Teacher(),
)
original = trainer._generate_and_score_completions


def generate(inputs):
    output = original(inputs)
    if trainer._live["client"] is not None:  # main process: let the teacher finish before the next batch
        assert trainer._live["client"].wait_idle(30)
    return output


trainer._generate_and_score_completions = generate
trainer.train()
with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
    json.dump({"records": records, "traces": trainer._live["traces"], "log": trainer.state.log_history}, f)
shut_down_processes()
