"""Identification claims' decision rules on hand-made inputs, and the ID-2 ratio against eager attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rh.heads import Head, HeadShape
from rh.id_claims import general_heads_exist, needle_mass_per_head, needle_mass_ratios, sparsity, variants_share_heads
from rh.rankings import Ranking
from rh.scoring import SampleScores



def test_needle_mass_ratio_equals_eager_attention(tiny, tiny_eager, tiny_samples):
    heads = [Head(1, 2), Head(3, 5)]
    got = needle_mass_ratios(tiny, tiny_samples, heads, batch_size=4)
    for s, g in zip(tiny_samples, got):
        with torch.no_grad():
            att = tiny_eager.model(input_ids=torch.tensor([s.input_ids]), output_attentions=True).attentions
        a, b = s.needle_span
        want = np.mean([float(att[h.layer][0, h.head, -1, a:b].sum()) / (b - a) * len(s.input_ids) for h in heads])
        assert g == pytest.approx(want, rel=1e-4)


def _scores(n_trials, n_heads, strong, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 0.02, (n_trials, n_heads))
    s[:, :strong] = rng.uniform(0.5, 0.9, (n_trials, strong))
    return SampleScores("wu24", [str(i) for i in range(n_trials)], s[:, None, :], np.ones(n_trials, bool),
                        [{} for _ in range(n_trials)])


def test_sparsity_is_decided_by_where_the_ci_lies():
    assert sparsity(_scores(30, 200, 2), n_boot=500).supported  # 1% of heads, CI far below 5%
    dense = sparsity(_scores(30, 200, 30), n_boot=500)  # 15% of heads
    assert dense.refuted and dense.statistic == pytest.approx(0.15)
    few = sparsity(_scores(3, 200, 2), n_boot=500)
    assert few.inconclusive and "trials" in few.reason


def _ranking(shape, seed):
    rng = np.random.default_rng(seed)
    return Ranking("t", shape, {h: float(v) for h, v in zip(shape.all_heads(), rng.random(shape.n_total))})


def test_general_heads_are_tested_per_head_on_fresh_prompts(tiny, tiny_samples):
    same = _ranking(tiny.shape, 0)
    heads = same.top(3)
    per = needle_mass_per_head(tiny, tiny_samples, heads, batch_size=4)
    assert per.shape == (len(tiny_samples), 3)
    np.testing.assert_allclose(per.mean(axis=1), needle_mass_ratios(tiny, tiny_samples, heads, batch_size=4), rtol=1e-5)
    tasks = {"a": tiny_samples, "b": tiny_samples}
    v = general_heads_exist(tiny, {"a": same, "b": same}, tasks, k=3, accuracy={"a": 0.9, "b": 0.9})
    assert v.details["candidates"] == [str(h) for h in heads] and set(v.details["per_head"]) == set(v.details["candidates"])
    # a model that does not retrieve on a task has no general heads to find, whatever its attention does
    low = general_heads_exist(tiny, {"a": same, "b": same}, tasks, k=3, accuracy={"a": 0.0, "b": 0.9})
    assert low.inconclusive and "floor" in low.reason
    assert general_heads_exist(tiny, {"a": same}, {"a": tiny_samples}, k=3, accuracy={"a": 0.9}).inconclusive


def test_variants_claim_is_inconclusive_without_a_pair_or_with_different_shapes():
    a = _ranking(HeadShape(4, 4, 2, 4), 1)
    assert variants_share_heads(a, None, k=3).inconclusive
    assert variants_share_heads(a, _ranking(HeadShape(5, 4, 2, 4), 1), k=3).inconclusive
    assert variants_share_heads(a, a, k=3).statistic == 3
