"""A teacher asked during training, in a background thread: `LiveTeacherClient`, and the pure decision of which groups
need a trace (`groups_needing_trace`).

The client runs on the main process only. `submit` queues prompts; a worker thread sends all queued prompts to the
teacher together (its `stream`, so an HTTP teacher keeps `concurrency` requests in flight), appends every reply to a
JSONL `GenerationCache` as it arrives (a resumed run reads replies from it instead of asking again), and hands each
prompt back through `collect` once all its samples are in. Verification happens in the caller's thread (the trainer's
main thread, with the training reward functions), so reward functions never run concurrently with training's own
calls. Training never waits for the teacher: a trace that arrives is used the next time its prompt is drawn.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from luffy_trl.evaluation.backends import Generation
from luffy_trl.evaluation.runner import GenerationCache, Problem, build_requests

logger = logging.getLogger(__name__)
WHEN = ("all_fail", "missing")


def groups_needing_trace(total: torch.Tensor, is_off: torch.Tensor, num_generations: int, when: str,
                         threshold: float = 1.0) -> torch.Tensor:
    """(num_groups,) bool: groups of the gathered batch whose prompt should be sent to the live teacher.

    A group qualifies when none of its rows is a teacher row (its row had no trace) and, for `when="all_fail"`, none
    of its completions is solved (total reward below `threshold`; NaN counts as unsolved); `"missing"` asks for every
    such group. `total` and `is_off` are the gathered (B,) tensors, so every process computes the same answer.
    """
    if when not in WHEN:
        raise ValueError(f"when must be one of {WHEN}, got {when!r}")
    no_teacher = ~is_off.view(-1, num_generations).any(dim=1)
    if when == "missing":
        return no_teacher
    solved = (total.view(-1, num_generations) >= threshold).any(dim=1)  # NaN >= t is False
    return no_teacher & ~solved


@dataclass
class Arrival:
    """A prompt whose samples are all in (or were given up on)."""

    key: str
    request: dict  # what `submit` got: prompt messages, gold, row
    generations: list[Generation]
    skipped: int
    seconds: float  # from submit to the last sample


@dataclass
class _Job:
    key: str
    request: dict
    submitted: float
    generations: list = field(default_factory=list)
    remaining: int = 0
    skipped: int = 0


class LiveTeacherClient:
    """Background requests to a teacher (`BackendTeacher`, `OpenAITeacher`, anything with `stream`).

    Args:
        teacher: the teacher.
        protocol: sampling and samples per prompt (`default_samples`).
        cache: a `GenerationCache` (give it a path to keep replies across runs).
        name: the benchmark name in the cache keys.
    """

    def __init__(self, teacher, protocol, cache: GenerationCache | None = None, name: str = "live"):
        self.teacher, self.protocol, self.name = teacher, protocol, name
        self.cache = cache if cache is not None else GenerationCache()
        self._queue: queue.Queue = queue.Queue()
        self._done: list[Arrival] = []
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.in_flight = 0
        self._thread = threading.Thread(target=self._run, name="live-teacher", daemon=True)
        self._thread.start()

    def submit(self, key: str, messages: Sequence[dict], gold: str, row: dict) -> None:
        with self._lock:
            self.in_flight += 1
        self._queue.put(_Job(key, {"messages": list(messages), "gold": gold, "row": row}, time.perf_counter()))

    def collect(self) -> list[Arrival]:
        """The prompts completed since the last call (does not wait)."""
        with self._lock:
            done, self._done = self._done, []
            self.in_flight -= len(done)
        return done

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted prompt has arrived (tests, the end of training); True if so."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            with self._lock:
                if self.in_flight == len(self._done) or self.error is not None:
                    return self.error is None
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:  # everything queued goes to the teacher together
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
            try:
                self._serve(jobs)
            except BaseException as err:  # noqa: BLE001 (handed to the trainer, which raises it on every process)
                logger.error("live teacher failed: %s", err)
                self.error = err
                return

    def _serve(self, jobs: list[_Job]) -> None:
        problems = [Problem(self.name, job.key, tuple(job.request["messages"]), job.request["gold"]) for job in jobs]
        requests = build_requests(problems, self.protocol, getattr(self.teacher, "tokenizer", None))
        by_key = {job.key: job for job in jobs}
        for job in jobs:
            job.remaining = self.protocol.samples_for(self.name)
        pending = []
        for request in requests:
            if request.key in self.cache:
                self._arrive(by_key[request.problem.problem_id], self.cache[request.key])
            else:
                pending.append(request)
        for request, generation in self.teacher.stream(pending, self.protocol):
            if generation is not None:
                self.cache.add([request], [generation])
            self._arrive(by_key[request.problem.problem_id], generation)

    def _arrive(self, job: _Job, generation: Generation | None) -> None:
        if generation is None:
            job.skipped += 1
        else:
            job.generations.append(generation)
        job.remaining -= 1
        if job.remaining == 0:
            arrival = Arrival(job.key, job.request, job.generations, job.skipped, time.perf_counter() - job.submitted)
            with self._lock:
                self._done.append(arrival)
