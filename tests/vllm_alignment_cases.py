"""Batches that once desynchronised vLLM server mode across processes (issue 16), shared by the two-process script
`scripts/two_process_vllm_alignment.py` and the single-process reference in `test_vllm_alignment.py`.

Each case is a global generation batch (TRL's order: groups are contiguous runs of G rows) that two processes split
in halves. Generation goes through TRL's real vLLM code in two modes: server mode with a fake server
(`attach_fake_vllm_server`: prompts gathered over processes, deduplicated by position, sliced equally) and
tensor-parallel colocate with a fake `LLM` (`attach_fake_vllm_colocate`: prompts gathered over the tensor-parallel
group, sliced equally). On one process "colocate" is plain single-GPU colocate (row by row, no gather).
"""

from conftest import (
    attach_fake_vllm_colocate,
    attach_fake_vllm_server,
    build_model,
    contains_answer_reward,
    math_dataset,
    prompt_marker,
    tiny_args,
)

from luffy_trl import MixedPolicyGRPOTrainer

# name -> (trainer name, dataset row of each group)
CASES = {
    # G = 4, one group split 2 / 2: process 0 holds slots 0-1 (no teacher row), process 1 slots 2-3 (teacher at 3).
    "one_process_without_teacher": ("g4", [0]),
    # G = 8, one group split 4 / 4: process 0 holds slots 0-3, process 1 slots 4-7 (teacher at 7).
    "g8_split_in_halves": ("g8", [1]),
    # G = 4, whole groups on each process: subset generation (G - k completions per prompt).
    "whole_groups": ("g4", [2, 3, 4, 5]),
    # G = 4, 12 rows: the middle group straddles the processes.
    "straddling_groups": ("g4", [6, 7, 0]),
    # G = 4, whole groups; the trace of the last group (on process 1 only) is missing.
    "missing_trace_on_one_process": ("g4_missing", [0, 1, 2, 7]),
    # G = 4, 8 whole groups and a group_share schedule at 0.15: most groups, and maybe a whole process, get none.
    "group_share_near_zero": ("g4_share", [0, 1, 2, 3, 4, 5, 6, 7]),
}


MODES = ("server", "colocate")


def build_trainers(tokenizer, output_dir, mode="server"):
    """The trainers the cases use, each generating through TRL's vLLM code in `mode` with a fake engine."""
    dataset = math_dataset()
    missing = dataset.map(lambda row, i: {"target": None if i == 7 else row["target"]}, with_indices=True)
    specs = {
        "g4": (dataset, {}),
        "g8": (dataset, {"num_generations": 8}),
        "g4_missing": (missing, {}),
        "g4_share": (dataset, {"off_policy_schedule_target": "group_share", "off_policy_schedule_start": 0.15}),
    }
    trainers = {}
    for name, (data, overrides) in specs.items():
        trainer = MixedPolicyGRPOTrainer(
            model=build_model(tokenizer), reward_funcs=contains_answer_reward, train_dataset=data,
            processing_class=tokenizer, args=tiny_args(f"{output_dir}/{mode}-{name}", max_steps=1, **overrides),
        )
        (attach_fake_vllm_server if mode == "server" else attach_fake_vllm_colocate)(trainer)
        trainers[name] = (trainer, data)
    return trainers


def global_rows(trainers, case):
    name, groups = CASES[case]
    trainer, data = trainers[name]
    return trainer, [data[i] for i in groups for _ in range(trainer.num_generations)]


def run_case(trainer, rows) -> dict:
    """Generate one batch; per local row: teacher flag and the fake server's sample index (None for teacher rows)."""
    out = trainer._generate_and_score_completions(rows)
    samples = []
    for ids, mask, completion, off in zip(out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                          out["is_off_policy"]):
        if off:
            samples.append(None)
            continue
        assert completion[0].item() == prompt_marker(ids[mask.bool()].tolist()), "a completion of another prompt"
        samples.append(completion[1].item() - 3)
    return {"is_off_policy": out["is_off_policy"].tolist(), "sample_index": samples,
            "discarded": trainer._metrics["train"]["off_policy/discarded_generations"][-1]}


def engine_calls(trainer) -> list:
    """Server mode: (unique prompts, completions per prompt) per request; colocate: rows per `LLM.generate`."""
    generation = trainer.vllm_generation
    return generation.vllm_client.calls if generation.mode == "server" else generation.llm.calls
