"""Score a study's kept generations again with another scorer (docs/real-model.md, "The first protocol").

Every run of `real_model_study.py` keeps its greedy held-out generations (`eval/<set>/generations.jsonl`), and the
base model its validation ones too. This re-scores them, without generating anything, with math-verify as LUFFY
calls it (`math`: `\\boxed{60 - 32}` and a bare `60 - 32` count for 28) and with the answer written as a number
(`number`, `luffy_trl.rewards.number_reward`), and counts the answers that only the first accepts: an arithmetic
expression that the verifier evaluated. It also says how the answers are built (`luffy_trl.tasks.arithmetic.
answer_form`): the share whose first expression has the gold value (the right setup), the share that works column by
column as the traces do, and the share of the equations they state that hold (the arithmetic itself).

    python examples/real_model_study_rescore.py --output_dir outputs/study-ca7fe7e3c833 \\
        --json docs/images/study_v1_rescored.json
    python examples/real_model_study_rescore.py --output_dir outputs/study --json docs/images/study_answer_forms.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

SETS = ("validation", "id", "wording", "harder")


def golds(root: pathlib.Path, regime: str, name: str) -> dict[str, str]:
    """Problem id -> gold answer of a study data file (`data/<regime>/<name>.jsonl`)."""
    from luffy_trl.evaluation import load_problems
    from luffy_trl.evaluation.runner import BenchmarkSpec

    problems = load_problems(BenchmarkSpec(name, str(root / "data" / regime / f"{name}.jsonl")), system_prompt="keep")
    return {p.problem_id: p.gold for p in problems}


def rescore_file(path: pathlib.Path, gold_of: dict[str, str]) -> dict:
    """Accuracy of one `generations.jsonl` under both scorers, and how many answers only `math` accepts."""
    from luffy_trl.rewards import make_math_reward
    from luffy_trl.tasks.arithmetic import answer_form

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts, answers = [r["text"] for r in rows], [gold_of[r["problem"]] for r in rows]
    lenient = make_math_reward(think_gate=False)(texts, ground_truth=answers)
    strict = make_math_reward(think_gate=False, numeric=True)(texts, ground_truth=answers)
    n = len(rows)
    forms = [answer_form(text, gold) for text, gold in zip(texts, answers)]
    equations = sum(f["equations"] for f in forms)
    return {"problems": n, "math": sum(x or 0.0 for x in lenient) / n, "number": sum(x or 0.0 for x in strict) / n,
            "expression_only": sum(bool(a) and not b for a, b in zip(lenient, strict)) / n,
            "setup": sum(f["setup"] for f in forms) / n, "column_steps": sum(f["column_steps"] for f in forms) / n,
            "equations": equations,
            "equations_true": sum(f["equations_true"] for f in forms) / equations if equations else None}


def rescore(root: pathlib.Path) -> list[dict]:
    """Every run (and the base model) of a study folder, every set whose generations were kept."""
    rows, cache = [], {}
    runs = root / "runs"
    for result in sorted(runs.glob("*/*/*/*/result.json")) + sorted(runs.glob("*/base/result.json")):
        run = json.loads(result.read_text())
        folder = result.parent
        regime = run.get("regime") or folder.relative_to(root / "runs").parts[0]
        entry = {"regime": regime, "arm": run.get("arm", "base"), "lr": run.get("lr"), "seed": run.get("seed")}
        for name in SETS:
            path = folder / "eval" / name / "generations.jsonl"
            if path.exists():
                gold_of = cache.setdefault((regime, name), golds(root, regime, name))
                entry[name] = rescore_file(path, gold_of)
        rows.append(entry)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | set | math-verify alone | answer written as a number | expression answers | right setup "
             "| column steps | stated equations that hold |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        arm = f"{row['regime']} {row['arm']}"
        label = arm if row["lr"] is None else f"{arm} lr {row['lr']:g} seed {row['seed']}"
        for name in SETS:
            if name in row:
                r = row[name]
                held = "" if r["equations_true"] is None else f"{r['equations_true']:.3f} of {r['equations']}"
                lines.append(f"| {label} | {name} | {r['math']:.3f} | {r['number']:.3f} | {r['expression_only']:.3f} "
                             f"| {r['setup']:.3f} | {r['column_steps']:.3f} | {held} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the study folder whose runs are scored again")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = rescore(pathlib.Path(args.output_dir))
    print(markdown(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
