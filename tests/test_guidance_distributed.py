"""Trigger and keyed random decisions across two processes (gloo on CPU), for groups that straddle them."""

import json
import pathlib

import pytest
from conftest import requires_torchrun, run_two_processes

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_triggers.py"
G = 4


def load(tmp_path, name):
    ranks = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("triggers")
    run_two_processes(SCRIPT, tmp_path, rank_files=None)
    return tmp_path


@pytest.mark.slow
@requires_torchrun
def test_all_fail_trigger_sees_samples_of_both_processes(runs):
    rank0, rank1 = load(runs, "trigger")
    batches = list(zip(rank0["records"], rank1["records"]))
    assert len(batches) == 2
    used = 0
    for rec0, rec1 in batches:
        assert rec0["is_off_policy"] == rec0["flags"] and rec1["is_off_policy"] == rec1["flags"]  # local order
        flags = rec0["flags"] + rec1["flags"]
        rewards = rec0["rewards"] + rec1["rewards"]
        lengths = rec0["lengths"] + rec1["lengths"]
        advantages = rec0["advantages"] + rec1["advantages"]
        prompts = rec0["prompts"] + rec1["prompts"]
        for g in range(0, 12, G):
            assert len(set(prompts[g : g + G])) == 1
            assert flags[g : g + G] == [False, False, False, True]
            fires = all(r == 0 for r, f in zip(rewards[g : g + G], flags[g : g + G]) if not f)
            part = [not f or fires for f in flags[g : g + G]]
            mean = sum(r for r, p in zip(rewards[g : g + G], part) if p) / sum(part)
            want = [r - mean if p else 0.0 for r, p in zip(rewards[g : g + G], part)]
            assert advantages[g : g + G] == pytest.approx(want)
            assert (lengths[g + 3] > 0) == fires  # a teacher row that does not take part has no loss tokens
            used += fires
    # batch 0: the middle group's success is on rank 0 and its teacher on rank 1, which must stay out
    first = batches[0][1]
    assert first["flags"][1] and first["lengths"][1] == 0 and first["advantages"][1] == 0.0
    assert batches[1][1]["lengths"][1] > 0  # batch 1: the middle group fails everywhere
    logged = [h["off_policy/used"] for h in rank0["log"] if "off_policy/used" in h]
    assert sum(logged) == used and logged == [h["off_policy/used"] for h in rank1["log"] if "off_policy/used" in h]


@pytest.mark.slow
@requires_torchrun
def test_group_share_and_random_traces_agree_across_processes(runs):
    rank0, rank1 = load(runs, "share")
    with_teacher = without = 0
    for rec0, rec1 in zip(rank0["records"], rank1["records"]):
        flags = rec0["flags"] + rec1["flags"]
        texts = rec0["texts"] + rec1["texts"]
        for g in range(0, 12, G):
            group = flags[g : g + G]
            assert group in ([False] * 4, [False, True, True, True])  # both processes drew the same share
            if group[1]:
                with_teacher += 1
                ways = sorted(t.split("way ")[1][0] for t in texts[g + 1 : g + G])
                assert ways == ["0", "1", "2"]  # one permutation of the three traces, shared by both processes
            else:
                without += 1
    assert with_teacher and without
