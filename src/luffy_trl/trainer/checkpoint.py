"""Exact resume inside a generation batch: the buffered completions and TRL's micro-step counter travel with the
checkpoint.

TRL 1.16 generates one generation batch every `steps_per_generation × num_iterations` micro-steps, buffers it
(`GRPOTrainer._buffered_inputs`) and trains on slice `_step % steps_per_generation` of it at micro-step `_step`.
Neither the buffer nor `_step` is checkpointed: a run resumed from a checkpoint that falls inside a generation batch
(for example LUFFY's geometry, `steps_per_generation` 16 > `gradient_accumulation_steps` 8, with a checkpoint at an
odd step) restarts `_step` at 0 and regenerates, so it trains on new samples of the current batch, from slice 0,
and every later generation happens at a shifted micro-step.

`GenerationCheckpointMixin` writes, next to the Trainer's own files, one `luffy_generation_state_rank<r>.pt` per
process (`_step`, and the buffered batch when the checkpoint is inside a generation batch) and restores both when
the Trainer resumes. With the Trainer's data skipping and RNG states, the resumed run then trains on the same rows,
generates at the same micro-steps and reaches the same parameters as an uninterrupted run. A checkpoint without the
file (an older luffy-trl, or another number of processes) is resumed with `_step` realigned to the optimiser step,
so later generation batches are the uninterrupted run's; the rest of the current batch is regenerated, and a
warning says so.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import send_to_device
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger("luffy_trl.trainer")
GENERATION_STATE_FILE = "luffy_generation_state_rank{}.pt"


class GenerationCheckpointMixin:
    """Saves and restores TRL's generation buffer and micro-step counter with every checkpoint."""

    def _generate_every(self) -> int:
        return self.args.steps_per_generation * self.num_iterations

    def _save_checkpoint(self, model, trial):
        # Written first, so that a checkpoint pushed to the Hub by the Trainer (hub_strategy="checkpoint") has it too.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        inside = self._step % self._generate_every() != 0
        state = {
            "step": self._step,
            "global_step": self.state.global_step,
            "world_size": self.accelerator.num_processes,
            "generate_every": self._generate_every(),
            "steps_per_generation": self.args.steps_per_generation,
            "buffered_inputs": self._buffered_inputs if inside else None,
        }
        torch.save(state, os.path.join(folder, GENERATION_STATE_FILE.format(self.accelerator.process_index)))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._restore_generation_state(checkpoint)

    def _restore_generation_state(self, checkpoint: str) -> None:
        """Called once when training resumes from `checkpoint` (after the Trainer restored `state.global_step`)."""
        # The micro-step of an uninterrupted run at this optimiser step (the Trainer resumes at step boundaries).
        step = self.state.global_step * self.args.gradient_accumulation_steps
        path = os.path.join(checkpoint, GENERATION_STATE_FILE.format(self.accelerator.process_index))
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        same_geometry = saved is not None and all(
            saved[key] == value for key, value in (
                ("world_size", self.accelerator.num_processes), ("generate_every", self._generate_every()),
                ("steps_per_generation", self.args.steps_per_generation), ("step", step),
            )
        )
        self._step = step
        usable = same_geometry and saved["buffered_inputs"] is not None
        if step % self._generate_every() == 0:
            self._buffered_inputs = None  # a generation-batch boundary: the next micro-step generates anyway
        elif self._on_every_process(usable):  # else the processes would not all regenerate (collectives): a hang
            self._buffered_inputs = send_to_device(saved["buffered_inputs"], self.accelerator.device)
        else:
            self._buffered_inputs = None
            why = ("it has no luffy-trl generation state" if saved is None else
                   "it was saved with another number of processes, steps_per_generation or num_iterations"
                   if not usable else "another process's generation state is missing or was saved differently")
            logger.warning(
                "Checkpoint %s falls inside a generation batch (micro-step %d of %d) but %s: the rest of this "
                "generation batch is generated again (new samples); later generation batches start at the "
                "micro-steps of the uninterrupted run.",
                checkpoint, step % self._generate_every(), self._generate_every(), why,
            )

    def _on_every_process(self, flag: bool) -> bool:
        """`flag` and the same on every other process (one gather; every process calls it: the step is shared)."""
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(flags.min().item() > 0)
