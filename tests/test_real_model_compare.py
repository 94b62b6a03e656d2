"""Short version of examples/real_model_compare.py (LUFFY vs GRPO vs SFT on SmolLM2-135M-Instruct, offline)."""

import pytest
import torch
from conftest import requires_smollm
from test_examples import load

# One prompt per step, groups of 2 (LUFFY: 1 sampled + 1 teacher); a large LoRA learning rate so that two steps move
# the log-likelihood of the traces clearly.
TINY = ["--demo_train_rows", "4", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3"]


def test_heldout_sets_hold_no_training_question():
    from luffy_trl.tasks.arithmetic import OOD_STORIES, STORIES, arithmetic_dataset

    example = load("real_model_compare")
    train = {m[-1]["content"] for m in arithmetic_dataset(256, seed=0)["prompt"]}
    sets = example.heldout_sets(train, rows=40)
    questions = {name: [m[-1]["content"] for m in d["prompt"]] for name, d in sets.items()}
    assert all(len(q) == 40 for q in questions.values())
    assert not (set(questions["id"]) | set(questions["ood"])) & train
    stem = [story.split("{a}")[0] for story, _ in STORIES]
    ood_stem = [story.split("{a}")[0] for story, _ in OOD_STORIES]
    assert all(any(q.startswith(s) for s in stem) for q in questions["id"])
    assert all(any(q.startswith(s) for s in ood_stem) and not any(q.startswith(s) for s in stem)
               for q in questions["ood"])
    # the sets are fixed: another call gives the same problems
    assert example.heldout_sets(train, rows=40)["ood"]["prompt"] == sets["ood"]["prompt"]


def test_answer_form_tells_the_right_setup_from_the_right_arithmetic():
    """`answer_form` on hand-checked answers, and on every teacher trace: the traces set up the problem right, work
    in columns, and every equation they state holds (the harder set's traces state theirs without columns)."""
    from luffy_trl.tasks.arithmetic import answer_form, arithmetic_dataset, harder_dataset

    # right operands and operation, wrong result: the setup counts, the equation does not hold
    assert answer_form("We know that 69 - 28 = 18. So, the answer is \\boxed{18}.", "41") == \
        {"setup": True, "column_steps": False, "equations": 1, "equations_true": 0}
    # the wrong operation: 60 + 32 is not 28, and the stated sum (96) is wrong too
    assert answer_form("the total is 60 + 32 = 96, so \\boxed{96}", "28") == \
        {"setup": False, "column_steps": False, "equations": 1, "equations_true": 0}
    # a bare number: no expression, no equation
    assert answer_form("\\boxed{28}", "28") == {"setup": False, "column_steps": False, "equations": 0,
                                                 "equations_true": 0}
    # three terms, evaluated left to right; a negative stated result is read with its sign
    assert answer_form("610 - 156 + 147 = 601 and 3 - 5 = -2", "601")["equations_true"] == 2
    for row in arithmetic_dataset(64, seed=3):
        form = answer_form(row["target"], row["ground_truth"])
        assert form["setup"] and form["column_steps"] and form["equations"] == 2, row["target"]
        assert form["equations_true"] == form["equations"], row["target"]
    for row in harder_dataset(32, seed=3):
        form = answer_form(row["target"], row["ground_truth"])
        assert form["equations"] == form["equations_true"] == 2 and not form["column_steps"], row["target"]


@requires_smollm
@pytest.mark.slow
@pytest.mark.smollm
def test_real_model_grpo_has_no_gradient_at_zero_reward_and_luffy_learns_the_traces(tmp_path):
    """GRPO on SmolLM2: every sampled answer scores 0, so every advantage is 0 and the gradient is exactly zero: LoRA's
    B stays zero (AdamW only decays A by lr * weight_decay), and the model, hence the traces' log-likelihood, does not
    change. LUFFY from the same start: the teacher slot scores 1, the gradient is non-zero and the held-out teacher
    traces become more likely."""
    example = load("real_model_compare")
    sets = example.heldout_sets(set(), rows=4)
    traces = (list(sets["id"]["prompt"]), list(sets["id"]["target"]))
    for name, steps in (("grpo", 1), ("luffy", 2)):
        script_args, args, model_args = example.parse([*TINY, "--max_steps", str(steps)], example.ARMS[name][1],
                                                      tmp_path / name)
        trainer = example.build_trainer(name, script_args, args, model_args)
        model, tokenizer = trainer.model, trainer.processing_class
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        before = example.trace_logprob(model, tokenizer, *traces)
        trainer.train()
        after = example.trace_logprob(model, tokenizer, *traces)
        logs = [h for h in trainer.state.log_history if "reward" in h]
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if name == "grpo":
            assert [h["reward"] for h in logs] == [0.0]  # the premise: no sampled answer is right
            assert logs[0]["grad_norm"] == 0.0
            decay = 1 - args.learning_rate * args.weight_decay  # LUFFY's AdamW weight_decay (0.01)
            for n, p in trained.items():
                expected = torch.zeros_like(p) if "lora_B" in n else start[n] * decay
                torch.testing.assert_close(p, expected, rtol=1e-6, atol=0, msg=n)
            assert after == before
        else:
            assert all(h["on_policy/reward_mean"] == 0.0 and h["off_policy/reward_mean"] == 1.0 for h in logs)
            assert all(h["grad_norm"] > 0 for h in logs)
            assert any(not torch.equal(p, start[n]) for n, p in trained.items() if "lora_B" in n)
            assert after > before + 0.05, (before, after)
