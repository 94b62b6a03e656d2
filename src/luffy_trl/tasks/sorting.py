"""The offline demo task: sort a few letters, with a worked teacher solution and a strict answer format.

A prompt asks to sort letters (`sort: d b e a`); the teacher trace first ranks each letter by its position in the
alphabet, then writes them in order, then the answer line:

    a1 b2 d4 e5
    answer: abde

The reward is 1.0 only when the completion's last line is exactly `answer: <sorted letters>`. A randomly initialised
model practically never produces that, so plain GRPO sees zero reward, zero advantage and zero gradient; LUFFY learns
from the teacher slot. Letter *sets* are split between training and held-out prompts, so held-out accuracy measures
sorting, not memorised answers. Everything is character-level and built in-process (tokenizer, model, data).
"""

from __future__ import annotations

import itertools
import random

import torch
from transformers import TrainerCallback

from luffy_trl.toy import CHATML_TEMPLATE, toy_model

ALPHABET = "abcdefghij"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 \n:"


def char_tokenizer():
    """A character-level tokenizer over lower-case letters, digits, space, newline and ':' plus ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def demo_model(tokenizer, hidden_size: int = 128, num_layers: int = 2, seed: int = 0):
    """A randomly initialised 2-layer Qwen2 model over the character vocabulary."""
    return toy_model(tokenizer, seed, hidden_size, num_layers, mlp_ratio=4, num_key_value_heads=4,
                     max_position_embeddings=256)


def teacher_trace(letters: str) -> str:
    ordered = sorted(letters)
    ranks = " ".join(f"{c}{ALPHABET.index(c) + 1}" for c in ordered)
    return f"{ranks}\nanswer: {''.join(ordered)}"


def letter_sets(num_letters: int, heldout_sets: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """All `num_letters`-subsets of the alphabet, split into (train, held-out) sets."""
    sets = ["".join(s) for s in itertools.combinations(ALPHABET, num_letters)]
    random.Random(seed).shuffle(sets)
    return sets[heldout_sets:], sets[:heldout_sets]


def sorting_dataset(split: str = "train", num_rows: int = 2000, num_letters: int = 4, heldout_sets: int = 30,
                    seed: int = 0):
    """Rows with `prompt` (chat messages), `target` (the worked teacher trace) and `ground_truth` (sorted letters)."""
    from datasets import Dataset

    train_sets, heldout = letter_sets(num_letters, heldout_sets, seed)
    pool = train_sets if split == "train" else heldout
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for _ in range(num_rows):
        letters = list(rng.choice(pool))
        rng.shuffle(letters)
        rows.append({
            "prompt": [{"role": "user", "content": "sort: " + " ".join(letters)}],
            "target": teacher_trace("".join(letters)),
            "ground_truth": "".join(sorted(letters)),
        })
    return Dataset.from_list(rows)


def sorting_reward(completions, ground_truth, **kwargs) -> list[float]:
    """1.0 when the completion's last line is exactly `answer: <sorted letters>`, else 0.0."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip().split("\n")[-1] == f"answer: {gt}") for t, gt in zip(texts, ground_truth)]


@torch.no_grad()
def heldout_accuracy(model, tokenizer, dataset, batch_size: int = 64, max_new_tokens: int = 32) -> float:
    """Greedy-decoding accuracy of `model` on `dataset` under `sorting_reward`."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        enc = tokenizer.apply_chat_template(rows["prompt"], add_generation_prompt=True, tokenize=True,
                                            padding=True, return_dict=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(sorting_reward(texts, rows["ground_truth"]))
    model.train(was_training)
    return correct / len(dataset)


class HeldoutAccuracyCallback(TrainerCallback):
    """Greedy held-out accuracy every `every` optimiser steps (and before training), logged as
    `heldout/accuracy` with the trainer's metrics and kept in `self.history` as (step, accuracy) pairs."""

    def __init__(self, trainer, dataset, every: int = 50, max_new_tokens: int = 32):
        self.trainer, self.dataset, self.every, self.max_new_tokens = trainer, dataset, every, max_new_tokens
        self.history: list[tuple[int, float]] = []

    def _evaluate(self, step: int, model) -> float:
        accuracy = heldout_accuracy(model, self.trainer.processing_class, self.dataset,
                                    max_new_tokens=self.max_new_tokens)
        self.history.append((step, accuracy))
        return accuracy

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.history:
            self._evaluate(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            accuracy = self._evaluate(state.global_step, model)
            self.trainer._metrics["train"]["heldout/accuracy"].append(accuracy)
