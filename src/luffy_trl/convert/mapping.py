"""The pure conversion: LUFFY / verl overrides -> recipe fields, every flag mapped or listed with its reason, and what
differs from the script, what is unknown and what is defaulted."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from luffy_trl.convert.flags import LUFFY_FLAGS, NOOPS, REASONS, REWARD_VERSIONS
from luffy_trl.convert.script import _hydra_list, unresolved_variables


@dataclass
class Converted:
    fields: dict = field(default_factory=dict)  # recipe field -> (value, comment)
    unmapped: list = field(default_factory=list)  # (flag, value, reason)
    differs: list = field(default_factory=list)  # (flag or field, what the recipe does instead of the script)
    unknown: list = field(default_factory=list)  # (flag, value, closest known flag or None)
    notes: list = field(default_factory=list)  # what the reader must know about the script as a whole

    def set(self, name, value, comment=""):
        self.fields[name] = (value, comment)

    def skip(self, flag, value, reason, differs: bool = False):
        """A flag with no recipe field; `differs`: the recipe trains something other than the script because of it."""
        self.unmapped.append((flag, value, reason))
        if differs:
            self.differs.append((f"{flag}={value}", reason))

    @property
    def defaulted(self) -> list:
        """Recipe fields the script does not set: (field, value, comment)."""
        return [(name, value, comment) for name, (value, comment) in self.fields.items() if DEFAULTED in comment]


DEFAULTED = "not set in the script"


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
    out, used, asked = Converted(), set(), set()
    luffy = any(key in flags for key in LUFFY_FLAGS)
    if not luffy:
        out.notes.append("no LUFFY flag in the script (" + ", ".join(sorted(LUFFY_FLAGS)) + "): converted as plain "
                         "GRPO, num_off_policy 0 (no teacher rows). For LUFFY, set num_off_policy: 1 and "
                         "off_policy_column to your teacher-trace column (docs/migrating.md).")

    def get(key, default=None):
        asked.add(key)
        if key in flags:
            used.add(key)
            return flags[key]
        return default

    def src(*keys):
        return (", ".join(f"{original.get(k, k)}={flags[k]}" for k in keys if k in flags)
                or f"{DEFAULTED}: {'LUFFY' if luffy else 'verl'}'s default")
    for key, value in flags.items():
        if unresolved_variables(value):
            out.differs.append((f"{original[key]}={value}", "unresolved shell variable(s) "
                                + ", ".join(f"${v}" for v in unresolved_variables(value))
                                + ": assign them in the script or edit the recipe"))

    # model and data
    if (path := get("model.path")) is not None:
        out.set("model_name_or_path", path, src("model.path"))
    if (files := get("data.train_files")) is not None:
        out.set("task", "luffy")
        listed = _hydra_list(files)
        if listed is not None and len(listed) == 1:
            files, listed = listed[0], None
        if listed is None:
            out.set("dataset_name", files, src("data.train_files") + " (a parquet file or folder in verl's schema)")
        else:
            out.set("dataset_name", listed[0], src("data.train_files") + ": the first file only")
            out.differs.append((f"{original['data.train_files']}={files}", f"{len(listed)} training files; "
                                "dataset_name takes one file or folder: put the files in one folder (every parquet "
                                "file in it is read) and point dataset_name at it"))
    if (length := get("data.max_prompt_length")) is not None:
        out.set("max_prompt_length", _value(length), src("data.max_prompt_length"))
    if (length := get("data.max_response_length")) is not None:
        out.set("max_completion_length", _value(length), src("data.max_response_length"))
    prefix_len = get("rollout.max_prefix_len")
    if prefix_len is not None:
        response = _value(flags.get("data.max_response_length", prefix_len))
        if _value(prefix_len) < response:
            out.skip(original["rollout.max_prefix_len"], prefix_len,
                     "a trace limit below max_response_length: traces are cut at max_completion_length only",
                     differs=True)
        else:
            out.set("filter_long_traces", True, src("rollout.max_prefix_len") + ": traces longer than "
                    "max_completion_length are dropped (LUFFY's data were filtered to ≤ 8192 tokens)")
    version = get("data.reward_impl_version", "3")
    if version in REWARD_VERSIONS:
        out.set("reward_funcs", [REWARD_VERSIONS[version]], src("data.reward_impl_version") +
                ": </think> gate + math-verify")
    else:
        out.skip(original.get("data.reward_impl_version"), version,
                 "only reward_impl_version=3 (think gate + math-verify) has a luffy-trl reward function", differs=True)

    # group: teacher slots
    n = _value(get("rollout.n", "8"))
    out.set("num_generations", n, src("rollout.n"))
    if "rollout.n" not in flags:
        out.differs.append(("num_generations=8", "the script does not set rollout.n; verl's default (1) makes groups "
                            "of one, with no GRPO advantage: 8 (LUFFY's published scripts) is used instead"))
    n_prefix = _value(get("rollout.n_prefix", "1" if luffy else "0"))
    low, high = _value(get("rollout.min_prefix_ratio", "1.0")), _value(get("rollout.max_prefix_ratio", "1.0"))
    strategy = get("rollout.prefix_strategy")
    ratio_keys = ("rollout.n_prefix", "rollout.min_prefix_ratio", "rollout.max_prefix_ratio")
    if not luffy:
        out.set("num_off_policy", 0, "no LUFFY flag in the script: plain GRPO")
    elif high == 0:
        out.set("num_off_policy", 0, src(*ratio_keys) + ": no teacher trace")
    elif low == high == 1.0:
        out.set("num_off_policy", n_prefix, src(*ratio_keys) + ": whole traces")
    else:
        out.set("num_off_policy", n_prefix, src(*ratio_keys) + ": WHOLE traces (partial prefixes refused)")
        out.skip(", ".join(original.get(k, k) for k in ratio_keys), f"{n_prefix}, {low}, {high}",
                 "partial prefixes (ratio strictly between 0 and 1) are not supported: the recipe trains on whole "
                 "traces", differs=True)
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
                     "traces trained with the on-policy PPO loss are not supported: set use_off_policy_loss=True",
                     differs=True)
    else:
        what = "PPO with a critic (gae) is not GRPO: the recipe trains GRPO" if estimator == "gae" else \
            "only grpo (and grpo_split with use_sft_multitask_loss) are supported"
        out.skip(original.get("algorithm.adv_estimator", "algorithm.adv_estimator"), estimator, what, differs=True)
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
            refused = value not in allowed[0]
            out.skip(original[key], value, allowed[1] + " (refused)" if refused else "no effect at this value",
                     differs=refused)
        elif key in REASONS:
            out.skip(original[key], value, REASONS[key])
        else:
            close = difflib.get_close_matches(key, sorted(asked | set(REASONS) | set(NOOPS)), 1, 0.8)
            out.unknown.append((original[key], value, close[0] if close else None))
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.skip(original[key], value, f"unknown to the converter{hint}: check docs/migrating.md")
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
        out.skip(original.get("actor.off_policy_reshape"), reshape, "unknown off_policy_reshape", differs=True)
    reshape = str(get("actor.on_policy_reshape", "no_reshape"))
    if (m := re.fullmatch(r"p_div_p_([0-9.]+)", reshape)):
        out.set("on_policy_shaping", "luffy", src("actor.on_policy_reshape"))
        out.set("on_policy_shaping_gamma", float(m.group(1)), src("actor.on_policy_reshape") + ": γ of f(p)/f(p_old)")
    elif reshape in ("logp", "p_logp", "square_root", "pow"):
        out.set("on_policy_shaping", reshape, src("actor.on_policy_reshape"))
    elif reshape != "no_reshape":
        out.skip(original.get("actor.on_policy_reshape"), reshape, "unknown on_policy_reshape", differs=True)
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
                 "off_policy_shaping: none (LUFFY does not reshape p/p_teacher)", differs=True)


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
                 "set per_device_train_batch_size, gradient_accumulation_steps and steps_per_generation by hand",
                 differs=True)
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
        if get("rollout.gpu_memory_utilization") is not None:
            out.set("vllm_gpu_memory_utilization", 0.35, src("rollout.gpu_memory_utilization") +
                    ": verl frees the engine during training, TRL's colocate shares the GPU: 0.3-0.5 with sleep mode")
            out.set("vllm_enable_sleep_mode", True, src("rollout.gpu_memory_utilization"))
    elif name is not None:
        out.skip(original["rollout.name"], name, "only vLLM (or TRL's transformers generation) is available: the "
                 "recipe generates with transformers (the same samples' distribution, slower)")
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
    out.set("dtype", "bfloat16", "the model's weights in bf16, as LUFFY's packaged recipe (verl's FSDP actor trains in "
            "bf16 mixed precision)")
    out.set("bf16", True, "verl's FSDP actor trains in bf16 mixed precision")
    if (folder := get("trainer.default_local_dir")) is not None:
        out.set("output_dir", folder, src("trainer.default_local_dir"))
    else:
        run = get("trainer.experiment_name")
        out.set("output_dir", f"outputs/{run or 'luffy'}", f"{DEFAULTED}: outputs/<trainer.experiment_name>")
    if (seed := get("data.seed")) is not None:
        out.set("seed", _value(seed), src("data.seed"))
    else:
        out.set("seed", 47, f"{DEFAULTED}: LUFFY's data sampler seed (as the packaged recipes)")
    out.set("logging_steps", 1)


