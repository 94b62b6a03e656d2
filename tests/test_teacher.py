"""Teacher tokenization equals the chat-template tokenization of the whole conversation."""

import pytest
from conftest import requires_smollm

from luffy_trl.teacher import TeacherTokenizer, teacher_texts

TRACE = "<think>\nFirst add: 12 + 30 = 42.\n</think>\nThe answer is \\boxed{42}."
PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": "What is 12 + 30?"}],
]


def template_ids(tokenizer, prompt, content):
    """Reference: the chat template applied to the whole conversation, tokenized in one go."""
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": content}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids_like_trl(tokenizer, prompt):
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def eos_ids(tokenizer):
    return [tokenizer.eos_token_id]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("content", [TRACE, "\n\n  leading whitespace and a trailing newline\n", "x"])
def test_chatml_prompt_plus_teacher_equals_full_conversation(tokenizer, prompt, content):
    teacher = TeacherTokenizer(tokenizer, eos_ids(tokenizer), max_completion_length=None)
    prompt_ids = prompt_ids_like_trl(tokenizer, prompt)
    encoded = teacher.encode(prompt, prompt_ids, content)
    assert not encoded.used_fallback and not encoded.truncated
    full = template_ids(tokenizer, prompt, content)
    assert prompt_ids + encoded.ids == full[: len(prompt_ids) + len(encoded.ids)]
    assert encoded.ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # ends the assistant turn
    assert full[len(prompt_ids) + len(encoded.ids) :] == tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_think_opening_generation_prompt_does_not_repeat_think(think_tokenizer):
    tok = think_tokenizer
    teacher = TeacherTokenizer(tok, eos_ids(tok), max_completion_length=None)
    prompt = PROMPTS[0]
    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith("<think>\n")
    prompt_ids = prompt_ids_like_trl(tok, prompt)
    encoded = teacher.encode(prompt, prompt_ids, TRACE)
    decoded = tok.decode(encoded.ids)
    assert decoded.startswith("First add") and decoded.count("<think>") == 0
    # prompt (which opened the thought) + teacher == the conversation whose assistant turn holds the whole trace
    full_text = prompt_text + TRACE[len("<think>\n") :] + "<|im_end|>"
    assert prompt_ids + encoded.ids == tok(full_text, add_special_tokens=False)["input_ids"]
    # a trace without the opener is kept whole
    plain = teacher.encode(prompt, prompt_ids, "The answer is 42.")
    assert tok.decode(plain.ids) == "The answer is 42.<|im_end|>"


def test_plain_text_prompt_ends_with_eos(tokenizer):
    teacher = TeacherTokenizer(tokenizer, eos_ids(tokenizer), max_completion_length=None)
    prompt = "What is 12 + 30? Answer:"
    prompt_ids = tokenizer(prompt)["input_ids"]
    encoded = teacher.encode(prompt, prompt_ids, " 42")
    assert encoded.ids[-1] == tokenizer.eos_token_id
    assert prompt_ids + encoded.ids[:-1] == tokenizer(prompt + " 42")["input_ids"]


def test_overlong_teacher_is_truncated_and_flagged(tokenizer):
    teacher = TeacherTokenizer(tokenizer, eos_ids(tokenizer), max_completion_length=5)
    prompt = PROMPTS[0]
    encoded = teacher.encode(prompt, prompt_ids_like_trl(tokenizer, prompt), TRACE)
    assert encoded.truncated and len(encoded.ids) == 5 and encoded.ids[-1] != tokenizer.eos_token_id


def test_boundary_merge_falls_back_to_separate_tokenization(tokenizer):
    """If the prompt's last token would merge with the teacher text, the teacher is tokenized on its own."""
    teacher = TeacherTokenizer(tokenizer, eos_ids(tokenizer), max_completion_length=None)
    prompt = "The answer is"
    prompt_ids = tokenizer(prompt)["input_ids"]
    encoded = teacher.encode(prompt, prompt_ids + [0], " 42")  # ids that the joint tokenization cannot start with
    assert encoded.used_fallback
    assert encoded.ids == tokenizer(" 42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@requires_smollm
@pytest.mark.smollm
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_real_tokenizer_and_template(smollm_tokenizer, prompt):
    tok = smollm_tokenizer
    teacher = TeacherTokenizer(tok, eos_ids(tok), max_completion_length=None)
    prompt_ids = prompt_ids_like_trl(tok, prompt)
    encoded = teacher.encode(prompt, prompt_ids, TRACE)
    assert not encoded.used_fallback
    full = template_ids(tok, prompt, TRACE)
    assert prompt_ids + encoded.ids == full[: len(prompt_ids) + len(encoded.ids)]
    assert tok.convert_ids_to_tokens(encoded.ids[-1]) == "<|im_end|>"
    assert teacher.end_of_turn[1] == "<|im_end|>"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("a trace", ["a trace"]),
        ([{"role": "assistant", "content": "a trace"}], ["a trace"]),
        ({"role": "assistant", "content": "a trace"}, ["a trace"]),
        (["one", "two"], ["one", "two"]),
        ([{"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}], ["one", "two"]),
        (None, []),
        ("", []),
        ("   \n", []),
        ([], []),
        ([{"role": "assistant", "content": ""}], []),
        ([None, "two"], ["two"]),
    ],
)
def test_teacher_column_values(value, expected):
    assert teacher_texts(value) == expected


@pytest.mark.parametrize("value", [42, [1, 2], {"text": "no content key"}, [{"role": "assistant", "content": 3}]])
def test_bad_teacher_values_name_the_column_and_row(value):
    with pytest.raises(TypeError, match=r"Column 'target' \(row 7\)"):
        teacher_texts(value, column="target", row=7)
