"""Unit tests of rh.causal.selection_conditions: the baseline / top-K / random-K / bottom-K
conditions the walkthrough notebook evaluates, each an rh.ablation.Ablation that declares its
selection, K and draw."""

from __future__ import annotations

import pytest

from rh.causal import selection_conditions
from rh.seeds import derive_seed
from rh.heads import Head, random_heads
from rh.rankings import Ranking



@pytest.fixture(scope="module")
def ranking(tiny):
    """Scores fall with layer * 8 + head: L0H0 best, L3H7 worst."""
    heads = tiny.shape.all_heads()
    return Ranking("sum_attention", tiny.shape, {h: float(100 - (h.layer * 8 + h.head)) for h in heads})


def test_names_and_heads(tiny, ranking):
    conds = selection_conditions(tiny, ranking, [2, 4], draws=2, seed=7)
    assert list(conds) == ["baseline", "top2", "random2#0", "random2#1", "bottom2",
                           "top4", "random4#0", "random4#1", "bottom4"]
    opened = {}
    for name, cond in conds.items():
        assert cond.name == name
        with cond.open(tiny) as heads:
            opened[name] = heads
    assert opened["baseline"] == []
    assert opened["top2"] == [Head(0, 0), Head(0, 1)]
    assert opened["bottom4"] == [Head(3, 4), Head(3, 5), Head(3, 6), Head(3, 7)]
    for k in (2, 4):
        top = set(opened[f"top{k}"])
        for d in range(2):  # the draws necessity_outcomes makes for the same seed
            expect = random_heads(tiny.shape, k, exclude=sorted(top), seed=derive_seed(7, k, d))
            assert sorted(opened[f"random{k}#{d}"]) == sorted(expect)
            assert not top & set(opened[f"random{k}#{d}"])
    assert [c.selection for c in conds.values()] == ["baseline"] + ["top", "random", "random", "bottom"] * 2
    assert [c.k for c in conds.values()] == [0] + [2] * 4 + [4] * 4
    assert [c.draw for c in conds.values()] == [None] + [None, 0, 1, None] * 2


def test_options(tiny, ranking):
    assert list(selection_conditions(tiny, ranking, [3], draws=0, bottom=False, baseline=False)) == ["top3"]
    with pytest.raises(ValueError, match="draws"):
        selection_conditions(tiny, ranking, [3], draws=-1)
