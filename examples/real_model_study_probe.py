"""Choose a task for the study's regime b on the base model's validation accuracy alone.

Regime b is meant to be a task on which the base model already scores 10-30%, so that GRPO learns too (the paper's
main table). Protocol 72efdb53d29d's regime b (the answer format shown, `\\boxed{57}`) leaves SmolLM2-135M-Instruct
at 1% once the answer has to be a number, so this probe scores candidate tasks, in the fixed order of `CANDIDATES`,
greedily on each candidate's own validation split (100 problems drawn as the study draws them, never a held-out set)
and chooses the first whose accuracy lies in [0.10, 0.30]. The rule and the candidates were written down before any
candidate was scored. It trains nothing.

    python examples/real_model_study_probe.py --output_dir outputs/study-probe    # ~1 min per candidate, 1 thread
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_model_study as study  # noqa: E402

BAND = (0.10, 0.30)
REGIME_B = study.PROTOCOL["regimes"]["b"]
# (name, second operand's range, a worked example as an earlier chat turn); the first is protocol 72efdb53d29d's
# regime b itself, scored again as the reference.
CANDIDATES = [
    ("format_shown", (10, 99), False),
    ("one_digit", (1, 9), False),
    ("worked_example", (10, 99), True),
    ("one_digit_worked_example", (1, 9), True),
]
EXAMPLE_OPERANDS = {(10, 99): (47, 25), (1, 9): (47, 5)}  # the worked example: a fixed addition with a carry


def example_turns(second_operand: tuple[int, int]) -> list[dict]:
    """One worked problem (a user question and the teacher's column solution) to put before every question."""
    from luffy_trl.tasks.arithmetic import STORIES, worked_solution

    a, b = EXAMPLE_OPERANDS[second_operand]
    story, op = STORIES[0]
    solution, _ = worked_solution(a, b, op)
    return [{"role": "user", "content": story.format(a=a, b=b) + REGIME_B},
            {"role": "assistant", "content": solution}]


def candidate_validation(second_operand: tuple[int, int], worked: bool, protocol: dict = study.PROTOCOL):
    """The candidate's validation split, drawn as `real_model_study.datasets` draws it (the training rows' seed and
    count, then the validation seed, excluding the training questions and the worked example's)."""
    from luffy_trl.tasks.arithmetic import arithmetic_dataset

    default = " Put the final answer in \\boxed{}."
    shot = example_turns(second_operand) if worked else []
    train = arithmetic_dataset(protocol["train_rows"], seed=protocol["train_seed"], second_operand=second_operand)
    seen = {m[-1]["content"] for m in train["prompt"]}
    seen |= {t["content"].removesuffix(REGIME_B) + default for t in shot[:1]}
    validation = arithmetic_dataset(protocol["validation"]["rows"], seed=protocol["validation"]["seed"], exclude=seen,
                                    second_operand=second_operand)

    def phrase(row):
        question = row["prompt"][-1]["content"].removesuffix(default) + REGIME_B
        return {"prompt": [*shot, {"role": "user", "content": question}]}

    return validation.map(phrase)


def choose(accuracies: dict[str, float], band: tuple[float, float] = BAND) -> str | None:
    """The first candidate, in `CANDIDATES`' order, whose base validation accuracy lies in `band`; None if none."""
    return next((name for name, _, _ in CANDIDATES if name in accuracies
                 and band[0] <= accuracies[name] <= band[1]), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    from luffy_trl.evaluation import TransformersBackend, run_evaluation
    from luffy_trl.threads import configure_cpu_threads

    configure_cpu_threads()
    root = pathlib.Path(args.output_dir)
    protocol = study.PROTOCOL
    greedy = study.compare.greedy_protocol(protocol["max_completion"])
    model, tokenizer = study.base_model(root / "model", protocol)
    summary = {"band": BAND, "candidates": {}}
    for name, second_operand, worked in CANDIDATES:
        start = time.perf_counter()
        problems = study.problems_of("validation", candidate_validation(second_operand, worked), root / "data" / name,
                                     protocol)
        results = run_evaluation(TransformersBackend(model, tokenizer), problems, greedy, root / "eval" / name,
                                 model_name="base", batch_size=study.EVAL_BATCH, progress=False)
        scores = results["benchmarks"]["validation"]
        summary["candidates"][name] = {"second_operand": list(second_operand), "worked_example": worked,
                                       **{k: scores[k] for k in ("accuracy", "boxed_rate", "truncation_rate")},
                                       "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: validation accuracy {scores['accuracy']:.3f} (boxed {scores['boxed_rate']:.2f}, "
              f"truncated {scores['truncation_rate']:.2f})", flush=True)
    summary["chosen"] = choose({n: c["accuracy"] for n, c in summary["candidates"].items()})
    print(f"chosen: {summary['chosen']}", flush=True)
    (root / "probe.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
