"""Evaluate a model on LUFFY's benchmarks (avg@k, pass@k, length, truncation, boxed rate); resumable.

    # LUFFY's protocol on all eight benchmarks (vLLM when installed with a GPU, else transformers)
    python examples/eval_luffy.py --model_name_or_path Elliott/LUFFY-Qwen-Math-7B-Zero --output_dir eval/luffy-7b

    # a base model + LoRA adapter, R1 sampling, a quick slice
    python examples/eval_luffy.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B --adapter_path runs/lora \
        --protocol r1 --max_problems_per_benchmark 20 --num_samples 4 --max_new_tokens 4096

    # from a YAML file (any field of EvalArguments; command-line flags override it)
    python examples/eval_luffy.py --config eval.yaml

Writes `generations.jsonl` (the cache: rerun the same command to resume or to re-score), `results.json`,
`results.md` and `results.png` to `--output_dir`. See docs/evaluation.md.
"""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl import TrlParser  # noqa: E402

from luffy_trl.evaluation.cli import EvalArguments, main  # noqa: E402

if __name__ == "__main__":
    (eval_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(eval_args)
