"""The LUFFY / verl flags that have no luffy-trl field (with the reason), the settings that are no-ops at some values,
and the flags only LUFFY's mixed-policy trainer has. Data for `luffy_trl.convert.mapping`; docs/migrating.md lists
them all."""

# Flags with no luffy-trl field, and why (checked before the generic "unknown flag" comment).
REASONS = {
    "data.val_files": "training-time validation: use LuffyEvalCallback or examples/eval_luffy.py (docs/evaluation.md)",
    "data.val_batch_size": "validation batch size: see data.val_files",
    "rollout.val_temperature": "validation sampling: eval_luffy.py --temperature (LUFFY evaluates at 0.6)",
    "rollout.n_val": "validation samples per prompt: eval_luffy.py --num_samples",
    "trainer.test_freq": "validation every N rollouts: LuffyEvalCallback(every=...) (docs/evaluation.md)",
    "trainer.val_before_train": "validation before training: run eval_luffy.py on the base model",
    "model.use_remove_padding": "verl's padding removal: here padding_free_batches (default on) cuts each "
    "micro-batch to its real tokens, and pack_sequences='auto' packs it (one sequence with flash attention, bins "
    "with sdpa) for model families that pack exactly (docs/batching.md); no effect on the loss",
    "actor.use_dynamic_bsz": "verl's token-budget micro-batches; here gradient_accumulation_steps micro-batches "
    "(K, which scales the entropy bonus under loss_type luffy; docs/configuration.md) whose rows padding_free_batches "
    "assigns by length, token-balanced when packed (docs/batching.md)",
    "actor.ppo_max_token_len_per_gpu": "token budget of verl's dynamic micro-batches: see actor.use_dynamic_bsz",
    "actor.ppo_micro_batch_size": "verl's micro-batch size (ignored by verl with use_dynamic_bsz); "
    "per_device_train_batch_size is set to one group instead",
    "actor.ulysses_sequence_parallel_size": "Ulysses sequence parallelism: not in TRL's GRPOTrainer (1 = off)",
    "actor.fsdp_config.param_offload": "FSDP knob: pick an accelerate config instead (zero3, or zero3_offload to "
    "offload; `luffy-trl recipes`)",
    "actor.fsdp_config.grad_offload": "FSDP knob: see actor.fsdp_config.param_offload",
    "actor.fsdp_config.optimizer_offload": "FSDP knob: see actor.fsdp_config.param_offload",
    "ref.fsdp_config.param_offload": "FSDP knob of the reference model (there is none with beta 0; with beta > 0 "
    "TRL's reference model follows the accelerate config)",
    "ref.use_ref": "reference model: TRL loads one only when beta > 0",
    "trainer.critic_warmup": "no critic in GRPO",
    "trainer.project_name": "W&B project: set the WANDB_PROJECT environment variable",
    "trainer.n_gpus_per_node": "Ray placement: the number of processes comes from `accelerate launch` "
    "(--num_processes); used here for the batch arithmetic",
    "trainer.nnodes": "Ray placement: `accelerate launch --num_machines`; used here for the batch arithmetic",
    "trainer.default_hdfs_dir": "HDFS upload: not supported (push_to_hub / hub_model_id upload to the Hub)",
    "actor.off_policy_normalize": "accepted by LUFFY's loss function but never read: no effect",
    "actor.off_policy_cliprange": "accepted by LUFFY's loss function but never read: no effect",
    "actor.off_policy_abs_cliprange": "accepted by LUFFY's loss function but never read: no effect",
    "actor.kl_loss_type": "TRL's KL is k3 = exp(ref−logp) − (ref−logp) − 1, verl's low_var_kl without its ±10 clamp",
    "data.shuffle": "TRL shuffles the prompts (shuffle_dataset, default true)",
    "data.add_tgt_with_acc": "declared by LUFFY but not implemented: no effect",
    "trainer.add_full_target_when_none": "empty in LUFFY: no effect",
}
# Flags that are no-ops at these values (anything else is refused with the reason).
NOOPS = {
    "algorithm.kl_ctrl.kl_coef": ({"0", "0.0", "0.00", "0.000"}, "reward-level KL penalty: not in TRL (use beta, "
                                  "the KL loss)"),
    "actor.use_sft_prefix_reward": ({"False"}, "not implemented in luffy-trl"),
    "rollout.prefix_share_across_samples": ({"False"}, "partial prefixes are not supported"),
    "rollout.prefix_reward_weight_beta": ({"1.0", "1"}, "on-policy advantage multiplier: no luffy-trl field"),
    "data.disable_truncation_advantage": ({"False"}, "zeroing the advantage of truncated responses: use "
                                          "mask_truncated_completions (masks them instead)"),
    "actor.off_policy_loss_impl": ({"token"}, "only the token-level off-policy loss exists"),
    "trainer.critic_warmup": ({"0"}, "no critic in GRPO"),
}
REWARD_VERSIONS = {"3": "luffy_math_reward"}
# Flags only LUFFY's mixed-policy trainer has: a script with none of them is a plain verl GRPO / PPO script.
LUFFY_FLAGS = {"rollout.n_prefix", "rollout.min_prefix_ratio", "rollout.max_prefix_ratio", "actor.use_off_policy_loss",
               "actor.off_policy_reshape", "actor.use_sft_multitask_loss", "data.sample_target_ratio"}


