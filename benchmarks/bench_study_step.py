"""Where a step of the real-model study goes, and how to spend 2 cores on it (examples/real_model_study.py).

One optimiser step of a study arm (SmolLM2-135M-Instruct + LoRA, 2 prompts × 8, completions ≤ 64 tokens), timed
by phase: generation (`_generate`), the training forward (`_get_per_token_logps_and_entropies` inside the loss),
the loss with its term-gradient diagnostic (`compute_loss`) and the whole `training_step` (forward, loss,
backward). Three layouts, each in fresh processes, `--steps` steps after one warm-up step:

- `alone_2threads`: one process, 2 torch threads, the term-gradient norms off;
- `alone_2threads_term_norms`: the same with `log_loss_term_grad_norms` on every step (two extra backward passes);
- `pair_1thread`: two processes at once (LUFFY and GRPO), one thread each: the study's `run --workers 2`.

    python benchmarks/bench_study_step.py --steps 2     # about 8 minutes on 2 cores; run it with nothing else

Writes benchmarks/results/bench_study_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
PHASES = ("_generate", "_get_per_token_logps_and_entropies", "compute_loss", "training_step")


def child(arm: str, steps: int, term_norms: bool, output_dir: str) -> dict:
    """In a fresh process: build the study's arm, wrap the phases with timers, train 1 + `steps` steps."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    import real_model_study as study

    from luffy_trl.threads import configure_cpu_threads

    configure_cpu_threads()
    import torch

    extra = ["--max_steps", str(steps + 1), "--log_loss_term_grad_norms", str(term_norms).lower(),
             "--loss_term_grad_norms_steps", "1"]
    trainer = study.build(arm, 3e-4, 0, pathlib.Path(output_dir), study.datasets("a"), study.PROTOCOL, extra)
    times = {name: [] for name in PHASES}
    for name in PHASES:
        method = getattr(trainer, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            start = time.perf_counter()
            out = _method(*args, **kwargs)
            times[_name].append(time.perf_counter() - start)
            return out

        setattr(trainer, name, timed)
    trainer.train()
    # Per step, the first (warm-up) step left out; the training forward runs once per micro-batch.
    return {"arm": arm, "threads": torch.get_num_threads(), "term_norms": term_norms,
            **{name: statistics.mean(values[1:]) for name, values in times.items() if len(values) > 1}}


def launch(arm: str, steps: int, threads: int, term_norms: bool, workdir: str) -> subprocess.Popen:
    env = {**os.environ, "LUFFY_TRL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    out = pathlib.Path(workdir) / f"{arm}-{threads}-{term_norms}.json"
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_study_step as b; "
            f"json.dump(b.child({arm!r}, {steps}, {term_norms}, {workdir!r} + '/run'), open({str(out)!r}, 'w'))")
    log = open(out.with_suffix(".log"), "w")
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    process.result_path = out
    return process


def collect(processes) -> list[dict]:
    results = []
    for process in processes:
        if process.wait() != 0:
            tail = process.result_path.with_suffix(".log").read_text()[-3000:]
            raise SystemExit(f"a timed run failed (exit {process.returncode}):\n{tail}")
        results.append(json.loads(process.result_path.read_text()))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run, after one warm-up step")
    known = parser.parse_args(argv)
    layouts = {}
    with tempfile.TemporaryDirectory() as workdir:
        layouts["alone_2threads"] = collect([launch("luffy", known.steps, 2, False, workdir)])
        layouts["alone_2threads_term_norms"] = collect([launch("luffy", known.steps, 2, True, workdir)])
        layouts["pair_1thread"] = collect([launch("luffy", known.steps, 1, False, workdir),
                                           launch("grpo", known.steps, 1, False, workdir)])
    lines = ["| layout | arm | threads | generation s | training forward s | loss s | step s | steps/hour, machine |",
             "|---|---|---|---|---|---|---|---|"]
    for layout, runs in layouts.items():
        per_hour = sum(3600 / run["training_step"] for run in runs)
        for run in runs:
            lines.append(f"| {layout} | {run['arm']} | {run['threads']} | {run['_generate']:.1f} | "
                         f"{run['_get_per_token_logps_and_entropies']:.1f} | {run['compute_loss']:.1f} | "
                         f"{run['training_step']:.1f} | {per_hour:.0f} |")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_study_step.json").write_text(json.dumps({"steps": known.steps, "layouts": layouts}, indent=2))


if __name__ == "__main__":
    main()
