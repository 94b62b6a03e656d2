"""Groups that straddle two processes (gloo on CPU): exactly num_off_policy teacher rows per group."""

import pathlib

import pytest
from conftest import assert_straddling_groups, requires_torchrun, run_two_processes

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_groups.py"


@pytest.mark.slow
@requires_torchrun
def test_groups_straddling_two_processes(tmp_path):
    ranks = run_two_processes(SCRIPT, tmp_path)
    assert_straddling_groups(ranks)
    assert ranks[0]["log"][0]["off_policy/fraction_of_rows"] == 0.25
