"""Offline toys: a tokenizer trained in-process, a tiny randomly initialised model, and a small math dataset with
teacher traces. For notebooks, smoke tests and the test suite; nothing is downloaded."""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The answer is 42. Let me think step by step about 12 + 30 = 42.",
    "<think>\nFirst add the numbers, then check the result.\n</think>\nThe answer is \\boxed{7}.",
    "What is 3 + 4? Solve: x^2 = 9, so x = 3 or x = -3. \\frac{1}{2} + \\frac{1}{2} = 1.",
    "system user assistant You are a helpful assistant. Please reason step by step.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +-*/=()[]{}<>.,;:!?'\"\\\n",
] * 20


def toy_tokenizer(chat_template: str = CHATML_TEMPLATE, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in-process, with ChatML special tokens (`<|im_end|>` is EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def toy_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, *, mlp_ratio: int = 2,
              num_key_value_heads: int = 2, max_position_embeddings: int = 512, num_attention_heads: int = 4,
              intermediate_size: int | None = None, vocab_size: int | None = None):
    """A randomly initialised Qwen2 causal LM (tied embeddings) sized for CPU tests and demos.

    The MLP is `mlp_ratio × hidden_size` wide unless `intermediate_size` is given. `vocab_size` defaults to the
    tokenizer's and may exceed it: ids the tokenizer does not know decode to nothing, which keeps the output layer
    as large as a real model's without a real tokenizer (the benchmarks' Qwen2-0.5B-sized preset).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or mlp_ratio * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def toy_math_dataset(n: int = 8, conversational: bool = True, with_target: bool = True):
    """`n` addition problems in LUFFY's column layout: `prompt`, `target` (a worked teacher trace), `ground_truth`."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        answer = str(2 * i + 1)
        question = f"What is {i} + {i + 1}?"
        prompt = [{"role": "user", "content": question}] if conversational else question + " Answer:"
        trace = f"<think>\n{i} + {i + 1} = {answer}\n</think>\nThe answer is \\boxed{{{answer}}}."
        row = {"prompt": prompt, "ground_truth": answer}
        if with_target:
            row["target"] = [{"role": "assistant", "content": trace}] if conversational else trace
        rows.append(row)
    return Dataset.from_list(rows)


def boxed_answer_reward(completions, ground_truth, **kwargs):
    """1.0 when `\\boxed{<gold>}` appears in the completion, else 0.0 (a cheap stand-in for a math verifier)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(f"\\boxed{{{gt}}}" in t) for t, gt in zip(texts, ground_truth)]
