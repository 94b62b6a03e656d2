"""`_compute_loss` of MixedPolicyGRPOTrainer vs GRPOTrainer on the same batch (forward pass + loss + metrics).

    python benchmarks/bench_loss.py [--batch 16 --completion 64 --hidden 64 --reps 5]

Both losses run on the same trainer object, model and inputs (stock: `GRPOTrainer._compute_loss` without the
`is_off_policy` key; LUFFY: with one teacher row per group of 8). Prints the median time of each over 60 calls for
`--reps` alternating repetitions and the median ratio. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.toy import toy_math_dataset, toy_model, toy_tokenizer  # noqa: E402


def median_time(fn, calls: int = 60) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)

    tokenizer = toy_tokenizer()
    config = MixedPolicyGRPOConfig(output_dir="/tmp/luffy-bench-loss", use_cpu=True, bf16=False,
                                   gradient_checkpointing=False, per_device_train_batch_size=8, num_generations=8,
                                   max_completion_length=args.completion, report_to="none")
    trainer = MixedPolicyGRPOTrainer(model=toy_model(tokenizer, hidden_size=args.hidden),
                                     reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                                     train_dataset=toy_math_dataset(), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    b, p, c = args.batch, args.prompt, args.completion
    inputs = {
        "prompt_ids": torch.randint(3, len(tokenizer), (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(3, len(tokenizer), (b, c), generator=g),
        "completion_mask": torch.ones(b, c, dtype=torch.long),
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": torch.tensor(b * c),
        "is_off_policy": torch.tensor([i % 8 == 7 for i in range(b)]),
    }
    stock_inputs = {k: v for k, v in inputs.items() if k != "is_off_policy"}
    ratios = []
    for rep in range(args.reps):
        stock = median_time(lambda: GRPOTrainer._compute_loss(trainer, trainer.model, stock_inputs))
        ours = median_time(lambda: trainer._compute_loss(trainer.model, inputs))
        ratios.append(ours / stock)
        print(f"rep {rep}: stock {stock * 1e3:.2f} ms, luffy {ours * 1e3:.2f} ms, ratio {ours / stock:.3f}")
    print(f"_compute_loss ratio (LUFFY / stock): median {statistics.median(ratios):.3f}, min {min(ratios):.3f}")


if __name__ == "__main__":
    main()
