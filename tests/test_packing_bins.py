"""`pack_sequences="bins"`: rows packed into several sequences no longer than the longest row (first-fit decreasing),
each with its own block-diagonal mask, chosen per forward by a cost model; gradients stay the switch-off arm's."""

import itertools

import pytest
import torch
from batching_cases import assert_same_gradients, cache_generation, cut_lengths, make_trainer, step_gradients
from test_packing import LENGTHS, _padded_batch

from luffy_trl.batching import ATTENTION_PAIR_COST, bin_rows, choose_layout, layout_tokens, plan_micro_batches


def test_bins_first_fit_decreasing_within_the_longest_row():
    lengths = [12, 3, 9, 3, 5, 2, 7]
    bins = bin_rows(lengths, max(lengths))
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert bins == [[0], [2, 1], [6, 4], [3, 5]]  # 12 | 9+3 | 7+5 | 3+2: first fit, longest first


def test_layout_tokens_against_a_hand_count():
    prompts, completions = [2, 2, 2, 2], [10, 1, 1, 1]  # rows of 12, 3, 3, 3 tokens
    assert layout_tokens(prompts, completions, "cut") == (4 * 12, 4 * 12 * 12)
    assert layout_tokens(prompts, completions, "bins") == (2 * 12, 2 * 12 * 12)  # [12] and [3, 3, 3] padded to 12
    assert layout_tokens(prompts, completions, "one") == (21, 21 * 21)
    assert layout_tokens(prompts, completions, "one", varlen=True) == (21, 144 + 3 * 9)
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_tokens(prompts, completions, "sideways")


def test_the_cost_model_picks_bins_at_a_ragged_mix_and_cut_at_an_even_one():
    ragged_p, ragged_c = [100] * 16, [300, 450, 200, 800, 350, 250, 600, 400] * 2
    ragged_c[3] = ragged_c[11] = 3000  # two teacher traces 5-6x the on-policy lengths
    assert choose_layout(ragged_p, ragged_c, hidden_size=896) == "bins"
    real = sum(p + c for p, c in zip(ragged_p, ragged_c))  # 12,700
    # 3100 | 3100 | 700+700+550+550+500 | 500+450+450+400+400+350+350 ... : 5 bins of 3100 against 16 rows of 3100
    assert layout_tokens(ragged_p, ragged_c, "bins")[0] == 5 * 3100 == 1.22 * real + 6
    assert layout_tokens(ragged_p, ragged_c, "cut")[0] == 16 * 3100
    even_p, even_c = [100] * 8, [1000] * 8
    assert choose_layout(even_p, even_c, hidden_size=896) == "cut"  # nothing to gain; cut keeps TRL's layout
    assert choose_layout(ragged_p, ragged_c, hidden_size=896, varlen=True, layouts=("cut", "one")) == "one"


def test_the_bins_plan_is_the_cheapest_cut_into_runs():
    """`plan_micro_batches(bins_hidden_size=h)` against every way to cut the length-sorted rows into k runs, each run
    costing the cheaper of its cut rows and its bins (an independent count through `layout_tokens`)."""
    prompt = [5, 9, 3, 7, 4, 6, 8, 2, 5, 3]
    completion = [40, 3, 25, 8, 60, 12, 5, 33, 9, 18]
    k, hidden = 3, 64

    def cost(rows):
        p, c = [prompt[i] for i in rows], [completion[i] for i in rows]
        return min(t + q * ATTENTION_PAIR_COST / hidden for t, q in (layout_tokens(p, c, "cut"),
                                                                     layout_tokens(p, c, "bins")))

    plan = plan_micro_batches(prompt, completion, k, bins_hidden_size=hidden)
    assert sorted(i for b in plan for i in b) == list(range(10))
    order = sorted(range(10), key=lambda i: (-(prompt[i] + completion[i]), -completion[i], i))
    best = min(sum(cost(order[a:b]) for a, b in itertools.pairwise((0, *cuts, 10)))
               for cuts in itertools.combinations(range(1, 10), k - 1))
    assert sum(cost(b) for b in plan) == pytest.approx(best)
    padded_plan = plan_micro_batches(prompt, completion, k)
    assert sum(cost(b) for b in plan) < sum(cost(b) for b in padded_plan)  # the padded plan optimises something else


@pytest.fixture(scope="module")
def bins_trainer(tokenizer, tmp_path_factory):
    trainer = make_trainer(tokenizer, tmp_path_factory.mktemp("bins"), per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, steps_per_generation=4, num_generations=4,
                           max_completion_length=24, entropy_coef=0.0, off_policy_trigger="all_fail",
                           pack_sequences="bins")
    cut_lengths(trainer, LENGTHS)
    return trainer


def test_a_bins_forward_equals_the_padded_forward_and_its_gradient(bins_trainer, tokenizer):
    trainer = bins_trainer
    model = trainer.model
    ids, mask, keep = _padded_batch(tokenizer, [7, 3, 5, 1, 2], [6, 9, 0, 4, 2])
    rows = [0, 1, 3, 4]
    start = ids.size(1) - keep
    capacity = int(max(mask[i].sum() for i in rows))
    results = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            (index, cols), lp, ent, _, tokens = trainer._packed_forward(model, ids, mask, keep, rows, True,
                                                                        capacity=capacity)
            logps = lp.new_zeros(ids.size(0), keep).index_put((index, cols), lp)
            entropies = ent.new_zeros(ids.size(0), keep).index_put((index, cols), ent)
            assert capacity == 13 and tokens == 3 * 13  # rows of 13, 12, 5, 4 tokens: [13] | [12] | [5, 4]
        else:
            trainer.args.pack_sequences = "never"
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep,
                                                                             compute_entropy=True)
            trainer.args.pack_sequences = "bins"
        weights = torch.linspace(0.5, 2.0, logps.numel(), dtype=logps.dtype).view_as(logps)
        ((logps + 0.1 * entropies) * weights * mask[:, start:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps, entropies, grads))
    (lp_on, ent_on, g_on), (lp_off, ent_off, g_off) = results
    completion = mask[:, start:].bool()
    completion[2] = False  # row 2 has no completion and is not in `rows`
    torch.testing.assert_close(lp_on[completion], lp_off[completion], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_on[completion], ent_off[completion], rtol=1e-6, atol=1e-6)
    assert_same_gradients([g_on], [g_off])


def test_every_optimiser_step_has_the_switch_off_gradient_with_bins(bins_trainer, monkeypatch):
    trainer = bins_trainer
    cache_generation(trainer)
    layouts = []

    def forced(prompts, completions):  # the tiny model's cost model may prefer one sequence: force each layout
        layouts.append(trainer._layout)
        return trainer._layout

    monkeypatch.setattr(trainer, "_forward_layout", forced, raising=False)
    tokens = {}
    for layout in ("bins", "one", "cut"):
        trainer._layout = layout
        for loss_type in ("grpo", "dapo"):
            trainer.args.loss_type = trainer.loss_type = loss_type
            on, _ = step_gradients(trainer, True)
            off, _ = step_gradients(trainer, False)
            assert_same_gradients(on, off)
        tokens[layout] = trainer._metrics["train"]["batching/computed_tokens"][-2]
    real = trainer._metrics["train"]["batching/real_tokens"][-2]
    assert real == tokens["one"] < tokens["bins"] < tokens["cut"]
    assert "bins" in layouts and trainer._packing_fallbacks == 0
    del trainer._generate_and_score_completions  # drop the cache
    trainer.args.padding_free_batches = True
