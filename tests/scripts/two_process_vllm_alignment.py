"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by tests/test_vllm_alignment.py.

Each case of `vllm_alignment_cases.CASES` is split in halves over the two processes and generated through TRL's own
vLLM code, in server mode (a fake server on rank 0) and in tensor-parallel colocate (a fake `LLM` on each rank, the
two processes forming one tensor-parallel group). A desynchronised collective shows up as a wrong completion, a
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
from vllm_alignment_cases import CASES, MODES, build_trainers, engine_calls, global_rows, run_case  # noqa: E402

out_dir = sys.argv[1]
tokenizer = build_tokenizer()
rank = None
result = {}
for mode in MODES:
    trainers = build_trainers(tokenizer, out_dir, mode)
    result[mode] = {}
    for case in CASES:
        trainer, rows = global_rows(trainers, case)
        rank, half = trainer.accelerator.process_index, len(rows) // 2
        result[mode][case] = run_case(trainer, rows[rank * half : (rank + 1) * half])
    result[mode]["engine_calls"] = {name: engine_calls(t) for name, (t, _) in trainers.items()}
result["world_size"] = trainer.accelerator.num_processes
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
shut_down_processes()
