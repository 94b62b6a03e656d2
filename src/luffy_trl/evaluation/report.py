"""Report writers: `results.json`, a Markdown table in the layout of LUFFY's results table, and a PNG bar chart.

The main table has one row per model and the columns AIME24 | AIME25 | AMC | MATH-500 | Minerva | Olympiad | Avg,
then ARC-c | GPQA-d | MMLU-Pro | OOD avg, for the benchmarks present (accuracy in %, one decimal, as the paper).
Benchmarks with other names follow LUFFY's in their group (math-verify ones before "Avg", multiple-choice ones before
"OOD avg"). A second table gives every benchmark's details.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from luffy_trl.evaluation.benchmarks import LUFFY_MATH_BENCHMARKS, LUFFY_OOD_BENCHMARKS

logger = logging.getLogger(__name__)

LABELS = {
    "aime": "AIME24", "aime25": "AIME25", "amc": "AMC", "math": "MATH-500", "minerva": "Minerva",
    "olympiad_bench": "Olympiad", "arc_c": "ARC-c", "gpqa": "GPQA-d", "mmlu_pro": "MMLU-Pro",
}
_GROUPS = (("math", LUFFY_MATH_BENCHMARKS, "Avg"), ("ood", LUFFY_OOD_BENCHMARKS, "OOD avg"))


def label(benchmark: str) -> str:
    """The paper's column name of a benchmark (the name itself for other benchmarks)."""
    return LABELS.get(benchmark, benchmark)


def _columns(results: dict) -> list[tuple[str, float]]:
    """(column label, accuracy) in table order: each group's benchmarks (LUFFY's order first), then its average."""
    columns = []
    for group, order, average_label in _GROUPS:
        average = results["averages"].get(group)
        if average is None:
            continue
        members = sorted(average["benchmarks"], key=lambda b: (order.index(b) if b in order else len(order)))
        columns += [(label(b), results["benchmarks"][b]["accuracy"]) for b in members]
        columns.append((average_label, average["accuracy"]))
    return columns


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(runs: Sequence[dict]) -> str:
    """The paper-layout table, one row per results dict (all with the same benchmarks)."""
    header = [label for label, _ in _columns(runs[0])]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for results in runs:
        lines.append(f"| {results['model']} | " + " | ".join(_percent(v) for _, v in _columns(results)) + " |")
    return "\n".join(lines)


def details_table(results: dict) -> str:
    """One row per benchmark: problems, samples per problem (k), avg@k and pass@k in %, mean length in tokens,
    truncated and boxed answers in %, unparseable golds."""
    lines = [
        "| benchmark | problems | k | avg@k | pass@k | mean length | truncated | boxed | gold unparseable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["benchmarks"].items():
        passes = [key for key in m if key.startswith("pass@")]
        best = max(passes, key=lambda key: int(key[5:]))
        lines.append(
            f"| {label(name)} | {m['num_problems']} | {m['k']} | {_percent(m['accuracy'])} | "
            f"{_percent(m[best])} ({best}) | {m['mean_length']:.0f} | {_percent(m['truncation_rate'])} | "
            f"{_percent(m['boxed_rate'])} | {m['gold_unparseable']} |"
        )
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """Both tables with a line on the protocol."""
    p = results["protocol"]
    samples = ", ".join(f"{label(b)} {k}" for b, k in p["samples"].items()) or "none"
    others = p["default_samples"] or "one per copy in the data file"
    return (
        f"# Evaluation of {results['model']}\n\n"
        f"Protocol `{p['name']}`: temperature {p['temperature']}, top_p {p['top_p']}, max_new_tokens "
        f"{p['max_new_tokens']}, system prompt `{p['system_prompt']}`, think gate `{p['think_gate']}`, samples per "
        f"problem: {samples}, other benchmarks {others}. Accuracy in % (avg@k).\n\n"
        f"{markdown_table([results])}\n\n{details_table(results)}\n"
    )


def bar_chart(results: dict, path: str | Path) -> None:
    """A PNG bar chart of the main table's columns (averages in a darker colour). Needs matplotlib (`plots`
    extra); uses no pyplot state, so it does not change the caller's matplotlib backend."""
    from matplotlib.figure import Figure

    columns = _columns(results)
    names = [name for name, _ in columns]
    values = [100 * value for _, value in columns]
    colours = ["#1f4e79" if name in ("Avg", "OOD avg") else "#6fa8dc" for name in names]
    fig = Figure(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.2), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(names, values, color=colours)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(10.0, 1.15 * max(values)))
    ax.set_title(f"{results['model']} ({results['protocol']['name']} protocol)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_reports(results: dict, output_dir: str | Path) -> None:
    """`results.json`, `results.md` and `results.png` in `output_dir` (no PNG without matplotlib: a warning)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(markdown_report(results))
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed (pip install 'luffy-trl[plots]'): no results.png")
    else:
        bar_chart(results, output_dir / "results.png")
