"""The live teacher during training (luffy_trl.trainer.live_teacher): which groups ask, verification, the shared trace
cache, filled teacher slots in later epochs, metrics, an HTTP teacher against the fake server."""

import pathlib
import re

import pytest
import torch
from conftest import (
    build_model,
    contains_answer_reward,
    math_dataset,
    requires_torchrun,
    run_two_processes,
    tiny_args,
)

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.evaluation.backends import Generation
from luffy_trl.traces.fake_server import FakeOpenAIServer
from luffy_trl.traces.live import groups_needing_trace
from luffy_trl.trainer.live_teacher import LIVE_CACHE_FILE

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_groups_needing_trace_exact():
    nan = float("nan")
    # 4 groups of 3: teacher row in group 0; group 1 all failed; group 2 one solved; group 3 NaN and 0.
    total = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0, nan, 0, 0], dtype=torch.float)
    is_off = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    assert groups_needing_trace(total, is_off, 3, "all_fail").tolist() == [False, True, False, True]
    assert groups_needing_trace(total, is_off, 3, "missing").tolist() == [False, True, True, True]
    assert groups_needing_trace(total * 0.5, is_off, 3, "all_fail", threshold=0.5).tolist() == [
        False, True, False, True]
    with pytest.raises(ValueError, match="when must be one of"):
        groups_needing_trace(total, is_off, 3, "sometimes")


class AnsweringTeacher:
    """Answers each prompt with the toy dataset's worked trace, except prompts containing `wrong` (a wrong answer)."""

    name = "answering"
    tokenizer = None

    def __init__(self, wrong: str):
        self.wrong, self.asked = wrong, []

    def stream(self, requests, protocol):
        for request in requests:
            question = request.problem.prompt[-1]["content"]
            self.asked.append(question)
            a, b = map(int, re.findall(r"\d+", question))
            answer = a + b + (1 if self.wrong in question else 0)
            yield request, Generation(f"{a} + {b} = {answer}. The answer is \\boxed{{{answer}}}.", 9, False)


def _without_traces(dataset, rows):
    return dataset.map(lambda row, i: {"target": [] if i in rows else row["target"]}, with_indices=True)


@pytest.mark.slow
def test_live_teacher_fills_traceless_slots_in_later_epochs(tokenizer, tmp_path):
    """4 prompts, 2 without a trace (one the teacher answers wrongly). The toy policy never solves anything, so every
    trace-less group asks ("all_fail"), once; the verified trace fills its teacher slots in the next epoch; the wrong
    one is rejected and never used."""
    dataset = _without_traces(math_dataset(4), {1, 2})
    teacher = AnsweringTeacher(wrong="2 + 3")
    args = tiny_args(tmp_path, max_steps=4, max_completion_length=32, live_teacher_num_samples=2)
    trainer = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                     train_dataset=dataset, processing_class=tokenizer, args=args,
                                     live_teacher=teacher)
    seen = []
    original = trainer._generate_and_score_completions

    def record(inputs):
        output = original(inputs)
        client = trainer._live["client"]
        assert client.wait_idle(10)  # deterministic test: let the background thread finish before the next batch
        texts = tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
        seen.append([(row["prompt"][0]["content"], bool(off), text)
                     for row, off, text in zip(inputs, output["is_off_policy"].tolist(), texts)])
        return output

    trainer._generate_and_score_completions = record
    trainer.train()
    logs = [h for h in trainer.state.log_history if "live_teacher/requested" in h]
    assert sum(h["live_teacher/requested"] for h in logs) == 2 and len(teacher.asked) == 4  # 2 prompts x 2
    assert sum(h["live_teacher/verified"] for h in logs) == 1 and sum(h["live_teacher/unsolved"] for h in logs) == 1
    assert len(trainer._live["traces"]) == 1 and logs[-1]["live_teacher/cache_size"] == 1
    live_prompts = {"What is 1 + 2?"}
    filled = 0
    for batch in seen:
        for question, off, text in batch:
            if question in live_prompts and off:
                a, b = map(int, re.findall(r"\d+", question))
                assert text.startswith(f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}")
                filled += 1
            if question == "What is 2 + 3?":
                assert not off  # rejected: never a teacher row
    assert filled == sum(h["live_teacher/filled"] for h in logs) > 0
    documented = set(re.findall(r"`([a-z_]+(?:/[a-z_<>]+)*)`", DOCS.read_text()))
    assert {k for k in logs[0] if k.startswith("live_teacher/")} <= documented


@pytest.mark.slow
def test_live_teacher_over_http_caches_replies_for_a_resumed_run(tokenizer, tmp_path):
    dataset = _without_traces(math_dataset(4), {0, 1, 2, 3})

    def answer(prompt):
        a, b = map(int, re.findall(r"\d+", prompt))
        return f"The answer is \\boxed{{{a + b}}}."

    with FakeOpenAIServer(answer, faults={"What is 1 + 2": ["500"]}) as server:
        args = tiny_args(tmp_path, max_steps=2, live_teacher_url=server.base_url, live_teacher_model="fake",
                         live_teacher_num_samples=1, live_teacher_when="missing")
        trainer = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                         train_dataset=dataset, processing_class=tokenizer, args=args)
        trainer._live["client"].teacher.backoff = 0.01
        trainer.train()
        client = trainer._live["client"]
        assert client.wait_idle(20)
        assert len(server.requests) == 4 + 1  # every prompt once, one retry after the injected 500
        assert client.teacher.stats["retry/http_500"] == 1
        cached = (tmp_path / LIVE_CACHE_FILE).read_text().splitlines()
        assert len(cached) == 4

        # A new trainer on the same output_dir reads the replies from the cache instead of asking again.
        trainer2 = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                          train_dataset=dataset, processing_class=tokenizer, args=args)
        trainer2.train()
        assert trainer2._live["client"].wait_idle(20) and len(server.requests) == 5


def test_live_teacher_configuration_errors(tokenizer, tmp_path):
    from luffy_trl import MixedPolicyGRPOConfig

    with pytest.raises(ValueError, match="needs num_off_policy > 0"):
        MixedPolicyGRPOConfig(str(tmp_path), live_teacher_url="http://127.0.0.1:1/v1", num_off_policy=0,
                              report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="live_teacher_when must be"):
        MixedPolicyGRPOConfig(str(tmp_path), live_teacher_when="often", report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="needs num_off_policy > 0"):
        MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                               train_dataset=math_dataset(4), processing_class=tokenizer,
                               args=tiny_args(tmp_path, num_off_policy=0), live_teacher=AnsweringTeacher(wrong="-"))


LIVE_FIELDS = ["live_teacher_url", "live_teacher_model", "live_teacher_when", "live_teacher_num_samples",
               "live_teacher_max_new_tokens", "live_teacher_concurrency", "live_teacher_timeout",
               "live_teacher_api_key_env"]


def test_live_teacher_fields_have_help_and_docs(tmp_path):
    import dataclasses

    from test_config import DOCS as CONFIG_DOCS
    from test_config import docs_table_rows

    from luffy_trl import MixedPolicyGRPOConfig

    config = MixedPolicyGRPOConfig(str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    fields = {f.name: f for f in dataclasses.fields(MixedPolicyGRPOConfig)}
    rows = docs_table_rows(CONFIG_DOCS / "configuration.md")
    for name in LIVE_FIELDS:
        assert fields[name].metadata.get("help") and name in MixedPolicyGRPOConfig.__doc__, name
        value = getattr(config, name)
        assert f"`{value!r}`" in rows[name][1] or f"`{value}`" in rows[name][1], name


@pytest.mark.slow
@requires_torchrun
def test_two_processes_agree_on_live_traces(tmp_path):
    ranks = run_two_processes(pathlib.Path(__file__).parent / "scripts" / "two_process_live_teacher.py", tmp_path)
    assert ranks[0]["traces"] == ranks[1]["traces"]  # the same cache on every process
    live = {"What is 1 + 2?", "What is 3 + 4?"}  # verified; "What is 4 + 5?" was answered wrongly
    assert len(ranks[0]["traces"]) == 2
    with_trace = {"What is 0 + 1?", "What is 2 + 3?", "What is 5 + 6?"}
    cached_before = set()
    filled = 0
    # training batches only (rank 0's reward function also scores the live samples it verifies, one per record)
    batches = [[r for r in rank["records"] if len(r["prompts"]) == 6] for rank in ranks]
    assert len(batches[0]) == len(batches[1]) == 4
    for rec0, rec1 in zip(*batches):
        prompts, flags = rec0["prompts"] + rec1["prompts"], rec0["flags"] + rec1["flags"]
        assert len(prompts) == 12
        for g in range(0, 12, 4):  # groups straddle the processes; both sides agree
            prompt = prompts[g]
            expected = prompt in with_trace or prompt in cached_before
            assert flags[g : g + 4] == [False, False, False, expected], (prompt, flags[g : g + 4])
            filled += prompt in live and expected
        # prompts asked in this batch are cached for the next one (the test waits for the teacher)
        cached_before |= {p for p in prompts if p in live}
    assert filled > 0
    logs = [h for h in ranks[0]["log"] if "live_teacher/requested" in h]
    assert sum(h["live_teacher/requested"] for h in logs) == 3 and sum(h["live_teacher/filled"] for h in logs) == filled


@pytest.mark.slow
def test_live_teacher_configuration_error_stops_training_clearly(tokenizer, tmp_path):
    """HTTP 401 (a wrong key) in the background thread: the next batch raises on every process, naming the cache."""
    dataset = _without_traces(math_dataset(4), {0, 1, 2, 3})
    with FakeOpenAIServer(faults={"What is": ["401"] * 10}) as server:
        args = tiny_args(tmp_path, max_steps=2, max_completion_length=8, live_teacher_url=server.base_url,
                         live_teacher_when="missing", live_teacher_num_samples=1)
        trainer = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                         train_dataset=dataset, processing_class=tokenizer, args=args)
        original = trainer._generate_and_score_completions

        def generate(inputs):
            output = original(inputs)
            trainer._live["client"].wait_idle(10)
            return output

        trainer._generate_and_score_completions = generate
        with pytest.raises(RuntimeError, match=r"live teacher failed: TeacherError.*HTTP 401.*API key.*cached in"):
            trainer.train()
        assert trainer.state.global_step == 1
