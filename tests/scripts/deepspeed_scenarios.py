"""Run the scenarios of `tests/deepspeed_cases.py` named in argv[2] (comma-separated) in one launch: two processes
under `accelerate launch` with a DeepSpeed config (DS_ACCELERATOR=cpu) or under torchrun (DDP); by
tests/test_deepspeed.py. DeepSpeed start-up is the expensive part, so one launch runs several scenarios.

Each process writes `<out_dir>/<scenario>_rank<r>.json`. A hang (a collective one process skips) is turned into a
traceback and exit by faulthandler, restarted for every scenario, before the test's own timeout.
"""

import faulthandler
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deepspeed_cases as cases  # noqa: E402
from conftest import shut_down_processes  # noqa: E402

HANG_SECONDS = int(os.environ.get("LUFFY_TEST_HANG_SECONDS", "150"))

out_dir, names = sys.argv[1], sys.argv[2].split(",")
for name in names:
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    started = time.perf_counter()
    scenario, _, arg = name.partition(":")
    result = getattr(cases, scenario)(out_dir, *([arg] if arg else []))
    result["seconds"] = time.perf_counter() - started
    result["world_size"] = cases.world()[1]
    cases.write_json(out_dir, name.replace(":", "_"), result)
    print(f"scenario {name}: {result['seconds']:.1f} s", flush=True)
faulthandler.cancel_dump_traceback_later()
shut_down_processes()
