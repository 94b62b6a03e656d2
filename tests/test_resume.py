"""Resuming inside a generation batch (`steps_per_generation` > GA) on one process: exact with luffy-trl's generation
state in the checkpoint (`luffy_trl.trainer.checkpoint`); realigned, with a warning, without it. The same under
DeepSpeed ZeRO-2/ZeRO-3 is in test_deepspeed.py."""

import logging

import deepspeed_cases as cases
import pytest
import torch


def rows_by_step(trained_on, first_step):
    return [m for m in trained_on if m["step"] >= first_step]


@pytest.mark.slow
def test_resume_inside_a_generation_batch_is_exact(tmp_path):
    result = cases.resume(str(tmp_path))
    uninterrupted, resumed = result["uninterrupted"], result["resumed"]
    assert [m["step"] for m in uninterrupted] == [0, 0, 1, 1, 2, 2]
    assert resumed == rows_by_step(uninterrupted, cases.RESUME_CHECKPOINT)  # the same rows, completions included
    state = torch.load(tmp_path / "resume_uninterrupted" / "checkpoint-1" / "luffy_generation_state_rank0.pt",
                       weights_only=False)
    assert state["step"] == 2 and len(state["buffered_inputs"]) == 4  # micro-step 2 of a generation batch of 4
    final = [torch.load(tmp_path / f"resume_{name}.pt") for name in ("uninterrupted", "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.slow
def test_resume_without_generation_state_regenerates_the_batch_and_realigns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        result = cases.resume(str(tmp_path), drop_generation_state=True)
    assert "falls inside a generation batch (micro-step 2 of 4) but it has no luffy-trl generation state" in caplog.text
    uninterrupted, resumed = result["uninterrupted"], result["resumed"]
    # step 1 trains on new samples of the same prompts; step 2 starts the next generation batch on time
    assert [m["step"] for m in resumed] == [1, 1, 2, 2]

    def prompts(micro_steps):
        return [sorted(p for p, _ in m["rows"]) for m in micro_steps]

    def prompt_set(micro_steps):
        return {p for m in micro_steps for p, _ in m["rows"]}

    # the regenerated batch is shuffled anew: its last two slices hold rows of the batch's prompts, not the same rows
    assert prompt_set(resumed[:2]) <= prompt_set(uninterrupted[:4])
    assert prompts(resumed[2:]) == prompts(rows_by_step(uninterrupted, 2))
    assert resumed[:2] != rows_by_step(uninterrupted, 1)[:2]  # regenerated: other completions


class _TwoProcesses:
    """An accelerator of two processes for `_restore_generation_state` alone: this is process 0, and `gather` adds
    the other process's flag."""

    num_processes, process_index, device = 2, 0, "cpu"

    def __init__(self, other_has_state: bool):
        self.other = float(other_has_state)

    def gather(self, tensor):
        return torch.cat([tensor, torch.tensor([self.other])])


@pytest.mark.parametrize("other_has_state", [True, False])
def test_resume_restores_the_buffer_only_if_every_process_can(tmp_path, caplog, other_has_state):
    """A process whose generation state is missing regenerates the batch; if the others restored theirs, they would
    skip that generation and its collectives (a hang). So the buffer is restored on all processes or on none."""
    from types import SimpleNamespace

    from luffy_trl.trainer.checkpoint import (
        GENERATION_STATE_FILE,
        GenerationCheckpointMixin,
    )

    trainer = GenerationCheckpointMixin()
    trainer.args = SimpleNamespace(steps_per_generation=4, gradient_accumulation_steps=2)
    trainer.num_iterations, trainer.state = 1, SimpleNamespace(global_step=1)
    trainer.accelerator = _TwoProcesses(other_has_state)
    buffer = [{"completion_ids": torch.full((2, 3), j)} for j in range(4)]
    torch.save({"step": 2, "global_step": 1, "world_size": 2, "generate_every": 4, "steps_per_generation": 4,
                "buffered_inputs": buffer}, tmp_path / GENERATION_STATE_FILE.format(0))
    with caplog.at_level(logging.WARNING, logger="luffy_trl.trainer"):
        trainer._restore_generation_state(str(tmp_path))
    assert trainer._step == 2
    if other_has_state:
        assert [int(b["completion_ids"][0, 0]) for b in trainer._buffered_inputs] == [0, 1, 2, 3]
    else:
        assert trainer._buffered_inputs is None and "another process's generation state is missing" in caplog.text
