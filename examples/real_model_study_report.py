"""The report of examples/real_model_study.py: the learning-rate grid, every run, a mechanism table per RL run, the
table of means with 95% intervals per held-out set, paired differences, validation curves with seed bands and the
mechanism figures.

    python examples/real_model_study.py report --output_dir outputs/study

Writes `report.md`, `report.json`, `grid_<regime>.png`, `curves_<regime>.png` and `mechanism_<regime>.png` to the
study's folder. Only results of the current protocol are read (a result of another protocol is an error: start a new
folder).
"""

from __future__ import annotations

import json
import pathlib

import real_model_study as study

from luffy_trl.evaluation.runner import problem_scores
from luffy_trl.evaluation.stats import bootstrap_mean, paired_difference


def load_runs(root: pathlib.Path) -> list[dict]:
    runs = []
    for path in sorted((root / "runs").glob("*/*/lr*/seed*/result.json")):
        result = json.loads(path.read_text())
        if result["protocol"] != study.protocol_hash():
            raise ValueError(f"{path} belongs to protocol {result['protocol']}, not {study.protocol_hash()}: keep "
                             "each protocol's runs in a folder of their own")
        result["folder"] = path.parent
        runs.append(result)
    return runs


def score_matrix(runs: list[dict], heldout: str):
    """(seeds, problems) per-problem accuracies of `runs` on a held-out set, problems in one fixed order."""
    per_run = [problem_scores(run["folder"] / "eval" / heldout / "scores.jsonl", heldout) for run in runs]
    problems = sorted(per_run[0])
    return [[scores[p] for p in problems] for scores in per_run]


def regime_report(root: pathlib.Path, regime: str, runs: list[dict]) -> tuple[list[str], dict]:
    lines, data = [f"## Regime {regime}", ""], {"grid": [], "table": {}, "differences": {}, "mechanism": []}
    chosen = study.chosen_rates(root, regime)
    base_path = root / "runs" / regime / "base" / "result.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    lines += ["### Learning-rate grid (seed 0, final validation accuracy)", "", "| arm | rate | validation accuracy "
              "(final) | best along the curve | chosen |", "|---|---|---|---|---|"]
    for arm in study.MAIN_ARMS:
        for lr in study.PROTOCOL["lr_grid"][arm]:
            run = next((r for r in runs if (r["arm"], r["lr"], r["seed"]) == (arm, lr, study.PROTOCOL["seeds"][0])),
                       None)
            if run is None:
                lines.append(f"| {study.LABELS[arm]} | {lr:g} | (not run) | | |")
                continue
            curve = [point["accuracy"] for point in run["validation_curve"]]
            data["grid"].append({"arm": arm, "lr": lr, "final": curve[-1], "best": max(curve)})
            lines.append(f"| {study.LABELS[arm]} | {lr:g} | {curve[-1]:.3f} | {max(curve):.3f} | "
                         f"{'✓' if chosen.get(arm) == lr else ''} |")
    sets = list(study.PROTOCOL["heldout_seeds"])
    ordered = sorted(runs, key=lambda r: (list(study.LABELS).index(r["arm"]), r["lr"], r["seed"]))
    lines += ["", "### Every run (held-out accuracy is reported, never used for a choice)", "",
              "| arm | rate | seed | validation (final) | " + " | ".join(sets) + " | teacher-trace log-lik./token | "
              "on-policy reward, steps 1-20 → 81-100 | entropy, steps 1-20 → 81-100 | wall time |",
              "|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    if base is not None:
        lines.append(f"| base model (step 0) | | | {base['validation']['accuracy']:.3f} | "
                     + " | ".join(f"{base[s]['accuracy']:.3f}" for s in sets)
                     + f" | {base.get('trace_logprob', float('nan')):.2f} | | | |")
    for run in ordered:
        mechanism = run["mechanism"]
        lines.append(f"| {study.LABELS[run['arm']]} | {run['lr']:g} | {run['seed']} | "
                     f"{run['validation_curve'][-1]['accuracy']:.3f} | "
                     + " | ".join(f"{run['heldout'][s]['accuracy']:.3f}" if s in run["heldout"] else "" for s in sets)
                     + f" | {run.get('trace_logprob', float('nan')):.2f} | "
                     f"{_ends(mechanism.get('on_policy/reward_mean'))} | {_ends(mechanism.get('entropy'))} | "
                     f"{run.get('wall_seconds', float('nan')) / 60:.0f} min |")
    lines += ["", "### Mechanism per RL run (steps 1-20 → 81-100; term norms: first 4 → last 4 logged steps)", "",
              "| arm | rate | seed | `\\boxed{}` rate of the rows | shaping weight | teacher-token probability | "
              "on-policy term grad norm | teacher term grad norm | ratio on-policy / teacher, median [min, max] | "
              "cosine, mean [min, max] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in ordered:
        if run["arm"] != "sft":
            row = mechanism_summary(run["mechanism"])
            data["mechanism"].append({"arm": run["arm"], "lr": run["lr"], "seed": run["seed"], **row})
            lines.append(f"| {study.LABELS[run['arm']]} | {run['lr']:g} | {run['seed']} | " + " | ".join(
                row[key] for key in ("boxed", "shaping", "prob", "on_norm", "off_norm", "ratio", "cosine")) + " |")
    lines += ["", "### Held-out accuracy: mean over seeds and problems [95% bootstrap interval]", "",
              "| arm | rate | seeds | " + " | ".join(sets) + " |", "|---|---|---|" + "---|" * len(sets)]
    if base is not None:
        lines.append("| base model (step 0) | | | " + " | ".join(f"{base[s]['accuracy']:.3f}" for s in sets) + " |")
    groups = {}
    for arm in (*study.MAIN_ARMS, *study.ABLATIONS):
        lr = chosen.get(study.ABLATIONS.get(arm, arm))
        members = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
        if not members:
            continue
        groups[arm] = members
        cells = []
        for name in sets:
            interval = bootstrap_mean(score_matrix(members, name))
            data["table"].setdefault(arm, {})[name] = vars(interval)
            cells.append(str(interval))
        lines.append(f"| {study.LABELS[arm]} | {lr:g} | {len(members)} | " + " | ".join(cells) + " |")
    for other in ("grpo", "sft"):
        if "luffy" in groups and other in groups:
            cells = []
            for name in sets:
                diff = paired_difference(score_matrix(groups["luffy"], name), score_matrix(groups[other], name))
                data["differences"].setdefault(f"luffy-{other}", {})[name] = vars(diff)
                cells.append(f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]")
            lines.append(f"| LUFFY − {study.LABELS[other]} | | | " + " | ".join(cells) + " |")
    plot_grid(root, regime, runs)
    plot_curves(root, regime, groups)
    # The mechanism of each arm at its chosen rate; an arm whose grid is not done yet shows its grid's middle rate.
    shown = {arm: groups.get(arm) or [r for r in runs if r["arm"] == arm
                                      and r["lr"] == study.PROTOCOL["lr_grid"][arm][1]] for arm in study.MAIN_ARMS}
    shown.update({arm: members for arm, members in groups.items() if arm not in shown})
    plot_mechanism(root, regime, {arm: members for arm, members in shown.items() if members})
    lines += ["", f"![learning-rate grid](grid_{regime}.png)", "", f"![validation curves](curves_{regime}.png)", "",
              f"![mechanism](mechanism_{regime}.png)", ""]
    return lines, data


def _ends(values, window: int = 20) -> str:
    """`first-window mean → last-window mean` of a per-step series ('' when the run has none)."""
    values = [v for v in (values or ()) if v is not None]
    if not values:
        return ""
    head, tail = values[:window], values[-window:]
    return f"{sum(head) / len(head):.3f} → {sum(tail) / len(tail):.3f}"


def mechanism_summary(mechanism: dict) -> dict:
    """The numbers docs/real-model.md quotes for one RL run, as strings ('' where the run did not log them): start →
    end of the rows' boxed rate, the shaping weight and the teacher tokens' probability (20-step windows), of the two
    loss terms' gradient norms (4 logged steps; they are logged every `loss_term_grad_norms_steps`), and the ratio of
    the on-policy to the teacher term over the logged steps where the teacher term is non-zero, and their cosine over
    the steps that logged one."""
    import statistics

    on = mechanism.get("loss_terms/on_policy_grad_norm") or []
    off = mechanism.get("loss_terms/off_policy_grad_norm") or []
    ratios = [a / b for a, b in zip(on, off) if a is not None and b]
    cosines = [c for c in mechanism.get("loss_terms/grad_cosine") or () if c is not None]
    return {
        "boxed": _ends(mechanism.get("rewards/boxed_rate/mean")),
        "shaping": _ends(mechanism.get("off_policy/shaping_weight_mean")),
        "prob": _ends(mechanism.get("off_policy/prob_mean")),
        "on_norm": _ends(on, window=4),
        "off_norm": _ends(off, window=4) if ratios else "",  # GRPO logs a teacher term of 0: nothing to show
        "ratio": f"{statistics.median(ratios):.1f} [{min(ratios):.1f}, {max(ratios):.1f}]" if ratios else "",
        "cosine": f"{statistics.mean(cosines):+.2f} [{min(cosines):+.2f}, {max(cosines):+.2f}]" if cosines else "",
    }


def _band(ax, xs, series, color, label):
    import numpy as np

    values = np.array(series, dtype=float)
    xs = np.asarray(list(xs))
    logged = ~np.all(np.isnan(values), axis=0)  # a metric logged every few steps only: join its points
    if not logged.any():
        return
    values, xs = values[:, logged], xs[logged]
    ax.plot(xs, np.nanmean(values, axis=0), color=color, label=label, marker="." if logged.sum() < 30 else None)
    if len(values) > 1:
        ax.fill_between(xs, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.2)


def plot_grid(root: pathlib.Path, regime: str, runs: list[dict]) -> None:
    """Validation accuracy along training of every grid run (seed 0): one panel per arm, one line per rate, the base
    model at step 0; the curves show whether the budget lets each arm flatten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_path = root / "runs" / regime / "base" / "result.json"
    base = json.loads(base_path.read_text()).get("validation", {}).get("accuracy") if base_path.exists() else None
    fig, axes = plt.subplots(1, len(study.MAIN_ARMS), figsize=(5 * len(study.MAIN_ARMS), 3.8), sharey=True)
    for ax, arm in zip(axes, study.MAIN_ARMS):
        for shade, lr in zip((0.45, 0.7, 1.0), study.PROTOCOL["lr_grid"][arm]):
            run = next((r for r in runs if (r["arm"], r["lr"], r["seed"]) == (arm, lr, study.PROTOCOL["seeds"][0])),
                       None)
            if run is None:
                continue
            points = ([(0, base)] if base is not None else []) + [(p["step"], p["accuracy"])
                                                                 for p in run["validation_curve"]]
            ax.plot(*zip(*points), marker="o", color=study.COLORS[arm], alpha=shade, label=f"lr {lr:g}")
        ax.set(title=study.LABELS[arm], xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("validation accuracy (greedy, 100 problems)")
    fig.suptitle(f"Learning-rate grid, regime {regime}, seed 0 (the rate with the best final accuracy is chosen)")
    fig.tight_layout()
    fig.savefig(root / f"grid_{regime}.png", dpi=100)
    plt.close(fig)


def plot_curves(root: pathlib.Path, regime: str, groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, members in groups.items():
        steps = [p["step"] for p in members[0]["validation_curve"]]
        for ax, key in zip(axes, ("accuracy", "boxed_rate")):
            _band(ax, steps, [[p[key] for p in r["validation_curve"]] for r in members], study.COLORS[arm],
                  f"{study.LABELS[arm]} ({len(members)} seed{'s' * (len(members) > 1)})")
    for ax, title in zip(axes, ("Validation accuracy (greedy)", "Validation \\boxed{} rate")):
        ax.set(title=title, xlabel="step", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"SmolLM2-135M-Instruct + LoRA, regime {regime}: mean over seeds, band = min-max")
    fig.tight_layout()
    fig.savefig(root / f"curves_{regime}.png", dpi=100)
    plt.close(fig)


def plot_mechanism(root: pathlib.Path, regime: str, groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in study.MECHANISM if any(k in r["mechanism"] for rs in groups.values() for r in rs)]
    if not keys:
        return
    columns = 3
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(15, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for arm, members in groups.items():
            series = [r["mechanism"][key] for r in members if key in r["mechanism"]]
            if series:
                width = min(len(s) for s in series)
                label = f"{study.LABELS[arm]}, lr {members[0]['lr']:g} ({len(members)} seed{'s' * (len(members) > 1)})"
                _band(ax, range(1, width + 1), [[float("nan") if v is None else v for v in s[:width]]
                                                for s in series], study.COLORS[arm], label)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    max(axes.flat, key=lambda ax: len(ax.get_legend_handles_labels()[0])).legend(fontsize=7)  # the panel with every arm
    fig.tight_layout()
    fig.savefig(root / f"mechanism_{regime}.png", dpi=90)
    plt.close(fig)


def publish(root: pathlib.Path, target: pathlib.Path) -> list[pathlib.Path]:
    """Copy the report's figures and a compact record of every run (its result.json without the adapter, plus its
    per-problem held-out scores in problem order) into `target`, for the docs: what the page shows can be audited
    without the study's folder."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    written = []
    for png in sorted(root.glob("*.png")):
        written.append(pathlib.Path(shutil.copy(png, target / f"study_{png.name}")))
    record = {"protocol": study.PROTOCOL, "hash": study.protocol_hash(), "runs": [], "base": {}}
    for run in load_runs(root):
        folder = run.pop("folder")
        run["scores"] = {}
        for name in study.PROTOCOL["heldout_seeds"]:
            scores = problem_scores(folder / "eval" / name / "scores.jsonl", name)
            run["scores"][name] = [scores[p] for p in sorted(scores)]
        record["runs"].append(run)
    for base in sorted((root / "runs").glob("*/base/result.json")):
        record["base"][base.parent.parent.name] = json.loads(base.read_text())
    path = target / "study_runs.json"
    path.write_text(json.dumps(record, default=str) + "\n")
    return [*written, path]


def report(root: pathlib.Path) -> str:
    runs = load_runs(root)
    lines = [f"# Real-model study (protocol {study.protocol_hash()})", "", study.plan(root), ""]
    data = {"protocol": study.PROTOCOL, "hash": study.protocol_hash(), "regimes": {}}
    for regime in study.PROTOCOL["regimes"]:
        members = [r for r in runs if r["regime"] == regime]
        if members:
            section, data["regimes"][regime] = regime_report(root, regime, members)
            lines += section
    text = "\n".join(lines) + "\n"
    (root / "report.md").write_text(text)
    (root / "report.json").write_text(json.dumps(data, indent=2, default=str))
    return text
