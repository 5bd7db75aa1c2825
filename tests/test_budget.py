"""Unit tests of rh.budget: token-layers counted by decoder-layer hooks against tokens x layers
computed by hand, the calibration, and the planner that fits claims into a budget."""

from __future__ import annotations

import pytest
import torch

from rh.models import decoder_layers
from rh.budget import TokenLayerCounter, calibrate, plan_budget



def test_counter_counts_tokens_times_layers_per_label_and_leaves_no_hook(tiny):
    layers = decoder_layers(tiny)
    before = [len(layer._forward_pre_hooks) for layer in layers]
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    ids = torch.randint(0, 1000, (3, 17))
    with torch.no_grad():
        with counter.charged_to("a"):
            tiny.model(input_ids=ids, use_cache=False)
        with counter.charged_to("b"):
            tiny.model(input_ids=ids[:1, :5], use_cache=False)
    handle.remove()
    assert counter.counts == {"a": 3 * 17 * 4, "b": 1 * 5 * 4} and counter.total == 3 * 17 * 4 + 20
    assert counter.label == "other"
    assert set(counter.seconds) >= {"a", "b", "other"} and all(t >= 0 for t in counter.seconds.values())
    assert [len(layer._forward_pre_hooks) for layer in layers] == before
    with torch.no_grad():
        tiny.model(input_ids=ids, use_cache=False)
    assert counter.total == 3 * 17 * 4 + 20  # removed: nothing more is counted


def test_counter_counts_each_decoding_step_as_one_token_per_row(tiny):
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        ids = torch.randint(0, 1000, (2, 9))
        with torch.no_grad():
            tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert counter.total == (2 * 9 + 3 * 2) * 4  # the prefill, then 3 steps of 1 token per row (the 4th is not run)


def test_calibrate_gives_seconds_per_token_layer(tiny):
    per, how = calibrate(tiny, batch_size=2, length=16, repeats=1)
    assert 0 < per < 1 and "token-layer" in how and "2 x 16 tokens x 4 layers" in how


ITEMS = [("a", ["model", "ranking"]), ("b", ["model", "ranking", "big"]), ("c", ["model"]), ("d", ["model"])]
FIXTURES = {"model": 0, "ranking": 50, "big": 1000}


def test_plan_takes_the_cheapest_claims_first_and_pays_each_fixture_once():
    costs = {"a": 10, "b": 5, "c": 30, "d": 200}
    p = plan_budget(ITEMS, costs, FIXTURES, 100)  # c (30), then a (10 + 50): 90; b needs 1005, d 200
    assert p.chosen == ("a", "c") and p.cost == 90
    assert set(p.left_out) == {"b", "d"} and "over budget" in p.left_out["b"]
    everything = plan_budget(ITEMS, costs, FIXTURES, 10**9)
    assert everything.chosen == ("a", "b", "c", "d")  # collection order kept
    assert everything.cost == 10 + 5 + 30 + 200 + 50 + 1000  # ranking and big paid once


def test_plan_leaves_out_a_claim_with_no_recorded_cost():
    p = plan_budget(ITEMS, {"a": 1, "b": 1, "c": None}, FIXTURES, 10**9)
    assert "c" not in p.chosen and "no recorded cost" in p.left_out["c"]
    assert "no recorded cost" in p.left_out["d"]  # absent from the record altogether


def test_plan_with_no_budget_chooses_nothing():
    p = plan_budget(ITEMS, {"a": 1, "b": 1, "c": 1, "d": 1}, FIXTURES, 0)
    assert p.chosen == () and len(p.left_out) == 4


def test_plan_orders_every_costed_claim_cheapest_first_beyond_the_first_plan():
    p = plan_budget(ITEMS, {"a": 10, "b": 5, "c": 30, "d": 200}, FIXTURES, 100)
    assert p.order == ("c", "a", "d", "b")  # 30, 60, then d 200 (b still needs 1005 with ranking paid)
    assert set(p.chosen) == {"c", "a"} and p.order[: len(p.chosen)] == ("c", "a")


def test_each_claims_plain_bill_adds_what_the_savings_left_out_while_it_ran():
    """The report's per-claim line: paid token-layers, and the plain passes' (paid + the exact
    savings noted while the claim and the fixtures first set up for it ran), per claim id."""
    from rh.budget import claim_costs, claim_plain, format_cost

    verdicts = [{"claim": "CA-3", "token_layers_with_fixtures": 600, "saved_with_fixtures": 400},
                {"claim": "CA-3", "token_layers_with_fixtures": 0, "saved_with_fixtures": 0},
                {"claim": "CA-5", "token_layers_with_fixtures": 300}]
    assert claim_plain(verdicts) == {"CA-3": 1000, "CA-5": 300}
    text = format_cost({"total": 900, "by_claim": claim_costs(verdicts), "plain_by_claim": claim_plain(verdicts),
                        "saved": {"curtailment": 400}})
    lines = text.splitlines()
    assert "curtailment 400" in lines[1] and "would be 1,300" in lines[1]
    ca3 = next(x for x in lines if "CA-3" in x)
    assert "plain 1,000, paid 60% of it" in ca3
    assert "plain" not in next(x for x in lines if "CA-5" in x)  # nothing saved: no plain beside
