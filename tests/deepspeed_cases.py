"""Scenarios run under DeepSpeed (tests/scripts/deepspeed_scenarios.py, two CPU processes) and, for reference, under
DDP (torchrun) and in one process (the test itself). Each returns a JSON-able dict; large tensors go to `.pt` files
written by the main process.

All scenarios share the tiny Qwen2 model of `conftest.build_model` and take a handful of optimiser steps.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from conftest import build_model, build_tokenizer, math_dataset, tiny_args
from trl import GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.toy import boxed_answer_reward

G = 4
# Rows per optimiser step over all processes in the parity scenario: 2 processes × 4 rows × GA 2.
PARITY_GLOBAL_ROWS_PER_MICRO_STEP = 8
PARITY_ARMS = {
    # Plain SGD without weight decay: the parameter change of a step is -lr × gradient, so the parameters after each
    # step check the gradient itself (a wrong scale, e.g. 1/GA applied twice, or a missing all-reduce shows).
    "sgd": {"optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 1e6, "weight_decay": 0.0, "beta": 0.0},
    # AdamW with weight decay and clipping, and a KL term to the reference model (beta > 0). Adam's first update
    # lr·g/(|g| + eps) amplifies fp32 rounding in g where |g| is near eps (with the default eps 1e-8, entries with
    # |g| ~ 1e-7 moved by 1e-3 between one process and ZeRO-3), so eps is raised to 1e-4: the update then depends
    # smoothly (and, unlike with a tiny eps, with its scale) on the gradient.
    "adamw_beta": {"learning_rate": 1e-2, "adam_epsilon": 1e-4, "beta": 0.04},
    # The SGD arm with each micro-batch packed into one sequence (`pack_sequences`): the same parameters as "sgd".
    "sgd_packed": {"optim": "sgd", "learning_rate": 0.05, "max_grad_norm": 1e6, "weight_decay": 0.0, "beta": 0.0,
                   "pack_sequences": "always"},
}


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def full_params(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the trained model, whole (ZeRO-3 partitions gathered), on CPU, by name."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    named = list(model.named_parameters())
    gathered = contextlib.nullcontext()
    if getattr(trainer, "is_deepspeed_enabled", False):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gathered:
        return {name.removeprefix("module."): p.detach().cpu().clone() for name, p in named}


class ParamsEachStep:
    """A callback that keeps the whole parameters after every optimiser step (collective under ZeRO-3)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(full_params(self.trainer))

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def toy_model_path(out_dir: str) -> str:
    """`conftest.build_model` saved to a folder of this process (TRL loads a path itself: under ZeRO-3 through
    `zero.Init`, and the reference model of `beta > 0` needs one)."""
    rank, _ = world()
    path = os.path.join(out_dir, f"toy_model_rank{rank}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tokenizer = build_tokenizer()
        build_model(tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def fixed_completion(ids: list[int], eos: int) -> list[int]:
    """A completion that depends only on the prompt: identical on any number of processes and any backend."""
    key = sum(ids)
    return [3 + key % 97] + [3 + (key + 7 * j) % 89 for j in range(1 + key % 6)] + [eos]


@contextlib.contextmanager
def fixed_generation():
    """Replace TRL's generation by `fixed_completion` (the teacher slots are still filled by luffy-trl)."""
    original = GRPOTrainer._generate_single_turn

    def fake(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [fixed_completion(list(map(int, ids)), self.eos_token_ids[0]) for ids in prompt_ids], None

    GRPOTrainer._generate_single_turn = fake
    try:
        yield
    finally:
        GRPOTrainer._generate_single_turn = original


def length_reward(completions, **kwargs):
    """A second reward with spread inside the on-policy rows' values across groups."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [(len(t) % 5) / 4 for t in texts]


def parity(out_dir: str, arm: str) -> dict:
    """Fixed completions, GA 2, three optimiser steps; the loss and grad norm of each step and (main process) the
    parameters after each step in `<out_dir>/parity_<arm>.pt`. One process takes the whole batch."""
    rank, size = world()
    tokenizer = build_tokenizer()
    with fixed_generation():
        trainer = MixedPolicyGRPOTrainer(
            model=toy_model_path(out_dir), reward_funcs=[boxed_answer_reward, length_reward],
            processing_class=tokenizer, train_dataset=math_dataset(),
            args=tiny_args(os.path.join(out_dir, "parity_" + arm), max_steps=3, gradient_accumulation_steps=2,
                           per_device_train_batch_size=PARITY_GLOBAL_ROWS_PER_MICRO_STEP // size,
                           **PARITY_ARMS[arm]),
        )
        params = ParamsEachStep(trainer)
        trainer.add_callback(params)
        initial = full_params(trainer)
        trainer.train()
    if rank == 0:
        torch.save([initial, *params.steps], os.path.join(out_dir, f"parity_{arm}.pt"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    keys = ("loss", "grad_norm", "kl", "reward", "off_policy/fraction_of_rows", "batching/padding_ratio",
            "batching/packing_fallbacks")
    return {"logs": [{k: h[k] for k in keys if k in h} for h in logs], "zero_stage": zero_stage(trainer),
            "offload": offload_devices(trainer),
            "optimizer": type(getattr(trainer.model_wrapped, "basic_optimizer", None) or trainer.optimizer).__name__}


def offload_devices(trainer) -> dict:
    """Where DeepSpeed offloads the optimizer state and the parameters ('none' or 'cpu'), from the running config."""
    if not trainer.is_deepspeed_enabled:
        return {}
    zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return {kind: zero.get(f"offload_{kind}", {}).get("device", "none") for kind in ("optimizer", "param")}


def write_json(out_dir: str, name: str, data: dict) -> None:
    rank, _ = world()
    with open(os.path.join(out_dir, f"{name}_rank{rank}.json"), "w") as f:
        json.dump(data, f)


def groups(out_dir: str) -> dict:
    """Groups that straddle the processes (3 rows per process and micro-step, GA 2: 12 global rows = 3 groups of 4,
    the middle one split), real sampling; records what the reward function saw and the advantages (checked like
    test_distributed.py). Then `save_model` (the shipped zero3.yaml settings under ZeRO-3) to `<out_dir>/saved`;
    the main process writes the whole trained parameters to `groups.pt`."""
    from conftest import recording_boxed_reward, train_recording_batches

    records = []

    reward = recording_boxed_reward(records)

    trainer = MixedPolicyGRPOTrainer(
        model=toy_model_path(out_dir), reward_funcs=reward, processing_class=build_tokenizer(),
        args=tiny_args(os.path.join(out_dir, "groups"), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                       max_completion_length=40, max_steps=2),
        train_dataset=math_dataset(),
    )
    train_recording_batches(trainer, records, os.path.join(out_dir, "groups_records_rank{}.json"))
    trained = full_params(trainer)
    trainer.save_model(os.path.join(out_dir, "saved"))
    if world()[0] == 0:
        torch.save(trained, os.path.join(out_dir, "groups.pt"))
    return {"zero_stage": zero_stage(trainer)}


def zero_stage(trainer) -> int | None:
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return None if plugin is None else plugin.zero_stage


def nogather(out_dir: str) -> dict:
    """Real generation with and without `ds3_gather_for_generation`; 2 rows per process, groups of 4 with 2 teacher
    slots, so process 1 holds only teacher rows (and generates one dummy row to keep the collectives paired)."""
    result = {}
    for gather_weights in (True, False):
        seen = []

        def reward(completions, is_off_policy, seen=seen, **kwargs):
            seen.append({"texts": [c[0]["content"] for c in completions], "flags": list(is_off_policy)})
            return [float(len(c[0]["content"]) % 3 == 0) for c in completions]

        name = f"nogather_{'gathered' if gather_weights else 'partitioned'}"
        trainer = MixedPolicyGRPOTrainer(
            model=toy_model_path(out_dir), reward_funcs=reward, processing_class=build_tokenizer(),
            args=tiny_args(os.path.join(out_dir, name), per_device_train_batch_size=2, num_off_policy=2,
                           steps_per_generation=1, max_steps=2, ds3_gather_for_generation=gather_weights),
            train_dataset=math_dataset(),
        )
        trainer.train()
        trained = full_params(trainer)
        if world()[0] == 0:
            torch.save(trained, os.path.join(out_dir, name + ".pt"))
        result[name] = {"batches": seen, "zero_stage": zero_stage(trainer)}
    return result


LORA_TARGETS = ["q_proj", "v_proj"]


def lora(out_dir: str) -> dict:
    """LoRA (peft) training; the whole parameters before and after (`lora.pt`) and the adapter saved by
    `save_model` to `<out_dir>/lora_adapter`."""
    from peft import LoraConfig

    trainer = MixedPolicyGRPOTrainer(
        model=toy_model_path(out_dir), reward_funcs=boxed_answer_reward, processing_class=build_tokenizer(),
        args=tiny_args(os.path.join(out_dir, "lora"), per_device_train_batch_size=4, max_steps=2,
                       learning_rate=5e-2),
        train_dataset=math_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    before = full_params(trainer)
    trainer.train()
    after = full_params(trainer)
    trainer.save_model(os.path.join(out_dir, "lora_adapter"))
    if world()[0] == 0:
        torch.save({"before": before, "after": after}, os.path.join(out_dir, "lora.pt"))
    return {"zero_stage": zero_stage(trainer)}


EVAL_PROBLEMS = 5
EVAL_BATCH_SIZE = 2


def eval_problems():
    from luffy_trl.evaluation.runner import Problem

    return [Problem("toy", str(i), tuple(row["prompt"]), row["ground_truth"])
            for i, row in enumerate(math_dataset(EVAL_PROBLEMS))]


def eval_protocol():
    from luffy_trl.evaluation.protocols import LUFFY

    return LUFFY.with_overrides(max_new_tokens=6, temperature=0.0)


def evaluation(out_dir: str) -> dict:
    """`LuffyEvalCallback` with uneven shares (5 problems on 2 processes, batch size 2: 3 and 2 requests, 2 and 1
    `generate` calls without padding): once before training (the initial weights, comparable with one process) and
    after each of two training steps."""
    from luffy_trl.evaluation import callback as callback_module
    from luffy_trl.evaluation.callback import LuffyEvalCallback

    scored = []  # per evaluation: (requests, gathered samples) passed to `summarize`; dummies must not be among them
    summarize = callback_module.summarize

    def counting_summarize(requests, samples, *args, **kwargs):
        scored.append((len(requests), len(samples)))
        return summarize(requests, samples, *args, **kwargs)

    callback_module.summarize = counting_summarize
    trainer = MixedPolicyGRPOTrainer(
        model=toy_model_path(out_dir), reward_funcs=boxed_answer_reward, processing_class=build_tokenizer(),
        args=tiny_args(os.path.join(out_dir, "evaluation"), per_device_train_batch_size=4, max_steps=2),
        train_dataset=math_dataset(),
    )
    callback = LuffyEvalCallback(trainer, eval_problems(), eval_steps=1, batch_size=EVAL_BATCH_SIZE,
                                 protocol=eval_protocol())
    try:
        initial = callback.evaluate()
        trainer.add_callback(callback)
        trainer.train()
    finally:
        callback_module.summarize = summarize
    entries = [h for h in trainer.state.log_history if any(k.startswith("eval_bench/") for k in h)]
    return {"initial": initial, "entries": entries, "scored": scored, "zero_stage": zero_stage(trainer)}


RESUME_CHECKPOINT = 1  # micro-steps 0-1 of a generation batch of 4 (GA 2, steps_per_generation 4): inside it
RESUME_MAX_STEPS = 3


def resume(out_dir: str, drop_generation_state: bool = False) -> dict:
    """`steps_per_generation` (4) > GA (2): an uninterrupted run of 3 steps saving a checkpoint every step, then a
    run resumed from checkpoint-1 (inside a generation batch). Returns what each micro-step trained on (prompt and
    completion token sums per row) for both; the main process writes the final parameters to `resume_<run>.pt`.
    `drop_generation_state`: delete luffy-trl's generation state from the checkpoint first (an older checkpoint)."""
    result = {}
    for name in ("uninterrupted", "resumed"):
        trained_on = []
        trainer = MixedPolicyGRPOTrainer(
            model=toy_model_path(out_dir), reward_funcs=boxed_answer_reward,
            processing_class=build_tokenizer(),
            args=tiny_args(os.path.join(out_dir, "resume_" + name), per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, steps_per_generation=4, max_steps=RESUME_MAX_STEPS,
                           save_strategy="steps", save_steps=1),
            train_dataset=math_dataset(),
        )
        original = trainer._compute_loss

        def record(model, inputs, original=original, trainer=trainer, trained_on=trained_on):
            prompts = (inputs["prompt_ids"] * inputs["prompt_mask"]).sum(1).tolist()
            completions = (inputs["completion_ids"] * inputs["completion_mask"]).sum(1).tolist()
            trained_on.append({"step": trainer.state.global_step, "rows": sorted(zip(prompts, completions))})
            return original(model, inputs)

        trainer._compute_loss = record
        checkpoint = None
        if name == "resumed":
            checkpoint = os.path.join(out_dir, "resume_uninterrupted", f"checkpoint-{RESUME_CHECKPOINT}")
            for file in os.listdir(checkpoint) if drop_generation_state else ():
                if file.startswith("luffy_generation_state"):
                    os.remove(os.path.join(checkpoint, file))
        trainer.train(resume_from_checkpoint=checkpoint)
        result[name] = trained_on
        trained = full_params(trainer)
        if world()[0] == 0:
            torch.save(trained, os.path.join(out_dir, f"resume_{name}.pt"))
    result["zero_stage"] = zero_stage(trainer)
    return result
