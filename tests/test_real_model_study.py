"""examples/real_model_study.py: the fixed protocol's data, the run plan and rate choice, the report's intervals,
and one real run end to end (a tiny budget)."""

import json
import pathlib

import pytest
from conftest import requires_smollm
from test_examples import load


@pytest.fixture(scope="module")
def study():
    return load("real_model_study")


def test_protocol_data_are_disjoint_fixed_and_phrased_per_regime(study):
    a, b = study.datasets("a"), study.datasets("b")
    question = lambda d: [m[-1]["content"] for m in d["prompt"]]  # noqa: E731
    train = set(question(a["train"]))
    for name in ("validation", "id", "wording", "harder"):
        assert not set(question(a[name])) & train, name
        assert len(a[name]) == (100 if name == "validation" else 200)
    assert not set(question(a["validation"])) & set(question(a["id"]))
    assert all(q.endswith("Put the final answer in \\boxed{}.") for q in question(a["id"]))
    assert all(q.endswith("for example \\boxed{57}.") for q in question(b["id"]))
    assert [q.rsplit(" Put", 1)[0] for q in question(a["harder"])] == \
           [q.rsplit(" Give", 1)[0] for q in question(b["harder"])]  # the same problems in both regimes
    assert question(study.datasets("a")["wording"]) == question(a["wording"])  # fixed: the same on every call
    assert len(study.protocol_hash()) == 12


def test_answers_must_be_numbers_and_kept_generations_are_scored_again(study, tmp_path):
    """The protocol scores with `number`: an unevaluated expression that math-verify finds equal is not an answer.
    The re-scoring script finds such answers in kept generations."""
    assert study.PROTOCOL["scorer"] == "number"
    data = study.datasets("a")
    problems = study.problems_of("id", data["id"].select(range(3)), tmp_path / "data" / "a")
    assert {p.scorer for p in problems} == {"number"}
    rescore = load("real_model_study_rescore")
    folder = tmp_path / "runs" / "a" / "luffy" / "lr0.0001" / "seed0"
    (folder / "eval" / "id").mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"regime": "a", "arm": "luffy", "lr": 1e-4, "seed": 0}))
    a, b = data["id"][0]["ground_truth"], data["id"][1]["ground_truth"]
    expression = f"{int(a) + 5} - 5"  # the first problem's answer written as a difference that equals it
    texts = [expression, f"So the answer is \\boxed{{{b}}}.", "\\boxed{0}"]
    lines = [json.dumps({"run": "r", "benchmark": "id", "problem": p.problem_id, "sample": 0, "text": t,
                         "num_tokens": 5, "truncated": False}) for p, t in zip(problems, texts)]
    (folder / "eval" / "id" / "generations.jsonl").write_text("\n".join(lines) + "\n")
    [row] = rescore.rescore(tmp_path)
    assert row["id"] == {"problems": 3, "math": pytest.approx(2 / 3), "number": pytest.approx(1 / 3),
                         "expression_only": pytest.approx(1 / 3), "setup": pytest.approx(1 / 3),
                         "column_steps": 0.0, "equations": 0, "equations_true": None}
    assert "| a luffy lr 0.0001 seed 0 | id | 0.667 | 0.333 | 0.333 | 0.333 | 0.000 |  |" in rescore.markdown([row])


def fake_run(study, root, regime, arm, lr, seed, accuracy, correct):
    """A result.json and scores.jsonl as run_one writes them: `correct[set]` = per-problem scores."""
    folder = study.run_dir(root, regime, arm, lr, seed)
    for name, scores in correct.items():
        (folder / "eval" / name).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"benchmark": name, "problem": f"p{i}", "sample": 0, "score": s, "boxed": True,
                             "truncated": False, "num_tokens": 5}) for i, s in enumerate(scores)]
        (folder / "eval" / name / "scores.jsonl").write_text("\n".join(lines) + "\n")
    result = {"protocol": study.protocol_hash(), "regime": regime, "arm": arm, "lr": lr, "seed": seed,
              "validation_curve": [{"step": 20, "accuracy": accuracy / 2, "boxed_rate": 0.5},
                                   {"step": 100, "accuracy": accuracy, "boxed_rate": 0.9}],
              "heldout": {}, "mechanism": {"on_policy/reward_mean": [0.0, accuracy]}}
    (folder / "result.json").write_text(json.dumps(result))


def test_rates_are_chosen_on_validation_and_the_report_has_intervals(study, tmp_path):
    grid = study.PROTOCOL["lr_grid"]
    sets = list(study.PROTOCOL["heldout_seeds"])
    plan = study.planned_runs(tmp_path)
    assert len(plan) == 2 * 9 and {run[3] for run in plan} == {0}  # only the grids until they are done
    for arm, accuracies in (("grpo", (0.1, 0.3, 0.3)), ("luffy", (0.2, 0.6, 0.4)), ("sft", (0.5, 0.4, 0.1))):
        for lr, accuracy in zip(grid[arm], accuracies):
            fake_run(study, tmp_path, "a", arm, lr, 0, accuracy, {s: [1.0, 0.0, 1.0, 0.0] for s in sets})
    chosen = study.chosen_rates(tmp_path, "a")
    assert chosen == {"grpo": grid["grpo"][1], "luffy": grid["luffy"][1], "sft": grid["sft"][0]}  # ties: smaller
    pending = [r for r in study.planned_runs(tmp_path) if r[0] == "a" and r[3] != 0 or r[1] in study.ABLATIONS]
    assert {(r[1], r[2]) for r in pending} == {("grpo", chosen["grpo"]), ("luffy", chosen["luffy"]),
                                               ("sft", chosen["sft"]), ("rl_sft_loss", chosen["luffy"]),
                                               ("no_shaping", chosen["luffy"]), ("grpo_no_entropy", chosen["grpo"])}
    for seed in (1, 2):
        fake_run(study, tmp_path, "a", "luffy", chosen["luffy"], seed, 0.6, {s: [1.0, 1.0, 1.0, 0.0] for s in sets})
        fake_run(study, tmp_path, "a", "grpo", chosen["grpo"], seed, 0.3, {s: [1.0, 0.0, 0.0, 0.0] for s in sets})
    report = load("real_model_study_report")
    text = report.report(tmp_path)
    assert "| LUFFY (7 + 1, shaping) | 0.0003 | 3 |" in text and "LUFFY − GRPO (8 sampled, clip)" in text
    mechanism_rows = text.split("### Mechanism per RL run")[1].split("###")[0].splitlines()[4:]
    assert len([r for r in mechanism_rows if r.startswith("| ")]) == 6 + 4  # RL runs only: the grids and 4 seeds
    data = json.loads((tmp_path / "report.json").read_text())
    luffy_id = data["regimes"]["a"]["table"]["luffy"]["id"]
    assert luffy_id["mean"] == pytest.approx((0.5 + 0.75 + 0.75) / 3) and luffy_id["seeds"] == 3
    assert luffy_id["low"] <= luffy_id["mean"] <= luffy_id["high"]
    assert all((tmp_path / f"{name}_a.png").exists() for name in ("grid", "curves", "mechanism"))
    published = report.publish(tmp_path, tmp_path / "docs")
    record = json.loads((tmp_path / "docs" / "study_runs.json").read_text())
    assert len(record["runs"]) == 9 + 4 and record["hash"] == study.protocol_hash()
    luffy_seed1 = next(r for r in record["runs"] if (r["arm"], r["seed"]) == ("luffy", 1))
    assert luffy_seed1["scores"]["id"] == [1.0, 1.0, 1.0, 0.0] and "folder" not in luffy_seed1
    assert (tmp_path / "docs" / "study_grid_a.png") in published


def test_mechanism_summary_quotes_windows_ratios_and_cosines():
    """The numbers the doc quotes per RL run: 20-step windows of the per-step series, 4-logged-step windows of the
    term norms (logged every 5th step, None between), the ratio only where the teacher term is non-zero."""
    report = load("real_model_study_report")
    steps = 40
    every_fifth = lambda f: [f(i) if i % 5 == 0 else None for i in range(steps)]  # noqa: E731
    mechanism = {"rewards/boxed_rate/mean": [0.1] * 20 + [0.5] * 20,
                 "off_policy/shaping_weight_mean": [0.6] * 20 + [0.8] * 20,
                 "loss_terms/on_policy_grad_norm": every_fifth(lambda i: 1.0 + i / 5),  # 1..8 on the 8 logged steps
                 "loss_terms/off_policy_grad_norm": every_fifth(lambda i: 0.5),
                 "loss_terms/grad_cosine": every_fifth(lambda i: 0.1 if i < 20 else -0.3)}
    row = report.mechanism_summary(mechanism)
    assert row["boxed"] == "0.100 → 0.500" and row["shaping"] == "0.600 → 0.800" and row["prob"] == ""
    assert row["on_norm"] == "2.500 → 6.500" and row["off_norm"] == "0.500 → 0.500"
    assert row["ratio"] == "9.0 [2.0, 16.0]"  # ratios 2, 4, ..., 16: median 9
    assert row["cosine"] == "-0.10 [-0.30, +0.10]"
    grpo = report.mechanism_summary({"loss_terms/on_policy_grad_norm": every_fifth(lambda i: 0.3),
                                     "loss_terms/off_policy_grad_norm": every_fifth(lambda i: 0.0),
                                     "loss_terms/grad_cosine": [None] * steps})
    assert grpo["on_norm"] == "0.300 → 0.300" and grpo["off_norm"] == grpo["ratio"] == grpo["cosine"] == ""


@requires_smollm
@pytest.mark.slow
@pytest.mark.smollm
def test_one_real_run_end_to_end(study, tmp_path, monkeypatch):
    for key, value in (("steps", 1), ("eval_every", 1), ("group", 2), ("prompts_per_step", 1),
                       ("max_completion", 8), ("heldout_rows", 3), ("validation", {"rows": 3, "seed": 4000})):
        monkeypatch.setitem(study.PROTOCOL, key, value)
    result = study.run_one(tmp_path, "a", "luffy", 1e-3, 0)
    folder = study.run_dir(tmp_path, "a", "luffy", 1e-3, 0)
    assert (folder / "adapter" / "adapter_config.json").exists()
    assert [point["step"] for point in result["validation_curve"]] == [1]
    assert set(result["heldout"]) == {"id", "wording", "harder"}
    assert all((folder / "eval" / name / "scores.jsonl").exists() for name in result["heldout"])
    assert {"on_policy/reward_mean", "rewards/boxed_rate/mean", "off_policy/shaping_weight_mean",
            "loss_terms/on_policy_grad_norm", "loss_terms/off_policy_grad_norm"} <= set(result["mechanism"])
    assert (folder / "validation" / "step1.jsonl").exists()  # kept, to be scored again
    assert study.run_one(tmp_path, "a", "luffy", 1e-3, 0) == result  # cached: not trained again


def test_parallel_workers_claim_each_run_once_and_take_over_a_dead_workers_run(study, tmp_path):
    import subprocess
    import sys

    folder = study.run_dir(tmp_path, "a", "luffy", 3e-4, 0)
    assert study.claim(folder) and not study.claim(folder)  # this process holds it: nobody else gets it
    study.release(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "claim.json").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    assert study.claim(folder)  # its owner is gone: taken over
    assert json.loads((folder / "claim.json").read_text())["pid"] == __import__("os").getpid()
    # The grid's middle rates come first, arms interleaved.
    assert study.planned_runs(tmp_path)[:3] == [("a", arm, study.PROTOCOL["lr_grid"][arm][1], 0)
                                                for arm in study.MAIN_ARMS]


def test_a_worker_takes_every_planned_run_in_order_once(study, tmp_path, monkeypatch):
    """The worker loop with the training replaced: base evaluations first, then each regime's grid, its seeds and
    its ablations; every run once; claims released."""
    done = []

    def fake_run_one(root, regime, arm, lr, seed, **kwargs):
        done.append((regime, arm, lr, seed))
        accuracy = 0.5 if lr == study.PROTOCOL["lr_grid"][arm if arm in study.MAIN_ARMS else "luffy"][1] else 0.1
        fake_run(study, root, regime, arm, lr, seed, accuracy, {"id": [1.0]})

    def fake_base(root, regime, **kwargs):
        done.append((regime, "base"))
        (root / "runs" / regime / "base" / "result.json").write_text("{}")

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "evaluate_base", fake_base)
    assert study.worker(tmp_path, max_hours=None, max_runs=None, poll_seconds=0) == 2 * (9 + 6 + 3)
    assert done[0] == ("a", "base") and done[19] == ("b", "base") and len(set(done)) == len(done)
    assert done == [done[0], *study.planned_runs(tmp_path)[:18], done[19], *study.planned_runs(tmp_path)[18:]]
    assert not list(tmp_path.glob("runs/**/claim.json"))


def test_a_killed_workers_claim_is_taken_over_before_its_parent_reaps_it(study, tmp_path):
    """`run --workers 2` waits for its children in order, so a killed second worker stays a zombie (its pid still
    answers signal 0) until the first ends: its run must be free all the same."""
    import os
    import socket
    import subprocess
    import sys
    import time

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = pathlib.Path(f"/proc/{zombie.pid}/stat")
    deadline = time.time() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.05)
    folder = study.run_dir(tmp_path, "a", "grpo", 3e-4, 0)
    folder.mkdir(parents=True)
    (folder / "claim.json").write_text(json.dumps({"pid": zombie.pid, "host": socket.gethostname()}))
    os.kill(zombie.pid, 0)  # the pid still answers: a plain signal-0 check would call the run taken
    assert study.claim(folder)
    zombie.wait()


def test_a_worker_limited_to_some_arms_takes_only_theirs(study, tmp_path, monkeypatch):
    """`--arms sft`: the base evaluation, then SFT's grid and, once it is complete, SFT's seeds; nothing else."""
    done = []

    def fake_run_one(root, regime, arm, lr, seed, **kwargs):
        done.append((regime, arm, lr, seed))
        fake_run(study, root, regime, arm, lr, seed, 0.5 if lr == 1e-4 else 0.1, {"id": [1.0]})

    def fake_base(root, regime, **kwargs):
        done.append((regime, "base"))
        (root / "runs" / regime / "base" / "result.json").write_text("{}")

    monkeypatch.setattr(study, "run_one", fake_run_one)
    monkeypatch.setattr(study, "evaluate_base", fake_base)
    assert study.worker(tmp_path, max_hours=None, max_runs=None, poll_seconds=0, arms={"sft"}) == 2 * 5
    runs = [r for r in done if len(r) == 4]
    assert {r[1] for r in runs} == {"sft"} and len(set(runs)) == 10
    assert [r for r in runs if r[0] == "a"][3:] == [("a", "sft", 1e-4, 1), ("a", "sft", 1e-4, 2)]
    assert done[0] == ("a", "base")


def test_regime_b_probe_draws_each_candidate_like_the_study_and_chooses_by_the_band(tmp_path):
    """real_model_study_probe.py: the reference candidate is protocol 72efdb53d29d's regime b validation split
    itself; the others change only the second operand and/or put one worked example before the question (never a
    validation question); the choice is the first candidate in order inside [0.10, 0.30]."""
    probe = load("real_model_study_probe")
    questions = lambda d: [m[-1]["content"] for m in d["prompt"]]  # noqa: E731
    reference = probe.candidate_validation((10, 99), False)
    assert questions(reference) == questions(probe.study.datasets("b")["validation"])
    one_digit = probe.candidate_validation((1, 9), True)
    assert len(one_digit) == 100 and all(len(p) == 3 for p in one_digit["prompt"])
    shot = one_digit["prompt"][0][:2]
    assert [t["role"] for t in shot] == ["user", "assistant"] and "\\boxed{52}" in shot[1]["content"]
    assert shot[0]["content"] not in questions(one_digit)
    operands = [int(t.split("We compute ")[1].split(".")[0].split()[2]) for t in one_digit["target"]]
    assert set(operands) <= set(range(1, 10)) and len(set(operands)) > 5
    assert probe.choose({"format_shown": 0.01, "one_digit": 0.35, "worked_example": 0.12,
                         "one_digit_worked_example": 0.2}) == "worked_example"
    assert probe.choose({"format_shown": 0.01, "one_digit": 0.05}) is None
