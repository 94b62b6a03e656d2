"""Load benchmark problems, generate the missing samples (cached to JSONL as they arrive), score them, aggregate.

Flow: `load_problems` (one `Problem` per distinct prompt: LUFFY's file repeats AIME/AMC rows 32 times, and those
copies become the samples of one problem) → `build_requests` (one `Request` per sample, with the templated prompt and
its seed) → `generate` (only the requests missing from the `GenerationCache`) → `score` (`luffy_trl.rewards`) →
`summarize` (`luffy_trl.evaluation.metrics`). `evaluate` runs these in memory; `run_evaluation` adds the cache file,
run information and the report files in an output folder, so that an interrupted run resumes where it stopped and a
rerun over a complete cache only re-scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from luffy_trl.evaluation.backends import Generation
from luffy_trl.evaluation.benchmarks import (  # noqa: F401 (LUFFY_MATH_BENCHMARKS re-exported)
    LUFFY_MATH_BENCHMARKS,
    LUFFY_OOD_BENCHMARKS,
    benchmark_dir,
)
from luffy_trl.evaluation.metrics import ScoredSample, average_metrics, benchmark_metrics, default_pass_ks
from luffy_trl.evaluation.protocols import Protocol
from luffy_trl.evaluation.report import write_reports

logger = logging.getLogger(__name__)

SCORERS = ("math", "number", "choice")
CACHE_FILE = "generations.jsonl"
SCORES_FILE = "scores.jsonl"  # one line per scored sample, for statistics over problems (luffy_trl.evaluation.stats)
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's problems are.

    Args:
        name: the benchmark's name in the results.
        path: a local file (`.parquet`, `.json`, `.jsonl`, `.csv`), a local folder or a Hub dataset.
        split: the split to read (a local file is read as `"train"`).
        prompt_column: a string or a list of `{"role", "content"}` messages; None: `prompt`, else `problem`, else
            `question`.
        gold_column: the gold answer; None reads `reward_model.ground_truth` (LUFFY's files), `ground_truth` or
            `answer`.
        data_source: keep only the rows whose `data_source` column equals this (LUFFY's `valid.all.parquet`).
        scorer: `"math"` (math-verify), `"number"` (math-verify, the answer written as a number: for tasks whose
            answer is a computed number, where math-verify would accept the unevaluated expression) or `"choice"`
            (option letters).
    """

    name: str
    path: str
    split: str = "train"
    prompt_column: str | None = None
    gold_column: str | None = None
    data_source: str | None = None
    scorer: str = "math"

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")


def luffy_benchmark(name: str, data_dir: str | Path | None = None) -> BenchmarkSpec:
    """A LUFFY benchmark (`aime`, `aime25`, `amc`, `math`, `minerva`, `olympiad_bench`, `arc_c`, `gpqa`,
    `mmlu_pro`, or any `data_source` of `valid.all.parquet`) in LUFFY's data folder (default: the copy shipped with
    luffy-trl, `benchmark_dir()`): `valid.<name>.parquet` when it exists, else the rows of `valid.all.parquet` whose
    `data_source` is `name`."""
    data_dir = benchmark_dir() if data_dir is None else Path(data_dir)
    scorer = "choice" if name in LUFFY_OOD_BENCHMARKS else "math"
    own_file = data_dir / f"valid.{name}.parquet"
    if own_file.exists():
        return BenchmarkSpec(name, str(own_file), scorer=scorer)
    if not (data_dir / "valid.all.parquet").exists():
        raise FileNotFoundError(f"neither {own_file} nor {data_dir / 'valid.all.parquet'} exists")
    return BenchmarkSpec(name, str(data_dir / "valid.all.parquet"), data_source=name, scorer=scorer)


@dataclass(frozen=True)
class Problem:
    """One distinct problem: its prompt messages (after the protocol's system-prompt handling), its gold answer, and
    how many rows of the data file hold it. `problem_id` is a hash of the prompt and the gold."""

    benchmark: str
    problem_id: str
    prompt: tuple = field(repr=False)
    gold: str
    copies: int = 1
    scorer: str = "math"


def _problem_id(messages: list[dict], gold: str) -> str:
    return hashlib.sha256(json.dumps([messages, gold], sort_keys=True).encode()).hexdigest()[:16]


def _load_table(path: str, split: str):
    from datasets import load_dataset

    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix not in _FORMATS:
            raise ValueError(f"unsupported file type {local.suffix!r}; use one of {sorted(_FORMATS)}")
        return load_dataset(_FORMATS[local.suffix], data_files={split: str(local)}, split=split)
    return load_dataset(str(local) if local.is_dir() else path, split=split)


PROMPT_COLUMNS = ("prompt", "problem", "question")


def _problem_columns(spec: BenchmarkSpec, columns: Sequence[str]) -> tuple[str, str | None]:
    """The prompt and gold columns of a benchmark's table: the spec's, else the first of the usual names present
    (gold None: LUFFY's `reward_model.ground_truth` or a `ground_truth` column)."""
    columns = list(columns)
    luffy_gold = bool({"reward_model", "ground_truth"} & set(columns))
    prompt = spec.prompt_column or next((c for c in PROMPT_COLUMNS if c in columns), None)
    gold = spec.gold_column
    if gold is None and not luffy_gold and "answer" in columns:
        gold = "answer"
    where = f"benchmark {spec.name!r} ({spec.path})"
    if prompt not in columns:
        named = f" {spec.prompt_column!r}" if spec.prompt_column else ""
        raise ValueError(f"{where}: no prompt column{named} among {columns}; set prompt_column (default: the first "
                         f"of {', '.join(PROMPT_COLUMNS)}).")
    if (gold not in columns) if gold is not None else not luffy_gold:
        named = f" {spec.gold_column!r}" if spec.gold_column else ""
        raise ValueError(f"{where}: no gold answer column{named} among {columns}; set gold_column (default: "
                         "reward_model.ground_truth, ground_truth or answer).")
    return prompt, gold


def load_problems(spec: BenchmarkSpec, system_prompt: str = "drop", max_problems: int | None = None) -> list[Problem]:
    """The distinct problems of a benchmark in file order (the first `max_problems` of them); identical rows (same
    prompt and gold) are one problem with `copies` > 1. `system_prompt` as in `luffy_trl.data.set_system_prompt`."""
    from luffy_trl.data import prepare_luffy_dataset

    dataset = _load_table(spec.path, spec.split)
    if spec.data_source is not None:
        dataset = dataset.filter(lambda source: source == spec.data_source, input_columns="data_source")
    prompt_column, gold_column = _problem_columns(spec, dataset.column_names)
    if prompt_column != "prompt":
        dataset = dataset.remove_columns([c for c in ("prompt",) if c in dataset.column_names])
        dataset = dataset.rename_column(prompt_column, "prompt")
    if gold_column is not None and gold_column != "ground_truth":
        drop = [c for c in ("reward_model", "ground_truth") if c in dataset.column_names]
        dataset = dataset.remove_columns(drop).rename_column(gold_column, "ground_truth")
    keep = {"prompt", "ground_truth", "reward_model"}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    prepared, _ = prepare_luffy_dataset(dataset, system_prompt=system_prompt)
    problems: dict[str, Problem] = {}
    for messages, gold in zip(prepared["prompt"], prepared["ground_truth"]):
        key = _problem_id(messages, gold)
        if key in problems:
            problems[key] = replace(problems[key], copies=problems[key].copies + 1)
        elif max_problems is None or len(problems) < max_problems:
            problems[key] = Problem(spec.name, key, tuple(messages), gold, 1, spec.scorer)
    if not problems:
        raise ValueError(f"benchmark {spec.name!r} has no rows in {spec.path}")
    return list(problems.values())


@dataclass(frozen=True)
class Request:
    """One sample to generate: sample `sample` of a problem, with its templated prompt and seed."""

    problem: Problem
    sample: int
    prompt_text: str = field(repr=False)
    seed: int
    gated: bool  # scored only after `</think>`

    @property
    def key(self) -> tuple[str, str, int]:
        return self.problem.benchmark, self.problem.problem_id, self.sample


def build_requests(problems: Sequence[Problem], protocol: Protocol, tokenizer) -> list[Request]:
    """Every sample of every problem (`protocol.samples_for`), with the tokenizer's chat template applied to the
    prompt (generation prompt added) and a seed derived from the protocol's seed, the problem and the sample.
    Without a tokenizer (a chat API that templates the messages itself) `prompt_text` is empty."""
    requests = []
    for problem in problems:
        text = "" if tokenizer is None else tokenizer.apply_chat_template(list(problem.prompt),
                                                                           add_generation_prompt=True, tokenize=False)
        for sample in range(protocol.samples_for(problem.benchmark, problem.copies)):
            digest = hashlib.sha256(f"{protocol.seed}|{problem.problem_id}|{sample}".encode()).hexdigest()
            requests.append(Request(problem, sample, text, int(digest[:8], 16), protocol.gated(text)))
    return requests


class GenerationCache:
    """Generations keyed by (benchmark, problem id, sample) for one run configuration, appended to a JSONL file (if
    `path` is given) as they arrive. Lines of another configuration (`run_hash`: model and sampling parameters) are
    kept in the file but ignored; a truncated last line (an interrupted write) is ignored."""

    def __init__(self, path: str | Path | None = None, run_hash: str = ""):
        self.path = Path(path) if path is not None else None
        self.run_hash = run_hash
        self.entries: dict[tuple[str, str, int], Generation] = {}
        if self.path is not None and self.path.exists():
            with self.path.open() as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("run") == run_hash:
                        key = (record["benchmark"], record["problem"], record["sample"])
                        self.entries[key] = Generation(record["text"], record["num_tokens"], record["truncated"])

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __getitem__(self, key) -> Generation:
        return self.entries[key]

    def add(self, requests: Sequence[Request], generations: Sequence[Generation]) -> None:
        lines = []
        for request, generation in zip(requests, generations, strict=True):
            self.entries[request.key] = generation
            benchmark, problem_id, sample = request.key
            lines.append(json.dumps({"run": self.run_hash, "benchmark": benchmark, "problem": problem_id,
                                     "sample": sample, **asdict(generation)}) + "\n")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+") as out:
                if out.tell() > 0:  # end a line an interrupted write left unfinished
                    out.seek(out.tell() - 1)
                    if out.read(1) != "\n":
                        out.write("\n")
                out.writelines(lines)


def run_hash(model_id: str, protocol: Protocol) -> str:
    """The cache key of a run configuration: the model and the protocol's generation parameters."""
    return hashlib.sha256(f"{model_id}|{protocol.generation_hash()}".encode()).hexdigest()[:12]


def generate(backend, requests: Sequence[Request], protocol: Protocol, cache: GenerationCache,
             batch_size: int | None = None, progress: bool = False) -> int:
    """Generate the requests missing from `cache`, `batch_size` at a time (default: the backend's), adding each batch
    to the cache as it arrives. Returns the number generated."""
    pending = [r for r in requests if r.key not in cache]
    batch_size = batch_size or backend.default_batch_size
    with tqdm(total=len(pending), desc="Generating", unit="sample", disable=not progress or not pending) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            cache.add(batch, backend.generate([r.prompt_text for r in batch], protocol, [r.seed for r in batch]))
            bar.update(len(batch))
    return len(pending)


def score(requests: Sequence[Request], generations: Sequence[Generation], protocol: Protocol) -> list[ScoredSample]:
    """Score each generation with `luffy_trl.rewards` (math-verify or option letters, gated on `</think>` when the
    request is). A verification timeout scores 0.0 (logged as a warning); an unparseable gold gives None, which the
    metrics count as incorrect (LUFFY's denominator is every row)."""
    from luffy_trl.rewards import make_choice_reward, make_math_reward, prepare_answer

    factories = {"math": make_math_reward, "number": functools.partial(make_math_reward, numeric=True),
                 "choice": make_choice_reward}
    scores: list[float | None] = [None] * len(requests)
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.problem.scorer, request.gated), []).append(i)
    timeouts = []

    def count_timeouts(name: str, value: float) -> None:
        if name.endswith("/timeouts"):
            timeouts.append(value)

    for (scorer, gated), indices in groups.items():
        reward = factories[scorer](think_gate=gated, timeout=protocol.verify_timeout)
        group_scores = reward([generations[i].text for i in indices],
                              ground_truth=[requests[i].problem.gold for i in indices], log_metric=count_timeouts)
        for i, value in zip(indices, group_scores):
            scores[i] = value
    if sum(timeouts):
        logger.warning("%d answers scored 0.0 because verification took over %s s", sum(timeouts),
                       protocol.verify_timeout)
    samples = []
    for request, generation, value in zip(requests, generations, scores, strict=True):
        answer = prepare_answer(generation.text, request.gated)
        samples.append(ScoredSample(value, generation.num_tokens, generation.truncated,
                                    answer is not None and "\\boxed" in answer))
    return samples


def summarize(requests: Sequence[Request], samples: Sequence[ScoredSample],
              pass_ks: Sequence[int] | None = None) -> dict:
    """Per-benchmark metrics (in order of first appearance) and the unweighted averages over the math benchmarks
    (`"math"`, LUFFY's "Avg.", the `number`-scored ones included) and over the multiple-choice ones (`"ood"`).
    `pass_ks` larger than a benchmark's samples per problem are left out for that benchmark."""
    by_problem: dict[str, dict[str, list[ScoredSample]]] = {}
    scorers: dict[str, str] = {}
    for request, sample in zip(requests, samples, strict=True):
        by_problem.setdefault(request.problem.benchmark, {}).setdefault(request.problem.problem_id, []).append(sample)
        scorers[request.problem.benchmark] = request.problem.scorer
    benchmarks = {}
    for name, problems in by_problem.items():
        k = min(len(s) for s in problems.values())
        ks = default_pass_ks(k) if pass_ks is None else [j for j in pass_ks if j <= k]
        benchmarks[name] = benchmark_metrics(problems.values(), ks)
    averages = {}
    for group, kinds in (("math", ("math", "number")), ("ood", ("choice",))):
        members = {name: m for name, m in benchmarks.items() if scorers[name] in kinds}
        if members:
            averages[group] = average_metrics(members)
    return {"benchmarks": benchmarks, "averages": averages}


def evaluate(backend, problems: Sequence[Problem], protocol: Protocol, *, cache: GenerationCache | None = None,
             batch_size: int | None = None, pass_ks: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Generate what `cache` lacks, score and summarize; the cache is kept in memory when None."""
    requests = build_requests(problems, protocol, backend.tokenizer)
    cache = cache if cache is not None else GenerationCache()
    generate(backend, requests, protocol, cache, batch_size, progress)
    samples = score(requests, [cache[r.key] for r in requests], protocol)
    return summarize(requests, samples, pass_ks)


def write_scores(requests: Sequence[Request], samples: Sequence[ScoredSample], path: str | Path) -> None:
    """Every scored sample as a JSON line: `benchmark`, `problem`, `sample`, `score` (None: unparseable gold),
    `boxed`, `truncated`, `num_tokens`."""
    with Path(path).open("w") as out:
        for request, sample in zip(requests, samples, strict=True):
            benchmark, problem, index = request.key
            out.write(json.dumps({"benchmark": benchmark, "problem": problem, "sample": index, **asdict(sample)})
                      + "\n")


def problem_scores(path: str | Path, benchmark: str) -> dict[str, float]:
    """Problem id -> mean score over its samples (an unparseable gold counts 0), from a `scores.jsonl`."""
    totals: dict[str, list[float]] = {}
    with Path(path).open() as lines:
        for line in lines:
            record = json.loads(line)
            if record["benchmark"] == benchmark:
                totals.setdefault(record["problem"], []).append(record["score"] or 0.0)
    return {problem: sum(values) / len(values) for problem, values in totals.items()}


def run_evaluation(backend, problems: Sequence[Problem], protocol: Protocol, output_dir: str | Path, *,
                   model_name: str, model_id: str | None = None, batch_size: int | None = None,
                   pass_ks: Sequence[int] | None = None, progress: bool = True) -> dict:
    """`evaluate` with the generations cached in `output_dir/generations.jsonl` (resumed when it exists), then
    `results.json`, `results.md` and `results.png` written to `output_dir` (see `luffy_trl.evaluation.report`), and
    every scored sample in `scores.jsonl`.
    `model_name` labels the results; `model_id` (default `model_name`) identifies the weights in the cache keys:
    the cache cannot tell that the weights behind an id changed, so use a new `output_dir` for new weights.

    The results hold `model`, `protocol`, `benchmarks`, `averages` and `run` (wall time, samples generated now and
    read from the cache, backend): everything but `run` is the same for a resumed and an uninterrupted run whose
    backend samples each request deterministically."""
    output_dir = Path(output_dir)
    start = time.perf_counter()
    cache = GenerationCache(output_dir / CACHE_FILE, run_hash(model_id or model_name, protocol))
    requests = build_requests(problems, protocol, backend.tokenizer)
    generated = generate(backend, requests, protocol, cache, batch_size, progress)
    samples = score(requests, [cache[r.key] for r in requests], protocol)
    results = {
        "model": model_name,
        "protocol": asdict(protocol),
        **summarize(requests, samples, pass_ks),
        "run": {"wall_seconds": round(time.perf_counter() - start, 1), "generated": generated,
                "from_cache": len(requests) - generated, "backend": backend.name},
    }
    write_reports(results, output_dir)
    write_scores(requests, samples, output_dir / SCORES_FILE)
    logger.info("evaluated %s in %.1f s (%d samples generated)", model_name, results["run"]["wall_seconds"], generated)
    return results
