"""One torch thread against two for a CPU run, on an idle machine and beside one busy process.

Why luffy-trl's commands default to one thread on a machine without a GPU (`luffy_trl.threads`): with torch's
default of one OpenMP thread per core, a parallel region waits for every thread, and when another process holds a
core the waiting threads spin. Each arm runs the README's demo command for a few steps in a fresh process
(`luffy-trl train --config demo_cpu --max_steps N`, no held-out evaluation) with `LUFFY_TRL_NUM_THREADS` set, and
reads the trainer's own `train_runtime` (model building and imports excluded). The "busy" arms start one pure-Python
busy loop (one core) first and stop it after. Arms alternate within each repetition.

    python benchmarks/bench_threads.py --steps 20 --reps 2      # about 4 minutes on 2 cores

Writes benchmarks/results/bench_threads.json and prints a table. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BUSY_LOOP = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def run_arm(threads: int, busy: bool, steps: int, workdir: str) -> float:
    """Seconds per training step of the demo with `threads` torch threads (beside a busy process if `busy`)."""
    env = {**os.environ, "LUFFY_TRL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, "-m", "luffy_trl.cli", "train", "--config", "demo_cpu", "--max_steps", str(steps),
             "--demo_heldout_every", "0", "--logging_steps", str(steps), "--output_dir", workdir],
            env=env, capture_output=True, text=True, check=True,
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    match = re.search(r"'train_runtime': '?([0-9.]+)", out.stdout + out.stderr)
    if match is None:
        raise RuntimeError("no train_runtime in the output:\n" + (out.stdout + out.stderr)[-2000:])
    return float(match.group(1)) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    arms = [(threads, busy) for busy in (False, True) for threads in (1, 2)]
    times: dict[str, list[float]] = {f"{t} thread{'s' * (t > 1)}, {'busy' if b else 'idle'}": [] for t, b in arms}
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.reps):
            for (threads, busy), name in zip(arms, times):
                times[name].append(run_arm(threads, busy, args.steps, workdir))
                print(f"rep {rep + 1}: {name}: {times[name][-1]:.3f} s/step", flush=True)
    summary = {name: {"median_s_per_step": statistics.median(v), "runs": v} for name, v in times.items()}
    for load in ("idle", "busy"):
        one, two = summary[f"1 thread, {load}"], summary[f"2 threads, {load}"]
        summary[f"2 threads / 1 thread, {load}"] = two["median_s_per_step"] / one["median_s_per_step"]
    result = {"steps": args.steps, "reps": args.reps, "cpu_count": os.cpu_count(), "arms": summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_threads.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| arm | s / step (median) |\n|---|---|")
    for name, value in summary.items():
        shown = value["median_s_per_step"] if isinstance(value, dict) else value
        print(f"| {name} | {shown:.3f} |")
    return result


if __name__ == "__main__":
    main()
