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
from luffy_trl.toy import toy_model, toy_tokenizer

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


def long_context_model(tok):
    """Qwen3's tool system prompt is long in a byte-level toy tokenizer: room for it, a tool result and a turn."""
    return toy_model(tok, max_position_embeddings=1024)


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
REFUSED = ["environment_factory", "rollout_func"]


@pytest.mark.slow  # about 7 s each for tools and environment_factory: Qwen3's tool system prompt is long
@pytest.mark.parametrize("feature", list(FEATURES))
def test_agentic_feature_at_num_off_policy_zero_trains_like_stock(tmp_path, feature):
    tok = tool_tokenizer()
    trainers, rewards = [], []
    common = {**COMMON, "max_completion_length": 80}  # room for a tool call, its result and a next turn
    for cls, args in ((GRPOTrainer, GRPOConfig(output_dir=str(tmp_path / "s"), **common)),
                      (MixedPolicyGRPOTrainer, tiny_args(tmp_path / "o", num_off_policy=0, on_policy_clip=True,
                                                         padding_free_batches=False,  # TRL's layout: exact
                                                         **common))):
        rewards.append(RecordingReward())
        trainer = cls(model=long_context_model(tok), reward_funcs=rewards[-1], args=args,
                      train_dataset=math_dataset(), processing_class=tok, **FEATURES[feature])
        if feature != "rollout_func":
            force_tool_calls(trainer, tok)
        trainer.train()
        trainers.append(trainer)
    stock, ours = trainers
    if feature != "rollout_func":
        assert stock.state.log_history[0]["tools/call_frequency"] > 0  # TRL's tool loop ran...
        assert any(m["role"] == "tool" for _, batch in rewards[0].calls for c in batch for m in c)  # ...to the end
        assert ours.state.log_history[0]["tools/call_frequency"] == stock.state.log_history[0]["tools/call_frequency"]
    for (name, a), (_, b) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(long_context_model(tok).lm_head.weight, ours.model.lm_head.weight)


@pytest.mark.parametrize("feature", REFUSED)
def test_agentic_feature_with_teacher_rows_is_refused_with_the_reason(tmp_path, feature):
    tok = tool_tokenizer()
    with pytest.raises(ValueError, match=f"{feature} with num_off_policy > 0 .*(environment|generation)"):
        MixedPolicyGRPOTrainer(model=build_model(tok), reward_funcs=by_length, args=tiny_args(tmp_path, **COMMON),
                               train_dataset=math_dataset(), processing_class=tok, **FEATURES[feature])


TRAJECTORY = [
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expression": "2+3"}}}]},
    {"role": "tool", "name": "calc", "content": "5"},
    {"role": "assistant", "content": "It is \\boxed{5}."},
]
# Qwen3's rendering, written out: each assistant turn as generated (the template's empty think block, the turn up to
# <|im_end|>), the tool result as TRL appends it (end of line, the tool turn, the next generation prompt).
TURN_1 = ('<think>\n\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"expression": "2+3"}}\n</tool_call>'
          "<|im_end|>")
TOOL = "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
TURN_2 = "<think>\n\n</think>\n\nIt is \\boxed{5}.<|im_end|>"


LONG = {**COMMON, "max_completion_length": 160}  # room for the trajectory (the toy tokenizer is byte-level)


def trajectory_dataset(n=8):
    from datasets import Dataset

    rows = [dict(r) for r in math_dataset(n)]
    for row in rows:
        row["target"] = TRAJECTORY
    return Dataset.from_list(rows)


class RecordingReward:
    __name__ = "recording"

    def __init__(self):
        self.calls = []

    def __call__(self, completions, is_off_policy=None, **kwargs):
        self.calls.append((list(is_off_policy or [False] * len(completions)), completions))
        return by_length(completions)


def test_teacher_trajectory_with_tools_is_tokenized_like_trls_tool_loop(tmp_path):
    """A tool-calling teacher trajectory in the teacher slot: its tokens are TRL's concatenation for a sampled
    rollout (assistant turns as generated, tool results as TRL's tool loop appends them), the tool results are
    masked out of the loss, its tools are not executed and the policy writes nothing into it, while sampled rows
    still run TRL's tool loop; reward functions see its messages."""
    tok = tool_tokenizer()
    reward = RecordingReward()
    trainer = MixedPolicyGRPOTrainer(model=long_context_model(tok), reward_funcs=reward, processing_class=tok,
                                     train_dataset=trajectory_dataset(),
                                     args=tiny_args(tmp_path, num_off_policy=1, **LONG), tools=[calc])
    force_tool_calls(trainer, tok)
    trainer.model.train()
    rows = [trajectory_dataset()[i] for i in range(2) for _ in range(4)]
    out = trainer._generate_and_score_completions(rows)
    off = out["is_off_policy"]
    assert off.tolist() == [False, False, False, True] * 2
    for row in range(8):
        mask = out["completion_mask"][row].bool()
        ids = out["completion_ids"][row][mask].tolist()
        tool = out["tool_mask"][row][mask].tolist()
        if off[row]:
            assert tok.decode(ids) == TURN_1 + TOOL + TURN_2
            assert tok.decode([t for t, m in zip(ids, tool) if m == 0]) == TOOL
            assert tok.decode([t for t, m in zip(ids, tool) if m == 1]) == TURN_1 + TURN_2
        elif row % 2 == 0:  # a forced tool call: TRL's loop executed it and the policy went on
            assert 0 in tool and "<tool_response>\n5\n</tool_response>" in tok.decode(ids)
    flags, completions = reward.calls[-1]
    for flag, completion in zip(flags, completions):
        if flag:
            assert completion == TRAJECTORY
    assert trainer.state.log_history == [] and trainer._metrics["train"]["off_policy/tokenization_fallback"] == [0.0]


def test_teacher_trajectory_trains_on_assistant_tokens_only(tmp_path):
    """A real run with trajectories: parameters move; changing the tool-result text leaves the teacher rows' loss
    unchanged except through the context it gives the next turn (its tokens carry no loss)."""
    tok = tool_tokenizer()
    model = long_context_model(tok)
    before = model.lm_head.weight.detach().clone()
    trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=by_length, processing_class=tok,
                                     train_dataset=trajectory_dataset(),
                                     args=tiny_args(tmp_path, num_off_policy=1, on_policy_clip=True, **LONG),
                                     tools=[calc])
    captured = []
    original = trainer._compute_loss

    def capture(model, inputs):
        captured.append(dict(inputs))
        return original(model, inputs)

    trainer._compute_loss = capture
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight)
    inputs = captured[0]
    off = inputs["is_off_policy"]
    assert off.any()
    tool_tokens = (inputs["completion_mask"] * (1 - inputs["tool_mask"]))[off]
    assert tool_tokens.sum() > 0  # teacher tool results are in the batch, masked out of the loss


def test_trajectory_without_tools_is_refused(tmp_path):
    tok = tool_tokenizer()
    with pytest.raises(ValueError, match="tool-calling trajectory, but no tools= were given"):
        MixedPolicyGRPOTrainer(model=build_model(tok), reward_funcs=by_length, processing_class=tok,
                               train_dataset=trajectory_dataset(), args=tiny_args(tmp_path, **COMMON))


def test_teacher_column_trajectory_values():
    from luffy_trl.teacher import TeacherTrajectory, teacher_traces

    luffy = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert teacher_traces(luffy) == [(0, "a"), (1, "b")]  # LUFFY's format: one trace per message, unchanged
    (position, one), = teacher_traces(TRAJECTORY)
    assert position == 0 and isinstance(one, TeacherTrajectory) and list(one.messages) == TRAJECTORY
    assert one.text == "It is \\boxed{5}."
    assert one.length_text == 'calc{"expression": "2+3"}5It is \\boxed{5}.'  # what "shortest" measures
    long_result = TeacherTrajectory((TRAJECTORY[0], {**TRAJECTORY[1], "content": "5" * 400}, TRAJECTORY[2]))
    direct = TeacherTrajectory((TRAJECTORY[0], TRAJECTORY[1], {"role": "assistant", "content": "It is 5, " * 20}))
    assert len(long_result.text) < len(direct.text) and len(long_result.length_text) > len(direct.length_text)
    several = teacher_traces([TRAJECTORY, TRAJECTORY[:1] + [TRAJECTORY[1], {"role": "assistant", "content": "5"}]])
    assert [p for p, _ in several] == [0, 1] and all(isinstance(t, TeacherTrajectory) for _, t in several)
    arrow = [{**m, "name": None} if m["role"] == "assistant" else {**m, "tool_calls": None} for m in TRAJECTORY]
    assert list(teacher_traces(arrow)[0][1].messages) == TRAJECTORY  # the None fields a datasets column adds
    with pytest.raises(TypeError, match=r"row 3.*ending with an assistant answer"):
        teacher_traces(TRAJECTORY[:2], row=3)


def test_trajectory_that_trls_tool_loop_cannot_produce_is_refused(tmp_path):
    """A tool result without `name` (OpenAI's `tool_call_id` only) crashed mid-run inside TRL's
    `_get_tool_suffix_ids` (KeyError 'name'); calls without their results, or a turn without tool calls before the
    end, were tokenized silently into sequences the policy can never produce. All are refused naming the row."""
    from luffy_trl.teacher import teacher_traces

    call, result, answer = TRAJECTORY
    openai_result = {"role": "tool", "tool_call_id": "c1", "content": "5"}
    two_calls = {**call, "tool_calls": call["tool_calls"] * 2}
    cases = {
        "has no 'name'": [call, openai_result, answer],
        "1 tool call.*followed by 0 tool result": [call, answer],
        "2 tool call.*followed by 1 tool result": [two_calls, result, answer],
        "without tool calls before the end": [answer, result, answer],
    }
    for message, value in cases.items():
        with pytest.raises(TypeError, match=rf"row 7.*cannot produce: .*{message}"):
            teacher_traces(value, row=7)
    assert teacher_traces([two_calls, result, result, answer])  # one result per call: accepted

    rows = [dict(r) for r in math_dataset(8)]
    for row in rows:
        row["target"] = cases["has no 'name'"]
    from datasets import Dataset

    tok = tool_tokenizer()
    with pytest.raises(TypeError, match="has no 'name'"):  # at construction, not in the first generation
        MixedPolicyGRPOTrainer(model=build_model(tok), reward_funcs=by_length, processing_class=tok,
                               train_dataset=Dataset.from_list(rows), args=tiny_args(tmp_path, num_off_policy=1,
                                                                                    **COMMON), tools=[calc])


def test_one_turn_teacher_text_with_tools_follows_trls_prompt_rendering(tmp_path):
    """TRL renders prompts with `tools=` (the template's tool system block); the teacher text was appended to a
    prompt rendered without them, so the joint tokenization never matched TRL's prompt ids and every teacher row
    fell back to tokenizing the text on its own (`off_policy/tokenization_fallback` = every teacher row)."""
    from datasets import Dataset

    rows = [dict(r) for r in math_dataset(8)]
    for row in rows:
        row["target"] = "It is \\boxed{5}."
    dataset = Dataset.from_list(rows)
    tok = tool_tokenizer()
    trainer = MixedPolicyGRPOTrainer(model=long_context_model(tok), reward_funcs=by_length, processing_class=tok,
                                     train_dataset=dataset, args=tiny_args(tmp_path, num_off_policy=1, **LONG),
                                     tools=[calc])
    trainer.model.train()
    out = trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    assert trainer._metrics["train"]["off_policy/tokenization_fallback"] == [0.0]
    for row in (3, 7):  # the teacher slots
        assert out["is_off_policy"][row]
        prompt = out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist()
        completion = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
        assert "<tools>" in tok.decode(prompt)  # TRL's prompt holds the tool block
        assert tok(tok.decode(prompt) + "It is \\boxed{5}.<|im_end|>", add_special_tokens=False)["input_ids"] == (
            prompt + completion)
