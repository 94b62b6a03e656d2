"""vLLM server mode on two processes (gloo, CPU) with batches where one process holds no teacher row (issue 16).

Every process must make the same collective calls whatever rows it holds; before the fix, a process without a
teacher row skipped the gathered "subset or not" check and paired TRL's prompt gather with the other process's
check (wrong prompts reached the server, or the job hung). Each case must finish (a hang fails through the script's
faulthandler and the subprocess timeout), give every row the completion a single process gives it, and count the
discarded teacher-slot samples.
"""

import pathlib

import pytest
from conftest import requires_torchrun, run_two_processes
from vllm_alignment_cases import CASES, build_trainers, global_rows, run_case

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_vllm_alignment.py"


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_alignment")
    return run_two_processes(SCRIPT, out, timeout=240)


@pytest.fixture(scope="module")
def single_process_results(tokenizer, tmp_path_factory):
    trainers = build_trainers(tokenizer, tmp_path_factory.mktemp("vllm_alignment_single"))
    return {case: run_case(*global_rows(trainers, case)) for case in CASES}


def _concatenated(ranks, case, key):
    return ranks[0][case][key] + ranks[1][case][key]


@pytest.mark.slow
@requires_torchrun
@pytest.mark.parametrize("case", list(CASES))
def test_same_completions_as_one_process(two_process_results, single_process_results, case):
    ranks = two_process_results
    assert [r["world_size"] for r in ranks] == [2, 2]
    single = single_process_results[case]
    assert _concatenated(ranks, case, "is_off_policy") == single["is_off_policy"]
    # on-policy slot s holds sample s of its prompt whether the server was asked for G or for G - k samples
    assert _concatenated(ranks, case, "sample_index") == single["sample_index"]


@pytest.mark.slow
@requires_torchrun
def test_discarded_generations_and_server_calls(two_process_results):
    ranks = two_process_results
    flags = {case: _concatenated(ranks, case, "is_off_policy") for case in CASES}
    expected_discarded = {
        "one_process_without_teacher": 1,  # half a group per process: every slot is generated
        "g8_split_in_halves": 1,
        "whole_groups": 0,  # uniform whole groups: G - k samples per prompt, nothing discarded
        "straddling_groups": 3,
        "missing_trace_on_one_process": 3,  # a group without a trace: every slot, 3 teacher slots discarded
        "group_share_near_zero": sum(flags["group_share_near_zero"]),
    }
    for case, discarded in expected_discarded.items():
        assert ranks[0][case]["discarded"] == ranks[1][case]["discarded"] == discarded, case
    # the schedule case really has a process without a teacher row, and groups without one
    share_flags = flags["group_share_near_zero"]
    assert not any(share_flags[:16]) or not any(share_flags[16:])
    assert 0 < sum(share_flags) < 8
    calls = ranks[0]["server_calls"]  # (unique prompts, completions per prompt); only rank 0 talks to the server
    assert calls["g4"] == [[1, 4], [4, 3], [3, 4]]
    assert calls["g8"] == [[1, 8]]
    assert calls["g4_missing"] == [[4, 4]]
    assert calls["g4_share"] == [[8, 4]]
    assert all(c == [] for c in ranks[1]["server_calls"].values())
