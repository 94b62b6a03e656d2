"""TRL's multi-turn features under `MixedPolicyGRPOTrainer`: at `num_off_policy=0` tool calling, environments and a
custom `rollout_func` train exactly like stock `GRPOTrainer`; with teacher rows they are refused, with the reason.

The toy tokenizer gets Qwen3's chat template and TRL's response schema, so TRL parses and executes tool calls
offline; the first generation of every other row is replaced by a tool call (in both trainers), so TRL's tool loop
really runs (tool results appended, masked out of the loss, the policy generating after them)."""

import pytest
import torch
from conftest import build_model, math_dataset, tiny_args
from trl import GRPOConfig, GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.toy import toy_tokenizer

CALL = '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>'
COMMON = dict(use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4, max_completion_length=48,
              max_steps=2, learning_rate=1e-2, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
              loss_type="grpo", scale_rewards="none", entropy_coef=0.0, weight_decay=0.0,
              lr_scheduler_type="constant")


def tool_tokenizer():
    from trl.chat_template_utils import add_response_schema, qwen3_chat_template

    tok = toy_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>", "<tool_response>",
                                                          "</tool_response>", "<think>", "</think>"]})
    tok.chat_template = qwen3_chat_template
    return add_response_schema(tok)


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression.
    """
    return str(sum(int(x) for x in expression.split("+")))


class Calculator:
    def reset(self, **kwargs):
        return None

    def calc(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: the expression.
        """
        return calc(expression)


def by_length(completions, **kwargs):
    return [float(sum(len(str(m.get("content", ""))) for m in c) % 3) / 2 for c in completions]


def force_tool_calls(trainer, tok):
    """Rows 0, 2, 4, ... of each first-turn generation become a tool call (the same in every trainer)."""
    original = trainer._generate_single_turn
    call = tok(CALL, add_special_tokens=False)["input_ids"]

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        ids, logprobs = original(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if num_generations == 1:  # a post-tool turn
            return ids, logprobs
        return [list(call) if i % 2 == 0 else row for i, row in enumerate(ids)], logprobs

    trainer._generate_single_turn = generate


def rollout(prompts, trainer):
    """A custom rollout: a fixed completion per prompt (TRL's `rollout_func` contract)."""
    tok = trainer.processing_class
    prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                  for p in prompts]
    completions = [tok("It is " + "1" * (i % 5) + ".<|im_end|>", add_special_tokens=False)["input_ids"]
                   for i in range(len(prompts))]
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": [[0.0] * len(c) for c in completions]}


FEATURES = {
    "tools": dict(tools=[calc]),
    "environment_factory": dict(environment_factory=Calculator),
    "rollout_func": dict(rollout_func=rollout),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_agentic_feature_at_num_off_policy_zero_trains_like_stock(tmp_path, feature):
    tok = tool_tokenizer()
    trainers = []
    for cls, args in ((GRPOTrainer, GRPOConfig(output_dir=str(tmp_path / "s"), **COMMON)),
                      (MixedPolicyGRPOTrainer, tiny_args(tmp_path / "o", num_off_policy=0, on_policy_clip=True,
                                                         padding_free_batches=False,  # TRL's layout: exact
                                                         **COMMON))):
        trainer = cls(model=build_model(tok), reward_funcs=by_length, args=args, train_dataset=math_dataset(),
                      processing_class=tok, **FEATURES[feature])
        if feature != "rollout_func":
            force_tool_calls(trainer, tok)
        trainer.train()
        trainers.append(trainer)
    stock, ours = trainers
    if feature != "rollout_func":
        assert stock.state.log_history[0]["tools/call_frequency"] > 0  # TRL's tool loop ran
        assert ours.state.log_history[0]["tools/call_frequency"] == stock.state.log_history[0]["tools/call_frequency"]
    for (name, a), (_, b) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(build_model(tok).lm_head.weight, ours.model.lm_head.weight)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_agentic_feature_with_teacher_rows_is_refused_with_the_reason(tmp_path, feature):
    tok = tool_tokenizer()
    with pytest.raises(ValueError, match=f"{feature} with num_off_policy > 0 .*(tool loop|generation)"):
        MixedPolicyGRPOTrainer(model=build_model(tok), reward_funcs=by_length, args=tiny_args(tmp_path, **COMMON),
                               train_dataset=math_dataset(), processing_class=tok, **FEATURES[feature])
