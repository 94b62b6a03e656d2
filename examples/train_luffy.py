"""Train with LUFFY: a thin wrapper over the package's entry point (`luffy-trl train`, `luffy_trl.train`).

    python examples/train_luffy.py --config demo_cpu                  # a packaged recipe by name, or a YAML path
    accelerate launch --config_file $(luffy-trl recipes --path zero3) examples/train_luffy.py \
        --config qwen2.5-math-7b

Without a checkout, the same is `luffy-trl train --config ...` or `accelerate launch -m luffy_trl.cli train ...`.
"""

from luffy_trl.train import (  # noqa: F401  (re-exported for scripts that import this file)
    LuffyScriptArguments,
    build_pretrained,
    build_sorting,
    main,
    make_parser,
    resolve_model_path,
    resolve_reward_funcs,
    run,
)

__all__ = ["LuffyScriptArguments", "build_pretrained", "build_sorting", "main", "make_parser", "resolve_model_path",
           "resolve_reward_funcs", "run"]

if __name__ == "__main__":
    run()
