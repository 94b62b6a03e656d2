"""Triggers, schedules, several traces, teacher log-probs and the paper's baselines (luffy_trl.guidance + trainer).

Pure functions are checked against direct formulas; the trainer's advantages, masks and loss against an independent
computation on a batch whose rewards are fixed per row (`TableReward`).
"""

import math
import pathlib
import re

import pytest
import torch
from conftest import build_model, math_dataset, tiny_args

from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer
from luffy_trl.guidance import (
    align_teacher_logprobs,
    group_gets_teacher,
    keyed_rng,
    on_policy_group_accuracy,
    schedule_value,
    trace_order,
    trigger_fired,
)
from luffy_trl.losses import mixed_policy_per_token_loss, sft_nll_loss
from luffy_trl.teacher import TeacherTokenizer, teacher_logprobs, teacher_traces

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
G = 4  # group size of the trainer tests: 3 sampled + 1 teacher
# On-policy reward of each of the 16 rows (4 groups × 4 slots); the last slot of a group is the teacher's, so its
# entry is used only when that slot is sampled (a group the schedule leaves without a teacher).
ON_POLICY = [0, 0, 0, 0.0,  # group 0: every sample fails          accuracy 0
             1, 0, 0, 0.0,  # group 1: one of three solved         accuracy 1/3
             1, 1, 1, 0.0,  # group 2: all solved                  accuracy 1
             1, 0, 1, 0.0]  # group 3: two of three solved         accuracy 2/3
TEACHER = [1.0, 0.5, 1.0, 1.0]  # reward of each group's teacher trace (0.5: a partly correct trace)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------
def reference_fired(totals, is_off, trigger, success=1.0, threshold=0.5):
    fired = []
    for g in range(0, len(totals), G):
        on = [t for t, off in zip(totals[g : g + G], is_off[g : g + G]) if not off]
        solved = sum(1 for t in on if not math.isnan(t) and t >= success)
        accuracy = solved / len(on)
        fired.append({"always": True, "all_fail": solved == 0, "accuracy_below": accuracy < threshold}[trigger])
    return fired


@pytest.mark.parametrize("trigger", ["always", "all_fail", "accuracy_below"])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 1.0])
def test_triggers_on_a_controlled_reward_matrix(trigger, threshold):
    totals = [r if s != G - 1 else TEACHER[i // G] for i, (r, s) in enumerate(zip(ON_POLICY, [0, 1, 2, 3] * 4))]
    totals[1] = float("nan")  # an unscorable sample counts as unsolved
    is_off = [i % G == G - 1 for i in range(16)]
    fired = trigger_fired(torch.tensor(totals), torch.tensor(is_off), G, trigger, accuracy_threshold=threshold)
    assert fired.tolist() == reference_fired(totals, is_off, trigger, threshold=threshold)
    acc = on_policy_group_accuracy(torch.tensor(totals), torch.tensor(is_off), G, 1.0)
    assert acc.tolist() == pytest.approx([0, 1 / 3, 1, 2 / 3])
    # the teacher's own reward never counts: a solved teacher in an all-fail group still fires all_fail
    assert trigger_fired(torch.tensor(totals), torch.tensor(is_off), G, "all_fail").tolist()[0]


def test_schedules_follow_their_formulas():
    kw = dict(start=0.8, end=0.2, warmup_steps=4, decay_steps=10)
    for step in range(0, 20):
        t = min(1.0, max(0.0, (step - 4) / 10))
        warm = 0.8 * step / 4
        assert schedule_value(step, "constant", **kw) == pytest.approx(warm if step < 4 else 0.8)
        assert schedule_value(step, "linear", **kw) == pytest.approx(warm if step < 4 else 0.8 - 0.6 * t)
        cosine = 0.2 + 0.6 * 0.5 * (1 + math.cos(math.pi * t))
        assert schedule_value(step, "cosine", **kw) == pytest.approx(warm if step < 4 else cosine)
    # without decay_steps the decay spans the rest of training
    assert schedule_value(50, "linear", start=1.0, end=0.0, max_steps=100) == pytest.approx(0.5)
    assert schedule_value(0, "constant") == 1.0  # the default: LUFFY, untouched
    with pytest.raises(ValueError, match="max_steps"):
        schedule_value(3, "cosine")


def test_group_share_draws_are_keyed_and_have_the_right_rate():
    draws = [group_gets_teacher(0.3, seed=7, step=s, generation=0, group=g) for s in range(50) for g in range(40)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.03)
    again = [group_gets_teacher(0.3, seed=7, step=s, generation=0, group=g) for s in range(50) for g in range(40)]
    assert draws == again  # a pure function of the key: every process agrees
    other = [group_gets_teacher(0.3, seed=8, step=s, generation=0, group=g) for s in range(50) for g in range(40)]
    assert other != draws
    assert all(group_gets_teacher(1.0, seed=0, step=0, generation=0, group=g) for g in range(10))
    assert not any(group_gets_teacher(0.0, seed=0, step=0, generation=0, group=g) for g in range(10))


def test_trace_order():
    assert trace_order(3, "first") == [0, 1, 2]
    assert trace_order(4, "shortest", lengths=[9, 3, 9, 1]) == [3, 1, 0, 2]  # ties keep column order
    orders = {tuple(trace_order(3, "random", rng=keyed_rng("trace", 0, s, 0, 0))) for s in range(40)}
    assert len(orders) == 6 and all(sorted(o) == [0, 1, 2] for o in orders)  # every permutation occurs
    assert trace_order(3, "random", rng=keyed_rng("trace", 0, 5, 0, 2)) == trace_order(
        3, "random", rng=keyed_rng("trace", 0, 5, 0, 2))
    with pytest.raises(ValueError):
        trace_order(2, "longest")


def test_teacher_logprob_alignment_and_lookup():
    assert align_teacher_logprobs([-1.0, -2.0, -0.5], 3, 3) == [-1.0, -2.0, -0.5]
    assert align_teacher_logprobs([-1.0, -2.0], 3, 3) == [-1.0, -2.0, 0.0]  # end-of-turn token: π_φ = 1
    assert align_teacher_logprobs([-1.0, -2.0, -0.5], 3, 2) == [-1.0, -2.0]  # truncated trace
    for bad in ([-1.0], [-1.0] * 4, [-1.0, float("nan"), -1.0], [0.3, 0.2, 0.5], ["x", "y", "z"], None):
        assert align_teacher_logprobs(bad, 3, 3) is None, bad
    assert teacher_logprobs([-1.0, -2.0], 0) == [-1.0, -2.0]
    assert teacher_logprobs([-1.0, -2.0], 1) is None
    assert teacher_logprobs([[-1.0], None, [-3.0]], 2) == [-3.0]
    assert teacher_logprobs([[-1.0], None], 1) is None and teacher_logprobs("oops", 0) is None
    # positions stay aligned with the raw list when items are skipped
    traces = teacher_traces([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, None, "b"])
    assert traces == [(1, "a"), (3, "b")]


def test_pure_loss_with_teacher_logprobs_weight_and_sft():
    g = torch.Generator().manual_seed(0)
    logps = (torch.rand(3, 4, generator=g, dtype=torch.float64) * -3).requires_grad_(True)
    teacher = torch.rand(3, 4, generator=g, dtype=torch.float64) * -2
    adv = torch.tensor([0.5, -0.25, 0.75], dtype=torch.float64)
    off = torch.tensor([True, False, True])
    mask = torch.ones(3, 4, dtype=torch.float64)
    mask[2, 2:] = 0
    out = mixed_policy_per_token_loss(logps, None, adv, off, teacher_per_token_logps=teacher, off_policy_weight=0.3)
    ratio = (logps - teacher).exp()
    expected = torch.where(off.view(-1, 1), -0.3 * adv.view(-1, 1) * ratio / (ratio + 0.1),
                           -adv.view(-1, 1) * torch.ones_like(logps))
    torch.testing.assert_close(out.per_token_loss, expected)
    sft = mixed_policy_per_token_loss(logps, None, adv, off, off_policy_loss="sft")
    assert torch.all(sft.per_token_loss[off] == 0)
    nll = sft_nll_loss(logps, mask, off)
    assert nll.item() == pytest.approx((-(logps * mask)[off].sum() / mask[off].sum()).item())


# ----------------------------------------------------------------------------------------------------------------
# Trainer: advantages, masks and loss against an independent computation
# ----------------------------------------------------------------------------------------------------------------
class TableReward:
    """Fixed rewards: `ON_POLICY[i]` for sampled row i of the batch, `TEACHER[group]` for a teacher row."""

    __name__ = "table_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, completions, is_off_policy, **kwargs):
        texts = [c[0]["content"] for c in completions]
        self.calls.append({"flags": list(is_off_policy), "texts": texts})
        return [TEACHER[i // G] if off else float(ON_POLICY[i]) for i, off in enumerate(is_off_policy)]


def make_trainer(tokenizer, tmp_path, dataset=None, reward=None, **overrides):
    overrides = {"per_device_train_batch_size": 16, "num_generations": G, "max_completion_length": 10,
                 "entropy_coef": 0.0, **overrides}
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer, seed=1), reward_funcs=reward or TableReward(),
        args=tiny_args(tmp_path, **overrides), train_dataset=dataset if dataset is not None else math_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def batch_rows(dataset=None):
    dataset = dataset if dataset is not None else math_dataset()
    return [dataset[i] for i in range(4) for _ in range(G)]


def independent_logps(model, out):
    prompt_width = out["prompt_ids"].size(1)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, prompt_width - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)


def expected_advantages(flags, fired, sft=False):
    """Group mean over the rows that take part (on-policy + teacher when its trigger fired and not SFT)."""
    advantages, takes_part = [], []
    for g in range(4):
        rows = range(g * G, (g + 1) * G)
        rewards = [TEACHER[g] if flags[i] else float(ON_POLICY[i]) for i in rows]
        part = [not flags[i] or (fired[g] and not sft) for i in rows]
        mean = sum(r for r, p in zip(rewards, part) if p) / sum(part)
        advantages += [r - mean if p else 0.0 for r, p in zip(rewards, part)]
        takes_part += [flags[i] and fired[g] for i in rows]
    return torch.tensor(advantages), torch.tensor(takes_part)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_loss(trainer, out, advantages, *, weight=1.0, sft_coef=None, teacher_logps=None, loss_type="dr_grpo"):
    """`_compute_loss` equals the formula of docs/method.md, computed independently, in value and gradient."""
    model = trainer.model
    got = trainer._compute_loss(model, out)
    got_grads = grads(model, got)
    logps = independent_logps(model, out)
    mask = out["completion_mask"].float()
    off = out["is_off_policy"].view(-1, 1)
    a = advantages.view(-1, 1)
    x = logps if teacher_logps is None else logps - teacher_logps
    p = x.exp()
    on_token = -a * torch.exp(logps - logps.detach())
    if sft_coef is None:
        token = torch.where(off, -weight * a * p / (p + 0.1), on_token)
        pg_mask = mask
    else:
        token, pg_mask = on_token, mask * ~off
    if loss_type == "dr_grpo":
        expected = (token * pg_mask).sum() / (mask.size(0) * trainer.max_completion_length)
    else:  # bnpo
        expected = (token * pg_mask).sum() / pg_mask.sum()
    if sft_coef is not None:
        off_mask = mask * off
        expected = expected + sft_coef * weight * (-logps * off_mask).sum() / off_mask.sum()
    want_grads = grads(model, expected)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("trigger,threshold,fired", [
    ("always", 0.5, [True, True, True, True]),
    ("all_fail", 0.5, [True, False, False, False]),
    ("accuracy_below", 0.5, [True, True, False, False]),
    ("accuracy_below", 0.7, [True, True, False, True]),
])
def test_trigger_advantages_masks_and_loss(tokenizer, tmp_path, trigger, threshold, fired):
    trainer = make_trainer(tokenizer, tmp_path, off_policy_trigger=trigger, off_policy_trigger_threshold=threshold)
    out = trainer._generate_and_score_completions(batch_rows())
    flags = out["is_off_policy"].tolist()
    assert flags == [i % G == G - 1 for i in range(16)]
    advantages, takes_part = expected_advantages(flags, fired)
    torch.testing.assert_close(out["advantages"], advantages)
    lengths = out["completion_mask"].sum(1)
    excluded = torch.tensor(flags) & ~takes_part
    assert torch.all(lengths[excluded] == 0) and torch.all(lengths[~excluded] > 0)
    assert out["num_items_in_batch"].item() == out["completion_mask"].sum().item()
    metrics = trainer._metrics["train"]
    assert metrics["off_policy/used"][-1] == sum(fired)
    assert metrics["off_policy/trigger_fired"][-1] == pytest.approx(sum(fired) / 4)
    assert metrics["off_policy/reward_mean"][-1] == pytest.approx(sum(TEACHER) / 4)  # every trace is scored
    check_loss(trainer, out, advantages)


@pytest.mark.parametrize("trigger,fired", [("always", [True] * 4), ("all_fail", [True, False, False, False])])
@pytest.mark.parametrize("loss_type", ["dr_grpo", "bnpo"])
def test_rl_with_sft_loss_baseline(tokenizer, tmp_path, trigger, fired, loss_type):
    """"RL w/ SFT loss": on-policy-only baseline; teacher tokens trained by coef × token-mean NLL, no PG term."""
    trainer = make_trainer(tokenizer, tmp_path, off_policy_loss="sft", sft_loss_coef=0.7, off_policy_trigger=trigger,
                           loss_type=loss_type)
    out = trainer._generate_and_score_completions(batch_rows())
    flags = out["is_off_policy"].tolist()
    advantages, takes_part = expected_advantages(flags, fired, sft=True)
    torch.testing.assert_close(out["advantages"], advantages)
    assert torch.all(out["advantages"][out["is_off_policy"]] == 0)
    lengths = out["completion_mask"].sum(1)
    excluded = torch.tensor(flags) & ~takes_part
    assert torch.all(lengths[excluded] == 0) and torch.all(lengths[takes_part] > 0)
    on_tokens = (out["completion_mask"] * ~out["is_off_policy"].view(-1, 1)).sum()
    assert out["num_items_in_batch"].item() == on_tokens.item()  # the PG normaliser counts on-policy tokens
    assert trainer._metrics["train"]["off_policy/used"][-1] == sum(fired)
    check_loss(trainer, out, advantages, sft_coef=0.7, loss_type=loss_type)
    assert trainer._metrics["train"]["off_policy/sft_nll"][-1] > 0


@pytest.mark.parametrize("schedule,step,weight", [("linear", 3, 1.0 - 3 / 10 * 0.9),
                                                  ("cosine", 5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
                                                  ("constant", 1, 0.5)])
def test_loss_weight_schedule(tokenizer, tmp_path, schedule, step, weight):
    start = 0.5 if schedule == "constant" else 1.0
    trainer = make_trainer(tokenizer, tmp_path, off_policy_schedule=schedule, off_policy_schedule_start=start,
                           off_policy_schedule_end=0.1, max_steps=10)
    trainer.state.global_step, trainer.state.max_steps = step, 10
    out = trainer._generate_and_score_completions(batch_rows())
    advantages, _ = expected_advantages(out["is_off_policy"].tolist(), [True] * 4)
    torch.testing.assert_close(out["advantages"], advantages)  # the weight scales the loss, not the advantages
    check_loss(trainer, out, advantages, weight=weight)
    assert trainer._metrics["train"]["off_policy/schedule_value"][-1] == pytest.approx(weight)


def test_loss_weight_schedule_scales_the_sft_term(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, off_policy_loss="sft", off_policy_schedule="linear", max_steps=4,
                           off_policy_schedule_end=0.0, loss_type="bnpo")
    trainer.state.global_step, trainer.state.max_steps = 1, 4
    out = trainer._generate_and_score_completions(batch_rows())
    advantages, _ = expected_advantages(out["is_off_policy"].tolist(), [True] * 4, sft=True)
    check_loss(trainer, out, advantages, sft_coef=1.0, weight=0.75, loss_type="bnpo")


def test_group_share_schedule(tokenizer, tmp_path):
    """Groups the schedule leaves out are sampled in full; the draws are the keyed ones of luffy_trl.guidance."""
    reward = TableReward()
    trainer = make_trainer(tokenizer, tmp_path, reward=reward, off_policy_schedule_target="group_share",
                           off_policy_schedule_start=0.5, seed=3)
    seen = []
    for step in range(3):
        trainer.state.global_step = step
        out = trainer._generate_and_score_completions(batch_rows())
        flags = out["is_off_policy"].tolist()
        chosen = [group_gets_teacher(0.5, seed=3, step=step, generation=0, group=g) for g in range(4)]
        assert flags == [chosen[i // G] and i % G == G - 1 for i in range(16)]
        advantages, _ = expected_advantages(flags, [True] * 4)
        torch.testing.assert_close(out["advantages"], advantages)
        assert trainer._metrics["train"]["off_policy/used"][-1] == sum(chosen)
        seen += chosen
    assert any(seen) and not all(seen)
    assert trainer._metrics["train"]["off_policy/schedule_value"] == [0.5] * 3
    check_loss(trainer, out, advantages)


def several_traces_dataset():
    dataset = math_dataset(4)
    traces = []
    for i in range(4):
        answer = 2 * i + 1
        traces.append([f"<think>\n{'long ' * 6}{i}\n</think>\nThe answer is \\boxed{{{answer}}}.",
                       f"The answer is \\boxed{{{answer}}}.",
                       f"<think>\n{i} + {i + 1}\n</think>\n\\boxed{{{answer}}}."])
    return dataset.remove_columns("target").add_column("target", traces), traces


@pytest.mark.parametrize("selection", ["first", "shortest", "random"])
def test_trace_selection_with_two_teacher_slots(tokenizer, tmp_path, selection):
    dataset, traces = several_traces_dataset()
    reward = TableReward()
    trainer = make_trainer(tokenizer, tmp_path, dataset=dataset, reward=reward, num_off_policy=2, seed=5,
                           off_policy_trace_selection=selection, max_completion_length=64)
    trainer.state.global_step = 2
    trainer._generate_and_score_completions(batch_rows(dataset))
    call = reward.calls[-1]
    for g in range(4):
        got = [t for f, t in zip(call["flags"][g * G : (g + 1) * G], call["texts"][g * G : (g + 1) * G]) if f]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in traces[g]]
        rng = keyed_rng("trace", 5, 2, 0, g)
        order = trace_order(3, selection, lengths=lengths, rng=rng)
        assert got == [traces[g][order[0]], traces[g][order[1]]]
        if selection == "shortest":
            assert order[:2] == [1, 2]


def test_teacher_logprobs_column(tokenizer, tmp_path):
    """π_θ/π_φ in the shaping where a row has fitting log-probs; π_φ = 1 (counted) where it does not."""
    dataset = math_dataset(4)
    teacher_tokenizer = TeacherTokenizer(tokenizer, [tokenizer.eos_token_id], max_completion_length=40)
    g = torch.Generator().manual_seed(0)
    values, expected_rows = [], []
    for i, row in enumerate(dataset):
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        ids = teacher_tokenizer.encode(row["prompt"], prompt_ids, row["target"][0]["content"]).ids
        lp = (torch.rand(len(ids), generator=g) * -3).tolist()
        if i == 1:
            lp = lp[:-1]  # without the end-of-turn token: it gets log-prob 0
        if i == 2:
            lp = lp[:-3]  # does not fit: π_φ = 1 for the whole row
        values.append(lp)
        expected_rows.append({1: lp + [0.0], 2: [0.0] * len(ids)}.get(i, lp))
    dataset = dataset.add_column("teacher_logps", values)
    trainer = make_trainer(tokenizer, tmp_path, dataset=dataset, max_completion_length=40,
                           off_policy_logprobs_column="teacher_logps")
    out = trainer._generate_and_score_completions(batch_rows(dataset))
    teacher = out["teacher_per_token_logps"]
    assert teacher.shape == out["completion_ids"].shape
    off = out["is_off_policy"]
    assert torch.all(teacher[~off] == 0)
    for group, row in enumerate(off.nonzero().flatten().tolist()):
        want = torch.tensor(expected_rows[group])
        torch.testing.assert_close(teacher[row, : len(want)], want)
        assert torch.all(teacher[row, len(want) :] == 0)
    metrics = trainer._metrics["train"]
    assert (metrics["off_policy/logprobs_used"][-1], metrics["off_policy/logprobs_fallback"][-1]) == (3, 1)
    advantages, _ = expected_advantages(off.tolist(), [True] * 4)
    check_loss(trainer, out, advantages, teacher_logps=teacher)


@pytest.mark.parametrize("bad,match", [
    (dict(off_policy_trigger="sometimes"), "off_policy_trigger must be one of"),
    (dict(off_policy_trigger="accuracy_below", off_policy_trigger_threshold=0.0), "off_policy_trigger_threshold"),
    (dict(off_policy_schedule="step"), "off_policy_schedule must be one of"),
    (dict(off_policy_schedule_target="group_share", off_policy_schedule_start=1.5), "probability"),
    (dict(off_policy_schedule_end=-1.0), "off_policy_schedule_end must be a finite number"),
    (dict(off_policy_schedule_warmup_steps=-2), "off_policy_schedule_warmup_steps"),
    (dict(off_policy_schedule_decay_steps=0), "off_policy_schedule_decay_steps"),
    (dict(off_policy_trace_selection="longest"), "off_policy_trace_selection must be one of"),
    (dict(off_policy_loss="dpo"), "off_policy_loss must be one of"),
    (dict(sft_loss_coef=-1.0), "sft_loss_coef"),
    (dict(off_policy_logprobs_column="target"), "must differ from off_policy_column"),
    (dict(off_policy_logprobs_column="lp", off_policy_loss="sft"), "no effect with off_policy_loss='sft'"),
])
def test_invalid_guidance_settings_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **bad)


def test_missing_logprobs_column_is_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="off_policy_logprobs_column='lp' is not a column"):
        make_trainer(tokenizer, tmp_path, off_policy_logprobs_column="lp")


def test_all_fail_trigger_trains_end_to_end(tokenizer, tmp_path):
    """A short real run: the metrics exist every step and count the teacher rows that took part."""
    trainer = MixedPolicyGRPOTrainer(
        model=build_model(tokenizer), reward_funcs=TableReward(), train_dataset=math_dataset(),
        processing_class=tokenizer,
        args=tiny_args(tmp_path, max_steps=2, per_device_train_batch_size=16, off_policy_trigger="all_fail"),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["off_policy/used"] == 1 and h["off_policy/trigger_fired"] == 0.25  # only group 0 fails all
        assert h["off_policy/schedule_value"] == 1.0


def assert_documented(keys):
    documented = set(re.findall(r"`([a-z_]+(?:/[a-z_<>]+)*)`", (DOCS / "metrics.md").read_text()))
    keys = {re.sub(r"^rewards/[^/]+/", "rewards/<fn>/", k) for k in keys}
    assert not {k for k in keys if k.startswith("off_policy/")} - documented


def test_new_metrics_are_documented(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, off_policy_loss="sft", off_policy_trigger="all_fail",
                           off_policy_schedule_target="group_share")
    out = trainer._generate_and_score_completions(batch_rows())
    trainer._compute_loss(trainer.model, out)
    keys = set(trainer._metrics["train"])
    assert {"off_policy/used", "off_policy/trigger_fired", "off_policy/schedule_value", "off_policy/sft_nll"} <= keys
    assert_documented(keys)
    assert_documented({f"off_policy/{k}" for k in ("logprobs_used", "logprobs_fallback")})


def test_cli_parses_the_guidance_fields():
    from trl import TrlParser

    (config,) = TrlParser((MixedPolicyGRPOConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "x", "--use_cpu", "--off_policy_trigger", "accuracy_below", "--off_policy_trigger_threshold",
         "0.25", "--off_policy_schedule", "cosine", "--off_policy_schedule_target", "group_share",
         "--off_policy_schedule_start", "0.9", "--off_policy_schedule_end", "0.1", "--off_policy_schedule_warmup_steps",
         "5", "--off_policy_schedule_decay_steps", "50", "--off_policy_trace_selection", "shortest",
         "--off_policy_logprobs_column", "teacher_logps", "--sft_loss_coef", "0.5"]
    )
    assert (config.off_policy_trigger, config.off_policy_trigger_threshold) == ("accuracy_below", 0.25)
    assert (config.off_policy_schedule, config.off_policy_schedule_target) == ("cosine", "group_share")
    assert (config.off_policy_schedule_start, config.off_policy_schedule_end) == (0.9, 0.1)
    assert (config.off_policy_schedule_warmup_steps, config.off_policy_schedule_decay_steps) == (5, 50)
    assert config.off_policy_trace_selection == "shortest" and config.off_policy_logprobs_column == "teacher_logps"
    assert (config.off_policy_loss, config.sft_loss_coef) == ("luffy", 0.5)
    for flag, bad in (("--off_policy_trigger", "never"), ("--off_policy_loss", "dpo")):
        with pytest.raises(SystemExit):
            TrlParser((MixedPolicyGRPOConfig,)).parse_args_into_dataclasses(["--output_dir", "x", flag, bad])


def test_defaults_are_luffy(tmp_path):
    args = tiny_args(tmp_path)
    assert (args.off_policy_trigger, args.off_policy_schedule, args.off_policy_schedule_start) == ("always", "constant",
                                                                                                   1.0)
    assert (args.off_policy_trace_selection, args.off_policy_logprobs_column, args.off_policy_loss) == ("first", None,
                                                                                                       "luffy")
