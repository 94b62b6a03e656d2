"""The training entry point: `luffy-trl train` (and `examples/train_luffy.py`, a thin wrapper over it).

    # the offline CPU demo (no downloads): a tiny random model learns to sort letters from teacher traces
    luffy-trl train --config demo_cpu

    # the paper's Qwen2.5-Math-7B run on 8 GPUs with DeepSpeed ZeRO-3
    accelerate launch --config_file $(luffy-trl recipes --path zero3) -m luffy_trl.cli train \
        --config qwen2.5-math-7b

`--config` takes a YAML file or the name of a packaged recipe (`luffy-trl recipes` lists them). Every field of the
recipe can be overridden on the command line (`--learning_rate 5e-7`). The arguments are the three dataclasses
below: `LuffyScriptArguments` (data, rewards, task), `MixedPolicyGRPOConfig` (training, LUFFY) and TRL's
`ModelConfig` (model, dtype, LoRA/QLoRA). Resume with `--resume_from_checkpoint <dir>` (or `true` for the last
checkpoint in `output_dir`): TRL's sampler and the Trainer's batch skipping restore the data order, and every
checkpoint also holds TRL's buffered generation batch and micro-step counter (`luffy_trl.trainer.checkpoint`), so a
checkpoint inside a generation batch (`steps_per_generation` > `gradient_accumulation_steps`) resumes on the same
rows: no prompt is repeated or skipped and the run continues as the uninterrupted one would (same number of
processes and geometry; otherwise the current generation batch is generated again, with a warning).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config  # noqa: E402

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer  # noqa: E402
from luffy_trl.model_paths import resolve_model, resolve_model_path  # noqa: E402, F401 (re-exported)
from luffy_trl.threads import configure_cpu_threads  # noqa: E402

logger = logging.getLogger("luffy_trl.train")


@dataclass
class LuffyScriptArguments(ScriptArguments):
    """Data, rewards and task options of `luffy-trl train` (plus TRL's `ScriptArguments`: `dataset_name`, ...)."""

    task: str = field(
        default="luffy",
        metadata={
            "help": "'luffy': LUFFY/OpenR1 data (verl parquet schema) from `dataset_name` (a local file or folder, or "
            "a Hub dataset). 'sorting': the bundled offline letter-sorting demo (tiny random model, no downloads). "
            "'arithmetic': bundled word problems with worked solutions, for a real small model (model_name_or_path).",
            "choices": ["luffy", "sorting", "arithmetic"],
        },
    )
    system_prompt: str = field(
        default="keep",
        metadata={"help": "System message of LUFFY data: 'keep', 'drop', or 'luffy' (replace with LUFFY's).",
                  "choices": ["keep", "drop", "luffy"]},
    )
    strip_think_prefix: bool = field(
        default=False,
        metadata={"help": "Strip a leading '<think>\\n' from the traces (the trainer also does this when the chat "
                          "template's generation prompt already opens <think>)."},
    )
    max_prompt_length: int | None = field(
        default=1024, metadata={"help": "Drop prompts longer than this many tokens (LUFFY: 1024). None keeps all."}
    )
    filter_long_traces: bool = field(
        default=True,
        metadata={"help": "Remove traces longer than max_completion_length tokens instead of truncating them."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["luffy_math_reward"],
        metadata={"help": "Reward functions: names in luffy_trl.rewards (luffy_math_reward, math_reward, "
                          "number_reward, multiple_choice_reward) or dotted import paths (my_lib.rewards.fn)."},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "Load the model and tokenizer from this GGUF file inside model_name_or_path."}
    )
    demo_train_rows: int = field(default=20000, metadata={"help": "sorting/arithmetic task: training prompts."})
    demo_heldout_rows: int = field(default=128, metadata={"help": "sorting task: held-out prompts (unseen sets)."})
    demo_heldout_every: int = field(
        default=50, metadata={"help": "sorting task: held-out greedy accuracy every N steps (0: never)."}
    )
    demo_hidden_size: int = field(default=128, metadata={"help": "sorting task: hidden size of the random model."})
    demo_num_layers: int = field(default=2, metadata={"help": "sorting task: layers of the random model."})


def resolve_reward_funcs(names: list[str]):
    import importlib

    from luffy_trl import rewards
    from luffy_trl.tasks import sorting

    funcs = []
    for name in names:
        if hasattr(rewards, name):
            funcs.append(getattr(rewards, name))
        elif hasattr(sorting, name):
            funcs.append(getattr(sorting, name))
        elif "." in name:
            module, attr = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            funcs.append(getattr(importlib.import_module(module), attr))
        else:
            raise ValueError(f"Unknown reward function {name!r}: use a name from luffy_trl.rewards "
                             "(luffy_math_reward, math_reward, number_reward, multiple_choice_reward) or a dotted "
                             "import path.")
    return funcs


def build_sorting(script_args: LuffyScriptArguments, training_args: MixedPolicyGRPOConfig):
    from luffy_trl.tasks import sorting

    tokenizer = sorting.char_tokenizer()
    model = sorting.demo_model(tokenizer, script_args.demo_hidden_size, script_args.demo_num_layers,
                               seed=training_args.seed)
    train = sorting.sorting_dataset("train", script_args.demo_train_rows, seed=training_args.data_seed or 0)
    heldout = sorting.sorting_dataset("heldout", script_args.demo_heldout_rows, seed=training_args.data_seed or 0)
    return model, tokenizer, train, None, heldout


def build_pretrained(script_args: LuffyScriptArguments, training_args: MixedPolicyGRPOConfig, model_args: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from luffy_trl.data import load_luffy_dataset

    if not model_args.model_name_or_path:
        raise ValueError("Set model_name_or_path (a Hub id or a local folder), or task: sorting for the offline demo.")
    if script_args.task == "luffy" and not script_args.dataset_name:
        raise ValueError("Set dataset_name to LUFFY's data: a local parquet/jsonl file or folder, or a Hub dataset.")
    model_args.model_name_or_path, script_args.gguf_file = resolve_model(model_args.model_name_or_path,
                                                                        script_args.gguf_file)
    load_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    if script_args.gguf_file:
        load_kwargs["gguf_file"] = script_args.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    model_init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                         "dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    if script_args.gguf_file:  # GGUF checkpoints are dequantised by transformers; load them here
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs,
                                                     dtype=model_args.dtype or "float32")
        # transformers dequantises GGUF weights into ordinary tensors but keeps the GGUF quantizer attached, which
        # makes Trainer refuse to train; detach it, the model is a plain one.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    else:
        model = model_args.model_name_or_path
        training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}

    options = dict(
        system_prompt=script_args.system_prompt,
        strip_think_prefix=script_args.strip_think_prefix,
        tokenizer=tokenizer,
        max_prompt_length=script_args.max_prompt_length,
        max_completion_length=training_args.max_completion_length if script_args.filter_long_traces else None,
        off_policy_column=training_args.off_policy_column,
    )
    if script_args.task == "arithmetic":
        from luffy_trl.data import prepare_luffy_dataset
        from luffy_trl.tasks.arithmetic import arithmetic_dataset

        train, report = prepare_luffy_dataset(arithmetic_dataset(script_args.demo_train_rows,
                                                                 seed=training_args.data_seed or 0), **options)
        logger.info("training data: %s", report)
        return model, tokenizer, train, None, None
    train, report = load_luffy_dataset(script_args.dataset_name, split=script_args.dataset_train_split, **options)
    logger.info("training data: %s", report)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset, _ = load_luffy_dataset(script_args.dataset_name, split=script_args.dataset_test_split,
                                             **options)
    return model, tokenizer, train, eval_dataset, None


def main(script_args: LuffyScriptArguments, training_args: MixedPolicyGRPOConfig, model_args: ModelConfig):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_cpu_threads()  # one thread on a CPU-only machine unless OMP_NUM_THREADS / LUFFY_TRL_NUM_THREADS is set
    if script_args.task == "sorting":
        model, tokenizer, train, eval_dataset, heldout = build_sorting(script_args, training_args)
    else:
        model, tokenizer, train, eval_dataset, heldout = build_pretrained(script_args, training_args, model_args)

    trainer = MixedPolicyGRPOTrainer(
        model=model,
        reward_funcs=resolve_reward_funcs(script_args.reward_funcs),
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if heldout is not None and script_args.demo_heldout_every:
        from luffy_trl.tasks.sorting import HeldoutAccuracyCallback

        trainer.add_callback(HeldoutAccuracyCallback(trainer, heldout, every=script_args.demo_heldout_every))
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


class UsageError(Exception):
    """A mistake in the command line or the recipe file; `luffy-trl train` prints it in one line and exits 2."""


class LuffyParser(TrlParser):
    """TrlParser whose errors are one line naming the field and the fix, not 250 lines of usage."""

    def error(self, message):
        raise UsageError(f"{message}. Fix the value in the recipe file or on the command line (`luffy-trl train "
                         "--help` lists every field with its type).")


def make_parser() -> TrlParser:
    return LuffyParser((LuffyScriptArguments, MixedPolicyGRPOConfig, ModelConfig), prog="luffy-trl train")


def check_recipe_fields(path, parser: TrlParser) -> None:
    """Refuse a recipe file with a key that is no field of the three dataclasses, naming the closest field."""
    import difflib

    import yaml

    try:
        config = yaml.safe_load(open(path))  # noqa: SIM115
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} must hold a YAML mapping of field: value (see `luffy-trl recipes`).")
    known = {action.dest for action in parser._actions}
    unknown = [key for key in config if key != "env" and key not in known]
    if unknown:
        described = [key + "".join(f" (did you mean {close!r}?)" for close in difflib.get_close_matches(key, known, 1))
                     for key in unknown]
        raise UsageError(f"{path}: unknown field(s): {', '.join(described)}. Correct or remove them in that file "
                         "(`luffy-trl train --help` lists every field).")


def run(argv: list[str] | None = None):
    """Parse `argv` (a recipe by path or packaged name with `--config`, then overrides) and train. Mistakes in the
    command line or the recipe raise `UsageError` before anything loads."""
    from luffy_trl.configs import recipe_path

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            name = arg.split("=", 1)[1]
            argv[i:i + 1] = ["--config", name]
        if name is not None:
            try:
                path = recipe_path(name)
            except FileNotFoundError as err:
                raise UsageError(str(err)) from None
            check_recipe_fields(path, parser)
            argv[i + 1] = str(path)
            break
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as err:  # a value the config classes refuse (__post_init__): the message names the field
        raise UsageError(f"{err} Fix it in the recipe file or on the command line.") from None
    return main(*parsed)


if __name__ == "__main__":
    run()
