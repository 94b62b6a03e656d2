"""LUFFY data loading: fixtures in LUFFY's schema, options, length filters, benchmark files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from luffy_trl.data import DataReport, load_luffy_dataset, prepare_luffy_dataset  # noqa: E402
from luffy_trl.prompts import LUFFY_SYSTEM_PROMPT  # noqa: E402
from luffy_trl.rewards import luffy_math_reward, math_reward  # noqa: E402
from luffy_trl.teacher import teacher_texts  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "luffy_sample.jsonl"
from luffy_trl.evaluation import benchmark_dir  # noqa: E402

BENCHMARKS = benchmark_dir()  # LUFFY's benchmark files, shipped with the package

# Fixture rows (extra_info.index): 0 one trace; 1 target None; 2 target []; 3 an empty trace; 4 a trace of ~900
# tokens; 5 two traces; 6 a prompt of ~1700 tokens; 7 no system message and a trace without <think>.
ORIGINAL_COLUMNS = ["data_source", "prompt", "target", "ability", "reward_model", "extra_info"]


def by_index(dataset, column):
    return {row["extra_info"]["index"]: row[column] for row in dataset}


def test_system_prompt_is_luffys_verbatim():
    assert LUFFY_SYSTEM_PROMPT.count("\n") == 3 and LUFFY_SYSTEM_PROMPT.count("\\") == 1
    assert '"<think>\n {thoughts} </think>\n"' in LUFFY_SYSTEM_PROMPT
    assert LUFFY_SYSTEM_PROMPT.endswith("include the answer in \\boxed{} for closed-form results like multiple "
                                        "choices or mathematical solutions.")


def test_system_prompt_matches_luffys_benchmark_files():
    import pandas as pd

    for name in ("all", "arc_c", "gpqa"):
        frame = pd.read_parquet(BENCHMARKS / f"valid.{name}.parquet")
        assert {messages[0]["content"] for messages in frame.prompt} == {LUFFY_SYSTEM_PROMPT}


def test_load_fixture_defaults():
    dataset, report = load_luffy_dataset(str(FIXTURE))
    assert set(ORIGINAL_COLUMNS + ["ground_truth"]) == set(dataset.column_names)
    assert report == DataReport(rows_in=8, rows_out=8, prompts_too_long=0, traces_in=6, traces_too_long=0,
                                traces_out=6, rows_without_trace=3)
    traces = by_index(dataset, "target")
    assert traces[0] == ["<think>\n2 plus 2 is 4.\n</think>\nThe answer is $\\boxed{4}$."]
    assert traces[1] == traces[2] == traces[3] == []  # None, [] and an empty trace: no trace
    assert len(traces[5]) == 2
    assert by_index(dataset, "ground_truth") == {0: "4", 1: "\\frac{3}{4}", 2: "3", 3: "15", 4: "3", 5: "2", 6: "2",
                                                 7: "[2,5)"}
    assert dataset[0]["prompt"][0] == {"role": "system", "content": LUFFY_SYSTEM_PROMPT}
    assert dataset[0]["reward_model"] == {"ground_truth": "4", "style": "rule"}  # original columns untouched
    for value in dataset["target"]:  # the trainer reads the teacher column with teacher_texts
        assert teacher_texts(value) == value


def test_traces_score_with_the_luffy_reward():
    dataset, _ = load_luffy_dataset(str(FIXTURE))
    rows = [row for row in dataset for _ in row["target"]]
    completions = [trace for row in dataset for trace in row["target"]]
    scores = luffy_math_reward(completions, ground_truth=[row["ground_truth"] for row in rows])
    assert scores == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # the last trace has no </think>
    assert math_reward(completions[-1:], ground_truth=["[2,5)"]) == [1.0]


@pytest.mark.parametrize("mode", ["keep", "drop", "luffy"])
def test_system_prompt_modes(mode):
    dataset, _ = load_luffy_dataset(str(FIXTURE), system_prompt=mode)
    prompts = by_index(dataset, "prompt")
    roles = {i: [m["role"] for m in p] for i, p in prompts.items()}
    expected_first = {"keep": ["system", "user"], "drop": ["user"], "luffy": ["system", "user"]}[mode]
    assert roles[0] == expected_first
    assert roles[7] == (["system", "user"] if mode == "luffy" else ["user"])  # row 7 has no system message
    if mode == "luffy":
        assert all(p[0]["content"] == LUFFY_SYSTEM_PROMPT for p in prompts.values())
    assert prompts[0][-1] == {"role": "user", "content": "What is $2+2$?"}


def test_strip_think_prefix():
    dataset, _ = load_luffy_dataset(str(FIXTURE), strip_think_prefix=True)
    traces = by_index(dataset, "target")
    assert traces[0] == ["2 plus 2 is 4.\n</think>\nThe answer is $\\boxed{4}$."]
    assert traces[7] == ["No think tags here: the answer is $\\boxed{[2,5)}$."]
    assert not any(t.startswith("<think>") for row in traces.values() for t in row)


def test_length_filters(tokenizer):
    dataset, report = load_luffy_dataset(
        str(FIXTURE), tokenizer=tokenizer, max_prompt_length=1000, max_completion_length=100
    )
    traces = by_index(dataset, "target")
    assert sorted(traces) == [0, 1, 2, 3, 4, 5, 7]  # row 6: prompt too long
    assert traces[4] == []  # its trace is too long: the row stays, without a trace
    assert len(traces[5]) == 2
    assert report == DataReport(rows_in=8, rows_out=7, prompts_too_long=1, traces_in=5, traces_too_long=1,
                                traces_out=4, rows_without_trace=4)


def test_length_limit_counts_the_end_token(tokenizer):
    trace = "<think>\n2 plus 2 is 4.\n</think>\nThe answer is $\\boxed{4}$."
    n = len(tokenizer(trace, add_special_tokens=False)["input_ids"])
    rows = [{"prompt": "q", "target": trace, "ground_truth": "4"}]
    for limit, kept in ((n, 0), (n + 1, 1)):
        _, report = prepare_luffy_dataset(Dataset.from_list(rows), tokenizer=tokenizer, max_completion_length=limit)
        assert report.traces_out == kept


def test_num_traces():
    dataset, report = load_luffy_dataset(str(FIXTURE), num_traces=1)
    assert all(len(traces) <= 1 for traces in dataset["target"])
    assert by_index(dataset, "target")[5] == ["<think>\n6 over 3 is 2.\n</think>\n\\boxed{2}"]
    assert (report.traces_in, report.traces_out) == (6, 5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<think>\nx\n</think>\n\\boxed{1}", ["<think>\nx\n</think>\n\\boxed{1}"]),
        (["one", "two"], ["one", "two"]),
        ([{"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}], ["one", "two"]),
        (None, []),
        ("", []),
        ([], []),
    ],
    ids=["string", "list-of-strings", "messages", "none", "empty-string", "empty-list"],
)
def test_teacher_column_shapes(value, expected):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "target": value, "reward_model": {"ground_truth": "1"}}]
    dataset, _ = prepare_luffy_dataset(Dataset.from_list(rows))
    assert dataset[0]["target"] == expected


def test_output_column_name_and_plain_prompts():
    rows = [{"prompt": "What is 1+1?", "target": [{"role": "assistant", "content": "2"}], "ground_truth": 2}]
    dataset, _ = prepare_luffy_dataset(Dataset.from_list(rows), off_policy_column="teacher")
    assert dataset[0]["teacher"] == ["2"]
    assert dataset[0]["target"] == [{"role": "assistant", "content": "2"}]  # the original column is kept
    assert dataset[0]["prompt"] == [{"role": "user", "content": "What is 1+1?"}]
    assert dataset[0]["ground_truth"] == "2"


def test_parquet_round_trip(tmp_path):
    """The fixture as parquet (LUFFY's file format) loads the same; prepared data saved and loaded again is stable."""
    import pandas as pd

    parquet = tmp_path / "train.parquet"
    pd.read_json(FIXTURE, lines=True).to_parquet(parquet)
    from_jsonl, _ = load_luffy_dataset(str(FIXTURE), system_prompt="luffy", strip_think_prefix=True)
    from_parquet, report = load_luffy_dataset(str(parquet), system_prompt="luffy", strip_think_prefix=True)
    columns = ["prompt", "target", "ground_truth"]
    assert from_parquet.select_columns(columns).to_list() == from_jsonl.select_columns(columns).to_list()

    again = tmp_path / "prepared.parquet"
    from_parquet.to_parquet(again)
    reloaded, report_again = load_luffy_dataset(str(again), system_prompt="luffy")
    assert reloaded.select_columns(columns).to_list() == from_parquet.select_columns(columns).to_list()
    assert (report_again.traces_in, report_again.rows_without_trace) == (report.traces_out, report.rows_without_trace)


def test_benchmark_files_load_through_the_same_code():
    import pandas as pd

    for name, rows in (("all", 6023), ("arc_c", 1172), ("gpqa", 198)):
        path = BENCHMARKS / f"valid.{name}.parquet"
        dataset, report = load_luffy_dataset(str(path), system_prompt="drop")
        assert (len(dataset), report.rows_without_trace, report.traces_in) == (rows, rows, 0)
        frame = pd.read_parquet(path)
        assert dataset["ground_truth"] == [rm["ground_truth"] for rm in frame.reward_model]
        assert {tuple(m["role"] for m in p) for p in dataset["prompt"]} == {("user",)}
        assert {"data_source", "reward_model", "extra_info"} <= set(dataset.column_names)


def test_errors(tmp_path):
    rows = [{"prompt": "q", "target": None, "ground_truth": "1"}]
    with pytest.raises(ValueError, match="system_prompt"):
        prepare_luffy_dataset(Dataset.from_list(rows), system_prompt="replace")
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_luffy_dataset(Dataset.from_list(rows), max_prompt_length=10)
    with pytest.raises(ValueError, match="num_traces"):
        prepare_luffy_dataset(Dataset.from_list(rows), num_traces=0)
    with pytest.raises(ValueError, match="ground_truth"):
        prepare_luffy_dataset(Dataset.from_list([{"prompt": "q"}]))
    with pytest.raises(TypeError, match="target"):
        prepare_luffy_dataset(Dataset.from_list([{"prompt": "q", "target": [1, 2], "ground_truth": "1"}]))
    text_file = tmp_path / "data.txt"
    text_file.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="unsupported file type"):
        load_luffy_dataset(str(text_file))
