"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_vllm_alignment.py.

Each case of `vllm_alignment_cases.CASES` is split in halves over the two processes and generated through TRL's own
vLLM server-mode code with a fake server on rank 0. A desynchronised collective shows up as a wrong completion, a
crash or a hang; the hang is turned into a traceback and exit by faulthandler before the test's own timeout.
"""

import faulthandler
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
faulthandler.dump_traceback_later(int(os.environ.get("LUFFY_TEST_HANG_SECONDS", "150")), exit=True)

from conftest import build_tokenizer, shut_down_processes  # noqa: E402
from vllm_alignment_cases import CASES, build_trainers, global_rows, run_case  # noqa: E402

out_dir = sys.argv[1]
trainers = build_trainers(build_tokenizer(), out_dir)
rank = None
result = {}
for case in CASES:
    trainer, rows = global_rows(trainers, case)
    rank, half = trainer.accelerator.process_index, len(rows) // 2
    result[case] = run_case(trainer, rows[rank * half : (rank + 1) * half])
result["world_size"] = trainer.accelerator.num_processes
result["server_calls"] = {name: t.vllm_generation.vllm_client.calls for name, (t, _) in trainers.items()}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
shut_down_processes()
