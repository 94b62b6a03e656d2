"""Teacher (off-policy) completions: reading the dataset column and tokenizing it like a generated completion.

A teacher completion must look, token for token, like something the policy could have generated after the
templated prompt: `prompt_ids + teacher_ids` equals the tokenization of the whole conversation under the chat
template, and `teacher_ids` ends with the token that ends an assistant turn (the token generation stops at).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

# Openers a reasoning template may already put at the end of its generation prompt (e.g. Qwen-think templates,
# LUFFY's `Qwen2.5-Math-7B-16k-think`). A trace that repeats the opener would otherwise contain `<think>` twice.
THINK_OPENERS = ("<think>\n", "<think>")


@dataclass(frozen=True)
class TeacherTrajectory:
    """A teacher trace that is a tool-calling conversation: assistant turns (with `tool_calls`) and tool results.

    `messages` follow the prompt: assistant and tool messages in TRL's format (`{"role": "assistant", "content": ...,
    "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}}]}`, `{"role": "tool", "name":
    ..., "content": ...}`), ending with an assistant turn without tool calls.
    """

    messages: tuple

    @property
    def text(self) -> str:
        """The assistant turns' text (for lengths and logs)."""
        return "".join(str(m.get("content") or "") for m in self.messages if m.get("role") == "assistant")

    @property
    def length_text(self) -> str:
        """Everything the trajectory puts in the completion, tool calls and tool results included: what
        `off_policy_trace_selection="shortest"` measures (a short answer after a long tool result is a long trace)."""
        parts = []
        for message in self.messages:
            parts.append(str(message.get("content") or ""))
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                parts.append(str(function.get("name") or "") + json.dumps(function.get("arguments"), default=str))
        return "".join(parts)


def _is_trajectory(value) -> bool:
    """A list of message dicts with a tool result or a tool call: one conversation, not several one-turn traces."""
    return (isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)
            and any(m.get("role") == "tool" or m.get("tool_calls") for m in value))


def _without_none(message: dict) -> dict:
    """A message without the None fields a datasets (Arrow) column adds to unify message structs."""
    message = {k: v for k, v in message.items() if v is not None}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            call = {k: v for k, v in call.items() if v is not None}
            function = dict(call.get("function") or {})
            if isinstance(function.get("arguments"), dict):
                function["arguments"] = {k: v for k, v in function["arguments"].items() if v is not None}
            calls.append({**call, "function": function})
        message["tool_calls"] = calls
    return message


def _trajectory(value, column: str, row: int | None) -> TeacherTrajectory:
    messages = tuple(_without_none(m) for m in value)
    roles = [m.get("role") for m in messages]
    where = f" (row {row})" if row is not None else ""
    if set(roles) - {"assistant", "tool"} or roles[0] != "assistant" or roles[-1] != "assistant" or messages[-1].get(
            "tool_calls"):
        raise TypeError(
            f"Column {column!r}{where} holds a tool-calling trajectory that is not assistant turns and tool results "
            "ending with an assistant answer without tool calls (roles: " + ", ".join(map(str, roles)) + "). Fix "
            "the dataset."
        )
    # The shape TRL's tool loop gives a sampled rollout: an assistant turn with k tool calls is followed by exactly
    # k tool results, each named after its function (TRL's `_get_tool_suffix_ids` reads `name`); a turn without tool
    # calls ends the rollout. Anything else would be tokenized into a sequence the policy can never produce, or fail
    # mid-run inside TRL.
    k = 0
    while k < len(messages):
        calls = messages[k].get("tool_calls") or []
        results = []
        while k + 1 + len(results) < len(messages) and messages[k + 1 + len(results)].get("role") == "tool":
            results.append(messages[k + 1 + len(results)])
        problem = None
        if not calls and k != len(messages) - 1:
            problem = f"message {k} is an assistant turn without tool calls before the end (it ends a rollout)"
        elif len(results) != len(calls):
            problem = (f"message {k} makes {len(calls)} tool call(s) followed by {len(results)} tool result(s) (TRL's "
                       "tool loop appends one result per call)")
        elif any(not isinstance(r.get("name"), str) or not r.get("name") for r in results):
            problem = (f"a tool result after message {k} has no 'name' (TRL's format: {{'role': 'tool', 'name': "
                       "<the called function>, 'content': ...}; an OpenAI-style 'tool_call_id' is not enough)")
        if problem:
            raise TypeError(f"Column {column!r}{where} holds a tool-calling trajectory TRL's tool loop cannot "
                            f"produce: {problem}. Fix the dataset.")
        k += 1 + len(results)
    return TeacherTrajectory(messages)


def teacher_texts(value, *, column: str = "target", row: int | None = None) -> list[str]:
    """Normalise one value of the teacher column into a list of non-empty completion texts.

    Accepted: a string; LUFFY's list of `{"role": "assistant", "content": ...}` messages (one trace per message);
    a list of strings; a tool-calling conversation (assistant turns with `tool_calls` and `tool` results, ending
    with an answer: one `TeacherTrajectory`) or a list of them; `None` or empty (→ `[]`, the row keeps a full
    on-policy group). Anything else raises a
    `TypeError` naming the column and the row.
    """
    return [text for _, text in teacher_traces(value, column=column, row=row)]


def teacher_traces(value, *, column: str = "target", row: int | None = None) -> list[tuple[int, str]]:
    """Like `teacher_texts`, with each text's position in the column value: `[(position, text), ...]`.

    The position is the index of the item in the list (0 for a plain string); it keys the matching entry of the
    teacher log-probs column (`teacher_logprobs`). Skipped items (non-assistant messages, `None`, blank strings)
    keep their index, so positions stay aligned with the raw list.
    """
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if _is_trajectory(value):  # one tool-calling conversation
        return [(0, _trajectory(value, column, row))]
    if isinstance(value, (list, tuple)) and value and all(_is_trajectory(v) for v in value):  # several
        return [(i, _trajectory(v, column, row)) for i, v in enumerate(value)]
    if isinstance(value, str):
        return [(0, value)] if value.strip() else []
    original = value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, Sequence) or hasattr(value, "tolist"):
        value = value.tolist() if hasattr(value, "tolist") else value
        traces = []
        for position, item in enumerate(value):
            if isinstance(item, dict) and "content" in item:
                if item.get("role", "assistant") != "assistant":
                    continue
                item = item["content"]
            if item is None:
                continue
            if not isinstance(item, str):
                break
            if item.strip():
                traces.append((position, item))
        else:
            return traces
    where = f" (row {row})" if row is not None else ""
    kind = type(original).__name__
    if isinstance(original, dict) and "content" not in original:
        kind = f"dict without a 'content' key (keys: {sorted(map(str, original))})"
    raise TypeError(
        f"Column {column!r}{where} holds a {kind} that is not a teacher completion: expected a "
        "string, a list of {'role': 'assistant', 'content': str} messages (LUFFY's format) or a list of strings. "
        f"Got: {str(original)[:120]!r}. Fix the dataset or set off_policy_column to the right column."
    )


# Rows of the training set whose teacher column is read at construction to warn about missing traces.
ROWS_CHECKED_FOR_TRACES = 512


def missing_trace_warning(train_dataset, column: str, rows: int = ROWS_CHECKED_FOR_TRACES) -> str | None:
    """A warning when most of the first `rows` rows of `train_dataset` have no teacher trace in `column` (None when
    the dataset cannot be read by column, or when most rows have one). Without a trace a row's group is all
    on-policy, so a column that is mostly empty trains (mostly) plain GRPO; the run still goes on, since a partial
    column is legitimate (an `all_fail`-style dataset, a live teacher that fills the gaps)."""
    if not hasattr(train_dataset, "select") or column not in getattr(train_dataset, "column_names", ()):
        return None
    head = train_dataset.select(range(min(rows, len(train_dataset))))
    values = head[column]
    if not values:
        return None
    missing = 0
    for value in values:
        try:
            missing += not teacher_texts(value, column=column)
        except TypeError:
            continue  # malformed values are refused elsewhere (type-checked at construction, counted in training)
    if missing * 2 <= len(values):
        return None
    share = "none" if missing == len(values) else f"only {len(values) - missing}"
    return (f"{share} of the first {len(values)} rows of train_dataset have a teacher trace in column {column!r}: "
            f"groups without a trace are plain GRPO groups (counted in off_policy/missing). Check off_policy_column "
            "(LUFFY's data call it 'target'), or set num_off_policy=0 (with on_policy_clip=True) to train plain GRPO "
            "on purpose.")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def teacher_logprobs(value, position: int):
    """The teacher log-probs that belong to the trace at `position` of the teacher column, or None.

    `value` is the row's value of `off_policy_logprobs_column`: a flat list of numbers (the log-probs of the
    trace at position 0, i.e. of a single-trace row), or a list with one entry per item of the teacher column
    (each a list of numbers or `None`). Anything else gives None; the trainer then counts the row as a fallback
    to π_φ = 1 (`off_policy/logprobs_fallback`) instead of failing.
    """
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) == 0:
        return None
    if _is_number(value[0]):
        return value if position == 0 else None
    if position >= len(value):
        return None
    entry = value[position]
    if hasattr(entry, "tolist"):
        entry = entry.tolist()
    if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)):
        return None
    return entry


@dataclass
class EncodedTeacher:
    ids: list[int]
    truncated: bool
    used_fallback: bool
    num_tokens: int = 0
    """Length of the completion before truncation to `max_completion_length` (end-of-turn token included)."""


class TeacherTokenizer:
    """Turns teacher text into completion token ids consistent with the prompt's chat template.

    Args:
        tokenizer: the policy's tokenizer.
        eos_token_ids: token ids that stop generation (TRL's `GRPOTrainer.eos_token_ids`).
        max_completion_length: teacher completions are cut to this many tokens (and lose their end token, like a
            truncated generation).
        chat_template / chat_template_kwargs: the same overrides TRL uses to render prompts.
    """

    def __init__(
        self,
        tokenizer,
        eos_token_ids: Sequence[int],
        max_completion_length: int | None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        render=None,
        tools=None,
    ):
        self.tokenizer = tokenizer
        # TRL renders prompts with the trainer's tools (the template's tool system block): the teacher text must
        # follow the same rendering, or the joint tokenization never starts with TRL's prompt ids.
        self.tools = tools or None
        # Vision-language models: `render(messages, add_generation_prompt)` renders a conversation as TRL does for
        # the processor (its prompt ids hold the image tokens the processor expanded, so the joint tokenization is
        # checked against the rendered prompt's own tokens instead).
        self.render = render
        self.eos_token_ids = list(eos_token_ids)
        self.max_completion_length = max_completion_length
        self.chat_template = chat_template
        self.chat_template_kwargs = chat_template_kwargs or {}
        self._end_of_turn: tuple[int, str] | None = None

    # -- chat-template helpers ----------------------------------------------------------------------------------
    def render_prompt(self, prompt: list[dict]) -> str:
        if self.render is not None:
            return self.render(prompt, True)
        return self.tokenizer.apply_chat_template(
            prompt,
            tools=self.tools,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
            **self.chat_template_kwargs,
        )

    @property
    def end_of_turn(self) -> tuple[int, str]:
        """(id, text) of the token that closes an assistant turn under the chat template.

        Found by rendering a one-turn conversation and taking the first stop token after the assistant content
        (`<|im_end|>` for ChatML); falls back to the tokenizer's EOS token.
        """
        if self._end_of_turn is None:
            eot_id = self.tokenizer.eos_token_id
            sentinel = "LUFFYSENTINEL"
            try:
                conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
                if self.render is not None:
                    text = self.render(conversation, False)
                else:
                    text = self.tokenizer.apply_chat_template(
                        conversation, chat_template=self.chat_template, tokenize=False, **self.chat_template_kwargs,
                    )
                tail_ids = self.tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
                eot_id = next((t for t in tail_ids if t in self.eos_token_ids), eot_id)
            except Exception:  # no chat template, or one that rejects this conversation: keep EOS
                pass
            self._end_of_turn = (eot_id, self.tokenizer.decode([eot_id]))
        return self._end_of_turn

    # -- encoding -----------------------------------------------------------------------------------------------
    def _turn_ids(self, message: dict) -> list[int]:
        """One assistant turn as the policy generates it: the template's rendering of the message as the latest turn
        of a conversation, after the generation prompt, up to and including its end-of-turn token."""
        dummy = [{"role": "user", "content": "dummy"}]
        if self.render is not None:
            prefix, full = self.render(dummy, True), self.render(dummy + [message], False)
        else:
            kwargs = dict(chat_template=self.chat_template, tokenize=False, **self.chat_template_kwargs)
            prefix = self.tokenizer.apply_chat_template(dummy, add_generation_prompt=True, **kwargs)
            full = self.tokenizer.apply_chat_template(dummy + [message], **kwargs)
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prefix_ids)] != prefix_ids:
            raise ValueError("The chat template renders an assistant turn that does not extend the generation prompt.")
        ids = full_ids[len(prefix_ids):]
        eot_id, _ = self.end_of_turn
        ends = [k for k, t in enumerate(ids) if t == eot_id]
        return ids[: ends[-1] + 1] if ends else ids + [eot_id]

    def encode_trajectory(self, trajectory: TeacherTrajectory, tool_suffix_ids) -> tuple[EncodedTeacher, list[int]]:
        """Token ids and tool mask of a tool-calling teacher trajectory, concatenated as TRL 1.16's tool loop
        concatenates a sampled multi-turn rollout: each assistant turn as generated (`_turn_ids`, mask 1), then the
        turn's tool results as `tool_suffix_ids(tool_messages)` renders them (TRL's `_get_tool_suffix_ids`: the tool
        messages and the next generation prompt, mask 0). Cut to `max_completion_length` like a sampled rollout."""
        ids, mask, tools = [], [], []
        for message in trajectory.messages + ({"role": "assistant"},):  # a sentinel flushes the last tool results
            if message.get("role") == "tool":
                tools.append(message)
                continue
            if tools:
                suffix = list(tool_suffix_ids(tools))
                ids += suffix
                mask += [0] * len(suffix)
                tools = []
            if "content" in message or message.get("tool_calls"):
                turn = self._turn_ids(message)
                ids += turn
                mask += [1] * len(turn)
        num_tokens = len(ids)
        truncated = self.max_completion_length is not None and num_tokens > self.max_completion_length
        if truncated:
            ids, mask = ids[: self.max_completion_length], mask[: self.max_completion_length]
        return EncodedTeacher(ids=ids, truncated=truncated, used_fallback=False, num_tokens=num_tokens), mask

    def encode(self, prompt, prompt_ids: Sequence[int], text: str) -> EncodedTeacher:
        """Token ids of `text` as the completion of `prompt` (already tokenized as `prompt_ids` by TRL).

        Conversational prompts: the text is appended to the rendered generation prompt (a `<think>` opener that
        the generation prompt already ends with is not repeated), followed by the end-of-turn token; the whole
        string is tokenized and the prompt's ids are cut off. Plain-text prompts: the text follows the prompt and
        ends with EOS. If the joint tokenization does not start with `prompt_ids` (a merge across the boundary),
        the text is tokenized on its own instead (`used_fallback=True`).
        """
        prompt_ids = list(prompt_ids)
        conversational = isinstance(prompt, list)
        if conversational:
            eot_id, eot_text = self.end_of_turn
            prompt_text = self.render_prompt(prompt)
            for opener in THINK_OPENERS:
                if prompt_text.endswith(opener) and text.startswith(opener):
                    text = text[len(opener) :]
                    break
            joint = self.tokenizer(prompt_text + text + eot_text, add_special_tokens=False)["input_ids"]
            if self.render is not None:  # a VLM: prompt ids with expanded image tokens; the text's own tokens instead
                prompt_ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            eot_id = self.tokenizer.eos_token_id
            joint = self.tokenizer(prompt + text)["input_ids"] + [eot_id]

        used_fallback = joint[: len(prompt_ids)] != prompt_ids
        if used_fallback:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eot_id]
        else:
            ids = joint[len(prompt_ids) :]
        num_tokens = len(ids)
        truncated = self.max_completion_length is not None and num_tokens > self.max_completion_length
        if truncated:
            ids = ids[: self.max_completion_length]
        return EncodedTeacher(ids=ids, truncated=truncated, used_fallback=used_fallback, num_tokens=num_tokens)
