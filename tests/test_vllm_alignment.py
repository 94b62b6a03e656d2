"""vLLM server mode and tensor-parallel colocate on two processes (gloo, CPU) with batches where one process holds no
teacher row (issue 16).

Every process must make the same collective calls whatever rows it holds; before the fix, a process without a
teacher row skipped the gathered "subset or not" check and paired TRL's prompt gather with the other process's
check (wrong prompts reached the server, or the job hung). Each case must finish (a hang fails through the script's
faulthandler and the subprocess timeout), give every row the completion a single process gives it, and count the
discarded teacher-slot samples. Tensor-parallel colocate is faked with the two processes as one tensor-parallel
group (TRL's own `all_gather_object` over `tp_group` and equal slicing; only `vllm.LLM` is fake).
"""

import pathlib

import pytest
from conftest import requires_torchrun, run_two_processes
from vllm_alignment_cases import CASES, MODES, build_trainers, global_rows, run_case

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_vllm_alignment.py"
PARAMS = [(mode, case) for mode in MODES for case in CASES]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_two_processes(SCRIPT, tmp_path_factory.mktemp("vllm_alignment"), timeout=240)


@pytest.fixture(scope="module")
def single_process_results(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_alignment_single")
    results = {}
    for mode in MODES:
        trainers = build_trainers(tokenizer, out, mode)
        results[mode] = {case: run_case(*global_rows(trainers, case)) for case in CASES}
    return results


def _concatenated(ranks, mode, case, key):
    return ranks[0][mode][case][key] + ranks[1][mode][case][key]


@pytest.mark.slow
@requires_torchrun
@pytest.mark.parametrize("mode,case", PARAMS)
def test_same_completions_as_one_process(two_process_results, single_process_results, mode, case):
    ranks = two_process_results
    assert [r["world_size"] for r in ranks] == [2, 2]
    single = single_process_results[mode][case]
    assert _concatenated(ranks, mode, case, "is_off_policy") == single["is_off_policy"]
    # on-policy slot s holds sample s of its prompt whether G or G - k samples were generated
    assert _concatenated(ranks, mode, case, "sample_index") == single["sample_index"]


@pytest.mark.slow
@requires_torchrun
@pytest.mark.parametrize("mode", MODES)
def test_discarded_generations_and_engine_calls(two_process_results, mode):
    ranks = two_process_results
    flags = {case: _concatenated(ranks, mode, case, "is_off_policy") for case in CASES}
    expected_discarded = {
        "one_process_without_teacher": 1,  # half a group per process: every slot is generated
        "g8_split_in_halves": 1,
        "whole_groups": 0,  # uniform whole groups: G - k samples per prompt, nothing discarded
        "straddling_groups": 3,
        "missing_trace_on_one_process": 3,  # a group without a trace: every slot, 3 teacher slots discarded
        "group_share_near_zero": sum(flags["group_share_near_zero"]),
    }
    for case, discarded in expected_discarded.items():
        assert ranks[0][mode][case]["discarded"] == ranks[1][mode][case]["discarded"] == discarded, case
    # the schedule case really has a process without a teacher row, and groups without one
    share_flags = flags["group_share_near_zero"]
    assert not any(share_flags[:16]) or not any(share_flags[16:])
    assert 0 < sum(share_flags) < 8
    calls = [r[mode]["engine_calls"] for r in ranks]
    if mode == "server":  # (unique prompts, completions per prompt); only rank 0 talks to the server
        assert calls[0] == {"g4": [[1, 4], [4, 3], [3, 4]], "g8": [[1, 8]], "g4_missing": [[4, 4]],
                            "g4_share": [[8, 4]]}
        assert all(c == [] for c in calls[1].values())
    else:  # rows per LLM.generate: every rank generates its tensor-parallel group's rows (12 = 4 groups x 3)
        assert calls[0] == calls[1] == {"g4": [4, 12, 12], "g8": [8], "g4_missing": [16], "g4_share": [32]}
