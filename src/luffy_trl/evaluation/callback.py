"""`LuffyEvalCallback`: benchmark metrics every N training steps, logged through the trainer's loggers.

Distributed runs: every process generates its own contiguous share of the samples with its unwrapped copy of the
model (`trl.models.utils.unwrap_model_for_generation`, which gathers ZeRO-3 parameters), scores its share, and
`accelerate.utils.gather_object` collects the scored samples on every process. Every process then computes the same
metrics and calls `transformers.Trainer.log`, as the trainer itself does for training metrics (its reporting
integrations write from the main process only, `state.log_history` is the same everywhere). All processes take part
in every collective, so none waits for another: there is no main-only branch that could deadlock.

Under DeepSpeed ZeRO-3 transformers generates with `synced_gpus=True`: every decoding step of every `generate` call
is a collective (parameter gathering), so every process must make the same number of `generate` calls. Shares that
differ in size (5 samples on 2 processes) would give different numbers of batches; `equal_shares` pads the shorter
shares with dummy requests (copies of a real prompt under a key no problem uses) whose generations are dropped
before scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from transformers import Trainer, TrainerCallback

from luffy_trl.evaluation.backends import TransformersBackend
from luffy_trl.evaluation.protocols import LUFFY, Protocol
from luffy_trl.evaluation.runner import (
    GenerationCache,
    Problem,
    Request,
    build_requests,
    generate,
    score,
    summarize,
)


def flatten_metrics(summary: dict, prefix: str = "eval_bench") -> dict[str, float]:
    """`<prefix>/<benchmark>/avg@<k>`, `.../pass@<j>`, `.../mean_length`, `.../truncation_rate`, `.../boxed_rate`,
    and `<prefix>/avg` / `<prefix>/ood_avg` (unweighted mean accuracy of the math / multiple-choice benchmarks)."""
    metrics = {}
    for name, m in summary["benchmarks"].items():
        metrics[f"{prefix}/{name}/avg@{m['k']}"] = m["accuracy"]
        for key, value in m.items():
            if key.startswith("pass@") or key in ("mean_length", "truncation_rate", "boxed_rate"):
                metrics[f"{prefix}/{name}/{key}"] = value
    for group, key in (("math", "avg"), ("ood", "ood_avg")):
        if group in summary["averages"]:
            metrics[f"{prefix}/{key}"] = summary["averages"][group]["accuracy"]
    return metrics


def equal_shares(requests: Sequence[Request], num_processes: int, process_index: int) -> tuple[list[Request], int]:
    """This process's contiguous share of `requests` (the split of `accelerate`'s `split_between_processes`: the first
    `len % num_processes` processes take one more), padded to the largest share with dummy requests so that every
    process makes the same number of `generate` calls. Returns (share + padding, number of real requests); the
    padding repeats the share's last request (`requests[0]` for an empty share) as sample `-1, -2, ...`, keys no
    real request has, so that the generation cache never mixes them up."""
    if not requests:
        raise ValueError("equal_shares needs at least one request")
    base, extra = divmod(len(requests), num_processes)
    start = process_index * base + min(process_index, extra)
    mine = list(requests[start : start + base + (process_index < extra)])
    largest = base + (extra > 0)
    filler = mine[-1] if mine else requests[0]
    padding = [replace(filler, sample=-1 - k) for k in range(largest - len(mine))]
    return mine + padding, len(mine)


class LuffyEvalCallback(TrainerCallback):
    """Evaluate `problems` with the model being trained every `eval_steps` optimizer steps.

    Args:
        trainer: the trainer (TRL's convention for callbacks that generate): its model, processing class,
            accelerator and `log` are used. Add the callback with `trainer.add_callback(callback)`.
        problems: the problems to evaluate, e.g. `load_problems(luffy_benchmark("aime", data_dir), max_problems=8)`
            for each benchmark of a small subset.
        protocol: prompts, sampling and samples per problem (default `LUFFY`; shorten `max_new_tokens` and the
            samples for frequent evaluation, e.g. `LUFFY.with_overrides(max_new_tokens=1024, num_samples=4)`).
        eval_steps: evaluate when `state.global_step` is a multiple of it.
        batch_size: prompts per `generate` call.
        pass_ks: the pass@k to log (default: powers of two up to the samples per problem).
        prefix: the metric namespace.

    Generation uses transformers `generate` in eval mode, without gradients and with the caller's random state
    restored afterwards, so training continues exactly as without the callback.
    """

    def __init__(self, trainer: Trainer, problems: Sequence[Problem], *, protocol: Protocol = LUFFY,
                 eval_steps: int = 100, batch_size: int = 8, pass_ks: Sequence[int] | None = None,
                 prefix: str = "eval_bench"):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be at least 1, got {eval_steps}")
        if not problems:
            raise ValueError("LuffyEvalCallback needs at least one problem")
        self.trainer, self.problems, self.protocol = trainer, list(problems), protocol
        self.eval_steps, self.batch_size, self.pass_ks, self.prefix = eval_steps, batch_size, pass_ks, prefix

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Evaluate now and log the metrics (at the trainer's current step); returns them."""
        from accelerate.utils import gather_object
        from trl.models.utils import unwrap_model_for_generation

        trainer, accelerator = self.trainer, self.trainer.accelerator
        tokenizer = trainer.processing_class
        requests = build_requests(self.problems, self.protocol, tokenizer)
        padded, num_real = equal_shares(requests, accelerator.num_processes, accelerator.process_index)
        mine = padded[:num_real]
        with unwrap_model_for_generation(
            trainer.model_wrapped, accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            was_training = model.training
            model.eval()
            cache = GenerationCache()
            try:
                generate(TransformersBackend(model, tokenizer), padded, self.protocol, cache, self.batch_size)
            finally:
                model.train(was_training)
        samples = score(mine, [cache[r.key] for r in mine], self.protocol)
        metrics = flatten_metrics(summarize(requests, gather_object(samples), self.pass_ks), self.prefix)
        # `Trainer.log`, not `trainer.log`: GRPOTrainer.log would also flush its running training-metric averages
        # into this entry. This one holds only the evaluation metrics (plus `epoch` and `step`). Logging clears
        # `control.should_log`, which the trainer's own logging of this step still needs.
        should_log = trainer.control.should_log
        Trainer.log(trainer, dict(metrics))
        trainer.control.should_log = should_log
        return metrics
