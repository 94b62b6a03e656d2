"""Bootstrap intervals over seeds and problems (luffy_trl.evaluation.stats) and the per-sample scores file."""

import json

import numpy as np
import pytest

from luffy_trl.evaluation.stats import bootstrap_mean, paired_difference


def test_constant_scores_have_a_point_interval():
    interval = bootstrap_mean(np.full((3, 50), 0.4))
    assert (interval.seeds, interval.problems) == (3, 50)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.4, 0.4, 0.4), abs=1e-12)


def test_one_seed_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    scores = (rng.random(400) < 0.3).astype(float)
    interval = bootstrap_mean(scores, reps=8000)
    half = 1.96 * np.sqrt(scores.mean() * (1 - scores.mean()) / scores.size)
    assert interval.mean == pytest.approx(scores.mean())
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.08)
    assert interval.low < interval.mean < interval.high


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(2)
    base = (rng.random(200) < 0.5).astype(float)
    same = np.stack([base, base, base])
    shifted = np.stack([np.clip(base + d, 0, 1) for d in (-0.3, 0.0, 0.3)])  # seeds that disagree a lot
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(bootstrap_mean(shifted)) > 1.5 * width(bootstrap_mean(same))


def test_paired_difference_of_an_arm_with_itself_is_zero_and_shifts_are_found():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 300)) < 0.4).astype(float)
    same = paired_difference(a, a)
    assert same.mean == 0.0 and same.low <= 0.0 <= same.high
    better = np.maximum(a, (rng.random((3, 300)) < 0.3).astype(float))
    diff = paired_difference(better, a)
    assert diff.mean == pytest.approx(better.mean() - a.mean()) and diff.low > 0
    with pytest.raises(ValueError, match="different problem sets"):
        paired_difference(a, a[:, :10])


def test_run_evaluation_writes_per_sample_scores(tmp_path):
    from luffy_trl.evaluation.backends import Generation
    from luffy_trl.evaluation.protocols import LUFFY
    from luffy_trl.evaluation.runner import Problem, problem_scores, run_evaluation

    class Backend:
        name, default_batch_size = "fake", 4

        class tokenizer:  # noqa: N801
            @staticmethod
            def apply_chat_template(messages, **_):
                return messages[-1]["content"]

        def generate(self, prompts, protocol, seeds):
            return [Generation(f"</think> \\boxed{{{p.split()[0]}}}" if s % 2 == 0 else "</think> no", 3, False)
                    for p, s in zip(prompts, seeds)]

    problems = [Problem("toy", str(i), ({"role": "user", "content": f"{i} is the answer"},), str(i))
                for i in range(3)]
    protocol = LUFFY.with_overrides(num_samples=2, temperature=1.0)
    run_evaluation(Backend(), problems, protocol, tmp_path, model_name="fake", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"benchmark", "problem", "sample", "score", "boxed", "num_tokens"} <= set(lines[0])
    per_problem = problem_scores(tmp_path / "scores.jsonl", "toy")
    assert sorted(per_problem) == ["0", "1", "2"]
    assert sum(per_problem.values()) / 3 == pytest.approx(sum(line["score"] for line in lines) / 6)
