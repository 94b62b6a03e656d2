"""`luffy-trl convert` as a command: the recipe's YAML text, the stderr summary, `--check` and the exit status."""

from __future__ import annotations

import argparse
import sys

import yaml

from luffy_trl.convert.mapping import Converted, convert_overrides
from luffy_trl.convert.script import read_overrides


def render(converted: Converted, source: str = "") -> str:
    """The recipe as YAML text: what differs from the script first, a comment per field, then every flag that was
    not mapped with its reason."""
    lines = [f"# Converted from {source} by `luffy-trl convert` (docs/migrating.md)." if source else
             "# Converted by `luffy-trl convert` (docs/migrating.md).",
             "# Launch: accelerate launch --config_file $(luffy-trl recipes --path zero3) -m luffy_trl.cli train "
             "--config THIS_FILE"]
    lines += [f"# NOTE: {note}" for note in converted.notes]
    lines += [f"# DIFFERS FROM THE SCRIPT: {flag}: {reason}" for flag, reason in converted.differs]
    lines += [f"# UNKNOWN FLAG: {flag}={value}" + (f" (did you mean {close}?)" if close else "")
              for flag, value, close in converted.unknown]
    lines.append("")
    for name, (value, comment) in converted.fields.items():
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000, allow_unicode=True).strip()
        text = text[1:-1] if text.startswith("{") else text
        lines.append(f"{text:40s}  # {comment}" if comment else text)
    if converted.unmapped:
        lines += ["", "# Flags with no luffy-trl field:"]
        for flag, value, reason in converted.unmapped:
            lines.append(f"#   {flag}={value}: {reason}")
    return "\n".join(lines) + "\n"


def summary(converted: Converted, flags: int) -> tuple[str, bool]:
    """The stderr report of a conversion, and whether the recipe trains what the script trains."""
    same = not (converted.differs or converted.unknown)
    lines = [f"luffy-trl convert: {flags} flags -> {len(converted.fields)} recipe fields; "
             f"{len(converted.differs)} differ from the script, {len(converted.unknown)} unknown, "
             f"{len(converted.defaulted)} fields defaulted, {len(converted.unmapped)} flags without a field."]
    lines += [f"  note: {note}" for note in converted.notes]
    lines += [f"  DIFFERS: {flag}: {reason}" for flag, reason in converted.differs]
    lines += [f"  UNKNOWN: {flag}={value}" + (f" (did you mean {close}?)" if close else " (a typo, or a flag the "
              "converter does not know: docs/migrating.md)") for flag, value, close in converted.unknown]
    lines += [f"  defaulted: {name}={value!r} ({comment})" for name, value, comment in converted.defaulted]
    if not same:
        lines.append("  The recipe does NOT train what the script trains: fix the script or the recipe (the recipe's "
                     "header lists the same), or pass --allow_differences to accept it.")
    return "\n".join(lines) + "\n", same


def check_recipe(path) -> str:
    """Parse a recipe with `luffy-trl train`'s parser on this machine (CPU, no model loaded); returns a one-line
    description, raises on a field or value the trainer would refuse."""
    from luffy_trl.train import check_recipe_fields, make_parser

    parser = make_parser()
    check_recipe_fields(path, parser)
    script_args, args, model_args = parser.parse_args_and_config(
        ["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    return (f"recipe parses: model {model_args.model_name_or_path}, data {script_args.dataset_name}, groups of "
            f"{args.num_generations} ({args.num_off_policy} teacher), {args.per_device_train_batch_size} sequences per "
            f"process × {args.gradient_accumulation_steps} accumulation steps, loss_type {args.loss_type} "
            "(checked with use_cpu=true and bf16=false; the recipe itself is unchanged)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luffy-trl convert", description="A LUFFY / verl launch script's Hydra "
                                     "overrides -> a luffy-trl recipe YAML (docs/migrating.md).")
    parser.add_argument("script", help="a LUFFY / verl launch script, or a file of key=value Hydra overrides")
    parser.add_argument("-o", "--output", help="write the recipe here instead of printing it")
    parser.add_argument("--gpus", type=int, help="processes to train on (default: trainer.nnodes × n_gpus_per_node)")
    parser.add_argument("--check", action="store_true",
                        help="also parse the recipe with luffy-trl train's parser (CPU, no model): exit 1 if it fails")
    parser.add_argument("--allow_differences", action="store_true",
                        help="exit 0 even when the recipe differs from the script or a flag is unknown")
    args = parser.parse_args(argv)
    try:
        with open(args.script) as f:
            overrides, _ = read_overrides(f.read())
    except OSError as err:
        print(f"luffy-trl convert: {err}", file=sys.stderr)
        return 2
    if not overrides:
        print(f"luffy-trl convert: no key=value Hydra overrides found in {args.script}", file=sys.stderr)
        return 2
    converted = convert_overrides(overrides, gpus=args.gpus)
    text = render(converted, source=args.script)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    report, same = summary(converted, len(overrides))
    sys.stderr.write(report + (f"  wrote {args.output}\n" if args.output else ""))
    if args.check:
        import tempfile

        from luffy_trl.train import UsageError

        with tempfile.TemporaryDirectory() as folder:
            path = args.output or f"{folder}/recipe.yaml"
            if not args.output:
                with open(path, "w") as f:
                    f.write(text)
            try:
                print(f"  check: {check_recipe(path)}", file=sys.stderr)
            except (UsageError, ValueError) as err:
                print(f"  check FAILED: {err}", file=sys.stderr)
                return 1
    return 0 if same or args.allow_differences else 1
