"""`luffy-trl`: the console entry point (also `python -m luffy_trl.cli`, `accelerate launch -m luffy_trl.cli`).

    luffy-trl recipes                         # the packaged recipes and accelerate configs
    luffy-trl recipes --path zero3            # the path of one (for accelerate's --config_file)
    luffy-trl train --config demo_cpu [--max_steps 10 ...]
    accelerate launch --config_file $(luffy-trl recipes --path zero3) -m luffy_trl.cli train --config qwen2.5-math-7b
    luffy-trl eval --model_name_or_path out/ --benchmarks math --max_problems_per_benchmark 50
    luffy-trl convert train.sh [-o recipe.yaml]   # a LUFFY / verl launch script -> a recipe (docs/migrating.md)
"""

from __future__ import annotations

import sys

USAGE = """usage: luffy-trl <command> [args]

commands:
  train     train with a recipe: luffy-trl train --config <recipe name or file> [--field value ...]
  recipes   list the packaged recipes and accelerate configs; --path NAME prints one's path
  eval      evaluate a model or LoRA adapter: luffy-trl eval --model_name_or_path <id|folder|pkg:...>
            [--adapter_path DIR] [--benchmarks math aime | name=problems.jsonl] [--num_samples 4] (docs/evaluation.md)
  convert   turn a LUFFY / verl launch script (or a file of key=value Hydra overrides) into a recipe YAML
"""


def recipes(argv: list[str]) -> int:
    import argparse
    import textwrap

    from luffy_trl.configs import accelerate_config_path, describe, list_accelerate_configs, list_recipes, recipe_path

    parser = argparse.ArgumentParser(prog="luffy-trl recipes", description="Packaged recipes and accelerate configs.")
    parser.add_argument("--path", metavar="NAME", help="print the path of this recipe or accelerate config")
    args = parser.parse_args(argv)
    if args.path:
        try:
            print(recipe_path(args.path))
        except FileNotFoundError:
            try:
                print(accelerate_config_path(args.path))
            except FileNotFoundError as err:
                print(f"luffy-trl recipes: {err}", file=sys.stderr)
                return 2
        return 0
    def show(name, path):
        print(textwrap.fill(describe(path), width=118, initial_indent=f"  {name:24s} ", subsequent_indent=" " * 27))

    print("recipes (luffy-trl train --config NAME):")
    for name, path in list_recipes().items():
        show(name, path)
    print("accelerate configs (accelerate launch --config_file $(luffy-trl recipes --path NAME) ...):")
    for name, path in list_accelerate_configs().items():
        show(name, path)
    return 0


def evaluate(argv: list[str]) -> int:
    """`luffy-trl eval`: `luffy_trl.evaluation.cli` (a model or adapter on LUFFY's benchmarks or any problem file)."""
    from luffy_trl.evaluation.cli import EvalArguments, main
    from luffy_trl.train import LuffyParser, UsageError

    try:
        (args,) = LuffyParser((EvalArguments,), prog="luffy-trl eval").parse_args_and_config(argv)
        main(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"luffy-trl eval: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from luffy_trl.train import UsageError, run

        try:
            run(rest)
        except UsageError as err:
            print(f"luffy-trl train: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "eval":
        return evaluate(rest)
    if command == "recipes":
        return recipes(rest)
    if command == "convert":
        from luffy_trl.convert import main as convert

        return convert(rest)
    print(f"luffy-trl: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
