"""Guard: the private TRL pieces MixedPolicyGRPOTrainer relies on. Fails loudly when TRL changes them.

Supported range: trl>=1.16.0,<1.17 (pyproject.toml). When this file fails after a TRL upgrade, re-read
`GRPOTrainer._generate_single_turn`, `_generate_and_score_completions`, `_calculate_rewards` and `_compute_loss`
and update `luffy_trl/trainer/` before widening the range.
"""

import inspect
import re

import pytest
import trl
from conftest import build_model, contains_answer_reward, math_dataset, tiny_args
from packaging.version import Version
from trl import GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer

EXPECTED_SIGNATURES = {
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
    "_get_per_token_logps_and_entropies": None,  # checked by keyword below
    "get_high_entropy_mask": ["self", "entropies", "mask", "threshold"],
    "get_off_policy_mask": ["advantages", "per_token_logps", "sampling_per_token_logps", "mask",
                            "off_policy_threshold"],
    "_tool_call_loop": ["self", "prompts", "prompt_ids", "completion_ids", "completions", "logprobs", "images",
                        "multimodal_fields"],
    "_get_tool_suffix_ids": ["self", "tool_messages"],
    "get_gamma_weights": ["advantages", "log_ratio_per_token", "mask", "importance_sampling_ratio", "k_pos",
                          "lambda_pos", "k_neg", "lambda_neg"],
}
LOGPS_KEYWORDS = {"model", "input_ids", "attention_mask", "logits_to_keep", "compute_entropy", "compute_aux_loss",
                  "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"}
# Attributes of GRPOTrainer read by MixedPolicyGRPOTrainer.
ATTRIBUTES = ["eos_token_ids", "_tokenizer", "chat_template", "chat_template_kwargs", "num_generations",
              "max_completion_length", "mask_truncated_completions", "use_vllm", "vllm_importance_sampling_correction",
              "top_entropy_quantile", "off_policy_mask_threshold", "beta", "epsilon_low", "epsilon_high",
              "loss_type", "aux_loss_enabled", "router_aux_loss_coef", "_entropy_bonus_enabled", "entropy_coef",
              "reward_weights", "_metrics", "_is_vlm", "num_iterations", "_step", "_buffered_inputs"]
OUTPUT_KEYS = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"}


def test_trl_version_is_in_the_supported_range():
    assert Version("1.16.0") <= Version(trl.__version__) < Version("1.17"), trl.__version__


@pytest.mark.parametrize("name", sorted(EXPECTED_SIGNATURES))
def test_private_signatures(name):
    params = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
    if name == "_get_per_token_logps_and_entropies":
        assert LOGPS_KEYWORDS <= set(params), sorted(LOGPS_KEYWORDS - set(params))
    else:
        assert params == EXPECTED_SIGNATURES[name]


def test_trl_loss_source_still_has_the_normalisers_we_mirror():
    """luffy_trl.losses.aggregate_loss mirrors these lines; test_trainer_loss checks the values."""
    source = inspect.getsource(GRPOTrainer._compute_loss)
    for fragment in ['loss_type in ["grpo", "sapo"]', 'loss_type == "bnpo"', 'loss_type == "dr_grpo"',
                     '"dapo"', "per_token_loss.size(0) * self.max_completion_length",
                     "current_gradient_accumulation_steps / self.args.steps_per_generation"]:
        assert fragment in source, fragment


def test_attributes_and_output_keys_of_one_step(tokenizer, tmp_path):
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=contains_answer_reward, args=tiny_args(tmp_path, max_steps=1),
        train_dataset=math_dataset(), processing_class=tokenizer,
    )
    missing = [a for a in ATTRIBUTES if not hasattr(trainer, a)]
    assert not missing
    trainer.model.train()
    rows = [math_dataset()[i] for i in range(2) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    assert OUTPUT_KEYS | {"is_off_policy"} <= set(out)
    assert out["is_off_policy"].shape == out["advantages"].shape == (8,)


def test_vllm_server_generation_still_dedupes_by_position_and_slices_equally():
    """Subset generation in vLLM server / tensor-parallel colocate mode (`_subset_generations_per_prompt`) relies on
    TRL taking every `num_generations`-th gathered prompt, asking for `num_generations` completions of each, and
    slicing `len(prompts)` rows per process."""
    from trl.generation.vllm_generation import VLLMGeneration

    assert list(inspect.signature(VLLMGeneration.generate).parameters) == [
        "self", "prompts", "images", "num_generations", "profiler"]
    source = inspect.getsource(VLLMGeneration.generate)
    for fragment in ["all_prompts[::num_generations]", '"n": num_generations',
                     "accelerator.process_index * len(prompts)", "local_rank_in_group * orig_size"]:
        assert fragment in source, fragment
    assert "num_generations=num_generations" in inspect.getsource(GRPOTrainer._generate_single_turn)


def test_trl_sampling_metrics_and_rules_we_rely_on():
    """`_log_on_policy_sampling_metrics` replaces the one value TRL appends per batch to these metrics, and
    `on_policy_ratio_departures` follows TRL's rule for computing rollout log-probs; the model card reads `_paper`."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for name in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                 "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                 "sampling/importance_sampling_ratio/max"):
        assert f'self._metrics[mode]["{name}"].append(' in source, name
    assert "self.args.gradient_accumulation_steps % generate_every != 0" in source
    assert "generate_every = self.args.steps_per_generation * self.num_iterations" in source
    assert {"title", "id", "citation"} <= set(GRPOTrainer._paper)
    assert GRPOTrainer.loss_is_scaled_for_ga is True  # loss_type="luffy" sums micro-batches: no ÷GA anywhere


def test_generation_buffer_and_checkpoint_hooks_that_exact_resume_relies_on():
    """`luffy_trl.trainer.checkpoint` saves `_step` and `_buffered_inputs` in `Trainer._save_checkpoint` and
    restores them in `_load_optimizer_and_scheduler` (called once on resume, after the Trainer state and, under
    DeepSpeed, the engine checkpoint are loaded)."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    for fragment in ["generate_every = self.args.steps_per_generation * self.num_iterations",
                     "if self._step % generate_every == 0 or self._buffered_inputs is None:",
                     "self._buffered_inputs[self._step % self.args.steps_per_generation]"]:
        assert fragment in prepare, fragment
    assert "self._step += 1" in inspect.getsource(GRPOTrainer.training_step)
    loop = inspect.getsource(Trainer._inner_training_loop)  # restores state.global_step, then prepares
    assert loop.index("self._init_training_state(") < loop.index("self._prepare_for_training(")
    prepare_training = inspect.getsource(Trainer._prepare_for_training)
    assert "self._load_optimizer_and_scheduler(resume_from_checkpoint)" in prepare_training
    assert prepare_training.index("deepspeed_load_checkpoint(") < prepare_training.index(
        "self._load_optimizer_and_scheduler(")
    assert 'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in inspect.getsource(
        Trainer._save_checkpoint)


def test_padding_free_batches_hooks_still_hold():
    """`luffy_trl.trainer.micro_batches` wraps `_prepare_inputs` (reassigns `_buffered_inputs` right after TRL fills it)
    and `_get_per_token_logps_and_entropies` during `_generate_and_score_completions` (old log-probs first, then
    reference log-probs; the same condition for the old ones; NaN differences give an IS ratio of 1, which teacher
    rows' unset old log-probs rely on). Trimming common left padding is exact for RoPE models only because no
    position ids are passed: positions are column indices, shifted uniformly."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    for fragment in ["self._step % generate_every == 0 or self._buffered_inputs is None",
                     "split_tensor_dict(generation_batch, self.args.steps_per_generation)",
                     "self._buffered_inputs[self._step % self.args.steps_per_generation]",
                     "generate_every = self.args.steps_per_generation * self.num_iterations"]:
        assert fragment in prepare, fragment
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    old = source.index("old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    ref = source.index("ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    assert old < ref
    assert source.count("self._get_per_token_logps_and_entropies(") == 3  # old, ref (ref model), ref (PEFT)
    for fragment in ["self.args.gradient_accumulation_steps % generate_every != 0 or (",
                     "self.use_vllm and self.vllm_importance_sampling_correction",
                     "torch.nan_to_num(per_token_logps_diff, nan=0.0)",
                     "delta = delta[mask & ~torch.isnan(delta)]"]:
        assert fragment in source, fragment
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:8] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                          "compute_entropy", "compute_aux_loss"]
    logps = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert not re.search(r"(?<!image_)position_ids", logps)
    assert "position_ids = torch.arange(inputs_embeds.shape[1]" in inspect.getsource(qwen2.Qwen2Model.forward)


def test_tool_loop_contract_teacher_trajectories_rely_on():
    """`TeacherGenerationMixin._tool_call_loop` blanks teacher rows' parsed completions so that TRL's loop skips them
    (it selects rows by `completion[0].get("tool_calls")`), then overwrites their tool mask and messages in the
    7-tuple TRL returns; a teacher trajectory's tool results are TRL's `_get_tool_suffix_ids` (prompt + completion +
    suffix concatenation, never re-tokenized)."""
    source = inspect.getsource(GRPOTrainer._tool_call_loop)
    for fragment in ['tool_calls = [completion[0].get("tool_calls") for completion in completions]',
                     "tool_mask = [[1] * len(ids) for ids in completion_ids]",
                     "suffix_ids = self._get_tool_suffix_ids(tool_messages)",
                     "prompt_ids[idx_with_tool] + completion_ids[idx_with_tool] + suffix_ids",
                     "return tool_mask, completions, completion_ids, logprobs, tool_call_count, tool_failure_count, "
                     "tool_images"]:
        assert fragment in source, fragment
    generate = inspect.getsource(GRPOTrainer._generate)
    assert generate.index("self._generate_single_turn(") < generate.index("self._tool_call_loop(")


def test_mixed_loss_mirrors_every_trl_loss_type():
    """`luffy_trl.objectives` re-implements each of these branches of TRL's `_compute_loss`; a new loss type or a
    changed formula must be mirrored (tests/test_trainer_loss.py compares values)."""
    from luffy_trl.losses import SUPPORTED_LOSS_TYPES

    source = inspect.getsource(GRPOTrainer._compute_loss)
    for fragment in ['self.loss_type == "cispo"', 'self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]',
                     'self.loss_type == "sapo"', 'self.loss_type == "vespo"',
                     "torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures",
                     "torch.clamp(coef_1, max=self.epsilon_high).detach()", "(per_token_loss * mask).sum(-1).mean()",
                     'self.importance_sampling_level == "sequence"',
                     'if self.use_adaptive_entropy and mode == "train":']:
        assert fragment in source, fragment
    assert set(re.findall(r'"(\w+)"', source.split("Unknown loss type")[0])) >= set(SUPPORTED_LOSS_TYPES) - {"luffy"}
