"""Verifiable rewards for LUFFY: math-verify answers and multiple-choice letters, with a hard time limit.

Reward functions follow TRL's interface, `f(completions, ground_truth=None, **kwargs) -> list[float | None]`, and
accept plain (`str`) and conversational (`[{"role": "assistant", "content": str}]`) completions:

- `luffy_math_reward`: LUFFY's reward. The completion must contain `</think>` (the generation prompt may have opened
  `<think>`); the text after it (up to a second `</think>`, as upstream's `split("</think>")[1]`) is verified against
  the gold answer with math-verify, gold first. 1.0 or 0.0.
- `math_reward`: the same verification on the whole completion, without the think gate.
- `number_reward`: `math_reward` whose final answer must also be written as a number (`28`, `-5`, `1,234`, `3.5`),
  not as an expression that equals the gold (`60 - 32`, `\\frac{56}{2}`). math-verify, as LUFFY calls it, compares
  values symbolically, so on arithmetic tasks it does the arithmetic for the model: a policy that copies the
  operands and the operation out of the question scores 1.0. Use it for tasks whose answer is a computed number
  (`luffy_trl.tasks.arithmetic`).
- `multiple_choice_reward`: letter (or digit) answers such as GPQA, ARC-c and MMLU-Pro, for evaluation.

A gold answer that does not parse gives `None` (TRL: "not applicable"; the row is left out of the reward mean) for
every completion of its row. A completion whose verification does not finish within the time limit (or whose worker
fails) scores 0.0. Both are counted and reported through TRL's `log_metric` as `rewards/<name>/gold_unparseable` and
`rewards/<name>/timeouts` (counts per call). `make_math_reward` and `make_choice_reward` build variants with another
time limit, think gate or name; `make_math_reward(numeric=True)` builds `number_reward`'s variants.

Hard time limit. math-verify's own timeouts use `signal.alarm`, which only works in the main thread, and a signal
cannot interrupt a long C call. Verification therefore runs in a per-process pool of persistent worker processes
(plain `python` subprocesses that load only this file: never the training script, never torch). A worker stops its
task with a timer signal after `timeout` seconds; the parent kills a worker that has not answered `timeout + 1`
seconds after it got the task and starts a fresh one. This works from any thread and in every process of a
distributed run (each process has its own pool). Workers exit when their parent exits or dies; as a last resort the
kernel kills a worker that spends `timeout + 3` seconds of CPU time on one task.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds per completion
MAX_ANSWER_CHARS = 20_000  # longer answers keep their last lines only (the final answer is at the end)
MAX_BOXED_CHARS = 1_000  # a final \boxed{} longer than this is not an answer: 0.0 without parsing
CHOICE_LABELS = "ABCDEFGHIJ123456789"  # MMLU-Pro has up to 10 options; some ARC-c items are numbered

_GRACE = 1.0  # extra seconds before the parent kills a worker that has not answered
_STARTUP_LIMIT = 120.0  # seconds for a new worker to import math-verify

# Gold answers: LaTeX then plain expressions, as math-verify's defaults (and LUFFY).
_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# Answers: a \boxed{} first (several \boxed{} with different values parse as a set), then "final answer is"/"answer:"
# patterns, then the last LaTeX or plain expression. Valid shorthands such as \frac43 and \sqrt2 are accepted.
_ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


# ---------------------------------------------------------------------------------------------------------------------
# Pure scoring functions (they run inside the worker processes)
# ---------------------------------------------------------------------------------------------------------------------
def _latex2sympy_workarounds(text: str) -> str:
    """Rewrite notations that latex2sympy cannot parse into equivalent ones it can: a subscripted `E` (`E_1`, read
    as a malformed number), `_{\\max}`/`_{\\min}` subscripts, and `_\\odot` (solar units). Applied to gold answers and
    to completions alike, so that both sides keep matching."""
    text = re.sub(r"(?<![\\A-Za-z])E_", r"\\mathcal{E}_", text)
    text = re.sub(r"_\{\\(max|min)\s*\}", r"_{\1}", text)
    return re.sub(r"_\{?\\odot\s*\}?", "_{sun}", text)


def normalize_gold(gold: str) -> str:
    """Clean a gold answer before parsing (a few benchmark golds need it): keep only the first formula of a gold
    that mixes `$...$` formulas with prose (`$f(x)=ax+b$, where $b$ is ...`), strip `$` delimiters and a trailing
    period, turn `np.arcsin` into `\\arcsin`, and apply the latex2sympy workarounds."""
    gold = str(gold).strip()
    formulas = re.findall(r"(?<!\\)\$([^$]+)(?<!\\)\$", gold)
    prose = re.sub(r"(?<!\\)\$[^$]*(?<!\\)\$|\\[A-Za-z]+", " ", gold)
    if formulas and re.search(r"[A-Za-z]{3,}", prose):
        gold = formulas[0]
    gold = re.sub(r"(?<!\\)\$", "", gold).strip().rstrip(".").strip()
    return _latex2sympy_workarounds(re.sub(r"\bnp\.([a-z]+)", r"\\\1", gold))


@functools.lru_cache(maxsize=1024)
def parse_gold(gold: str) -> list | None:
    """Parse a gold answer as LUFFY does (`parse("$" + gold + "$")`, after `normalize_gold`).

    Returns math-verify's list of candidates, or None when no candidate is a math object (a bare string is not a
    usable gold: it would only match a character-identical answer)."""
    gold = normalize_gold(gold)
    parsed = parse(f"${gold}$", list(_GOLD_CONFIG), parsing_timeout=None) if gold else []
    return parsed if any(not isinstance(item, str) for item in parsed) else None


# A final answer written as a decimal number: digits, an optional sign, thousands commas, a decimal part.
_NUMBER_LITERAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def score_math(gold: str, answer: str | None, numeric: bool = False) -> float | None:
    """1.0 if `answer` verifies against `gold` (gold first), 0.0 if not or if `answer` is None, None if the gold does
    not parse. `numeric`: 0.0 also unless the extracted final answer is written as a decimal number (digits, an
    optional sign, thousands commas, a decimal part): `\\boxed{28}` and "... = 28" count, `\\boxed{60 - 32}` and
    "60 - 32" do not, although math-verify finds them equal to 28. No time limit: call through a reward function, or
    in the main thread with your own limit."""
    gold_parsed = parse_gold(gold)
    if gold_parsed is None:
        return None
    if answer is None:
        return 0.0
    answer_parsed = parse(_latex2sympy_workarounds(answer), list(_ANSWER_CONFIG), parsing_timeout=None)
    if numeric:
        written = next((item for item in answer_parsed if isinstance(item, str)), None)
        if written is None or not _NUMBER_LITERAL.fullmatch(written.replace(" ", "")):
            return 0.0
    return float(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def normalize_choice(gold: str, labels: str = CHOICE_LABELS) -> str | None:
    """The option label of a multiple-choice gold answer (`"C"`, `"(c)"`, `"2"`), or None."""
    label = str(gold).strip().strip("()").strip().upper()
    return label if len(label) == 1 and label in labels else None


def extract_choice(text: str, labels: str = CHOICE_LABELS) -> str | None:
    """The option label a completion chose: the last `\\boxed{}` that starts with a label, else the last
    "answer: X" / "answer is (X)", else a last line that is only a label (`**C**`, `(C)`). None if there is none."""
    label = f"[{re.escape(labels)}]"
    boxed = re.findall(r"\\boxed\s*\{(.{0,200}?)\}(?!\})", text)
    candidates = [re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{|[{}$\s*]", "", b) for b in boxed]
    for candidate in reversed(candidates):
        match = re.match(rf"\(?({label})(?![A-Za-z0-9])", candidate, re.IGNORECASE)
        if match:
            return match.group(1).upper()
    answer = re.findall(rf"(?i:answer)(?: is)?\s*[:：]?\s*\**\s*\(?({label})(?![A-Za-z0-9])", text)
    if answer:
        return answer[-1].upper()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = re.fullmatch(rf"[\s*(]*({label})[\s*).]*", lines[-1]) if lines else None
    return last.group(1) if last else None


def score_choice(gold: str, answer: str | None) -> float | None:
    """1.0 if the completion chose the gold option, 0.0 otherwise, None if the gold is not an option label."""
    gold_label = normalize_choice(gold)
    if gold_label is None:
        return None
    return float(answer is not None and extract_choice(answer) == gold_label)


_SCORERS = {"math": score_math, "number": functools.partial(score_math, numeric=True), "choice": score_choice}


def _last_boxed_too_long(text: str) -> bool:
    """Whether the last `\\boxed{` holds more than `MAX_BOXED_CHARS` characters or never closes."""
    start = text.rfind("\\boxed")
    brace = text.find("{", start, start + 16) if start >= 0 else -1
    if brace < 0:
        return False
    depth = 0
    for token in re.findall(r"\\.|[{}]", text[brace : brace + MAX_BOXED_CHARS + 2]):  # `\{` and `\}` do not count
        depth += (token == "{") - (token == "}")
        if depth == 0:
            return False
    return True


def prepare_answer(text: str, think_gate: bool) -> str | None:
    """The part of a completion to verify, or None when it cannot score (cheap checks before any parsing).

    With `think_gate`, the text between the first and second `</think>` (None without `</think>`). Answers longer
    than `MAX_ANSWER_CHARS` keep their last whole lines; an answer whose last `\\boxed{` holds more than
    `MAX_BOXED_CHARS` characters (or never closes) gives None."""
    if think_gate:
        if "</think>" not in text:
            return None
        text = text.split("</think>", 2)[1]
    if len(text) > MAX_ANSWER_CHARS:
        tail = text[-MAX_ANSWER_CHARS:]
        text = tail.split("\n", 1)[1] if "\n" in tail else tail
    return None if _last_boxed_too_long(text) else text


# ---------------------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------------------
class _SoftTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so that math-verify's `except Exception` cannot swallow it."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


def _limit_cpu_time(seconds: float) -> None:
    """Let the kernel kill this process once it has used `seconds` more CPU time (plus 2 s): the backstop for a
    task stuck in C code whose parent is gone (the parent normally kills it first)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 2
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _worker_main() -> None:
    """Worker loop: one JSON task per stdin line, `[kind, gold, answer, timeout]`; one `[score, status]` line back,
    status "ok", "timeout" or "error". Exits when stdin closes (the parent exited)."""
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file if the CPU-time limit kills this worker
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then ends the workers
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": this loop is the timeout
    protocol.write(b'"ready"\n')
    for line in sys.stdin.buffer:
        kind, gold, answer, limit = json.loads(line)
        _limit_cpu_time(limit + _GRACE)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, limit)
                result = [_SCORERS[kind](gold, answer), "ok"]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            result = [0.0, "timeout"]
        except Exception:
            traceback.print_exc()
            result = [0.0, "error"]
        protocol.write(json.dumps(result).encode() + b"\n")


# Loads this very file by path (it imports nothing from luffy_trl): the worker runs the parent's code without importing
# the package or changing sys.path.
_WORKER_COMMAND = (
    "import importlib.util, sys; spec = importlib.util.spec_from_file_location('luffy_reward_worker', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module._worker_main()"
)


class _Worker:
    """One worker subprocess and the task it holds: `(index, deadline)` or None."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started = time.monotonic()
        self.ready = False
        self.task = None

    def send(self, message) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self):
        """The next message, or None if the worker died."""
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class _WorkerPool:
    """Persistent verification workers of one process; `run` scores a batch with a per-task deadline."""

    def __init__(self, num_workers: int):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.workers = [_Worker() for _ in range(num_workers)]

    def resize(self, num_workers: int) -> None:
        with self.lock:
            while len(self.workers) > num_workers:
                self.workers.pop().kill()
            self.workers += [_Worker() for _ in range(num_workers - len(self.workers))]

    def close(self) -> None:
        """Kill the workers. Does not wait for a batch in progress: this also runs at interpreter exit."""
        for worker in self.workers:
            worker.kill()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker()

    def run(self, tasks: list[list], limit: float) -> list[tuple[float | None, str]]:
        """Score `tasks` (`[kind, gold, answer]` each) in parallel; `(score, status)` per task, status "ok",
        "timeout" (no answer in time: 0.0) or "error" (the worker died twice on it, or raised: 0.0). A task whose
        worker dies is retried once on a fresh worker (the worker may have died before it got the task)."""
        with self.lock:
            results = [None] * len(tasks)
            crashes = [0] * len(tasks)
            todo = deque(range(len(tasks)))
            while todo or any(w.task for w in self.workers):
                for worker in self.workers:
                    if worker.ready and worker.task is None and todo:
                        index = todo.popleft()
                        try:
                            worker.send([*tasks[index], limit])
                        except OSError:  # died while idle
                            todo.appendleft(index)
                            self._replace(worker)
                            continue
                        worker.task = (index, time.monotonic() + limit + _GRACE)
                deadlines = [w.task[1] for w in self.workers if w.task]
                deadlines += [w.started + _STARTUP_LIMIT for w in self.workers if not w.ready]
                pending = {w.proc.stdout: w for w in self.workers if w.task or not w.ready}
                for stream in wait(list(pending), max(0.0, min(deadlines) - time.monotonic())):
                    worker = pending[stream]
                    message = worker.receive()
                    if message is None and not worker.ready:
                        raise RuntimeError("a reward worker failed to start (its error is on stderr)")
                    if message == "ready":
                        worker.ready = True
                    elif message is None:  # died with a task
                        index = worker.task[0]
                        crashes[index] += 1
                        if crashes[index] < 2:
                            todo.appendleft(index)
                        else:
                            results[index] = (0.0, "error")
                        self._replace(worker)
                    else:
                        results[worker.task[0]] = tuple(message)
                        worker.task = None
                now = time.monotonic()
                for worker in list(self.workers):
                    if worker.task and now > worker.task[1]:
                        results[worker.task[0]] = (0.0, "timeout")
                        self._replace(worker)
                    elif not worker.ready and now > worker.started + _STARTUP_LIMIT:
                        raise RuntimeError(f"a reward worker did not start within {_STARTUP_LIMIT:.0f} s")
            return results


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def default_num_workers() -> int:
    """CPUs available to this process divided among the processes of this node (`LOCAL_WORLD_SIZE`), 1 to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def _get_pool(num_workers: int | None) -> _WorkerPool:
    """This process's worker pool, started on first use (a forked child starts its own)."""
    global _POOL
    num_workers = num_workers or default_num_workers()
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _WorkerPool(num_workers)
        elif len(_POOL.workers) != num_workers:
            _POOL.resize(num_workers)
        return _POOL


def shutdown_reward_workers() -> None:
    """Stop this process's verification workers (also runs at interpreter exit; the next reward call restarts
    them)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(shutdown_reward_workers)


# ---------------------------------------------------------------------------------------------------------------------
# TRL reward functions
# ---------------------------------------------------------------------------------------------------------------------
def completion_text(completion) -> str:
    """The text of a plain (`str`) or conversational (list of messages; the last one is used) completion."""
    if isinstance(completion, str):
        return completion
    content = completion[-1].get("content") if completion else ""
    if isinstance(content, list):  # multimodal parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


class VerifiedReward:
    """A TRL reward function scoring completions against the `ground_truth` column in worker processes.

    Args:
        kind: `"math"` (math-verify), `"number"` (math-verify, the answer written as a number) or `"choice"`
            (option letters).
        think_gate: score only the text after `</think>`; 0.0 without `</think>`.
        timeout: seconds per completion before it scores 0.0 (counted as a timeout).
        num_workers: worker processes for this process (shared by all rewards); default `default_num_workers()`.
        name: the name TRL logs the reward under (`rewards/<name>/mean`).

    A class rather than a closure so that it pickles (TRL may send reward functions to other processes).
    """

    def __init__(self, kind: str, think_gate: bool, timeout: float, num_workers: int | None, name: str):
        if kind not in _SCORERS:
            raise ValueError(f"kind must be one of {sorted(_SCORERS)}, got {kind!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.kind, self.think_gate, self.timeout, self.num_workers = kind, think_gate, timeout, num_workers
        self.__name__ = name

    def __repr__(self) -> str:
        return f"<reward {self.__name__}: {self.kind}, think_gate={self.think_gate}, timeout={self.timeout}s>"

    def __call__(self, completions, ground_truth=None, log_metric=None, **kwargs) -> list[float | None]:
        if ground_truth is None:
            raise ValueError(f"{self.__name__} needs a `ground_truth` dataset column with the gold answers")
        if len(ground_truth) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(ground_truth)} ground_truth values")
        tasks = [
            [self.kind, "" if gold is None else str(gold), prepare_answer(completion_text(c), self.think_gate)]
            for c, gold in zip(completions, ground_truth)
        ]
        results = _get_pool(self.num_workers).run(tasks, self.timeout) if tasks else []
        scores = [score for score, _ in results]
        unparseable = sum(score is None for score in scores)
        timeouts = sum(status != "ok" for _, status in results)
        if unparseable or timeouts:
            logger.debug("%s: %d unparseable gold answers, %d timeouts", self.__name__, unparseable, timeouts)
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/gold_unparseable", float(unparseable))
            log_metric(f"rewards/{self.__name__}/timeouts", float(timeouts))
        return scores


def make_math_reward(
    *,
    think_gate: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int | None = None,
    name: str | None = None,
    numeric: bool = False,
) -> VerifiedReward:
    """A math-verify reward; `think_gate=True` is LUFFY's reward, `False` verifies the whole completion.
    `numeric=True` also requires the final answer to be written as a number (`score_math(numeric=True)`)."""
    if numeric:
        return VerifiedReward("number", think_gate, timeout, num_workers, name or "number_reward")
    name = name or ("luffy_math_reward" if think_gate else "math_reward")
    return VerifiedReward("math", think_gate, timeout, num_workers, name)


def make_choice_reward(
    *,
    think_gate: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int | None = None,
    name: str | None = None,
) -> VerifiedReward:
    """A multiple-choice reward: the gold is an option label (`A`-`J`, `1`-`9`)."""
    return VerifiedReward("choice", think_gate, timeout, num_workers, name or "multiple_choice_reward")


luffy_math_reward = make_math_reward(think_gate=True)
math_reward = make_math_reward(think_gate=False)
number_reward = make_math_reward(think_gate=False, numeric=True)
multiple_choice_reward = make_choice_reward()
