"""Plot and tabulate `bench_step.py` JSON lines: where one step's time goes and the LUFFY / stock ratios.

    python benchmarks/plot_results.py benchmarks/results/*bench_step*.jsonl --out docs/images/bench_step.png

Prints one markdown table row per file (medians over repetitions, min-max in brackets) and writes the PNG.

One column per file (a configuration): on top, the median time of each phase of an optimiser step for stock
GRPOTrainer and MixedPolicyGRPOTrainer (stacked); below, each repetition's ratio of step time and generation time,
with the 0.95 target and parity drawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PHASES = ("generation", "rewards", "scoring_other", "forward_loss", "backward", "optimizer")
COLORS = ("#4c72b0", "#dd8452", "#937860", "#55a868", "#c44e52", "#8172b3")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label(records: list[dict], path: Path) -> str:
    config, first = records[0]["config"], records[0]
    k, g = config["num_off_policy"], config["num_generations"]
    rows = f"{g - k}+{k}"
    backend = "continuous batching" if config.get("continuous_batching") else "generate()"
    lora = f", LoRA r={config['lora']}" if config.get("lora") else ""
    return f"{first['device'].split(',')[0]}\n{config['preset']}, {rows}, {backend}{lora}"


def _spread(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(runs) -> str:
    lines = ["| configuration | rows generated (stock → LUFFY) | step time | generation time | `_compute_loss` | "
             "peak memory | step time, stock / LUFFY (s) | tokens trained/s, stock / LUFFY |",
             "|---|---|---|---|---|---|---|---|"]
    for path, records in runs:
        ratio = {m: [r["ratio"][m] for r in records if m in r["ratio"]] for m in
                 ("step_time", "generation_time", "loss_time", "peak_memory_bytes")}
        med = {arm: {k: statistics.median(r[arm][k] for r in records) for k in ("step_time", "trained_tokens_per_s")}
               for arm in ("stock", "luffy")}
        rows = " → ".join(f"{records[0][arm]['rows_generated_per_step']:g}" for arm in ("stock", "luffy"))
        memory = _spread(ratio["peak_memory_bytes"]) if ratio["peak_memory_bytes"] else "—"
        lines.append(
            f"| {label(records, path).replace(chr(10), ', ')} ({len(records)} reps) | {rows} | "
            f"{_spread(ratio['step_time'])} | {_spread(ratio['generation_time'])} | {_spread(ratio['loss_time'])} | "
            f"{memory} | {med['stock']['step_time']:.3f} / {med['luffy']['step_time']:.3f} | "
            f"{med['stock']['trained_tokens_per_s']:.0f} / {med['luffy']['trained_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench_step.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(path, load(path)) for path in args.files]
    print(table(runs))
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 7), squeeze=False)
    for col, (path, records) in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        for x, arm in enumerate(("stock", "luffy")):
            base = 0.0
            for phase, color in zip(PHASES, COLORS):
                value = statistics.median(r[arm]["phases"][phase] for r in records)
                top.bar(x, max(value, 0.0), bottom=base, color=color, label=phase if (x, col) == (0, 0) else None)
                base += max(value, 0.0)
        top.set_xticks([0, 1], ["GRPOTrainer", "LUFFY"])
        top.set_ylabel("seconds per optimiser step (median)")
        top.set_title(label(records, path), fontsize=9)
        for name, marker in (("step_time", "o"), ("generation_time", "s")):
            values = [r["ratio"][name] for r in records]
            bottom.plot(range(len(values)), values, marker, label=name.replace("_", " "))
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.axhline(0.95, color="grey", lw=0.8, ls="--")
        config = records[0]["config"]
        expected = (config["num_generations"] - config["num_off_policy"]) / config["num_generations"]
        bottom.axhline(expected, color="green", lw=0.8, ls=":")
        bottom.set_xticks(range(len(records)))
        bottom.set_xlim(-0.5, len(records) - 0.5)
        bottom.set_xlabel("repetition")
        bottom.set_ylabel("LUFFY / stock")
        bottom.set_ylim(0, 1.4)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(PHASES), fontsize=8)
    axes[1][0].legend(fontsize=7, loc="lower left", title="dashed 0.95, dotted rows ratio", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
