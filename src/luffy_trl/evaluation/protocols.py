"""Evaluation protocols: prompt handling, sampling parameters and samples per benchmark, as one dataclass.

`LUFFY` follows LUFFY's evaluation script (`ElliottYan/LUFFY:eval_scripts/generate_vllm.py`): the system message is
dropped and the model's own chat template is applied to the user turn, temperature 0.6, top_p 1.0, 8192 new tokens,
AIME24/AIME25/AMC as avg@32 (LUFFY's data file repeats those rows 32 times), one sample for the other benchmarks, and
LUFFY's think gate: when the templated prompt ends with `<think>\\n`, the response must contain `</think>` and only
the text after it is scored. `R1` is the DeepSeek-R1 sampling convention (top_p 0.95, up to 32768 new tokens) with
the same prompts, gate and samples. Every field can be overridden with `dataclasses.replace` or `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

SYSTEM_PROMPT_MODES = ("drop", "keep", "luffy")  # as `luffy_trl.data.set_system_prompt`
THINK_GATES = ("auto", "always", "never")
THINK_OPENER = "<think>\n"


@dataclass(frozen=True)
class Protocol:
    """How to prompt, sample and score.

    Args:
        name: the protocol's name (reported in the results).
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling threshold.
        max_new_tokens: generation limit; a response that reaches it counts as truncated.
        samples: samples per problem for named benchmarks (e.g. `{"aime": 32}`).
        default_samples: samples per problem for the other benchmarks; None: as many as the problem's copies in the
            data file (1 for a file without duplicates).
        system_prompt: `"drop"` the prompt's system message (LUFFY), `"keep"` it, or `"luffy"`: use LUFFY's.
        think_gate: `"auto"` (LUFFY): gate the answer on `</think>` when the templated prompt ends with `<think>\\n`;
            `"always"`; `"never"` (score the whole response).
        verify_timeout: seconds per answer for math-verify (LUFFY: 10).
        seed: base seed; each sample's seed is derived from it, the problem and the sample index.
    """

    name: str
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    samples: Mapping[str, int] = field(default_factory=lambda: {"aime": 32, "aime25": 32, "amc": 32})
    default_samples: int | None = None
    system_prompt: str = "drop"
    think_gate: str = "auto"
    verify_timeout: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters in {self}")
        counts = [*self.samples.values(), *([] if self.default_samples is None else [self.default_samples])]
        if any(k < 1 for k in counts):
            raise ValueError(f"samples per problem must be at least 1, got {counts}")
        if self.system_prompt not in SYSTEM_PROMPT_MODES:
            raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPT_MODES}, got {self.system_prompt!r}")
        if self.think_gate not in THINK_GATES:
            raise ValueError(f"think_gate must be one of {THINK_GATES}, got {self.think_gate!r}")
        object.__setattr__(self, "samples", dict(self.samples))

    def samples_for(self, benchmark: str, copies: int = 1) -> int:
        """Samples per problem of `benchmark`, whose problem appears `copies` times in its data file."""
        return self.samples.get(benchmark, self.default_samples or copies)

    def gated(self, prompt_text: str) -> bool:
        """Whether a response to the templated `prompt_text` is scored only after `</think>`."""
        if self.think_gate == "auto":
            return prompt_text.endswith(THINK_OPENER)
        return self.think_gate == "always"

    def generation_hash(self) -> str:
        """A short hash of the fields that change generations (cache keys; scoring fields are left out)."""
        fields = {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                  "seed": self.seed}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def with_overrides(self, *, num_samples: str | int | None = None, **overrides) -> Protocol:
        """A copy with the given fields replaced (None values are ignored). `num_samples` is an int or `"4"` (every
        benchmark), or `"aime=8,amc=4"` (those benchmarks)."""
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if num_samples is not None:
            text = str(num_samples)
            if "=" in text:
                pairs = [item.split("=") for item in text.split(",") if item.strip()]
                overrides["samples"] = {**self.samples, **{name.strip(): int(k) for name, k in pairs}}
            else:
                overrides["samples"], overrides["default_samples"] = {}, int(text)
        return dataclasses.replace(self, **overrides)


LUFFY = Protocol(name="luffy")
R1 = Protocol(name="r1", top_p=0.95, max_new_tokens=32768)
PROTOCOLS = {"luffy": LUFFY, "r1": R1}


def get_protocol(name: str) -> Protocol:
    """The preset named `name` (`"luffy"` or `"r1"`)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
