"""Teacher traces for any question/answer dataset: generate, verify, cache (docs/traces.md).

Modules: `teachers` (a local model through the evaluation backends, an OpenAI-compatible HTTP endpoint),
`generate` (generate → verify → select → dataset, resumable), `fake_server` (a local OpenAI-compatible server for
tests and benchmarks), `live` (a teacher asked during training). Names are imported lazily::

    from luffy_trl.traces import OpenAITeacher, make_traces

    teacher = OpenAITeacher("http://localhost:8000/v1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", concurrency=32)
    dataset, summary = make_traces(dataset, teacher, cache_path="traces/cache.jsonl", teacher_id="r1-distill-7b")
"""

from importlib import import_module

_LAZY = {
    "BackendTeacher": "teachers", "OpenAITeacher": "teachers", "TeacherError": "teachers",
    "TRACES": "generate", "TraceSummary": "generate", "make_traces": "generate", "problems_from_dataset": "generate",
    "generate_traces": "generate", "verify_samples": "generate", "select_traces": "generate",
    "write_dataset": "generate",
    "FakeOpenAIServer": "fake_server",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"luffy_trl.traces.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'luffy_trl.traces' has no attribute {name!r}")
