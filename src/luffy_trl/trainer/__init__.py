"""`luffy_trl.trainer`: `MixedPolicyGRPOTrainer`, LUFFY's mixed-policy GRPO as a narrow subclass of TRL's `GRPOTrainer`.

Data flow of one generation batch (docs/method.md has the formulas):

1. TRL's sampler repeats each prompt `num_generations` (G) times; global row `g` is slot `g % G` of its group.
   `_generate_and_score_completions` marks the last `num_off_policy` slots of each group as teacher rows (when the
   row has a teacher completion) and exposes the flag to reward functions as the `is_off_policy` column.
2. `_generate_single_turn` generates only the on-policy rows and puts the tokenized teacher completion in the
   teacher slots (with "unknown" sampling log-probs, so vLLM's importance-sampling ratio is exactly 1 there).
3. TRL decodes and scores every row (teacher rows with the same reward functions). `_calculate_rewards` then applies
   the trigger (`luffy_trl.guidance`) on the gathered rewards: a teacher row that does not take part (and, for the
   "RL w/ SFT loss" baseline, every teacher row) gets NaN rewards, so TRL leaves it out of the group baseline and
   gives it advantage 0. TRL computes the group advantages, pads, shuffles and splits; an `is_off_policy` (B,)
   tensor travels with the batch, and teacher rows that do not take part get an all-zero completion mask.
4. `_compute_loss` runs one forward pass and calls the pure `luffy_trl.losses` functions.

Everything else (optimiser, logging, vLLM, PEFT, DeepSpeed, checkpoints) is TRL's; checkpoints also hold TRL's
buffered generation batch (`luffy_trl.trainer.checkpoint`).

The class is assembled in `mixed_policy.py` from one mixin per module; each wraps TRL methods with `super()`:

- `mixed_policy`: the class itself. Overrides `__init__` and `_calculate_rewards`: construction checks, the
  trigger's decisions (`luffy_trl.guidance`) and the batch metrics (steps 1 and 3).
- `generation`: `TeacherGenerationMixin`. Overrides `_generate_and_score_completions`, `_generate_single_turn` and
  `_tool_call_loop`: teacher slots, generation of the on-policy rows only, teacher rows kept out of TRL's tool loop
  (a tool-calling teacher trajectory brings its own tool mask) (steps 1-2).
- `loss`: `MixedLossMixin`. Overrides `_compute_loss` (re-implemented; `tests/test_trainer_loss.py` checks it against
  stock TRL): the mixed-policy loss and its metrics (step 4).
- `micro_batches`: `PaddingFreeBatchingMixin`. Overrides `_prepare_inputs`, `_generate_and_score_completions` and
  `_get_per_token_logps_and_entropies`: micro-batches of real tokens and packed sequences (the pure planner it
  calls is `luffy_trl.batching`).
- `packed_sequences`: `PackedSequencesMixin`, the base of `PaddingFreeBatchingMixin`. Overrides `__init__` (refuses
  `pack_sequences="always"` on a family that cannot pack exactly): whether packing is on for this model (the lists
  of `luffy_trl.packing` and a check at the first packed forward) and the packed forward.
- `checkpoint`: `GenerationCheckpointMixin`. Overrides transformers' `Trainer._save_checkpoint` and
  `_load_optimizer_and_scheduler`: TRL's buffered generation batch in checkpoints, for exact resume.
- `live_teacher`: `LiveTeacherMixin`. Overrides `_generate_and_score_completions`: an optional live teacher that
  fills trace-less teacher slots.

The pure layer they call holds no trainer state: `luffy_trl.losses` (with TRL's on-policy objectives in
`luffy_trl.objectives`), `luffy_trl.batching`, `luffy_trl.guidance`,
`luffy_trl.teacher`, `luffy_trl.config`.
Built against TRL 1.16; `tests/test_trl_compat.py` fails loudly if the wrapped private methods change.

Collectives: the rule that keeps processes aligned. Every process must issue the same sequence of collective calls
(gathers, reductions, and those inside generation: vLLM server mode's prompt gather, tensor-parallel colocate's group
gather, ZeRO-3 weight gathering and synced decoding), whatever rows it holds. So a branch that contains a collective
may depend only on what every process shares: the config, train/eval mode, the step, or gathered tensors; never on
this process's own rows (whether it holds a teacher row, a trace, a failed group). The collectives luffy-trl adds:

- `_subset_generations_per_prompt`: `gather_object` of "my rows are whole uniform groups", once per training
  generation batch in vLLM server / tensor-parallel colocate mode with `num_off_policy > 0` (config and mode only:
  the teacher plan is set on every process, even one without a teacher row). Then every process generates at
  least one row, so generation's own collectives pair up.
- `_calculate_rewards`: `gather` of the teacher flags, every training batch (TRL gathers the rewards itself).
- `_apply_guidance`: `gather` of the loss-token count, when the *gathered* trigger decisions exclude a row or
  `off_policy_loss="sft"` (config).
- `_mask_truncated_on_policy_rows`: `gather` of the loss-token count, when `mask_truncated_completions` (config).
- `_log_mixed_batch_metrics`: `gather` of the lengths and of the teacher counters, every training batch with
  `num_off_policy > 0` (the counters are set on every process by `_plan_teacher_rows`).
- `_log_on_policy_sampling_metrics`: one `gather`, every generation batch with vLLM's importance-sampling correction
  on (config).
- `_compute_loss`: `gather` of the policy loss when the entropy bonus is on, of the aux loss when enabled (config);
  with `use_adaptive_entropy`, one `reduce` of the window's entropy statistics at every optimiser-step boundary in
  training (config, mode, step); `_log_loss_metrics`: one `reduce` and one `gather`, every call.
- `LiveTeacherMixin` (`luffy_trl.trainer.live_teacher`): one `broadcast_object_list`, one `gather_object` and one
  `gather`
  per training generation batch while the live teacher is on (config).
- `PaddingFreeBatchingMixin` (`luffy_trl.trainer.micro_batches`): one `gather` of the no-grad forward count per old /
  reference log-prob call (a process with fewer forwards runs dummy ones, so ZeRO-3's weight gathers pair up), one
  `reduce` of the token counters per training generation batch (config and mode only).
- `GenerationCheckpointMixin` (`luffy_trl.trainer.checkpoint`): one `gather` of "my saved generation buffer is usable"
  when resuming inside a generation batch (the step is shared), so all processes restore it or all regenerate.
- `LuffyEvalCallback`: every process makes the same number of `generate` calls (shares padded to equal length, for
  ZeRO-3's synced decoding), then one `gather_object`; see `luffy_trl.evaluation.callback`.
`tests/test_vllm_alignment.py` runs two processes against TRL's real server-mode client with batches where one
process holds no teacher row, a schedule leaves groups without one, or a trace is missing on one process only.
"""

from luffy_trl.trainer.generation import IS_OFF_POLICY, TEACHER_LOGPS, teacher_slot
from luffy_trl.trainer.mixed_policy import MixedPolicyGRPOTrainer

__all__ = ["IS_OFF_POLICY", "TEACHER_LOGPS", "MixedPolicyGRPOTrainer", "teacher_slot"]
