"""DeepSpeed ZeRO-2 and ZeRO-3 for real: two CPU processes (`DS_ACCELERATOR=cpu`, gloo / shared-memory collectives,
parameters and optimizer state really partitioned), launched with `accelerate launch` and the shipped configs of
`ACCELERATE_CONFIGS` changed only in device, precision and process count.

DeepSpeed's start-up dominates, so each launch runs several scenarios (`tests/deepspeed_cases.py`, driven by
`tests/scripts/deepspeed_scenarios.py`): one ZeRO-3 launch, one ZeRO-2, one ZeRO-3 with CPU offload, one DDP
(torchrun) and one two-machine ZeRO-3 launch; the single-process references run in this process. Run them alone
with `python -m pytest -m deepspeed`.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import deepspeed_cases as cases
import pytest
import torch
import yaml
from conftest import assert_straddling_groups

# The shipped accelerate configs (one place to change if they move).
ACCELERATE_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "src" / "luffy_trl" / "configs" / "accelerate"
# The only settings in which the CPU test configs differ from the shipped GPU ones.
CPU_OVERRIDES = {"use_cpu": True, "mixed_precision": "no", "num_processes": 2}
DRIVER = pathlib.Path(__file__).parent / "scripts" / "deepspeed_scenarios.py"
LAUNCH_TIMEOUT = 300  # seconds per launch; a hang fails the test (each scenario also has a faulthandler timer)
HANG_SECONDS = 150
# The first ZeRO-Offload run compiles DeepSpeed's CPU Adam op (1-4 minutes on 2 cores, then cached).
OFFLOAD_BUILD_SECONDS = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.deepspeed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install -e '.[test]' installs it)"),
]


def cpu_config(name: str, folder: pathlib.Path) -> pathlib.Path:
    """The shipped `<name>.yaml` with `CPU_OVERRIDES` applied, written to `folder`."""
    config = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())
    config.update(CPU_OVERRIDES)
    path = folder / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(hang_seconds: int = HANG_SECONDS) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "LUFFY_TEST_HANG_SECONDS": str(hang_seconds)}


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def launch(config: str, scenarios: str, out_dir: pathlib.Path, extra_seconds: int = 0) -> pathlib.Path:
    """Two processes on one machine under `accelerate launch` with the CPU variant of a shipped config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config(config, out_dir)),
           "--main_process_port", str(free_port()), str(DRIVER), str(out_dir), scenarios]
    check(subprocess.run(cmd, env=environment(HANG_SECONDS + extra_seconds), capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT + extra_seconds, check=False))
    return out_dir


def load(out_dir: pathlib.Path, name: str) -> list[dict]:
    ranks = [json.loads((out_dir / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return launch("zero3", "groups,nogather,lora,evaluation,parity:sgd,parity:sgd_packed,parity:adamw_beta,resume",
                  tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch("zero2", "parity:sgd,parity:sgd_packed,parity:adamw_beta,resume", tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(DRIVER), str(out_dir), "parity:sgd,parity:sgd_packed,parity:adamw_beta"]
    check(subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                         check=False))
    return out_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one_process")
    for arm in cases.PARITY_ARMS:
        (out_dir / f"parity_{arm}_rank0.json").write_text(json.dumps(cases.parity(str(out_dir), arm)))
    return out_dir


# ------------------------------------------------------------------------------------------------------------------
# 8. The tested settings are the shipped settings
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_cpu_configs_differ_from_the_shipped_ones_only_in_device_precision_and_processes(name, tmp_path):
    shipped = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())
    tested = yaml.safe_load(cpu_config(name, tmp_path).read_text())
    differing = {key for key in shipped.keys() | tested.keys() if shipped.get(key) != tested.get(key)}
    assert differing <= set(CPU_OVERRIDES)
    assert tested["deepspeed_config"] == shipped["deepspeed_config"]
    assert shipped["distributed_type"] == "DEEPSPEED" and shipped["use_cpu"] is False
    assert shipped["mixed_precision"] == "bf16"


# ------------------------------------------------------------------------------------------------------------------
# 1. Group layout under ZeRO-3
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_groups_straddling_the_processes(zero3):
    assert [r["zero_stage"] for r in load(zero3, "groups")] == [3, 3]
    ranks = [json.loads((zero3 / f"groups_records_rank{r}.json").read_text()) for r in range(2)]
    assert_straddling_groups(ranks)
    assert len(ranks[0]["records"]) == 2  # two generation batches (2 steps, steps_per_generation = GA)


# ------------------------------------------------------------------------------------------------------------------
# 2 and 6. Same loss, gradient and parameters as DDP and as one process (fixed completions: identical inputs)
# ------------------------------------------------------------------------------------------------------------------
# Tolerances: float32 throughout; the arms differ only in the order of reductions (all-reduce vs reduce-scatter over
# flat partitions, one process summing all rows). Observed: ≤ 1.2e-7 on parameters, ≤ 2e-6 relative on loss and grad
# norm. A real error (a gradient scaled by 1/GA or 1/world size, a missing reduction, a wrong row) is ≥ 1e-4 here.
PARAM_ATOL = 1e-6
LOG_RTOL = 1e-5
# AdamW on one process vs two: torch's AdamW (or DeepSpeed's) sums the two processes' gradients in another order and
# Adam's update amplifies that near |g| ≈ eps; observed 9.4e-6 after three steps (each step moves entries by ~lr =
# 1e-2). A doubled gradient would move them by ~2e-3 here (eps = 1e-4 keeps the update scale-sensitive). The losses
# after the first step then differ by up to 1.2e-5 relative (observed), hence a looser check on them. The logged `kl`
# is not compared with one process: TRL logs the mean over processes of each process's token mean.
ADAM_ONE_PROCESS_ATOL = 5e-5
ADAM_ONE_PROCESS_LOG_RTOL = 1e-3


def parity_run(out_dir: pathlib.Path, arm: str):
    logs = json.loads((out_dir / f"parity_{arm}_rank0.json").read_text())
    return logs, torch.load(out_dir / f"parity_{arm}.pt")


def max_param_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_logs_close(got: list[dict], want: list[dict], keys=("loss", "grad_norm"), rel: float = LOG_RTOL) -> None:
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for key in (k for k in keys if k in w):
            assert g.keys() == w.keys()
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-9), key


@pytest.mark.parametrize("backend", ["zero2", "zero3", "ddp"])
@pytest.mark.parametrize("arm", sorted(cases.PARITY_ARMS))
def test_parity_with_one_process(backend, arm, request, one_process):
    out_dir = request.getfixturevalue(backend)
    (got, params), (want, reference) = parity_run(out_dir, arm), parity_run(one_process, arm)
    assert got["zero_stage"] == {"zero2": 2, "zero3": 3, "ddp": None}[backend]
    assert_logs_close(got["logs"], want["logs"], rel=LOG_RTOL if arm.startswith("sgd") else ADAM_ONE_PROCESS_LOG_RTOL)
    assert got["logs"][0]["loss"] == pytest.approx(want["logs"][0]["loss"], rel=LOG_RTOL)  # before any update
    assert len(params) == len(reference) == 4  # initial + 3 optimiser steps
    atol = PARAM_ATOL if arm.startswith("sgd") else ADAM_ONE_PROCESS_ATOL
    for step, (p, r) in enumerate(zip(params, reference)):
        assert max_param_difference(p, r) <= atol, step
    assert max_param_difference(reference[-1], reference[0]) > 100 * atol  # training moved them


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
@pytest.mark.parametrize("arm", sorted(cases.PARITY_ARMS))
def test_parity_with_ddp(backend, arm, request, ddp):
    """Against DDP (the same two processes) every arm agrees to float32 rounding, the KL metric included."""
    (got, params), (want, reference) = parity_run(request.getfixturevalue(backend), arm), parity_run(ddp, arm)
    assert_logs_close(got["logs"], want["logs"], keys=("loss", "grad_norm", "kl", "reward"))
    for p, r in zip(params, reference):
        assert max_param_difference(p, r) <= PARAM_ATOL


@pytest.mark.parametrize("backend", ["zero2", "zero3", "one_process"])
def test_packed_sequences_give_the_padded_parameters(backend, request):
    """`pack_sequences="always"` (one packed sequence per micro-batch, no padding) trains to the parameters of the
    padded arm, under ZeRO-2/3 too (one forward per micro-step on every process either way)."""
    out_dir = request.getfixturevalue(backend)
    (packed_logs, packed), (padded_logs, padded) = parity_run(out_dir, "sgd_packed"), parity_run(out_dir, "sgd")
    assert_logs_close(packed_logs["logs"], padded_logs["logs"])
    for p, r in zip(packed, padded):
        assert max_param_difference(p, r) <= PARAM_ATOL
    assert max_param_difference(packed[-1], packed[0]) > 100 * PARAM_ATOL
    ratios = [h["batching/padding_ratio"] for h in packed_logs["logs"] if "batching/padding_ratio" in h]
    assert ratios and all(r == 1.0 for r in ratios)  # packed: only real tokens computed...
    assert all(h.get("batching/packing_fallbacks", 0) == 0 for h in packed_logs["logs"])  # ...and nothing fell back
    assert any(h["batching/padding_ratio"] > 1.0 for h in padded_logs["logs"] if "batching/padding_ratio" in h)


def test_zero3_reference_model_for_beta(zero3):
    """beta > 0 under ZeRO-3: the KL to the reference model is 0 before the first update and grows after."""
    logs = parity_run(zero3, "adamw_beta")[0]["logs"]
    assert logs[0]["kl"] == 0.0
    assert 0 < logs[1]["kl"] < logs[2]["kl"]


# ------------------------------------------------------------------------------------------------------------------
# 3. ZeRO-3 generation without gathering the weights
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_generation_without_gathering_matches_the_gathered_run(zero3):
    ranks = load(zero3, "nogather")
    for rank in ranks:
        gathered, partitioned = rank["nogather_gathered"], rank["nogather_partitioned"]
        assert gathered["zero_stage"] == partitioned["zero_stage"] == 3
        assert len(partitioned["batches"]) == 2
        assert partitioned["batches"] == gathered["batches"]  # the same completions
    # groups of 4 with 2 teacher slots, 2 rows per process: process 1 holds only teacher rows
    assert all(batch["flags"] == [True, True] for batch in ranks[1]["nogather_partitioned"]["batches"])
    assert all(batch["flags"] == [False, False] for batch in ranks[0]["nogather_partitioned"]["batches"])
    gathered, partitioned = (torch.load(zero3 / f"nogather_{name}.pt") for name in ("gathered", "partitioned"))
    assert max_param_difference(gathered, partitioned) <= PARAM_ATOL


# ------------------------------------------------------------------------------------------------------------------
# 4. LoRA under ZeRO-3
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_lora_trains_only_the_adapter_and_the_adapter_reloads(zero3):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert [r["zero_stage"] for r in load(zero3, "lora")] == [3, 3]
    saved = torch.load(zero3 / "lora.pt")
    before, after = saved["before"], saved["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if ".lora_" in k}
    assert changed == lora and len(lora) == 2 * 2 * len(cases.LORA_TARGETS)  # A and B, 2 layers

    base = AutoModelForCausalLM.from_pretrained(zero3 / "toy_model_rank0")
    reloaded = PeftModel.from_pretrained(base, zero3 / "lora_adapter")
    state = {k: v for k, v in reloaded.named_parameters()}
    for key in lora:
        assert torch.equal(state[key], after[key]), key
    for key in set(before) - lora:
        assert torch.equal(state[key], before[key]), key


# ------------------------------------------------------------------------------------------------------------------
# 5. Saving under ZeRO-3 (the shipped zero3.yaml: zero3_save_16bit_model) and exact resume
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_save_model_writes_the_trained_weights(zero3):
    from transformers import AutoModelForCausalLM

    trained = torch.load(zero3 / "groups.pt")
    initial = dict(AutoModelForCausalLM.from_pretrained(zero3 / "toy_model_rank0").named_parameters())
    loaded = dict(AutoModelForCausalLM.from_pretrained(zero3 / "saved").named_parameters())
    assert loaded.keys() == trained.keys()
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key
    assert max_param_difference({k: v.detach() for k, v in initial.items()}, trained) > 1e-3


def assert_resume_is_exact(out_dir: pathlib.Path) -> None:
    for rank in (json.loads((out_dir / f"resume_rank{r}.json").read_text()) for r in range(2)):
        uninterrupted, resumed = rank["uninterrupted"], rank["resumed"]
        ga = 2
        # micro-steps 2.. of the uninterrupted run, from inside its first generation batch on
        assert [m["step"] for m in uninterrupted] == [0, 0, 1, 1, 2, 2]
        assert resumed == uninterrupted[cases.RESUME_CHECKPOINT * ga :]
    uninterrupted, resumed = (torch.load(out_dir / f"resume_{name}.pt") for name in ("uninterrupted", "resumed"))
    assert max_param_difference(uninterrupted, resumed) <= PARAM_ATOL  # observed: 0.0


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_resume_inside_a_generation_batch_is_exact(backend, request):
    out_dir = request.getfixturevalue(backend)
    assert [r["zero_stage"] for r in load(out_dir, "resume")] == [int(backend[-1])] * 2
    assert_resume_is_exact(out_dir)


# ------------------------------------------------------------------------------------------------------------------
# 6. LuffyEvalCallback under ZeRO-3 with uneven shares
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_eval_callback_with_uneven_shares(zero3):
    from transformers import AutoModelForCausalLM

    from luffy_trl.evaluation.backends import TransformersBackend
    from luffy_trl.evaluation.callback import flatten_metrics
    from luffy_trl.evaluation.runner import evaluate

    ranks = load(zero3, "evaluation")
    assert [r["zero_stage"] for r in ranks] == [3, 3]
    assert ranks[0]["entries"] == ranks[1]["entries"]
    assert [h["step"] for h in ranks[0]["entries"]] == [1, 2]
    assert ranks[0]["initial"] == ranks[1]["initial"]
    for rank in ranks:  # three evaluations, each scoring the 5 real samples (the padding is dropped)
        assert rank["scored"] == [[cases.EVAL_PROBLEMS, cases.EVAL_PROBLEMS]] * 3
    # the initial weights on one process, greedy: the same metrics as the two ZeRO-3 processes
    model = AutoModelForCausalLM.from_pretrained(zero3 / "toy_model_rank0")
    tokenizer = cases.build_tokenizer()
    summary = evaluate(TransformersBackend(model, tokenizer), cases.eval_problems(), cases.eval_protocol(),
                       batch_size=cases.EVAL_BATCH_SIZE)
    assert ranks[0]["initial"] == pytest.approx(flatten_metrics(summary))


# ------------------------------------------------------------------------------------------------------------------
# 7. ZeRO-3 with CPU offload (zero3_offload.yaml): DeepSpeedCPUAdam is built (JIT) on first use
# ------------------------------------------------------------------------------------------------------------------
def test_zero3_offload_matches_ddp(tmp_path, ddp):
    out_dir = launch("zero3_offload", "parity:adamw_beta", tmp_path, extra_seconds=OFFLOAD_BUILD_SECONDS)
    got, params = parity_run(out_dir, "adamw_beta")
    assert got["zero_stage"] == 3 and got["offload"] == {"optimizer": "cpu", "param": "cpu"}
    assert got["optimizer"] == "DeepSpeedCPUAdam"
    want, reference = parity_run(ddp, "adamw_beta")
    assert_logs_close(got["logs"], want["logs"], keys=("loss", "grad_norm", "kl", "reward"))
    for p, r in zip(params, reference):
        assert max_param_difference(p, r) <= PARAM_ATOL


# ------------------------------------------------------------------------------------------------------------------
# 9. The multi-node launch line of docs/recipes.md, two machine ranks of one process each on 127.0.0.1
# ------------------------------------------------------------------------------------------------------------------
def test_two_machines_match_one_machine(tmp_path, zero3):
    config, port = cpu_config("zero3", tmp_path), free_port()
    runs, logs = [], [tmp_path / f"machine{rank}.log" for rank in range(2)]
    for machine_rank in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(DRIVER), str(tmp_path),
               "groups"]
        with logs[machine_rank].open("w") as log:  # files, not pipes: a full pipe would stall the other machine
            runs.append(subprocess.Popen(cmd, env=environment(), stdout=log, stderr=subprocess.STDOUT))
    try:
        for run, log in zip(runs, logs):
            assert run.wait(timeout=LAUNCH_TIMEOUT) == 0, log.read_text()[-4000:]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    assert [r["zero_stage"] for r in load(tmp_path, "groups")] == [3, 3]
    ranks = [json.loads((tmp_path / f"groups_records_rank{r}.json").read_text()) for r in range(2)]
    assert_straddling_groups(ranks)
    single = [json.loads((zero3 / f"groups_records_rank{r}.json").read_text()) for r in range(2)]
    assert [r["records"] for r in ranks] == [r["records"] for r in single]
    assert max_param_difference(torch.load(tmp_path / "groups.pt"), torch.load(zero3 / "groups.pt")) <= PARAM_ATOL
