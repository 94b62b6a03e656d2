"""How much of a live teacher's latency the training loop pays: `MixedPolicyGRPOTrainer` with `live_teacher_url`
pointing at the local fake OpenAI-compatible server (which sleeps `--latency` seconds per request), against the same
run without a live teacher.

    python benchmarks/bench_live_teacher.py [--latency 2.0] [--steps 8] [--out results.jsonl]

The toy model never solves the toy problems and no row has a trace, so every group asks (`live_teacher_when:
missing`, one prompt per group). Reported: mean step time of both runs, the time the training loop spent on the live
teacher (`live_teacher/wait_seconds`, summed), the teacher's mean latency per prompt (`live_teacher/latency_seconds`,
hidden in the background thread), and what synchronous requests would have cost (latency × groups per batch /
concurrency, rounded up, per batch). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.toy import (  # noqa: E402
    boxed_answer_reward,
    toy_math_dataset,
    toy_model,
    toy_tokenizer,
)
from luffy_trl.traces.fake_server import FakeOpenAIServer  # noqa: E402


def run(tokenizer, dataset, steps: int, output_dir: str, **live) -> list[dict]:
    args = MixedPolicyGRPOConfig(output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=8,
                                 num_generations=4, max_completion_length=32, max_steps=steps, learning_rate=1e-3,
                                 report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                 **live)
    trainer = MixedPolicyGRPOTrainer(model=toy_model(tokenizer), reward_funcs=boxed_answer_reward,
                                     train_dataset=dataset, processing_class=tokenizer, args=args)
    trainer.train()
    return [h for h in trainer.state.log_history if "step_time" in h]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tokenizer = toy_tokenizer()
    dataset = toy_math_dataset(64).map(lambda row: {"target": []})

    def answer(prompt):
        a, b = map(int, re.findall(r"\d+", prompt)[:2])
        return f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."

    with tempfile.TemporaryDirectory() as tmp:
        base = run(tokenizer, dataset, args.steps, f"{tmp}/base")
        with FakeOpenAIServer(answer, latency=args.latency) as server:
            live = run(tokenizer, dataset, args.steps, f"{tmp}/live", live_teacher_url=server.base_url,
                       live_teacher_model="fake", live_teacher_when="missing", live_teacher_num_samples=1,
                       live_teacher_concurrency=args.concurrency)
    groups = 8 // 4
    arrived = [h for h in live if h["live_teacher/arrived"] > 0]
    result = {
        "latency_s": args.latency, "steps": args.steps, "concurrency": args.concurrency,
        "step_time_without_s": round(sum(h["step_time"] for h in base) / len(base), 3),
        "step_time_with_s": round(sum(h["step_time"] for h in live) / len(live), 3),
        "wait_seconds_total": round(sum(h["live_teacher/wait_seconds"] for h in live), 4),
        "teacher_latency_mean_s": round(sum(h["live_teacher/latency_seconds"] for h in arrived) / len(arrived), 3)
        if arrived else None,
        "requested": sum(h["live_teacher/requested"] for h in live),
        "arrived": sum(h["live_teacher/arrived"] for h in live),
        "synchronous_cost_per_batch_s": args.latency * math.ceil(groups / args.concurrency),
        "load": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
