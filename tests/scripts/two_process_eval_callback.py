"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_evaluation.py.

A short training run with `LuffyEvalCallback` on 5 problems (split 3 + 2 between the processes); each process writes
the evaluation entries of its `state.log_history`.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import build_model, build_tokenizer, math_dataset, shut_down_processes, tiny_args  # noqa: E402

from luffy_trl import MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.evaluation.callback import LuffyEvalCallback  # noqa: E402
from luffy_trl.evaluation.protocols import LUFFY  # noqa: E402
from luffy_trl.evaluation.runner import Problem  # noqa: E402
from luffy_trl.toy import boxed_answer_reward  # noqa: E402

tokenizer = build_tokenizer()
trainer = MixedPolicyGRPOTrainer(
    model=build_model(tokenizer), reward_funcs=boxed_answer_reward, processing_class=tokenizer,
    args=tiny_args(sys.argv[1], per_device_train_batch_size=4, max_steps=2), train_dataset=math_dataset(),
)
problems = [Problem("toy", str(i), tuple(row["prompt"]), row["ground_truth"]) for i, row in enumerate(math_dataset(5))]
trainer.add_callback(LuffyEvalCallback(trainer, problems, eval_steps=1, batch_size=2,
                                       protocol=LUFFY.with_overrides(max_new_tokens=6, temperature=0.0)))
trainer.train()
entries = [h for h in trainer.state.log_history if any(k.startswith("eval_bench/") for k in h)]
with open(os.path.join(sys.argv[1], f"rank{trainer.accelerator.process_index}.json"), "w") as out:
    json.dump({"world_size": trainer.accelerator.num_processes, "entries": entries}, out)
shut_down_processes()
