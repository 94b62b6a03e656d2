"""Groups that straddle two processes (gloo on CPU): exactly num_off_policy teacher rows per group."""

import pathlib

import pytest
from conftest import requires_torchrun, run_two_processes

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_groups.py"


@pytest.mark.slow
@requires_torchrun
def test_groups_straddling_two_processes(tmp_path):
    ranks = run_two_processes(SCRIPT, tmp_path)
    assert all(r["world_size"] == 2 for r in ranks)
    steps = list(zip(ranks[0]["records"], ranks[1]["records"]))
    assert len(steps) >= 1
    for rec0, rec1 in steps:
        # per process: 3 rows × 2 steps per generation = 6 rows; global batch 12 rows = 3 groups of 4,
        # the middle group spans both processes (rows 4-5 on rank 0, rows 0-1 on rank 1).
        prompts = rec0["prompts"] + rec1["prompts"]
        flags = rec0["flags"] + rec1["flags"]
        rewards = rec0["rewards"] + rec1["rewards"]
        assert len(flags) == 12
        for g in range(0, 12, 4):
            assert len(set(prompts[g : g + 4])) == 1
            assert flags[g : g + 4] == [False, False, False, True]
            assert rewards[g + 3] == 1.0  # the teacher trace is correct
        # advantages are computed over the mixed group even where it spans processes (scale_rewards="none")
        by_row = {}
        for rec, base in ((rec0, 0), (rec1, 6)):
            # the output is shuffled locally; match rows through (flag, advantage) multisets per process
            by_row[base] = sorted(zip(rec["is_off_policy"], rec["advantages"]))
        expected = []
        for g in range(0, 12, 4):
            mean = sum(rewards[g : g + 4]) / 4
            expected += [(f, r - mean) for f, r in zip(flags[g : g + 4], rewards[g : g + 4])]
        for base in (0, 6):
            want = sorted(expected[base : base + 6])
            got = by_row[base]
            assert [f for f, _ in got] == [f for f, _ in want]
            assert [a for _, a in got] == pytest.approx([a for _, a in want])
    assert ranks[0]["log"][0]["off_policy/fraction_of_rows"] == 0.25
