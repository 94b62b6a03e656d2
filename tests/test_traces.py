"""Teacher traces (luffy_trl.traces): selection, generate-verify-cache, resuming, the HTTP teacher against a fake
OpenAI-compatible server on 127.0.0.1 (retries, skips, clear errors, nothing cached lost), a local model teacher."""

import json
import re

import pytest
from datasets import Dataset

from luffy_trl.evaluation.backends import Generation, TransformersBackend
from luffy_trl.tasks.arithmetic import arithmetic_dataset
from luffy_trl.traces.fake_server import FakeOpenAIServer
from luffy_trl.traces.generate import TRACES, make_traces, select_traces
from luffy_trl.traces.teachers import BackendTeacher, OpenAITeacher, TeacherError

PROTOCOL2 = TRACES.with_overrides(num_samples=2, max_new_tokens=32)


def solve(prompt: str) -> str:
    """A correct worked answer to a bundled arithmetic story (the fake server's 'model')."""
    a, b = map(int, re.findall(r"\d+", prompt)[:2])
    add = "more" in prompt or "added" in prompt
    return f"{a} {'+' if add else '-'} {b} = \\boxed{{{a + b if add else a - b}}}"


def problems(n=4):
    return arithmetic_dataset(n, seed=1).remove_columns("target")


class ScriptedTeacher:
    """Answers from a table: texts[(question marker, sample)] -> text; counts what it was asked."""

    name = "scripted"
    tokenizer = None

    def __init__(self, answer, fail_after=None):
        self.answer, self.fail_after, self.asked = answer, fail_after, []

    def stream(self, requests, protocol):
        for request in requests:
            if self.fail_after is not None and len(self.asked) == self.fail_after:
                raise KeyboardInterrupt  # an interrupted run
            self.asked.append(request.key)
            text = self.answer(request.problem.prompt[-1]["content"], request.sample)
            yield request, None if text is None else Generation(text, len(text.split()), False)


def test_select_traces_shortest_all_and_length_filter():
    texts = ["a a a", "b", "c c", "b", "d d d d"]
    lengths = [3, 1, 2, 1, 4]
    assert select_traces(texts, lengths, keep="shortest") == ([1], 0)
    assert select_traces(texts, lengths, keep="all") == ([1, 2, 0, 4], 0)  # shortest first, "b" once
    assert select_traces(texts, lengths, keep="all", max_length=2) == ([1, 2], 2)
    assert select_traces(texts, lengths, keep="shortest", max_length=0) == ([], 5)
    with pytest.raises(ValueError, match="keep must be one of"):
        select_traces(texts, lengths, keep="longest")


def test_make_traces_verifies_selects_and_reverifies_from_cache(tmp_path):
    dataset = problems(4)
    golds = dataset["ground_truth"]

    def answer(question, sample):  # sample 0 wrong, sample 1 right; the last problem never right
        if question.startswith(dataset[3]["prompt"][0]["content"][:30]):
            return "no idea \\boxed{-1}"
        return solve(question) if sample == 1 else "\\boxed{0}"

    cache = tmp_path / "cache.jsonl"
    teacher = ScriptedTeacher(answer)
    out, summary = make_traces(dataset, teacher, cache_path=cache, teacher_id="t", protocol=PROTOCOL2,
                               progress=False)
    assert len(teacher.asked) == 8 and len(cache.read_text().splitlines()) == 8
    assert [row for row in out["target"][:3]] == [[solve(q[0]["content"])] for q in dataset["prompt"][:3]]
    assert out["target"][3] == [] and out["ground_truth"] == golds and out["prompt"] == dataset["prompt"]
    assert (summary.problems, summary.samples, summary.generated, summary.from_cache) == (4, 8, 8, 0)
    assert (summary.correct, summary.problems_with_correct, summary.problems_with_trace) == (3, 3, 3)
    assert summary.yield_fraction == 0.75 and summary.traces_per_problem == 1.0

    # A rerun re-verifies from the cache: nothing generated, same output; new selection options apply.
    again = ScriptedTeacher(answer)
    out2, summary2 = make_traces(dataset, again, cache_path=cache, teacher_id="t", protocol=PROTOCOL2,
                                 progress=False, max_length=3, policy_tokenizer=_WordTokenizer())
    assert again.asked == [] and (summary2.generated, summary2.from_cache) == (0, 8)
    assert summary2.dropped_too_long == 3  # each correct trace is 5 words + the end token > 3
    assert out2["target"] == [[], [], [], []]
    # Another teacher id is another cache key: asked again.
    other = ScriptedTeacher(answer)
    make_traces(dataset, other, cache_path=cache, teacher_id="t2", protocol=PROTOCOL2, progress=False)
    assert len(other.asked) == 8


class _WordTokenizer:
    """Counts whitespace-separated words (a stand-in policy tokenizer with obvious lengths)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(range(len(t.split()))) for t in texts]}


def test_keep_all_dedups_and_orders_by_policy_length(tmp_path):
    dataset = problems(1)
    question = dataset[0]["prompt"][0]["content"]
    right = solve(question)
    variants = [right + " Done, and checked twice.", right, right, "So: " + right]
    out, summary = make_traces(dataset, ScriptedTeacher(lambda q, s: variants[s]), cache_path=None, teacher_id="t",
                               protocol=TRACES.with_overrides(num_samples=4), keep="all",
                               policy_tokenizer=_WordTokenizer(), progress=False)
    assert out["target"] == [[right, "So: " + right, right + " Done, and checked twice."]]
    assert summary.correct == 4 and summary.traces_kept == 3
    assert summary.mean_length == pytest.approx(sum(len(t.split()) + 1 for t in out["target"][0]) / 3)


def test_interrupted_run_resumes_without_asking_again(tmp_path):
    dataset = problems(3)
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(KeyboardInterrupt):
        make_traces(dataset, ScriptedTeacher(lambda q, s: solve(q), fail_after=4), cache_path=cache, teacher_id="t",
                    protocol=PROTOCOL2, progress=False)
    assert len(cache.read_text().splitlines()) == 4
    with cache.open("a") as f:  # a write cut off mid-line is ignored
        f.write('{"run": "x", "bench')
    resumed = ScriptedTeacher(lambda q, s: solve(q))
    out, summary = make_traces(dataset, resumed, cache_path=cache, teacher_id="t", protocol=PROTOCOL2,
                               progress=False)
    assert len(resumed.asked) == 2 and (summary.generated, summary.from_cache) == (2, 4)
    assert summary.problems_with_trace == 3 and all(len(t) == 1 for t in out["target"])


def test_http_teacher_retries_skips_and_keeps_the_cache(tmp_path):
    dataset = problems(6)
    questions = [p[0]["content"] for p in dataset["prompt"]]
    markers = [q[:40] for q in questions]
    faults = {
        markers[0]: ["500", "429"],  # two retries, then fine
        markers[1]: ["malformed", "bad_shape"],  # not JSON, then JSON without choices: retried
        markers[2]: ["timeout"],  # the client's timeout: retried
        markers[3]: ["400"],  # this request only is bad: a counted skip, no retry
        markers[4]: ["503"] * 10,  # retries exhausted: a counted skip
        markers[5]: ["drop"],  # connection closed without a reply: retried
    }
    cache = tmp_path / "cache.jsonl"
    protocol = TRACES.with_overrides(num_samples=1)
    with FakeOpenAIServer(solve, faults=faults, hang_seconds=1.5) as server:
        teacher = OpenAITeacher(server.base_url, "fake", concurrency=3, timeout=0.5, max_retries=2, backoff=0.01)
        out, summary = make_traces(dataset, teacher, cache_path=cache, teacher_id="t", protocol=protocol,
                                   progress=False)
        stats = teacher.stats
        assert summary.skipped == 2 and summary.generated == 4 and summary.problems_with_trace == 4
        assert out["target"][3] == [] and out["target"][4] == []
        assert stats["skipped/http_400"] == 1 and stats["skipped/http_503"] == 1
        assert stats["retry/http_500"] == 1 and stats["retry/http_429"] == 1 and stats["retry/malformed"] == 2
        assert stats["retry/timeout"] == 1 and stats["retry/connection"] == 1 and stats["retry/http_503"] == 2
        assert stats["requests"] == 6 + stats["retries"] and stats["ok"] == 4
        assert all(body["model"] == "fake" and body["seed"] >= 0 and body["top_p"] == 0.95
                   for body in server.requests)
        cached = len(cache.read_text().splitlines())
        assert cached == 4  # skipped requests are not cached: the next run asks for them again

        # Next run: the server is healthy for those two; only they are asked.
        before = len(server.requests)
        server.faults.clear()
        rerun = OpenAITeacher(server.base_url, "fake", concurrency=3, timeout=5, max_retries=0)
        out, summary = make_traces(dataset, rerun, cache_path=cache, teacher_id="t", protocol=protocol,
                                   progress=False)
        assert len(server.requests) - before == 2 and summary.problems_with_trace == 6

        # A configuration error stops the run with a clear message; what arrived before stays cached.
        server.faults = {markers[2]: ["401"]}
        fresh = tmp_path / "fresh.jsonl"
        bad = OpenAITeacher(server.base_url, "fake", concurrency=1, timeout=5)
        with pytest.raises(TeacherError, match="HTTP 401.*base URL.*model name.*API key"):
            make_traces(dataset, bad, cache_path=fresh, teacher_id="t", protocol=protocol, progress=False)
        assert len(fresh.read_text().splitlines()) == 2  # the two prompts answered before the 401


def test_http_teacher_concurrency_and_completions_api(tokenizer):
    dataset = problems(8)
    with FakeOpenAIServer(solve, latency=0.2) as server:
        teacher = OpenAITeacher(server.base_url, "fake", concurrency=4, timeout=10)
        _, summary = make_traces(dataset, teacher, cache_path=None, teacher_id="t",
                                 protocol=TRACES.with_overrides(num_samples=1), progress=False)
        assert summary.problems_with_trace == 8 and server.max_in_flight == 4

    with FakeOpenAIServer(lambda prompt: solve(prompt.split("<|im_start|>user\n")[1])) as server:
        teacher = OpenAITeacher(server.base_url, "fake", api="completions", tokenizer=tokenizer)
        _out, summary = make_traces(problems(2), teacher, cache_path=None, teacher_id="t",
                                   protocol=TRACES.with_overrides(num_samples=1), progress=False)
        expected = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                    for p in problems(2)["prompt"]]
        # the requests run concurrently, so they reach the server in any order
        assert sorted(body["prompt"] for body in server.requests) == sorted(expected)
        assert "messages" not in server.requests[0]
        assert summary.problems_with_trace == 2


def test_local_model_teacher_caches_every_batch(tmp_path, tokenizer):
    from luffy_trl.toy import toy_model

    class CountingBackend(TransformersBackend):
        calls = 0

        def generate(self, prompts, protocol, seeds):
            CountingBackend.calls += 1
            return super().generate(prompts, protocol, seeds)

    backend = CountingBackend(toy_model(tokenizer), tokenizer)
    dataset = Dataset.from_list([{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?", "answer": "4"}])
    accept_all = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731
    cache = tmp_path / "local.jsonl"
    protocol = TRACES.with_overrides(num_samples=3, max_new_tokens=6)
    out, summary = make_traces(dataset, BackendTeacher(backend, batch_size=4), cache_path=cache, teacher_id="toy",
                               protocol=protocol, reward_funcs=accept_all, gold_column="answer", keep="all",
                               progress=False)
    assert CountingBackend.calls == 2 and summary.generated == 6  # 6 samples in batches of 4
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 6 and all(line["num_tokens"] <= 6 for line in lines)
    assert summary.correct == 6 and all(1 <= len(traces) <= 3 for traces in out["target"])
    _, again = make_traces(dataset, BackendTeacher(backend, batch_size=4), cache_path=cache, teacher_id="toy",
                           protocol=protocol, reward_funcs=accept_all, gold_column="answer", progress=False)
    assert CountingBackend.calls == 2 and again.from_cache == 6


def test_bad_input_gives_clear_errors():
    teacher = ScriptedTeacher(lambda q, s: "x")
    with pytest.raises(ValueError, match="no gold answers.*gold_column"):
        make_traces(Dataset.from_list([{"prompt": "q"}]), teacher, cache_path=None, teacher_id="t")
    with pytest.raises(ValueError, match="no prompt column 'question'"):
        make_traces(Dataset.from_list([{"prompt": "q", "ground_truth": "1"}]), teacher, cache_path=None,
                    teacher_id="t", prompt_column="question")
    with pytest.raises(ValueError, match="policy_tokenizer"):
        make_traces(problems(1), teacher, cache_path=None, teacher_id="t", max_length=10)
    with pytest.raises(ValueError, match="api must be one of"):
        OpenAITeacher("http://127.0.0.1:1/v1", "m", api="responses")


def test_make_traces_script_writes_a_dataset_the_trainer_reads(tmp_path):
    from luffy_trl.data import load_luffy_dataset
    from luffy_trl.traces.cli import TraceArguments, main

    with FakeOpenAIServer(solve) as server:
        args = TraceArguments(dataset="arithmetic", max_problems=5, output=str(tmp_path / "arith.jsonl"),
                              teacher_url=server.base_url, teacher_model="fake", num_samples=2, progress=False)
        _, _summary = main(args)
    assert (tmp_path / "arith.trace_generations.jsonl").exists()
    written = json.loads((tmp_path / "arith.summary.json").read_text())
    assert written["problems_with_trace"] == 5 and written["yield_fraction"] == 1.0
    loaded, report = load_luffy_dataset(str(tmp_path / "arith.jsonl"))
    assert report.traces_out == 5 and report.rows_without_trace == 0
    assert all(re.search(r"\\boxed\{\d+\}", traces[0]) for traces in loaded["target"])


def test_reward_functions_get_trls_arguments():
    """Plain-text prompts: completions are strings (as TRL passes them); the row's other columns come along."""
    seen = []

    def reward(prompts, completions, ground_truth, extra, completion_ids, **kwargs):
        seen.append((prompts, completions, ground_truth, extra, completion_ids))
        return [float(f"\\boxed{{{g}}}" in c) for c, g in zip(completions, ground_truth)]

    dataset = Dataset.from_list([{"prompt": "1+1?", "ground_truth": "2", "extra": 7}])
    out, summary = make_traces(dataset, ScriptedTeacher(lambda q, s: f"so \\boxed{{{s + 1}}}"), cache_path=None,
                               teacher_id="t", reward_funcs=reward, protocol=PROTOCOL2, progress=False)
    assert seen == [(["1+1?", "1+1?"], ["so \\boxed{1}", "so \\boxed{2}"], ["2", "2"], [7, 7], None)]
    assert out["target"] == [["so \\boxed{2}"]] and summary.correct == 1


def test_make_traces_script_with_the_number_reward_drops_unevaluated_expressions(tmp_path):
    """`--reward number`: a teacher that writes `\\boxed{a + b}` without the result gets no trace; with `--reward
    math` math-verify evaluates the expression and keeps it."""
    from luffy_trl.traces.cli import TraceArguments, main

    def lazy(prompt: str) -> str:
        return solve(prompt).split(" = ")[0].join(["So \\boxed{", "}"])

    kept = {}
    with FakeOpenAIServer(lazy) as server:
        for reward in ("math", "number"):
            args = TraceArguments(dataset="arithmetic", max_problems=3, output=str(tmp_path / f"{reward}.jsonl"),
                                  teacher_url=server.base_url, teacher_model="fake", num_samples=1, progress=False,
                                  reward=reward)
            kept[reward] = main(args)[1].problems_with_trace
    assert kept == {"math": 3, "number": 0}
