"""Rewards: hand-labelled cases, gold answers of LUFFY's benchmarks, adversarial completions, worker processes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from luffy_trl import rewards  # noqa: E402
from luffy_trl.evaluation import benchmark_dir  # noqa: E402
from luffy_trl.rewards import (  # noqa: E402
    luffy_math_reward,
    make_choice_reward,
    make_math_reward,
    math_reward,
    multiple_choice_reward,
    number_reward,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BENCHMARKS = benchmark_dir()  # LUFFY's benchmark files, shipped with the package

M, L, C, N = "math_reward", "luffy_math_reward", "multiple_choice_reward", "number_reward"
REWARDS = {M: math_reward, L: luffy_math_reward, C: multiple_choice_reward, N: number_reward}

PROSE_GOLD = (r"$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive integer with "
              r"$\mho(a)=0$")

# (reward, completion, gold, expected), labelled by hand.
CASES = [
    # LaTeX fractions
    (M, r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
    (M, r"So $x = \boxed{\dfrac{1}{2}}$.", r"\frac12", 1.0),
    (M, r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (M, r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (M, r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
    (M, r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (M, r"\boxed{\frac43}", r"\frac{4}{3}", 1.0),
    (M, r"\boxed{\frac{4}{3}}", r"\frac 43", 1.0),
    (M, r"\boxed{-\frac{2}{3}}", r"-\frac{2}{3}", 1.0),
    (M, r"\boxed{\frac{-2}{3}}", r"-\frac{2}{3}", 1.0),
    (M, r"\boxed{\frac{2}{3}}", r"-\frac{2}{3}", 0.0),
    (M, r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    # roots, constants, expressions
    (M, r"\boxed{11\sqrt2}", r"11\sqrt{2}", 1.0),
    (M, r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (M, r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
    (M, r"\boxed{x^2+2x+1}", r"(x+1)^2", 1.0),
    (M, r"\boxed{x^2+1}", r"(x+1)^2", 0.0),
    (M, r"\boxed{10^{6}}", "1000000", 1.0),
    # intervals (gold first: a gold inequality accepts an interval, not the reverse)
    (M, r"\boxed{[2,5)}", "[2,5)", 1.0),
    (M, r"\boxed{[2,5]}", "[2,5)", 0.0),
    (M, r"\boxed{(2,5)}", "[2,5)", 0.0),
    (M, r"\boxed{x \in [2,5)}", "[2,5)", 1.0),
    (M, r"\boxed{[2,5)}", r"2 \le x < 5", 1.0),
    (M, r"\boxed{(-\infty, 0) \cup \{1\}}", r"$(-\infty, 0) \cup\{1\}$.", 1.0),
    (M, r"\boxed{(-\infty, 0)}", r"$(-\infty, 0) \cup\{1\}$.", 0.0),
    # sets and tuples
    (M, r"\boxed{2, 3}", "2, 3", 1.0),
    (M, r"\boxed{3, 2}", "2, 3", 1.0),
    (M, r"\boxed{\{2,3\}}", r"\{2, 3\}", 1.0),
    (M, r"\boxed{2}", "2, 3", 0.0),
    (M, r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (M, r"\boxed{(\frac{\pi}{2}, 3)}", r"\left( 3, \frac{\pi}{2} \right)", 0.0),
    # units, degrees, money, percent
    (M, r"\boxed{3\text{ cm}}", "3", 1.0),
    (M, r"\boxed{30^\circ}", "30", 1.0),
    (M, r"\boxed{\frac{270}{7}}", r"\frac{270}7\text{ degrees}", 1.0),
    (M, r"\boxed{18.90}", r"\$18.90", 1.0),
    (M, r"\boxed{\$18.90}", "18.90", 1.0),
    (M, r"\boxed{5\%}", r"5\%", 1.0),
    (M, r"\boxed{6\%}", r"5\%", 0.0),
    # several \boxed{}: the same value repeated counts once, different values form a set
    (M, r"First \boxed{3}. Checking again, the answer is \boxed{3}.", "3", 1.0),
    (M, "\\boxed{2}\n\nWait, actually it is \\boxed{3}.", "3", 0.0),
    (M, r"\boxed{2} and \boxed{3}", "2, 3", 1.0),
    (M, r"\boxed{4} is wrong, but the problem asks for 3 so: \boxed{3}", "3", 0.0),
    # no \boxed{}: "answer" patterns, then the last expression
    (M, "The answer is 42.", "42", 1.0),
    (M, "So x = 7", "7", 1.0),
    (M, "We get $3$ apples and $4$ pears.", "4", 1.0),
    (M, "We get $3$ apples and $4$ pears.", "3", 0.0),
    (M, r"Final answer: $\frac{1}{2}$", "0.5", 1.0),
    # AIME-style integers and leading zeros
    (M, r"\boxed{23}", "023", 1.0),
    (M, r"\boxed{023}", "23", 1.0),
    (M, r"\boxed{24}", "023", 0.0),
    # text answers, equations, matrices
    (M, r"\boxed{\text{Devon}}", r"\text{Devon}", 1.0),
    (M, r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
    (M, r"\boxed{x=3}", "3", 1.0),
    (M, r"\boxed{y=2x+1}", "y=2x+1", 1.0),
    (M, r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1.0),
    (M, r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 0.0),
    # empty, missing and junk answers
    (M, "", "3", 0.0),
    (M, "I could not solve it.", "3", 0.0),
    (M, r"\boxed{}", "3", 0.0),
    (M, r"The answer is \boxed{3", "3", 0.0),
    # unparseable gold answers: None, whatever the completion
    (M, r"\boxed{3}", "", None),
    (M, r"\boxed{(0,4]}", "t(0,4]", None),
    (M, "", r"\frac{", None),
    (M, r"\boxed{3}", None, None),
    # notations latex2sympy cannot parse as written (rewritten on both sides)
    (M, r"\boxed{E_1, E_2}", "E_{1},E_{2}", 1.0),
    (M, r"\boxed{\frac{E_1 + 2E_2}{3}}", r"\frac{1}{3} E_{1}+\frac{2}{3} E_{2}", 1.0),
    (M, r"\boxed{\frac{E_1 + E_2}{3}}", r"\frac{1}{3} E_{1}+\frac{2}{3} E_{2}", 0.0),
    (M, r"\boxed{n^2-n-1}", r"$m_{\max }=n^{2}-n-1$", 1.0),
    (M, r"\boxed{\arcsin(10/13)}", "np.arcsin(10/13)", 1.0),
    # a gold with prose keeps its first formula (as written it parses to 0, the value of the last equation)
    (M, r"\boxed{f(x) = ax + b}", PROSE_GOLD, 1.0),
    (M, r"\boxed{0}", PROSE_GOLD, 0.0),
    # LUFFY: </think> required, only the text after it counts
    (L, "<think>\nSo \\boxed{5}.\n</think>\nThe answer is \\boxed{5}.", "5", 1.0),
    (L, "the template opened <think>; reasoning\n</think>\n\\boxed{5}", "5", 1.0),
    (L, "<think>\nreasoning that never ends \\boxed{5}", "5", 0.0),
    (L, r"\boxed{5}", "5", 0.0),
    (L, r"<think>\boxed{4}</think>The answer is \boxed{5}", "5", 1.0),
    (L, r"<think>\boxed{5}</think>The answer is \boxed{4}", "5", 0.0),
    (L, "<think>\n\\boxed{5}\n</think>", "5", 0.0),
    (L, r"a</think>\boxed{5}</think>\boxed{4}", "5", 1.0),
    (L, "", "5", 0.0),
    (L, r"</think>\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (L, r"</think>\boxed{5}", "", None),
    (L, "no think at all", "???", None),
    # multiple choice (GPQA, ARC-c, MMLU-Pro)
    (C, "The answer is (C).", "C", 1.0),
    (C, r"\boxed{C}", "C", 1.0),
    (C, r"\boxed{\text{B}}", "B", 1.0),
    (C, r"$\boxed{(D)}$", "D", 1.0),
    (C, "Reasoning...\nANSWER: A", "A", 1.0),
    (C, "Answer: **B**", "B", 1.0),
    (C, "Thinking.\n\n**A**", "A", 1.0),
    (C, r"\boxed{C. Planetary days will become shorter}", "C", 1.0),
    (C, r"\boxed{A}, no wait: \boxed{B}", "B", 1.0),
    (C, r"\boxed{E}", "E", 1.0),
    (C, r"\boxed{2}", "2", 1.0),
    (C, r"\boxed{B}", "(B)", 1.0),
    (C, "The answer is (C).", "D", 0.0),
    (C, "It is between A and B.", "A", 0.0),
    (C, "", "A", 0.0),
    (C, r"\boxed{10^{-4}\text{ eV}}", "A", 0.0),
    (C, r"\boxed{B}", "10^-4 eV", None),
    # Numbers written as numbers (the arithmetic task): math-verify would accept the unevaluated expressions
    (N, r"So Tom has \boxed{28} apples.", "28", 1.0),
    (N, "60 - 32 = 28", "28", 1.0),
    (N, r"\boxed{-5}", "-5", 1.0),
    (N, r"\boxed{1,234}", "1234", 1.0),
    (N, r"\boxed{3.5}", "3.5", 1.0),
    (N, r"\boxed{29}", "28", 0.0),
    (N, "60 - 32", "28", 0.0),
    (N, r"\boxed{60 - 32}", "28", 0.0),
    (N, "610 - 156 + 147", "601", 0.0),
    (N, r"\boxed{\frac{56}{2}}", "28", 0.0),
    (N, r"\boxed{28}\boxed{60-32}", "28", 0.0),
    (N, "", "28", 0.0),
    (N, r"\boxed{28}", "", None),
    (M, "60 - 32", "28", 1.0),  # the hole number_reward closes
    (M, r"\boxed{60 - 32}", "28", 1.0),
]


@pytest.mark.parametrize(
    ("reward", "completion", "gold", "expected"), CASES, ids=[f"{i}-{case[0]}" for i, case in enumerate(CASES)]
)
def test_hand_labelled(reward, completion, gold, expected):
    assert REWARDS[reward]([completion], ground_truth=[gold]) == [expected]


def test_hand_labelled_batch_and_conversational():
    """The same cases in one batch per reward, as TRL passes them (conversational completions)."""
    for name, reward in REWARDS.items():
        cases = [case for case in CASES if case[0] == name]
        completions = [[{"role": "assistant", "content": completion}] for _, completion, _, _ in cases]
        assert reward(completions, ground_truth=[gold for *_, gold, _ in cases]) == [case[3] for case in cases]


def test_choice_reward_with_think_gate():
    reward = make_choice_reward(think_gate=True)
    assert reward(["<think>A?</think> ANSWER: B", "ANSWER: B"], ground_truth=["B", "B"]) == [1.0, 0.0]


def test_prepare_answer():
    """The cheap checks that run before any parsing."""
    prepare = rewards.prepare_answer
    assert prepare("a</think>b</think>c", think_gate=True) == "b"
    assert prepare("a</think>b", think_gate=False) == "a</think>b"
    assert prepare("<think>no end", think_gate=True) is None
    long = "step\n" * 10_000 + "\\boxed{1}"
    assert prepare(long, think_gate=False).endswith("\n\\boxed{1}")
    assert len(prepare(long, think_gate=False)) <= rewards.MAX_ANSWER_CHARS
    assert prepare("\\boxed{" + "1+" * 600 + "1}", think_gate=False) is None  # a 1201-character \boxed{}
    assert prepare("\\boxed{5", think_gate=False) is None  # never closes
    assert prepare("\\boxed{\\left\\{ x \\right.} = 5", think_gate=False) is not None  # escaped braces do not count
    assert prepare("\\boxed{1} and \\boxed 2", think_gate=False) is not None


def test_math_verify_examples():
    import pandas as pd

    outputs = pd.read_csv(FIXTURES / "math-verify-examples" / "model_outputs.csv")
    assert math_reward(list(outputs.answer), ground_truth=list(outputs.gold)) == [1.0] * len(outputs)
    answers = list(pd.read_csv(FIXTURES / "math-verify-examples" / "few_shot_answers.csv").answer)
    golds = ["26", "3000", "25", "12.5", "[2,5)", "24", "16", r"-\frac{2}{3}"]
    wrong = ["27", "300", "5", "12", "[2,5]", "25", "15", r"\frac{2}{3}"]
    assert math_reward(answers, ground_truth=golds) == [1.0] * 8
    assert math_reward(answers, ground_truth=wrong) == [0.0] * 8


# Gold answers of LUFFY's benchmarks that cannot be verified, and why.
KNOWN_UNPARSEABLE = {
    "$t(0,4]$": "olympiad_bench: malformed gold (the answer is t in (0,4]); a stray 't' before the interval",
}


def test_benchmark_golds_parse_and_verify_themselves():
    """Every gold of valid.all.parquet parses, except the known ones; a completion that boxes the gold scores 1.0."""
    import pandas as pd

    frame = pd.read_parquet(BENCHMARKS / "valid.all.parquet")
    frame["gold"] = [rm["ground_truth"] for rm in frame.reward_model]
    golds = sorted(set(frame.gold))
    completions = [f"The answer is $\\boxed{{{rewards.normalize_gold(g)}}}$." for g in golds]
    score = dict(zip(golds, math_reward(completions, ground_truth=golds)))
    frame["score"] = frame.gold.map(score)

    rates = frame.groupby("data_source").score.agg(parsed=lambda s: s.notna().mean(), rows="size")
    print("\ngold parse rate per benchmark (rows):\n" + rates.to_string())
    unparseable = {g for g, s in score.items() if s is None}
    assert unparseable == set(KNOWN_UNPARSEABLE), f"unparseable golds changed: {sorted(unparseable)}"
    assert (rates.parsed >= 0.998).all(), rates
    not_self_consistent = [g for g, s in score.items() if s == 0.0]
    assert not not_self_consistent, f"golds that do not verify against themselves: {not_self_consistent}"


@pytest.mark.parametrize("name", ["arc_c", "gpqa"])
def test_choice_golds_parse(name):
    import pandas as pd

    frame = pd.read_parquet(BENCHMARKS / f"valid.{name}.parquet")
    golds = [rm["ground_truth"] for rm in frame.reward_model]
    assert all(rewards.normalize_choice(g) for g in golds)
    assert multiple_choice_reward([f"ANSWER: {g}" for g in golds], ground_truth=golds) == [1.0] * len(golds)


def test_trl_interface():
    """Name TRL logs, picklability, log_metric counts, `None` for unparseable golds, extra kwargs ignored."""
    from trl.trainer.utils import get_callable_name

    assert [get_callable_name(r) for r in REWARDS.values()] == [M, L, C, N]
    assert get_callable_name(make_math_reward(timeout=2, name="mine")) == "mine"
    restored = pickle.loads(pickle.dumps(luffy_math_reward))
    assert restored.__name__ == L and restored(["</think>\\boxed{1}"], ground_truth=["1"]) == [1.0]

    logged = {}
    scores = luffy_math_reward(
        ["</think>\\boxed{1}", "</think>\\boxed{1}", "\\boxed{1}"],
        ground_truth=["1", "???", "1"],
        is_off_policy=[True, False, False],
        trainer_state=None,
        log_metric=logged.__setitem__,
        log_extra=lambda *a: None,
    )
    assert scores == [1.0, None, 0.0]
    assert logged == {f"rewards/{L}/gold_unparseable": 1.0, f"rewards/{L}/timeouts": 0.0}
    assert luffy_math_reward([], ground_truth=[]) == []
    with pytest.raises(ValueError, match="ground_truth"):
        luffy_math_reward(["x"])


def _junk(n: int) -> str:
    rng = random.Random(0)
    return bytes(rng.getrandbits(8) for _ in range(n)).decode("latin-1")


# Completions that used to take seconds to minutes in math-verify (or could), and junk of every kind.
ADVERSARIAL = {
    "huge_sum_boxed": "$\\boxed{" + "1+" * 25_000 + "1}$",
    "huge_sum_inline": "$" + "1+" * 25_000 + "1$",
    "huge_sum_unanchored": "answer: " + "1+" * 9_000 + "x",
    "nested_braces": "\\boxed{" + "{" * 5_000 + "1" + "}" * 5_000 + "}",
    "nested_parens_inline": "$" + "(" * 3_000 + "1" + ")" * 3_000 + "$",
    "nested_fracs_inline": "$" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "$",
    "unclosed_braces": "\\boxed{" + "{" * 100_000,
    "power_tower": "$\\boxed{9^{9^{9^{9}}}}$",
    "huge_factorial": "$\\boxed{(10^{10})!}$",
    "binary_junk": _junk(50_000),
    "nul_bytes": "\x00" * 10_000 + "\\boxed{3}",
    "unicode": "答案 😀 \u202e $\\boxed{３}$ " + "\u0301" * 10_000,
    "lone_surrogates": "\ud800 $\\boxed{3}$ \udfff",
    "many_boxed": "\\boxed{1} " * 20_000,
    "huge_number": "$\\boxed{" + "9" * 50_000 + "}$",
    "dollars": "$" * 100_000,
    "backslashes": "\\" * 100_000,
}
LIMIT = 1.0
BOUND = LIMIT + rewards._GRACE + 1.0  # the parent's hard deadline plus scheduling slack on a loaded machine


@pytest.fixture(scope="module")
def fast_reward():
    reward = make_math_reward(think_gate=False, timeout=LIMIT, name="adversarial")
    assert reward(["\\boxed{3}"], ground_truth=["3"]) == [1.0]  # workers started
    return reward


def test_adversarial_completions_return_within_the_limit(fast_reward):
    worst = 0.0
    for name, text in ADVERSARIAL.items():
        start = time.monotonic()
        (score,) = fast_reward([text], ground_truth=["3"])
        elapsed = time.monotonic() - start
        worst = max(worst, elapsed)
        assert elapsed < BOUND, f"{name} took {elapsed:.2f} s"
        assert score == (1.0 if name in ("nul_bytes", "lone_surrogates") else 0.0), name
    print(f"\nworst adversarial completion: {worst:.2f} s (limit {LIMIT} s)")
    # The pool is still healthy afterwards.
    assert fast_reward(["\\boxed{3}"] * 8, ground_truth=["3"] * 8) == [1.0] * 8


def test_adversarial_batch_from_a_worker_thread(fast_reward):
    """From a non-main thread (signals unavailable there), mixed with good completions; timeouts are counted."""
    texts = [ADVERSARIAL["power_tower"], "\\boxed{3}", ADVERSARIAL["nested_parens_inline"], "\\boxed{3}"]
    out, logged = [], {}

    def score():
        out.append(fast_reward(texts, ground_truth=["3"] * 4, log_metric=logged.__setitem__))

    thread = threading.Thread(target=score)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - start < 2 * BOUND
    assert out == [[0.0, 1.0, 0.0, 1.0]]
    assert logged["rewards/adversarial/timeouts"] == 2.0


def test_unresponsive_worker_is_killed_and_replaced(fast_reward):
    """A worker that never answers (stopped, like one stuck in C code) is killed at the hard deadline."""
    pool = rewards._get_pool(None)
    stopped = [worker.proc.pid for worker in pool.workers]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    assert fast_reward(["\\boxed{3}"], ground_truth=["3"]) == [0.0]
    assert LIMIT + rewards._GRACE <= time.monotonic() - start < BOUND
    for pid in stopped:  # the idle stopped worker is still there; end it like a crash
        if pid in [worker.proc.pid for worker in pool.workers]:
            os.kill(pid, signal.SIGKILL)
    # A worker that died while idle is replaced and its task retried: no error, no timeout.
    assert fast_reward(["\\boxed{3}"] * 4, ground_truth=["3"] * 4) == [1.0] * 4
    assert not set(stopped) & {worker.proc.pid for worker in pool.workers}


_RANK_SCRIPT = """
import json, os, sys
from luffy_trl import rewards
scores = rewards.luffy_math_reward(["</think>\\\\boxed{2}", "\\\\boxed{2}"], ground_truth=["2", "2"])
pids = [w.proc.pid for w in rewards._POOL.workers]
print(json.dumps({"scores": scores, "pids": pids, "default": rewards.default_num_workers()}), flush=True)
if sys.argv[1] == "hang":
    import time; time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_each_process_has_its_own_workers_and_they_exit_with_it():
    """Two processes (like two ranks): each starts its own workers; they end at interpreter exit and when the
    parent is killed with SIGKILL (no atexit)."""
    env = {**os.environ, "LOCAL_WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, mode], stdout=subprocess.PIPE, text=True, env=env)
        for mode in ("exit", "hang")
    ]
    reports = [json.loads(proc.stdout.readline()) for proc in procs]
    procs[1].kill()
    for proc in procs:
        proc.wait(timeout=30)
    assert [r["scores"] for r in reports] == [[1.0, 0.0], [1.0, 0.0]]
    cpus = len(os.sched_getaffinity(0))
    assert reports[0]["default"] == max(1, min(8, cpus // 2))
    workers = reports[0]["pids"] + reports[1]["pids"]
    assert len(set(workers)) == len(workers)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]


def test_shutdown_and_restart():
    pool = rewards._get_pool(None)
    procs = [worker.proc for worker in pool.workers]
    rewards.shutdown_reward_workers()
    assert all(proc.poll() is not None for proc in procs)
    assert math_reward(["\\boxed{3}"], ground_truth=["3"]) == [1.0]
