"""Pure evaluation metrics and protocols: exact values on hand-made samples, pass@k against brute force."""

import itertools
import math
from fractions import Fraction

import pytest

from luffy_trl.evaluation.metrics import (
    ScoredSample,
    average_metrics,
    avg_at_k,
    benchmark_metrics,
    default_pass_ks,
    pass_at_k,
)
from luffy_trl.evaluation.protocols import LUFFY, R1, Protocol, get_protocol


def brute_force_pass_at_k(n, c, k):
    """The share of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == float(brute_force_pass_at_k(n, c, k)), (n, c, k)  # both correctly rounded


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))  # C(200, 100) ~ 1e58: no float overflow
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(5, 3, 3) == 1.0 and pass_at_k(7, 0, 7) == 0.0
    assert pass_at_k(32, 8, 1) == 0.25  # pass@1 is the fraction correct


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_and_default_ks():
    assert avg_at_k([1.0, 0.0, 0.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])
    assert default_pass_ks(1) == [1]
    assert default_pass_ks(6) == [1, 2, 4, 6]
    assert default_pass_ks(32) == [1, 2, 4, 8, 16, 32]


def sample(score, tokens=10, truncated=False, boxed=True):
    return ScoredSample(score, tokens, truncated, boxed)


def test_benchmark_metrics_on_hand_made_samples():
    problems = [
        [sample(1.0, 10), sample(0.0, 20, truncated=True), sample(0.0, 30, boxed=False), sample(0.0, 40)],
        [sample(1.0, 50), sample(1.0, 60), sample(0.0, 70, truncated=True), sample(0.0, 80, boxed=False)],
        [sample(None, 5), sample(None, 5), sample(None, 5, boxed=False), sample(None, 5)],  # gold does not parse
    ]
    m = benchmark_metrics(problems)
    assert m["num_problems"] == 3 and m["k"] == 4
    assert m["accuracy"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    # pass@2: 1 - C(3,2)/C(4,2) = 1/2 and 1 - C(2,2)/C(4,2) = 5/6, and 0 for the unparseable gold
    assert m["pass@2"] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert set(m) == {"num_problems", "k", "accuracy", "pass@1", "pass@2", "pass@4", "mean_length",
                      "truncation_rate", "boxed_rate", "gold_unparseable"}
    assert m["mean_length"] == pytest.approx((100 + 260 + 20) / 12)
    assert m["truncation_rate"] == pytest.approx(2 / 12)
    assert m["boxed_rate"] == pytest.approx(9 / 12)
    assert m["gold_unparseable"] == 1
    assert benchmark_metrics(problems, pass_ks=[3])["pass@3"] == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_benchmark_metrics_rejects_k_above_the_samples():
    with pytest.raises(ValueError, match="pass@k needs k <= 2"):
        benchmark_metrics([[sample(1.0), sample(0.0)]], pass_ks=[4])
    with pytest.raises(ValueError):
        benchmark_metrics([[]])


def test_average_is_unweighted_over_benchmarks():
    per_benchmark = {
        "aime": benchmark_metrics([[sample(1.0)] * 32]),  # 1 problem, 100%
        "math": benchmark_metrics([[sample(0.0)]] * 500),  # 500 problems, 0%
    }
    average = average_metrics(per_benchmark)
    assert average["accuracy"] == 0.5 and average["benchmarks"] == ["aime", "math"]
    assert average["mean_length"] == 10 and average["boxed_rate"] == 1.0


def test_protocol_presets_follow_luffy_and_r1():
    assert (LUFFY.temperature, LUFFY.top_p, LUFFY.max_new_tokens, LUFFY.system_prompt) == (0.6, 1.0, 8192, "drop")
    assert LUFFY.samples_for("aime", copies=32) == 32 and LUFFY.samples_for("amc") == 32
    assert LUFFY.samples_for("math") == 1 and LUFFY.samples_for("custom", copies=3) == 3
    assert (R1.temperature, R1.top_p, R1.max_new_tokens) == (0.6, 0.95, 32768)
    assert get_protocol("r1") is R1
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("greedy")


def test_protocol_overrides_and_think_gate():
    every = LUFFY.with_overrides(num_samples="4", temperature=0.0, top_p=None)
    assert every.samples_for("aime", 32) == 4 and every.samples_for("math") == 4
    assert every.temperature == 0.0 and every.top_p == 1.0
    some = LUFFY.with_overrides(num_samples="aime=8, math=2")
    assert some.samples_for("aime") == 8 and some.samples_for("amc") == 32 and some.samples_for("math") == 2
    assert LUFFY.gated("<|im_start|>assistant\n<think>\n") and not LUFFY.gated("<|im_start|>assistant\n")
    assert LUFFY.with_overrides(think_gate="always").gated("x") and not R1.with_overrides(think_gate="never").gated(
        "<think>\n")
    assert LUFFY.generation_hash() == LUFFY.with_overrides(verify_timeout=1.0, num_samples=2).generation_hash()
    assert LUFFY.generation_hash() != LUFFY.with_overrides(temperature=1.0).generation_hash()
    for bad in (dict(top_p=0.0), dict(max_new_tokens=0), dict(system_prompt="none"), dict(think_gate="maybe"),
                dict(samples={"aime": 0})):
        with pytest.raises(ValueError):
            Protocol(name="bad", **bad)
