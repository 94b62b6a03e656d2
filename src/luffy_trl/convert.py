"""`luffy-trl convert`: a LUFFY / verl launch script's Hydra overrides -> a luffy-trl recipe YAML.

    luffy-trl convert exp_scripts/train.sh                 # prints the recipe
    luffy-trl convert train.sh --gpus 8 -o luffy.yaml      # writes it

The input is a shell script that runs `python -m verl.mix_src.main_mix_ppo key=value ...` (line continuations,
comments and `VAR=value` / `export VAR=value` assignments are understood; `$VAR` and `${VAR}` are substituted when
the script assigns them), or a file of `key=value` lines. Every flag ends up either as a recipe field (with the LUFFY
flag it came from in a comment) or in a commented list of flags that have no equivalent, each with the reason. Flags
that LUFFY's loss function accepts but never reads, and settings that are no-ops at their value, are listed too. The
full table is docs/migrating.md; the conversion is a pure function (`convert_overrides`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field

import yaml

# Flags with no luffy-trl field, and why (checked before the generic "unknown flag" comment).
REASONS = {
    "data.val_files": "training-time validation: use LuffyEvalCallback or examples/eval_luffy.py (docs/evaluation.md)",
    "data.val_batch_size": "validation batch size: see data.val_files",
    "rollout.val_temperature": "validation sampling: eval_luffy.py --temperature (LUFFY evaluates at 0.6)",
    "rollout.n_val": "validation samples per prompt: eval_luffy.py --num_samples",
    "trainer.test_freq": "validation every N rollouts: LuffyEvalCallback(every=...) (docs/evaluation.md)",
    "trainer.val_before_train": "validation before training: run eval_luffy.py on the base model",
    "model.use_remove_padding": "verl's padding removal: here padding_free_batches (default on) cuts each "
    "micro-batch to its real tokens, and pack_sequences='auto' packs it into one sequence with a flash-attention "
    "model (docs/batching.md); no effect on the loss",
    "actor.use_dynamic_bsz": "verl's token-budget micro-batches; here gradient_accumulation_steps micro-batches "
    "(K, which scales the entropy bonus under loss_type luffy; docs/configuration.md) whose rows padding_free_batches "
    "assigns by length, token-balanced when packed (docs/batching.md)",
    "actor.ppo_max_token_len_per_gpu": "token budget of verl's dynamic micro-batches: see actor.use_dynamic_bsz",
    "actor.ppo_micro_batch_size": "verl's micro-batch size (ignored by verl with use_dynamic_bsz); "
    "per_device_train_batch_size is set to one group instead",
    "actor.ulysses_sequence_parallel_size": "Ulysses sequence parallelism: not in TRL's GRPOTrainer (1 = off)",
    "actor.fsdp_config.param_offload": "FSDP knob: pick an accelerate config instead (zero3, or zero3_offload to "
    "offload; `luffy-trl recipes`)",
    "actor.fsdp_config.grad_offload": "FSDP knob: see actor.fsdp_config.param_offload",
    "actor.fsdp_config.optimizer_offload": "FSDP knob: see actor.fsdp_config.param_offload",
    "ref.fsdp_config.param_offload": "FSDP knob of the reference model (there is none with beta 0; with beta > 0 "
    "TRL's reference model follows the accelerate config)",
    "ref.use_ref": "reference model: TRL loads one only when beta > 0",
    "trainer.critic_warmup": "no critic in GRPO",
    "trainer.project_name": "W&B project: set the WANDB_PROJECT environment variable",
    "trainer.n_gpus_per_node": "Ray placement: the number of processes comes from `accelerate launch` "
    "(--num_processes); used here for the batch arithmetic",
    "trainer.nnodes": "Ray placement: `accelerate launch --num_machines`; used here for the batch arithmetic",
    "trainer.default_hdfs_dir": "HDFS upload: not supported (push_to_hub / hub_model_id upload to the Hub)",
    "trainer.default_local_dir": "checkpoint folder: set output_dir",
    "actor.off_policy_normalize": "accepted by LUFFY's loss function but never read: no effect",
    "actor.off_policy_cliprange": "accepted by LUFFY's loss function but never read: no effect",
    "actor.off_policy_abs_cliprange": "accepted by LUFFY's loss function but never read: no effect",
    "actor.kl_loss_type": "TRL's KL is k3 = exp(ref−logp) − (ref−logp) − 1, verl's low_var_kl without its ±10 clamp",
    "data.shuffle": "TRL shuffles the prompts (shuffle_dataset, default true)",
    "data.add_tgt_with_acc": "declared by LUFFY but not implemented: no effect",
    "trainer.add_full_target_when_none": "empty in LUFFY: no effect",
}
# Flags that are no-ops at these values (anything else is refused with the reason).
NOOPS = {
    "algorithm.kl_ctrl.kl_coef": ({"0", "0.0", "0.00", "0.000"}, "reward-level KL penalty: not in TRL (use beta, "
                                  "the KL loss)"),
    "actor.use_sft_prefix_reward": ({"False"}, "not implemented in luffy-trl"),
    "rollout.prefix_share_across_samples": ({"False"}, "partial prefixes are not supported"),
    "rollout.prefix_reward_weight_beta": ({"1.0", "1"}, "on-policy advantage multiplier: no luffy-trl field"),
    "data.disable_truncation_advantage": ({"False"}, "zeroing the advantage of truncated responses: use "
                                          "mask_truncated_completions (masks them instead)"),
    "actor.off_policy_loss_impl": ({"token"}, "only the token-level off-policy loss exists"),
    "trainer.critic_warmup": ({"0"}, "no critic in GRPO"),
}
REWARD_VERSIONS = {"3": "luffy_math_reward"}


@dataclass
class Converted:
    fields: dict = field(default_factory=dict)  # recipe field -> (value, comment)
    unmapped: list = field(default_factory=list)  # (flag, value, reason)

    def set(self, name, value, comment=""):
        self.fields[name] = (value, comment)

    def skip(self, flag, value, reason):
        self.unmapped.append((flag, value, reason))


def read_overrides(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The `key=value` Hydra overrides of a launch script (or of a file of such lines), in order, and the shell
    variables the script assigns."""
    text = re.sub(r"\\\r?\n", " ", text)
    variables, overrides = {}, []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: take the line as plain words
            tokens = line.split()
        if tokens and tokens[0] == "export":
            tokens = tokens[1:]
        for token in tokens:
            match = re.fullmatch(r"(\+{0,2})([A-Za-z_][\w.\-]*)=(.*)", token, re.S)
            if not match:
                continue
            key, value = match.group(2), match.group(3)
            if "." in key:
                overrides.append((key, value))
            elif len(tokens) == 1 or tokens.index(token) == 0:  # VAR=value (an assignment, not a command's env)
                variables[key] = value
    substituted = []
    for key, value in overrides:
        for name, replacement in variables.items():
            value = value.replace("${" + name + "}", replacement).replace("$" + name, replacement)
        substituted.append((key, value))
    return substituted, variables


def _short(key: str) -> str:
    return key[len("actor_rollout_ref."):] if key.startswith("actor_rollout_ref.") else key


def _value(text):
    """A Hydra value as Python: ints, floats (`1e-6` too, which YAML 1.1 reads as a string), booleans, None."""
    if not isinstance(text, str):
        return text
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("null", "none", "~"):
        return None
    return text


def convert_overrides(overrides: list[tuple[str, str]], gpus: int | None = None) -> Converted:
    """Map LUFFY / verl overrides to recipe fields; every flag is either mapped or listed in `unmapped`."""
    flags = {_short(k): v for k, v in overrides}
    original = {_short(k): k for k, _ in overrides}
    out, used = Converted(), set()

    def get(key, default=None):
        if key in flags:
            used.add(key)
            return flags[key]
        return default

    def src(*keys):
        return ", ".join(f"{original.get(k, k)}={flags[k]}" for k in keys if k in flags) or "not set: LUFFY's default"

    # model and data
    if (path := get("model.path")) is not None:
        out.set("model_name_or_path", path, src("model.path"))
    if (files := get("data.train_files")) is not None:
        out.set("task", "luffy")
        out.set("dataset_name", files, src("data.train_files") + " (a parquet file or folder in verl's schema)")
    if (length := get("data.max_prompt_length")) is not None:
        out.set("max_prompt_length", _value(length), src("data.max_prompt_length"))
    if (length := get("data.max_response_length")) is not None:
        out.set("max_completion_length", _value(length), src("data.max_response_length"))
    prefix_len = get("rollout.max_prefix_len")
    if prefix_len is not None:
        response = _value(flags.get("data.max_response_length", prefix_len))
        if _value(prefix_len) < response:
            out.skip(original["rollout.max_prefix_len"], prefix_len,
                     "a trace limit below max_response_length: traces are cut at max_completion_length only")
        else:
            out.set("filter_long_traces", True, src("rollout.max_prefix_len") + ": traces longer than "
                    "max_completion_length are dropped (LUFFY's data were filtered to ≤ 8192 tokens)")
    version = get("data.reward_impl_version", "3")
    if version in REWARD_VERSIONS:
        out.set("reward_funcs", [REWARD_VERSIONS[version]], src("data.reward_impl_version") +
                ": </think> gate + math-verify")
    else:
        out.skip(original.get("data.reward_impl_version"), version,
                 "only reward_impl_version=3 (think gate + math-verify) has a luffy-trl reward function")

    # group: teacher slots
    n = _value(get("rollout.n", "8"))
    out.set("num_generations", n, src("rollout.n"))
    n_prefix = _value(get("rollout.n_prefix", "1"))
    low, high = _value(get("rollout.min_prefix_ratio", "1.0")), _value(get("rollout.max_prefix_ratio", "1.0"))
    strategy = get("rollout.prefix_strategy")
    ratio_keys = ("rollout.n_prefix", "rollout.min_prefix_ratio", "rollout.max_prefix_ratio")
    if high == 0:
        out.set("num_off_policy", 0, src(*ratio_keys) + ": no teacher trace")
    elif low == high == 1.0:
        out.set("num_off_policy", n_prefix, src(*ratio_keys) + ": whole traces")
    else:
        out.skip(", ".join(original.get(k, k) for k in ratio_keys), f"{n_prefix}, {low}, {high}",
                 "partial prefixes (ratio strictly between 0 and 1) are not supported: whole traces only")
    if strategy is not None:
        out.skip(original["rollout.prefix_strategy"], strategy, "no effect with prefix ratios of 0 or 1")
    if (ratio := get("data.sample_target_ratio")) is not None and _value(ratio) != 1.0:
        out.set("off_policy_schedule_target", "group_share", src("data.sample_target_ratio"))
        out.set("off_policy_schedule_start", _value(ratio), "share of groups that get their trace")
    if (alpha := get("rollout.prefix_reward_weight_alpha")) is not None and _value(alpha) != 1.0:
        out.set("off_policy_schedule_start", _value(alpha), src("rollout.prefix_reward_weight_alpha") +
                ": a constant weight on the off-policy loss (it is linear in the advantage)")

    # advantages and loss
    estimator = get("algorithm.adv_estimator", "grpo")
    off_loss = get("actor.use_off_policy_loss", "False")
    sft = get("actor.use_sft_multitask_loss", "False")
    if estimator == "grpo_split" and sft == "True":
        out.set("off_policy_loss", "sft", src("algorithm.adv_estimator", "actor.use_sft_multitask_loss"))
        if (coef := get("actor.sft_loss_coef")) is not None:
            out.set("sft_loss_coef", _value(coef), src("actor.sft_loss_coef"))
        if off_loss == "True":
            out.skip(original["actor.use_off_policy_loss"], off_loss, "replaced by the SFT term")
    elif estimator == "grpo" and sft != "True":
        if off_loss == "True":
            out.set("off_policy_loss", "luffy", src("actor.use_off_policy_loss"))
        elif out.fields.get("num_off_policy", (0,))[0]:
            out.skip(original.get("actor.use_off_policy_loss", "actor.use_off_policy_loss"), off_loss,
                     "traces trained with the on-policy PPO loss are not supported: set use_off_policy_loss=True")
    else:
        out.skip(original.get("algorithm.adv_estimator", "algorithm.adv_estimator"), estimator,
                 "only grpo (and grpo_split with use_sft_multitask_loss) are supported")
    std = get("algorithm.grpo_use_std", "True")
    out.set("scale_rewards", "none" if std == "False" else "group",
            src("algorithm.adv_estimator", "algorithm.grpo_use_std") + ": group-mean advantage" +
            ("" if std == "False" else " ÷ group std"))
    _loss_options(flags, original, get, src, out)

    if get("actor.use_kl_loss", "False") == "True":
        out.set("beta", _value(get("actor.kl_loss_coef", "0.001")), src("actor.use_kl_loss", "actor.kl_loss_coef"))
    else:
        get("actor.kl_loss_coef")
        out.set("beta", 0.0, src("actor.use_kl_loss", "actor.kl_loss_coef") + ": no KL loss, no reference model")
    if (coef := get("actor.entropy_coeff")) is not None:
        out.set("entropy_coef", _value(coef), src("actor.entropy_coeff"))

    # optimiser
    for key, name in (("actor.optim.lr", "learning_rate"), ("actor.grad_clip", "max_grad_norm"),
                      ("actor.optim.weight_decay", "weight_decay"), ("actor.ppo_epochs", "num_iterations"),
                      ("actor.optim.lr_warmup_steps_ratio", "warmup_ratio")):
        if (value := get(key)) is not None:
            out.set(name, _value(value), src(key))
    out.set("lr_scheduler_type", "constant", "verl 0.2's actor learning rate is constant")

    _geometry(flags, original, get, src, out, n, gpus)
    _rollout_and_system(get, src, out, original)

    mentioned = " ".join(comment for _, comment in out.fields.values()) + " " + " ".join(f for f, _, _ in out.unmapped)
    for key, value in flags.items():
        if key in used:
            if f"{original[key]}=" not in mentioned and original[key] not in mentioned:
                out.skip(original[key], value, "no effect at this value (LUFFY's default)")
            continue
        allowed = NOOPS.get(key)
        if allowed is not None:
            reason = "no effect at this value" if value in allowed[0] else allowed[1] + " (refused)"
            out.skip(original[key], value, reason)
        else:
            out.skip(original[key], value, REASONS.get(key, "unknown to the converter: check docs/migrating.md"))
    return out


def _loss_options(flags, original, get, src, out):
    """compute_token_on_off_policy_loss's options (docs/migrating.md, first table)."""
    token_mean = get("actor.loss_remove_token_mean", "False")
    out.set("loss_type", "luffy" if token_mean == "True" else "bnpo",
            src("actor.loss_remove_token_mean") + (": Σ/max_len per micro-batch, micro-batches summed"
                                                   if token_mean == "True" else ": token mean per micro-batch"))
    no_clip = get("actor.loss_remove_clip", "False")
    out.set("on_policy_clip", no_clip != "True", src("actor.loss_remove_clip"))
    eps = _value(get("actor.clip_ratio", "0.2"))
    out.set("epsilon", eps, src("actor.clip_ratio"))
    if (upper := get("actor.clip_upper_bound")) is not None:
        out.set("epsilon_high", round(max(_value(upper), 1 + eps) - 1, 10),
                src("actor.clip_upper_bound") + ": upper clip max(bound, 1 + ε)")
    reshape = str(get("actor.off_policy_reshape", "no_reshape"))
    teacher_loss = out.fields.get("num_off_policy", (0,))[0] and out.fields.get("off_policy_loss", ("",))[0] == "luffy"
    if "actor.off_policy_reshape" not in flags and not teacher_loss:
        pass  # no shaped teacher term: LUFFY's default reshape is irrelevant
    elif (m := re.fullmatch(r"p_div_p_([0-9.]+)", reshape)):
        out.set("off_policy_shaping", "luffy", src("actor.off_policy_reshape"))
        out.set("policy_shaping_gamma", float(m.group(1)), src("actor.off_policy_reshape") + ": γ of p/(p+γ)")
    elif reshape in ("no_reshape", "logp", "p_logp", "square_root", "pow"):
        out.set("off_policy_shaping", "none" if reshape == "no_reshape" else reshape, src("actor.off_policy_reshape"))
    else:
        out.skip(original.get("actor.off_policy_reshape"), reshape, "unknown off_policy_reshape")
    reshape = str(get("actor.on_policy_reshape", "no_reshape"))
    if (m := re.fullmatch(r"p_div_p_([0-9.]+)", reshape)):
        out.set("on_policy_shaping", "luffy", src("actor.on_policy_reshape"))
        out.set("on_policy_shaping_gamma", float(m.group(1)), src("actor.on_policy_reshape") + ": γ of f(p)/f(p_old)")
    elif reshape in ("logp", "p_logp", "square_root", "pow"):
        out.set("on_policy_shaping", reshape, src("actor.on_policy_reshape"))
    elif reshape != "no_reshape":
        out.skip(original.get("actor.on_policy_reshape"), reshape, "unknown on_policy_reshape")
    for key, name in (("actor.off_policy_reshape_weight", "off_policy_shaping_weight"),
                      ("actor.off_policy_reshape_pow_exp", "off_policy_shaping_exponent"),
                      ("actor.on_policy_reshape_weight", "on_policy_shaping_weight"),
                      ("actor.on_policy_reshape_pow_exp", "on_policy_shaping_exponent")):
        if (value := get(key)) is not None:
            out.set(name, _value(value), src(key))
    for key, name in (("actor.off_policy_max_clip", "off_policy_max_clip"),
                      ("actor.off_policy_min_clip", "off_policy_min_clip"), ("actor.all_max_clip", "max_token_prob")):
        if (value := get(key)) is not None:
            value = _value(value)
            out.set(name, None if value == -1 else value, src(key) + (" (−1: off)" if value == -1 else ""))
    if get("actor.use_off_policy_probs", "False") == "True":
        out.skip(original["actor.use_off_policy_probs"], "True",
                 "teacher probabilities: set off_policy_logprobs_column to your column of per-token log-probs and "
                 "off_policy_shaping: none (LUFFY does not reshape p/p_teacher)")


def _geometry(flags, original, get, src, out, n, gpus):
    """Batch sizes: LUFFY counts prompts over all GPUs; TRL counts sequences per process."""
    nodes = _value(flags.get("trainer.nnodes", 1))
    gpus = gpus or nodes * _value(flags.get("trainer.n_gpus_per_node", 8))
    rollout = get("data.train_batch_size")
    mini = get("actor.ppo_mini_batch_size")
    if rollout is None or mini is None:
        return
    per_step, per_rollout = _value(mini) * n, _value(rollout) * n  # sequences
    if per_step % gpus or per_rollout % per_step or (per_step // gpus) % n:
        out.skip(f"{original['data.train_batch_size']}, {original['actor.ppo_mini_batch_size']}",
                 f"{rollout}, {mini}", f"batch sizes that do not split into whole groups over {gpus} processes: "
                 "set per_device_train_batch_size, gradient_accumulation_steps and steps_per_generation by hand")
        return
    per_device = n
    ga = per_step // gpus // per_device
    out.set("per_device_train_batch_size", per_device, src("actor.ppo_mini_batch_size", "data.train_batch_size") +
            f": one group of {n} per micro-batch, on {gpus} processes")
    out.set("gradient_accumulation_steps", ga, src("actor.ppo_mini_batch_size") +
            f": {per_step} sequences per optimiser step = {per_device} × {ga} × {gpus}")
    out.set("steps_per_generation", ga * per_rollout // per_step, src("data.train_batch_size") +
            f": {per_rollout} sequences per rollout, {per_rollout // per_step} optimiser steps each")
    steps_per_rollout = per_rollout // per_step
    if (freq := get("trainer.save_freq")) is not None:
        out.set("save_strategy", "steps")
        out.set("save_steps", _value(freq) * steps_per_rollout, src("trainer.save_freq") + " rollouts")
    if (epochs := get("trainer.total_epochs")) is not None:
        out.set("num_train_epochs", _value(epochs), src("trainer.total_epochs") +
                " (LUFFY's headline run used ≈ 500 rollouts: set max_steps to stop earlier)")


def _rollout_and_system(get, src, out, original):
    if (name := get("rollout.name")) == "vllm":
        out.set("use_vllm", True, src("rollout.name"))
        out.set("vllm_mode", "colocate", src("rollout.name") + ": verl colocates the engine with the actor")
        if (tp := get("rollout.tensor_model_parallel_size")) is not None:
            out.set("vllm_tensor_parallel_size", _value(tp), src("rollout.tensor_model_parallel_size") +
                    " (1 lets luffy-trl generate only the on-policy slots)")
        if (util := get("rollout.gpu_memory_utilization")) is not None:
            out.set("vllm_gpu_memory_utilization", 0.35, src("rollout.gpu_memory_utilization") +
                    ": verl frees the engine during training, TRL's colocate shares the GPU: 0.3-0.5 with sleep mode")
            out.set("vllm_enable_sleep_mode", True, src("rollout.gpu_memory_utilization"))
    elif name is not None:
        out.skip(original["rollout.name"], name, "only vLLM (or TRL's transformers generation) is available")
    for key, name in (("rollout.temperature", "temperature"), ("rollout.top_p", "top_p")):
        if (value := get(key)) is not None:
            out.set(name, _value(value), src(key))
    if (top_k := get("rollout.top_k")) is not None:
        out.set("top_k", max(_value(top_k), 0), src("rollout.top_k") + " (−1 and 0 both disable it)")
    if (value := get("model.enable_gradient_checkpointing")) is not None:
        out.set("gradient_checkpointing", _value(value), src("model.enable_gradient_checkpointing"))
    if (loggers := get("trainer.logger")) is not None:
        names = [x for x in re.findall(r"[A-Za-z_]+", loggers) if x != "console"]
        out.set("report_to", names or "none", src("trainer.logger") + " (the console always logs)")
    if (name := get("trainer.experiment_name")) is not None:
        out.set("run_name", name, src("trainer.experiment_name"))
    if (keep := get("trainer.max_optim_to_keep")) is not None:
        out.set("save_total_limit", _value(keep), src("trainer.max_optim_to_keep") + " (TRL keeps whole checkpoints)")
    out.set("bf16", True, "verl's FSDP actor trains in bf16 mixed precision")
    out.set("logging_steps", 1)


def render(converted: Converted, source: str = "") -> str:
    """The recipe as YAML text, a comment per field, then every flag that was not mapped with its reason."""
    lines = [f"# Converted from {source} by `luffy-trl convert` (docs/migrating.md)." if source else
             "# Converted by `luffy-trl convert` (docs/migrating.md).",
             "# Launch: accelerate launch --config_file $(luffy-trl recipes --path zero3) -m luffy_trl.cli train "
             "--config THIS_FILE", ""]
    for name, (value, comment) in converted.fields.items():
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000, allow_unicode=True).strip()
        text = text[1:-1] if text.startswith("{") else text
        lines.append(f"{text:40s}  # {comment}" if comment else text)
    if converted.unmapped:
        lines += ["", "# Flags with no luffy-trl field:"]
        for flag, value, reason in converted.unmapped:
            lines.append(f"#   {flag}={value}: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luffy-trl convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="a LUFFY / verl launch script, or a file of key=value Hydra overrides")
    parser.add_argument("-o", "--output", help="write the recipe here instead of printing it")
    parser.add_argument("--gpus", type=int, help="processes to train on (default: trainer.nnodes × n_gpus_per_node)")
    args = parser.parse_args(argv)
    with open(args.script) as f:
        overrides, _ = read_overrides(f.read())
    if not overrides:
        print(f"luffy-trl convert: no key=value Hydra overrides found in {args.script}", file=sys.stderr)
        return 2
    text = render(convert_overrides(overrides, gpus=args.gpus), source=args.script)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
