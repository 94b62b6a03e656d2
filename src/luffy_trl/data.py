"""Load LUFFY / OpenR1 data into the columns `MixedPolicyGRPOTrainer` and `luffy_trl.rewards` read.

Input: the verl RL schema of LUFFY's training set (`Elliott/Openr1-Math-46k-8192`) and benchmark files: `prompt` (a list
of `{"role", "content"}` messages, or a string), `target` (LUFFY: a list with one `{"role": "assistant", "content":
<trace>}` message; also a string, a list of strings, None or empty; absent in benchmark files) and
`reward_model: {"ground_truth": str}` (or a `ground_truth` column).

Output, with every other column kept:
- `prompt`: a list of `{"role", "content"}` messages, with the system message kept, dropped or set to LUFFY's;
- the teacher column (`off_policy_column`, default `target`): a list of trace strings, `[]` where a row has none (the
  trainer then samples the whole group from the policy and counts it);
- `ground_truth`: the gold answer string.

Filters need a tokenizer: prompts longer than `max_prompt_length` tokens (after the chat template with the
generation prompt, as LUFFY) remove their row; traces longer than `max_completion_length` tokens (counting the end
token the trainer appends) are removed from their row. Every count is returned in a `DataReport` and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, List, Value, load_dataset

from luffy_trl.prompts import LUFFY_SYSTEM_PROMPT
from luffy_trl.teacher import THINK_OPENERS, teacher_texts

logger = logging.getLogger(__name__)

SYSTEM_PROMPT_MODES = ("keep", "drop", "luffy")
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
_STATS = ("_luffy_prompt_fits", "_luffy_traces_in", "_luffy_traces_too_long")


@dataclass
class DataReport:
    """What loading did. Trace counts are over the rows kept."""

    rows_in: int
    rows_out: int
    prompts_too_long: int  # rows removed because the templated prompt exceeds max_prompt_length
    traces_in: int  # non-empty traces found
    traces_too_long: int  # traces removed because they exceed max_completion_length
    traces_out: int  # traces in the output (at most num_traces per row)
    rows_without_trace: int  # rows kept with no trace: the trainer samples their whole group

    def __str__(self) -> str:
        return (
            f"{self.rows_out}/{self.rows_in} rows kept ({self.prompts_too_long} prompts too long); "
            f"{self.traces_out} traces kept of {self.traces_in} ({self.traces_too_long} too long); "
            f"{self.rows_without_trace} rows without a trace"
        )


def set_system_prompt(messages: list[dict], mode: str) -> list[dict]:
    """`messages` as `{"role", "content"}` dicts, with the system message kept (`"keep"`), removed (`"drop"`) or
    replaced by (inserted as) LUFFY's (`"luffy"`)."""
    if mode not in SYSTEM_PROMPT_MODES:
        raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPT_MODES}, got {mode!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if mode == "keep":
        return messages
    messages = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": LUFFY_SYSTEM_PROMPT}] + messages if mode == "luffy" else messages


def strip_think_opener(trace: str) -> str:
    """Remove a leading `<think>\\n` (or `<think>`), for chat templates whose generation prompt already opens it."""
    for opener in THINK_OPENERS:
        if trace.startswith(opener):
            return trace[len(opener) :]
    return trace


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _ground_truth(row: dict) -> str:
    if row.get("reward_model") is not None:
        value = row["reward_model"].get("ground_truth")
    else:
        value = row.get("ground_truth")
    return "" if value is None else str(value)


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _convert_batch(
    batch, indices, *, system_prompt, strip_think, tokenizer, max_prompt_length, max_completion_length, num_traces,
    source, off_policy_column,
):
    """Batched `Dataset.map` function: the output columns plus per-row statistics (`_STATS`)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    prompts = [set_system_prompt(_messages(row["prompt"]), system_prompt) for row in rows]
    traces = [teacher_texts(row.get(source), column=source, row=i) for row, i in zip(rows, indices)]
    if strip_think:
        traces = [[strip_think_opener(t) for t in row_traces] for row_traces in traces]
    traces_in = [len(row_traces) for row_traces in traces]

    prompt_fits = [True] * len(rows)
    if max_prompt_length is not None:
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        prompt_fits = [n <= max_prompt_length for n in _token_counts(tokenizer, texts)]
    if max_completion_length is not None:  # + 1: the end token the trainer appends
        counts = _token_counts(tokenizer, [t for row_traces in traces for t in row_traces])
        start, short = 0, []
        for row_traces in traces:
            row_counts = counts[start : start + len(row_traces)]
            short.append([t for t, n in zip(row_traces, row_counts) if n + 1 <= max_completion_length])
            start += len(row_traces)
        traces = short

    return {
        "prompt": prompts,
        off_policy_column: [row_traces[:num_traces] for row_traces in traces],
        "ground_truth": [_ground_truth(row) for row in rows],
        _STATS[0]: prompt_fits,
        _STATS[1]: traces_in,
        _STATS[2]: [n - len(row_traces) for n, row_traces in zip(traces_in, traces)],
    }


def prepare_luffy_dataset(
    dataset: Dataset,
    *,
    system_prompt: str = "keep",
    strip_think_prefix: bool = False,
    tokenizer=None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    off_policy_column: str = "target",
    num_traces: int | None = None,
    num_proc: int | None = None,
) -> tuple[Dataset, DataReport]:
    """Convert a dataset in LUFFY's schema (see the module docstring); returns it with a `DataReport`.

    Args:
        system_prompt: `"keep"` the prompt's system message, `"drop"` it (LUFFY's evaluation), or `"luffy"`: use
            LUFFY's system prompt (`luffy_trl.prompts.LUFFY_SYSTEM_PROMPT`).
        strip_think_prefix: remove a leading `<think>\\n` from traces, for templates whose generation prompt opens it.
        tokenizer: the policy's tokenizer; needed by the two length filters.
        max_prompt_length: drop rows whose templated prompt (with the generation prompt) is longer (tokens).
        max_completion_length: drop traces longer than this many tokens, counting one end token.
        off_policy_column: the output teacher column. Traces are read from this column when the dataset has it,
            else from `target`; rows keep `[]` when there is neither.
        num_traces: keep at most this many traces per row (the first ones); None keeps all.
        num_proc: processes for `Dataset.map`.
    """
    if system_prompt not in SYSTEM_PROMPT_MODES:
        raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPT_MODES}, got {system_prompt!r}")
    if (max_prompt_length is not None or max_completion_length is not None) and tokenizer is None:
        raise ValueError("max_prompt_length and max_completion_length need a tokenizer")
    if num_traces is not None and num_traces < 1:
        raise ValueError(f"num_traces must be at least 1 (or None for all), got {num_traces}")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'prompt' column; columns: {dataset.column_names}")
    if "reward_model" not in dataset.column_names and "ground_truth" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'reward_model' or 'ground_truth' column; columns: {dataset.column_names}")
    source = off_policy_column if off_policy_column in dataset.column_names else "target"

    features = Features({
        **dataset.features,
        "prompt": _MESSAGES,
        off_policy_column: List(Value("string")),
        "ground_truth": Value("string"),
        _STATS[0]: Value("bool"),
        _STATS[1]: Value("int64"),
        _STATS[2]: Value("int64"),
    })
    options = dict(
        system_prompt=system_prompt, strip_think=strip_think_prefix, tokenizer=tokenizer,
        max_prompt_length=max_prompt_length, max_completion_length=max_completion_length, num_traces=num_traces,
        source=source, off_policy_column=off_policy_column,
    )
    converted = dataset.map(
        _convert_batch, batched=True, with_indices=True, fn_kwargs=options, features=features, num_proc=num_proc,
        desc="Preparing LUFFY data",
    )
    kept = converted.filter(lambda fits: fits, input_columns=_STATS[0], num_proc=num_proc).remove_columns(list(_STATS))
    traces_out = sum(len(traces) for traces in kept[off_policy_column])
    report = DataReport(
        rows_in=len(converted),
        rows_out=len(kept),
        prompts_too_long=len(converted) - len(kept),
        traces_in=sum(n for n, fits in zip(converted[_STATS[1]], converted[_STATS[0]]) if fits),
        traces_too_long=sum(n for n, fits in zip(converted[_STATS[2]], converted[_STATS[0]]) if fits),
        traces_out=traces_out,
        rows_without_trace=sum(not traces for traces in kept[off_policy_column]),
    )
    logger.info("LUFFY data: %s", report)
    return kept, report


def load_luffy_dataset(path_or_name: str, split: str = "train", **options) -> tuple[Dataset, DataReport]:
    """Load a local file (`.parquet`, `.json`, `.jsonl`, `.csv`), a local folder or a Hugging Face Hub dataset, then
    `prepare_luffy_dataset(dataset, **options)`.

    Example:
        ```python
        train, report = load_luffy_dataset(
            "Elliott/Openr1-Math-46k-8192", tokenizer=tokenizer, max_prompt_length=1024, max_completion_length=8192,
            strip_think_prefix=True,  # the policy's generation prompt ends with "<think>\\n"
        )
        ```
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        if path.suffix not in _FORMATS:
            raise ValueError(f"unsupported file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
        dataset = load_dataset(_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    else:  # a local folder, or a dataset on the Hub
        dataset = load_dataset(str(path) if path.is_dir() else path_or_name, split=split)
    return prepare_luffy_dataset(dataset, **options)
