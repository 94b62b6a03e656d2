"""The README's notebook example: LUFFY on a tiny offline model in a few lines (CPU, no downloads, ~10 s).

    python examples/quickstart.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is built in-process

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer
from luffy_trl.toy import boxed_answer_reward, toy_math_dataset, toy_model, toy_tokenizer

tokenizer = toy_tokenizer()
model = toy_model(tokenizer)
dataset = toy_math_dataset()  # columns: prompt, target (teacher trace), ground_truth
args = MixedPolicyGRPOConfig(
    output_dir="luffy-quickstart", num_generations=4, num_off_policy=1, per_device_train_batch_size=8,
    max_completion_length=48, max_steps=5, learning_rate=1e-2, logging_steps=1, use_cpu=True, bf16=False,
    report_to="none",
)
trainer = MixedPolicyGRPOTrainer(
    model=model, reward_funcs=boxed_answer_reward, args=args, train_dataset=dataset, processing_class=tokenizer
)
trainer.train()

last = trainer.state.log_history[-2]
print(f"teacher reward {last['off_policy/reward_mean']:.2f}, on-policy reward {last['on_policy/reward_mean']:.2f}, "
      f"mean teacher-token probability {last['off_policy/prob_mean']:.4f}")
