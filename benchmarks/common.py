"""Shared pieces of the benchmarks: model presets, long teacher traces, device, synchronised timers, peak memory.

Peak memory is the maximum of bytes allocated by torch above what was live when the measurement started:
`torch.cuda.max_memory_allocated` on a GPU; on a CPU the allocation events of `torch.profiler` (profile_memory),
summed in time order. Both count tensors only (not the Python heap or the allocator's cache), which is what a
change in the loss or the batch layout can change.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

# Model shapes. "gpu" is Qwen2-0.5B's architecture (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864,
# vocabulary 151,936, tied embeddings), randomly initialised, in bf16.
PRESETS = {
    "cpu": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=None,
                prompts=2, max_completion_length=64, dtype="float32", trace_tokens=64),
    # A CPU model large enough that generation cost grows with the number of rows (batch-bound generation).
    "cpu-batch-bound": dict(hidden_size=512, layers=4, heads=8, kv_heads=2, intermediate_size=1024,
                            vocab_size=None, prompts=4, max_completion_length=64, dtype="float32",
                            trace_tokens=64),
    "gpu": dict(hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864, vocab_size=151936,
                prompts=4, max_completion_length=256, dtype="bfloat16", trace_tokens=256),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(tokenizer, hidden_size, layers, heads, kv_heads, intermediate_size, vocab_size=None,
                dtype="float32", seed=0, **_):
    """`luffy_trl.toy.toy_model` of a preset's shape, initialised on `device()` (seconds saved per arm on a GPU),
    in `dtype`. `vocab_size` may exceed the tokenizer's (see `toy_model`)."""
    from luffy_trl.toy import toy_model

    with torch.device(device()):
        model = toy_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads,
                          intermediate_size=intermediate_size, vocab_size=vocab_size, max_position_embeddings=4096)
    return model.to(dtype=getattr(torch, dtype))


def trace_dataset(tokenizer, n: int = 64, trace_tokens: int | None = None):
    """`toy_math_dataset(n)`, with teacher traces padded with reasoning text to at least `trace_tokens` tokens.

    Traces longer than `max_completion_length` are cut to it by the trainer, so `trace_tokens` equal to it gives
    teacher rows as long as the longest sampled row: both arms then train on tensors of the same shape.
    """
    from luffy_trl.toy import toy_math_dataset

    dataset = toy_math_dataset(n)
    if not trace_tokens:
        return dataset
    filler = " Let me check this step again: adding the two numbers gives the same result."
    repeats = trace_tokens // max(1, len(tokenizer(filler)["input_ids"])) + 1

    def lengthen(row):
        content = row["target"][0]["content"]
        head, tail = content.split("</think>")
        return {"target": [{"role": "assistant", "content": head + filler * repeats + "\n</think>" + tail}]}

    return dataset.map(lengthen)


class Timer:
    """Accumulates synchronised wall-clock durations: `with timer: ...` appends one."""

    def __init__(self):
        self.times: list[float] = []

    def __enter__(self):
        sync()
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        sync()
        self.times.append(time.perf_counter() - self._start)
        return False

    def median(self, skip: int = 0) -> float:
        values = self.times[skip:] or self.times
        return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def peak_memory():
    """Yields a dict whose "bytes" is set, on exit, to the peak of torch allocations above the starting level."""
    result = {"bytes": 0}
    if torch.cuda.is_available():
        sync()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        sync()
        result["bytes"] = torch.cuda.max_memory_allocated() - start
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    result["bytes"] = peak


def ratio_summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
