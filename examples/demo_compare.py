"""LUFFY vs on-policy GRPO on the offline sorting task: same model init, data, seed and budget.

    python examples/demo_compare.py --output_dir outputs/demo-compare

Trains the packaged recipe `demo_cpu` twice through `luffy-trl train`'s code path, once with
`num_off_policy=1` (LUFFY: the recipe's groups of 4 hold 3 sampled + 1 teacher completion) and once with
`num_off_policy=0` (GRPO: 4 sampled), evaluates greedy held-out accuracy every `demo_heldout_every` steps, and writes

- `DIR/results.json`: for each arm (`"luffy"`, `"grpo"`): `final_accuracy` (the best of the last three
  evaluations), `accuracy_curve` ([step, accuracy] pairs), `train_reward` (per step: the on-policy samples' mean
  reward), `grad_norm` (per step), `wall_time_s`;
- `DIR/curves.png`: held-out accuracy and on-policy train reward against the step, both arms.

Each arm also records `teacher_used` (per step: teacher traces that took part, `off_policy/used`) and
`teacher_traces_used` (their sum). `--arms` picks other arms than the default `luffy,grpo`, e.g.
`--arms luffy,luffy_all_fail` compares LUFFY's always-on guidance with the all-fail trigger; the arms are listed in
`ARMS` (`rl_sft_loss` and `no_shaping` are the paper's baselines).

Any recipe field can be overridden after the flags, e.g. `--max_steps 4 --demo_heldout_every 2` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from transformers.trainer_callback import ProgressCallback

from luffy_trl import train as train_luffy
from luffy_trl.configs import recipe_path
from luffy_trl.threads import configure_cpu_threads

# arm -> (num_off_policy, extra recipe overrides, plot label, colour)
ARMS = {
    "luffy": (1, [], "LUFFY (sampled + 1 teacher per group)", "tab:blue"),
    "grpo": (0, [], "GRPO (all sampled)", "tab:red"),
    "luffy_all_fail": (1, ["--off_policy_trigger", "all_fail"], "LUFFY, teacher only when all samples fail",
                       "tab:green"),
    "luffy_accuracy_below": (1, ["--off_policy_trigger", "accuracy_below"], "LUFFY, teacher when accuracy < 0.5",
                             "tab:olive"),
    "rl_sft_loss": (1, ["--off_policy_loss", "sft"], "RL w/ SFT loss", "tab:purple"),
    "no_shaping": (1, ["--off_policy_shaping", "none"], "LUFFY without shaping", "tab:orange"),
}


class QuietProgressCallback(ProgressCallback):
    """TRL's progress bar without printing every log dict (the curves go to results.json and curves.png)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def run_arm(name: str, num_off_policy: int, recipe: str, output_dir: pathlib.Path, overrides: list[str],
            arm_overrides: list[str] = ()) -> dict:
    from transformers.trainer_callback import PrinterCallback

    from luffy_trl import MixedPolicyGRPOTrainer
    from luffy_trl.tasks.sorting import HeldoutAccuracyCallback, sorting_reward

    script_args, args, _ = train_luffy.make_parser().parse_args_and_config(
        ["--config", str(recipe_path(recipe)), "--num_off_policy", str(num_off_policy), "--output_dir", str(output_dir / name),
         "--logging_steps", "1", *arm_overrides, *overrides]
    )
    model, tokenizer, train, _, heldout = train_luffy.build_sorting(script_args, args)
    trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=sorting_reward, args=args, train_dataset=train,
                                     processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # a progress bar instead of a dict per step
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback)
    heldout_cb = HeldoutAccuracyCallback(trainer, heldout, every=script_args.demo_heldout_every)
    trainer.add_callback(heldout_cb)
    print(f"[{name}] training {args.max_steps} steps (num_off_policy={num_off_policy})", flush=True)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    on_policy_reward = [h.get("on_policy/reward_mean", h["reward"]) for h in logs]
    curve = [[step, acc] for step, acc in heldout_cb.history]
    result = {
        "num_off_policy": num_off_policy,
        "final_accuracy": max(acc for _, acc in curve[-3:]),
        "accuracy_curve": curve,
        "train_reward": on_policy_reward,
        "grad_norm": [h["grad_norm"] for h in logs],
        "wall_time_s": wall,
        "teacher_used": [h.get("off_policy/used", 0.0) for h in logs],
    }
    result["teacher_traces_used"] = sum(result["teacher_used"])
    print(f"[{name}] held-out accuracy {result['final_accuracy']:.3f} (best of last three), {wall:.0f} s", flush=True)
    return result


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {name: (label, color) for name, (_, _, label, color) in ARMS.items()}
    for name, result in results.items():
        label, color = styles[name]
        steps, accs = zip(*result["accuracy_curve"])
        ax_acc.plot(steps, accs, marker="o", color=color, label=label)
        rewards = result["train_reward"]
        window = max(1, len(rewards) // 50)
        smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
                  for i in range(len(rewards))]
        ax_rew.plot(range(1, len(rewards) + 1), smooth, color=color, label=label)
    ax_acc.set(title="Held-out accuracy (greedy, unseen letter sets)", xlabel="step", ylabel="accuracy",
               ylim=(-0.02, 1.02))
    ax_rew.set(title="Train reward of the model's own samples", xlabel="step", ylabel="mean reward",
               ylim=(-0.02, 1.02))
    for ax in (ax_acc, ax_rew):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle("Offline demo: a random 2-layer model learns to sort letters only with off-policy guidance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--recipe", default="demo_cpu", help="a packaged recipe name or a YAML file")
    parser.add_argument("--arms", default="luffy,grpo",
                        help=f"comma-separated arms to train, from: {', '.join(ARMS)} (default: luffy,grpo)")
    known, overrides = parser.parse_known_args(argv)
    arms = [a.strip() for a in known.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_cpu_threads()  # one thread on a CPU-only machine unless OMP_NUM_THREADS / LUFFY_TRL_NUM_THREADS is set
    output_dir = pathlib.Path(known.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    results = {name: run_arm(name, ARMS[name][0], known.recipe, output_dir, overrides, ARMS[name][1])
               for name in arms}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, output_dir / "curves.png")
    total = sum(r["wall_time_s"] for r in results.values())
    if arms == ["luffy", "grpo"]:
        summary = f"LUFFY {results['luffy']['final_accuracy']:.3f} vs GRPO {results['grpo']['final_accuracy']:.3f}"
    else:
        summary = " vs ".join(f"{name} {r['final_accuracy']:.3f} ({r['teacher_traces_used']:.0f} teacher traces)"
                              for name, r in results.items())
    print(f"{summary} held-out accuracy; {total / 60:.1f} min in all. Wrote {output_dir / 'results.json'} and "
          f"{output_dir / 'curves.png'}.")
    return results


if __name__ == "__main__":
    main()
