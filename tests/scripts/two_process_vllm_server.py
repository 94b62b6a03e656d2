"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py.

Generation goes through TRL's own vLLM server-mode code (gather over processes, dedupe by position, broadcast, equal
slice per process) with a fake server on rank 0. Two batches: whole groups on each process (the server is asked for
G − k completions per prompt) and groups that straddle the two processes (every slot is generated). Each rank writes
what it saw; the test checks alignment and counts.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import (  # noqa: E402
    assert_server_completions_match_prompts,
    attach_fake_vllm_server,
    build_model,
    build_tokenizer,
    contains_answer_reward,
    math_dataset,
    shut_down_processes,
    tiny_args,
)

from luffy_trl import MixedPolicyGRPOTrainer  # noqa: E402

out_dir = sys.argv[1]
tokenizer = build_tokenizer()
dataset = math_dataset()
trainer = MixedPolicyGRPOTrainer(
    model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=dataset,
    processing_class=tokenizer, args=tiny_args(out_dir, max_completion_length=12, max_steps=1),
)
server = attach_fake_vllm_server(trainer)
rank = trainer.accelerator.process_index
result = {"world_size": trainer.accelerator.num_processes}
# Whole groups: rank r holds prompts 2r and 2r + 1, four rows each (G = 4, k = 1).
whole = [dataset[2 * rank + j] for j in range(2) for _ in range(4)]
# Straddling: 12 global rows = prompts 4, 5, 6 × 4; rank 0 holds rows 0-5, rank 1 rows 6-11 (prompt 5 on both).
global_rows = [dataset[4 + j] for j in range(3) for _ in range(4)]
straddle = global_rows[6 * rank : 6 * rank + 6]
for name, rows in (("whole", whole), ("straddle", straddle)):
    out = trainer._generate_and_score_completions(rows)
    assert_server_completions_match_prompts(out)
    result[name] = {
        "is_off_policy": out["is_off_policy"].tolist(),
        "sample_index": [c[1].item() - 3 for c in out["completion_ids"]],
        "discarded": trainer._metrics["train"]["off_policy/discarded_generations"][-1],
    }
result["server_calls"] = server.calls  # only rank 0 talks to the server
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
shut_down_processes()
