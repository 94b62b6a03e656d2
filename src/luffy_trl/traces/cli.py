"""`TraceArguments` (TrlParser-style, usable from a YAML with `--config`) and `main`, behind `examples/make_traces.py`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from luffy_trl.traces.generate import (
    CACHE_FILE,
    KEEP,
    TRACES,
    make_traces,
    write_dataset,
    write_summary,
)
from luffy_trl.traces.teachers import APIS, BackendTeacher, OpenAITeacher


@dataclass
class TraceArguments:
    """Arguments of `examples/make_traces.py`: a dataset of problems and gold answers in, the same rows with a
    column of verified teacher traces out."""

    dataset: str = field(metadata={"help": "Local file (.parquet, .json, .jsonl, .csv), folder or Hub dataset with a "
                                           "prompt and a gold answer per row; `arithmetic` is the bundled task."})
    output: str = field(metadata={"help": "Output dataset: a .parquet or .jsonl file, or a folder (save_to_disk). "
                                          "The cache and summary.json go next to it."})
    split: str = field(default="train", metadata={"help": "Split to read."})
    max_problems: int | None = field(default=None, metadata={"help": "Use only the first rows."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column (a string or chat messages)."})
    gold_column: str | None = field(default=None, metadata={
        "help": "Gold answer column (default: `reward_model.ground_truth`, else `ground_truth`)."})
    off_policy_column: str = field(default="target", metadata={"help": "Output column holding the traces."})
    # teacher
    teacher_url: str | None = field(default=None, metadata={
        "help": "Base URL of an OpenAI-compatible server (e.g. http://localhost:8000/v1 from `vllm serve`)."})
    teacher_model: str | None = field(default=None, metadata={
        "help": "With teacher_url: the served model name. Without: a local model (Hub id or folder) to load."})
    api: str = field(default="chat", metadata={"help": "HTTP API: 'chat' (/chat/completions) or 'completions' "
                                                       "(the prompt templated with the teacher's tokenizer).",
                                               "choices": list(APIS)})
    api_key_env: str | None = field(default=None, metadata={
        "help": "Name of the environment variable holding the API key (the key itself is never a flag)."})
    concurrency: int = field(default=16, metadata={"help": "HTTP requests in flight."})
    timeout: float = field(default=600.0, metadata={"help": "Seconds per HTTP request."})
    max_retries: int = field(default=3, metadata={"help": "Retries per HTTP request before it is skipped."})
    teacher_tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer for api='completions' with an HTTP teacher (default: teacher_model)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file of a local teacher_model."})
    backend: str = field(default="auto", metadata={"help": "Local teacher: 'auto', 'vllm' or 'transformers'."})
    batch_size: int | None = field(default=None, metadata={"help": "Local teacher: requests per generate call."})
    teacher_system_prompt: str | None = field(default=None, metadata={
        "help": "System message the teacher sees instead of the prompt's (the output keeps the policy's prompt)."})
    # sampling
    num_samples: int = field(default=TRACES.default_samples, metadata={"help": "Samples per problem (n)."})
    temperature: float = field(default=TRACES.temperature, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=TRACES.top_p, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=TRACES.max_new_tokens, metadata={"help": "Generation limit (teacher "
                                                                                  "tokens)."})
    seed: int = field(default=0, metadata={"help": "Base seed of the per-sample seeds."})
    # verification and selection
    reward: str = field(default="math", metadata={
        "help": "'math' (math-verify of the whole trace), 'number' (the same, the answer written as a number: for "
                "computed answers such as `--dataset arithmetic`, where math-verify also accepts `60 - 32` for 28) or "
                "'luffy_math' (the answer after </think>, LUFFY's training reward).",
        "choices": ["math", "number", "luffy_math"]})
    threshold: float = field(default=1.0, metadata={"help": "A trace is correct when its reward is at least this."})
    policy_model: str | None = field(default=None, metadata={
        "help": "The policy's tokenizer (Hub id or folder): lengths are counted in its tokens."})
    policy_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file of policy_model."})
    max_length: int | None = field(default=None, metadata={
        "help": "Drop traces longer than this many policy tokens (the trainer's max_completion_length)."})
    keep: str = field(default="shortest", metadata={"help": "'shortest' correct trace per row, or 'all'.",
                                                    "choices": list(KEEP)})
    strip_think: bool = field(default=False, metadata={
        "help": "Remove a leading <think> (when the policy's generation prompt already opens it)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


def load_input(args: TraceArguments):
    from luffy_trl.evaluation.runner import _load_table

    if args.dataset == "arithmetic":
        from luffy_trl.tasks.arithmetic import arithmetic_dataset

        dataset = arithmetic_dataset(args.max_problems or 256, seed=args.seed).remove_columns("target")
    else:
        dataset = _load_table(args.dataset, args.split)
    if args.max_problems is not None:
        dataset = dataset.select(range(min(args.max_problems, len(dataset))))
    return dataset


def build_teacher(args: TraceArguments):
    from luffy_trl.evaluation.backends import load_backend, load_tokenizer

    if args.teacher_url:
        if not args.teacher_model:
            raise ValueError("--teacher_url needs --teacher_model (the model name the server serves)")
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise ValueError(f"the environment variable {args.api_key_env} is not set")
        tokenizer = None
        if args.api == "completions":
            tokenizer = load_tokenizer(args.teacher_tokenizer or args.teacher_model)
        return OpenAITeacher(args.teacher_url, args.teacher_model, api=args.api, api_key=api_key,
                             concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                             tokenizer=tokenizer)
    if not args.teacher_model:
        raise ValueError("give a teacher: --teacher_url with --teacher_model, or a local --teacher_model")
    backend = load_backend(args.backend, args.teacher_model, gguf_file=args.gguf_file)
    return BackendTeacher(backend, args.batch_size)


def output_paths(output: Path) -> tuple[Path, Path]:
    """The cache and the summary next to the output: `<stem>.trace_generations.jsonl`, `<stem>.summary.json`."""
    return output.with_name(f"{output.stem}.{CACHE_FILE}"), output.with_name(f"{output.stem}.summary.json")


def main(args: TraceArguments):
    """Generate, verify and write the traces; returns (dataset, summary)."""
    from luffy_trl.threads import configure_cpu_threads

    configure_cpu_threads()
    from luffy_trl.evaluation.backends import load_tokenizer
    from luffy_trl.rewards import luffy_math_reward, math_reward, number_reward

    dataset = load_input(args)
    teacher = build_teacher(args)
    policy_tokenizer = None
    if args.policy_model:
        from luffy_trl.model_paths import resolve_model

        policy_model, policy_gguf = resolve_model(args.policy_model, args.policy_gguf_file)
        policy_tokenizer = load_tokenizer(policy_model, gguf_file=policy_gguf)
    protocol = TRACES.with_overrides(num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    output = Path(args.output)
    cache_path, summary_path = output_paths(output)
    teacher_id = f"{args.teacher_url or ''}|{args.teacher_model}|{args.gguf_file or ''}|{args.api}"
    traces, summary = make_traces(
        dataset, teacher, cache_path=cache_path, teacher_id=teacher_id, protocol=protocol,
        reward_funcs={"luffy_math": luffy_math_reward, "number": number_reward}.get(args.reward, math_reward),
        threshold=args.threshold,
        policy_tokenizer=policy_tokenizer, max_length=args.max_length, keep=args.keep, strip_think=args.strip_think,
        prompt_column=args.prompt_column, gold_column=args.gold_column,
        teacher_system_prompt=args.teacher_system_prompt, off_policy_column=args.off_policy_column,
        progress=args.progress,
    )
    write_dataset(traces, output)
    write_summary(summary, summary_path)
    print(summary)
    print(f"wrote {output} and {summary_path}")
    return traces, summary


def run(args: TraceArguments) -> int:
    """`main` as a command: exit status 0 when at least one problem got a trace, 1 when the run produced none,
    2 when the teacher cannot be used (`TeacherError`: a dead URL, a wrong model name or key)."""
    import sys

    from luffy_trl.traces.teachers import TeacherError

    try:
        _, summary = main(args)
    except TeacherError as err:
        print(f"make_traces: {err}", file=sys.stderr)
        return 2
    if summary.problems_with_trace == 0:
        print(f"make_traces: no problem got a trace ({summary.skipped} samples skipped by the teacher, "
              f"{summary.correct} correct): nothing usable was produced.", file=sys.stderr)
        return 1
    return 0
