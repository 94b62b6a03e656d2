"""`_compute_loss` of MixedPolicyGRPOTrainer vs GRPOTrainer on the same batch: time and peak memory.

    python benchmarks/bench_loss.py                          # CPU: toy model, 16 rows x 64 completion tokens
    python benchmarks/bench_loss.py --preset gpu --batch 16 --completion 1024   # Qwen2-0.5B-sized, bf16, CUDA

Both losses run on the same trainer object, model and inputs (stock: `GRPOTrainer._compute_loss` without the
`is_off_policy` key; LUFFY: with `--teachers` teacher rows per group of 8, as long as the sampled rows). Each
measurement is the loss *and* its backward pass (the peak is in the backward pass). Prints, for `--reps` alternating
repetitions, the median time over `--calls` calls and the peak tensor memory of one call (CUDA:
`max_memory_allocated`; CPU: torch's memory profiler), and the median/min/max of the LUFFY / stock ratios.
Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json

from common import PRESETS, Timer, bench_model, device, peak_memory, ratio_summary

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.toy import toy_math_dataset, toy_tokenizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default: gpu on CUDA, else cpu)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--teachers", type=int, default=1, help="teacher rows per group of 8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=None, help="timed calls per repetition (CPU 30, GPU 10)")
    args = parser.parse_args(argv)
    on_gpu = device().type == "cuda"
    preset = PRESETS[args.preset or ("gpu" if on_gpu else "cpu")]
    calls = args.calls or (10 if on_gpu else 30)

    tokenizer = toy_tokenizer()
    config = MixedPolicyGRPOConfig(output_dir="/tmp/luffy-bench-loss", use_cpu=not on_gpu,
                                   bf16=preset["dtype"] == "bfloat16", gradient_checkpointing=False,
                                   per_device_train_batch_size=8, num_generations=8,
                                   max_completion_length=args.completion, report_to="none")
    model = bench_model(tokenizer, **preset).to(device())
    trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                     args=config, train_dataset=toy_math_dataset(), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    b, p, c = args.batch, args.prompt, args.completion
    vocab = min(len(tokenizer), model.config.vocab_size)
    inputs = {
        "prompt_ids": torch.randint(3, vocab, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (b, c), generator=g),
        "completion_mask": torch.ones(b, c, dtype=torch.long),
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": torch.tensor(b * c),
        "is_off_policy": torch.tensor([i % 8 >= 8 - args.teachers for i in range(b)]),
    }
    inputs = {k: v.to(device()) for k, v in inputs.items()}
    stock_inputs = {k: v for k, v in inputs.items() if k != "is_off_policy"}

    def stock():
        GRPOTrainer._compute_loss(trainer, trainer.model, stock_inputs).backward()

    def luffy():
        trainer._compute_loss(trainer.model, inputs).backward()

    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {b} rows x ({p} prompt + {c} completion) tokens, vocabulary {model.config.vocab_size}, "
          f"{args.teachers} teacher row(s) per 8")
    ratios = {"time": [], "peak_memory": []}
    arms = {"stock": stock, "luffy": luffy}
    for fn in arms.values():
        fn()  # warm-up; allocates the gradients, which stay allocated (zeroed): the peak is the call's own
    trainer.model.zero_grad(set_to_none=False)
    for rep in range(args.reps):
        order = ("stock", "luffy") if rep % 2 == 0 else ("luffy", "stock")
        measured = {arm: {} for arm in arms}
        for arm in order:
            with peak_memory() as memory:
                arms[arm]()
            measured[arm]["peak_memory"] = memory["bytes"]
        timers = {arm: Timer() for arm in arms}
        for _ in range(calls):  # interleaved call by call, so that drift hits both arms alike
            for arm in order:
                with timers[arm]:
                    arms[arm]()
        trainer.model.zero_grad(set_to_none=False)
        for arm in arms:
            measured[arm]["time"] = timers[arm].median()
        for key in ratios:
            ratios[key].append(measured["luffy"][key] / measured["stock"][key])
        st, lf = measured["stock"], measured["luffy"]
        print(f"rep {rep}: stock {st['time'] * 1e3:.2f} ms / {st['peak_memory'] / 2**20:.1f} MiB, "
              f"luffy {lf['time'] * 1e3:.2f} ms / {lf['peak_memory'] / 2**20:.1f} MiB, "
              f"ratio time {ratios['time'][-1]:.3f} memory {ratios['peak_memory'][-1]:.4f}")
    summary = {"device": name, "batch": b, "completion": c, "vocab": model.config.vocab_size,
               "time_ratio": ratio_summary(ratios["time"]), "peak_memory_ratio": ratio_summary(ratios["peak_memory"])}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
