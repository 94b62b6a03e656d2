"""Evaluation on LUFFY's benchmarks: avg@k and pass@k, resumable, as a script and as a training callback.

Modules: `metrics` (pure avg@k / pass@k / aggregation), `protocols` (`LUFFY`, `R1`), `backends` (transformers,
vLLM), `benchmarks` (LUFFY's benchmark names), `runner` (problems, cache, generation, scoring), `report` (JSON, Markdown, PNG), `callback`
(`LuffyEvalCallback`), `cli` (`EvalArguments`, `main` of `examples/eval_luffy.py`). Names are imported lazily::

    from luffy_trl.evaluation import LUFFY, TransformersBackend, evaluate, load_problems, luffy_benchmark

    problems = load_problems(luffy_benchmark("math"), max_problems=20)  # LUFFY's files ship with the package
    summary = evaluate(TransformersBackend(model, tokenizer), problems, LUFFY.with_overrides(max_new_tokens=1024))

See docs/evaluation.md.
"""

from importlib import import_module

_LAZY = {
    "avg_at_k": "metrics", "pass_at_k": "metrics", "benchmark_metrics": "metrics", "ScoredSample": "metrics",
    "Protocol": "protocols", "LUFFY": "protocols", "R1": "protocols", "get_protocol": "protocols",
    "Generation": "backends", "TransformersBackend": "backends", "VLLMBackend": "backends", "load_backend": "backends",
    "BenchmarkSpec": "runner", "Problem": "runner", "luffy_benchmark": "runner", "load_problems": "runner",
    "GenerationCache": "runner", "evaluate": "runner", "run_evaluation": "runner",
    "LUFFY_MATH_BENCHMARKS": "benchmarks", "LUFFY_OOD_BENCHMARKS": "benchmarks", "benchmark_dir": "benchmarks",
    "markdown_table": "report", "write_reports": "report",
    "LuffyEvalCallback": "callback",
    "EvalArguments": "cli",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"luffy_trl.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'luffy_trl.evaluation' has no attribute {name!r}")
