"""A live teacher during training: teacher slots whose row has no trace get one from a teacher, asked in the background.

`LiveTeacherMixin` is one of the pieces of `MixedPolicyGRPOTrainer` (`luffy_trl.trainer`); it wraps
`_generate_and_score_completions` with `super()` and is off unless `live_teacher_url` is set or a `live_teacher` is
passed to the trainer. Per training generation batch:

1. sync (a collective, every batch): the main process collects the prompts whose teacher samples arrived, verifies
   them with the trainer's reward functions (a sample is correct when its weighted total reward reaches
   `success_reward_threshold`; correct samples longer than `max_completion_length` policy tokens are dropped) and
   broadcasts the new traces, so every process holds the same trace cache;
2. fill: a row in a teacher slot whose own teacher column is empty takes the cached traces of its prompt;
3. generate and score (the rest of the trainer, unchanged);
4. request (a collective, every batch): from the gathered rewards, the groups with no teacher row whose on-policy
   samples all failed (`live_teacher_when="all_fail"`; `"missing"`: every group without a teacher row) are
   identified identically on every process (`luffy_trl.traces.live.groups_needing_trace`); the process holding the
   first row of such a group contributes its prompt, the prompts are gathered, and the main process queues the new
   ones to `LiveTeacherClient`, whose thread asks the teacher while training goes on.

Training never waits for the teacher: the only time spent in the training loop is the sync (verification of arrived
samples, one broadcast) and the request gather, logged as `live_teacher/wait_seconds`; the teacher's latency is
logged as `live_teacher/latency_seconds`. A trace is used from the next time its prompt is drawn (a later epoch).
Both collectives run on every process of every training batch whenever the live teacher is on (config), whatever
rows a process holds: the rule of `luffy_trl.trainer`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather, gather_object

from luffy_trl.data import _ground_truth
from luffy_trl.teacher import teacher_texts
from luffy_trl.trainer.generation import IS_OFF_POLICY, teacher_slot

logger = logging.getLogger("luffy_trl.trainer")
LIVE_CACHE_FILE = "live_teacher_generations.jsonl"
# Logged every training batch while the live teacher is on (docs/metrics.md).
LIVE_COUNTERS = ("requested", "arrived", "verified", "unsolved", "skipped_samples", "failed_attempts", "pending",
                 "filled", "cache_size", "wait_seconds", "latency_seconds")


def failed_attempts(teacher) -> int:
    """The teacher's failed attempts so far (retries and skips of an HTTP teacher; 0 for a local one), so that a
    struggling teacher shows in the logs while requests are still being retried."""
    stats = getattr(teacher, "stats", {})
    return sum(count for key, count in stats.items() if key.startswith(("retry/", "skipped/")))


def prompt_key(prompt, gold) -> str:
    """The live cache's key of a prompt (a string or messages) and its gold answer."""
    return hashlib.sha256(json.dumps([prompt, "" if gold is None else str(gold)], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


class LiveTeacherMixin:
    """Fills trace-less teacher slots from a teacher asked in a background thread (see the module docstring)."""

    _live = None  # set by _setup_live_teacher when the live teacher is on

    def _setup_live_teacher(self, teacher=None) -> None:
        """Build the teacher client (main process) and the shared state; called at the end of `__init__`."""
        args = self.args
        if teacher is None and args.live_teacher_url is None:
            return
        if self.num_off_policy == 0:
            raise ValueError("the live teacher fills teacher slots: it needs num_off_policy > 0")
        if any(isinstance(f, torch.nn.Module) for f in self.reward_funcs):
            raise ValueError("the live teacher verifies traces with the reward functions, which must then be "
                             "callables (not reward models)")
        from luffy_trl.traces.generate import TRACES

        protocol = TRACES.with_overrides(num_samples=args.live_teacher_num_samples,
                                         max_new_tokens=args.live_teacher_max_new_tokens or self.max_completion_length,
                                         seed=args.seed)
        client = None
        if self.accelerator.is_main_process:
            import os

            from luffy_trl.evaluation.runner import GenerationCache, run_hash
            from luffy_trl.traces.live import LiveTeacherClient
            from luffy_trl.traces.teachers import OpenAITeacher

            if teacher is None:
                api_key = os.environ.get(args.live_teacher_api_key_env) if args.live_teacher_api_key_env else None
                teacher = OpenAITeacher(args.live_teacher_url, args.live_teacher_model or "default",
                                        api_key=api_key, concurrency=args.live_teacher_concurrency,
                                        timeout=args.live_teacher_timeout)
            teacher_id = f"{args.live_teacher_url}|{args.live_teacher_model}|{getattr(teacher, 'name', '')}"
            cache = GenerationCache(Path(args.output_dir) / LIVE_CACHE_FILE, run_hash(teacher_id, protocol))
            client = LiveTeacherClient(teacher, protocol, cache)
        self._live = {"client": client, "traces": {}, "asked": set()}

    # ------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if self._live is None or not self.model.training:  # the same on every process
            return super()._generate_and_score_completions(inputs)
        start = time.perf_counter()
        stats = self._live_sync()
        inputs, filled = self._live_fill(inputs)
        waited = time.perf_counter() - start
        output = super()._generate_and_score_completions(inputs)
        start = time.perf_counter()
        stats["requested"] = self._live_request(inputs)
        waited += time.perf_counter() - start
        stats["filled"] = gather(torch.tensor([float(filled)], device=self.accelerator.device)).sum().item()
        stats["cache_size"] = len(self._live["traces"])
        stats["wait_seconds"] = waited
        metrics = self._metrics["train"]
        for key in LIVE_COUNTERS:
            metrics[f"live_teacher/{key}"].append(float(stats.get(key, 0.0)))
        return output

    def _live_sync(self) -> dict:
        """Verify what arrived (main process) and give every process the new traces. Collective."""
        live = self._live
        payload = [None]
        if self.accelerator.is_main_process:
            client = live["client"]
            if client.error is not None:
                payload = [{"error": f"{type(client.error).__name__}: {client.error}"}]
            else:
                arrivals = client.collect()
                try:  # an error here must reach every process (they wait in the broadcast below)
                    payload = [{"traces": self._live_verify(arrivals), "arrived": len(arrivals),
                                "skipped_samples": sum(a.skipped for a in arrivals), "pending": client.in_flight,
                                "failed_attempts": failed_attempts(client.teacher),
                                "latency_seconds": (sum(a.seconds for a in arrivals) / len(arrivals)
                                                    if arrivals else 0.0)}]
                except Exception as err:  # noqa: BLE001
                    logger.exception("verifying live teacher samples failed")
                    payload = [{"error": f"verification: {type(err).__name__}: {err}"}]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        update = payload[0]
        if "error" in update:
            raise RuntimeError(f"the live teacher failed: {update['error']}. Its replies so far are cached in "
                               f"{Path(self.args.output_dir) / LIVE_CACHE_FILE}; fix the teacher and resume.")
        new = update.pop("traces")
        live["traces"].update({key: traces for key, traces in new.items() if traces})
        update["verified"] = sum(bool(traces) for traces in new.values())
        update["unsolved"] = sum(not traces for traces in new.values())
        return update

    def _live_verify(self, arrivals) -> dict[str, list[str]]:
        """key -> the correct traces (shortest first, at most max_completion_length policy tokens; [] if none)."""
        from luffy_trl.evaluation.runner import Problem
        from luffy_trl.traces.generate import (
            policy_lengths,
            select_traces,
            verify_samples,
        )

        out = {}
        weights = self.reward_weights.tolist()
        for arrival in arrivals:
            texts = [g.text for g in arrival.generations]
            request = arrival.request
            row = {k: v for k, v in request["row"].items() if k != "prompt"}
            row[IS_OFF_POLICY] = True  # scored as the teacher row it will be
            problem = Problem("live", arrival.key, tuple(request["messages"]), request["gold"])
            scores = verify_samples(texts, [problem] * len(texts), [row] * len(texts), self.reward_funcs,
                                    reward_weights=weights, threshold=self.args.success_reward_threshold,
                                    conversational=isinstance(request["row"].get("prompt"), list),
                                    extra_kwargs={"trainer_state": self.state, "log_extra": _ignore,
                                                  "log_metric": _ignore})
            correct = [t for t, s in zip(texts, scores) if s >= self.args.success_reward_threshold]
            lengths = policy_lengths(self._tokenizer, correct)
            chosen, _ = select_traces(correct, lengths, max_length=self.max_completion_length, keep="all")
            out[arrival.key] = [correct[i] for i in chosen]
        return out

    def _live_fill(self, inputs: list[dict]) -> tuple[list[dict], int]:
        """Rows in a teacher slot without a trace of their own take their prompt's live traces."""
        column, traces = self.args.off_policy_column, self._live["traces"]
        if not traces:
            return inputs, 0
        base = self.accelerator.process_index * len(inputs)
        out, filled = [], 0
        for i, row in enumerate(inputs):
            if teacher_slot(base + i, self.num_generations, self.num_off_policy) is not None and not _has_trace(
                    row, column):
                key = prompt_key(row.get("prompt"), _ground_truth(row))
                if key in traces:
                    row = {**row, column: list(traces[key])}
                    filled += 1
            out.append(row)
        return out, filled

    def _live_request(self, inputs: list[dict]) -> int:
        """Queue the prompts of the groups that need a trace (decided on gathered rewards). Collective."""
        from luffy_trl.traces.live import groups_needing_trace

        args, live = self.args, self._live
        total, is_off = self._batch_rewards
        needed = groups_needing_trace(total, is_off, self.num_generations, args.live_teacher_when,
                                      args.success_reward_threshold)
        base = self.accelerator.process_index * len(inputs)
        mine = []
        for i, row in enumerate(inputs):
            group, first = divmod(base + i, self.num_generations)
            if first == 0 and needed[group] and not _has_trace(row, args.off_policy_column):
                mine.append((prompt_key(row.get("prompt"), _ground_truth(row)), row))
        everyone = gather_object(mine) if self.accelerator.num_processes > 1 else mine
        requested = 0
        if self.accelerator.is_main_process:
            for key, row in everyone:
                if key in live["asked"]:
                    continue
                live["asked"].add(key)
                prompt = row.get("prompt")
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                live["client"].submit(key, messages, _ground_truth(row),
                                      {k: v for k, v in row.items() if k != IS_OFF_POLICY})
                requested += 1
        return requested


def _ignore(*args, **kwargs) -> None:
    """Stands in for TRL's `log_metric` / `log_extra` while verifying live samples (not training rows)."""


def _has_trace(row: dict, column: str) -> bool:
    try:
        return bool(teacher_texts(row.get(column), column=column))
    except TypeError:  # counted by the trainer as off_policy/invalid
        return False
