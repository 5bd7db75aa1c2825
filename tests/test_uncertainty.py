"""Unit tests of rh.uncertainty: the vectorised bootstrap against a plain loop with the same draws,
p_top at the extremes and under ties, group resampling, uncounted prompts, narrowing with the
number of prompts, JSON round trips (alone and inside a Ranking) and the error messages."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from rh.heads import Head, HeadShape
from rh.rankings import Ranking
from rh.scoring import SampleScores, aggregate
from rh.uncertainty import (
    RankingUncertainty,
    bootstrap_indices,
    default_sizes,
    ranking_uncertainty,
    uncertainty_of,
    with_uncertainty,
)


SMALL = HeadShape(n_layers=2, n_heads=3, n_kv_heads=1, head_dim=4)


def scored_from(values: np.ndarray, counted=None, method="sum_attention") -> SampleScores:
    n = values.shape[0]
    counted = np.ones(n, bool) if counted is None else np.asarray(counted, bool)
    return SampleScores(method, [f"p{i}" for i in range(n)], np.asarray(values, float), counted, [{} for _ in range(n)])


def ranking_of(scored: SampleScores, shape: HeadShape) -> Ranking:
    fake = [SimpleNamespace(task="t", length=1, depth=0.0)] * len(scored.ids)
    return aggregate(shape, fake, scored)


# --------------------------------------------------------------------------- a loop to compare with


def loop_bootstrap(values, counted, groups, shape, k, n_boot, level, seed, size=None):
    """Plain Python: units by first counted appearance, the documented draws, one mean per round."""
    order: list = []
    members: dict = {}
    for i in range(len(values)):
        if not counted[i]:
            continue
        key = groups[i] if groups is not None else i
        if key not in members:
            order.append(key)
            members[key] = []
        members[key].append(i)
    n_units = len(order)
    size = n_units if size is None else size
    draws = np.random.default_rng(seed).integers(0, n_units, size=(n_boot, size))
    heads = [(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    round_means, tops = [], []
    for r in range(n_boot):
        rows = [i for u in draws[r] for i in members[order[u]]]
        means = {hd: sum(values[i][hd] for i in rows) / len(rows) for hd in heads}
        round_means.append(means)
        tops.append(sorted(heads, key=lambda hd: (-means[hd], hd[0], hd[1]))[:k])
    tail = (1 - level) / 2
    ci = {Head(*hd): tuple(np.percentile([m[hd] for m in round_means], [100 * tail, 100 * (1 - tail)]))
          for hd in heads}
    p_top = {Head(*hd): sum(hd in t for t in tops) / n_boot for hd in heads}
    return ci, p_top, tops


def test_cis_and_p_top_equal_a_loop_with_the_same_draws():
    rng = np.random.default_rng(3)
    n = 30
    values = rng.normal(size=(n, 2, 3)) + np.array([[0.4, 0.2, 0.0], [0.3, 0.1, -0.2]])
    counted = rng.random(n) > 0.2
    groups = [f"g{rng.integers(0, 9)}" for _ in range(n)]  # uneven group sizes, in scrambled order
    for g in (None, groups):
        unc = ranking_uncertainty(scored_from(values, counted), SMALL, k=2, groups=g, n_boot=120,
                                  level=0.9, seed=11, sizes=[3, 5])
        ci, p_top, _ = loop_bootstrap(values, counted, g, SMALL, 2, 120, 0.9, 11)
        assert unc.unit == ("prompt" if g is None else "group")
        for h in SMALL.all_heads():
            np.testing.assert_allclose(unc.ci[h], ci[h], rtol=1e-12, atol=1e-12)
            assert unc.p_top[h] == p_top[h]
        full = ranking_of(scored_from(values, counted), SMALL)
        assert unc.top_k == full.top(2)
        assert unc.stable_core == [h for h in full.heads if p_top[h] >= 0.9]
        # narrowing at a subsample size: the same loop with `size` units per round
        for row in unc.narrowing[:2]:
            n_sub = row["n_units"]
            ci_n, p_n, tops = loop_bootstrap(values, counted, g, SMALL, 2, 120, 0.9, 11, size=n_sub)
            top = [(h.layer, h.head) for h in full.top(2)]
            assert row["core_size"] == sum(p >= 0.9 for p in p_n.values())
            assert row["mean_ci_width_top_k"] == pytest.approx(np.mean([ci_n[h][1] - ci_n[h][0] for h in full.top(2)]),
                                                               rel=1e-12)
            assert row["mean_top_k_overlap"] == pytest.approx(np.mean([len(set(t) & set(top)) / 2 for t in tops]))


def test_return_tops_keeps_each_rounds_top_k_as_the_loop_orders_it():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(24, 2, 3))
    counted = np.ones(24, bool)
    groups = [f"g{i // 2}" for i in range(24)]
    unc = ranking_uncertainty(scored_from(values, counted), SMALL, k=2, groups=groups, n_boot=60, seed=4,
                              return_tops=True)
    _, _, tops = loop_bootstrap(values, counted, groups, SMALL, 2, 60, 0.95, 4)
    assert unc.boot_tops.shape == (60, 2)
    assert [[(i // 3, i % 3) for i in row] for row in unc.boot_tops.tolist()] == [list(t) for t in tops]
    assert ranking_uncertainty(scored_from(values, counted), SMALL, k=2, n_boot=60).boot_tops is None


def test_bootstrap_indices_are_the_documented_draws():
    idx = bootstrap_indices(7, 60, seed=5, size=4)
    assert idx.shape == (60, 4) and idx.min() >= 0 and idx.max() < 7
    np.testing.assert_array_equal(idx, np.random.default_rng(5).integers(0, 7, size=(60, 4)))
    assert bootstrap_indices(7, 60, seed=5).shape == (60, 7)


def test_a_head_with_a_huge_margin_is_always_top_and_in_the_core_tied_heads_are_not():
    rng = np.random.default_rng(0)
    n = 40
    values = rng.normal(0, 0.05, size=(n, 2, 3))
    values[:, 0, 0] += 10.0  # far above everything
    values[:, 1, 0] = 1.0 + rng.normal(size=n)  # L1H0 and L1H2: the same distribution
    values[:, 1, 2] = 1.0 + rng.normal(size=n)
    unc = ranking_uncertainty(scored_from(values), SMALL, k=2, n_boot=300, seed=1)
    assert unc.p_top[Head(0, 0)] == 1.0
    assert unc.stable_core[0] == Head(0, 0)
    for h in (Head(1, 0), Head(1, 2)):
        assert 0.0 < unc.p_top[h] < 1.0
        assert h not in unc.stable_core
    assert unc.p_top[Head(1, 0)] + unc.p_top[Head(1, 2)] == pytest.approx(1.0)  # they share the second slot
    assert unc.ci[Head(0, 0)][0] > 9.9 > unc.ci[Head(1, 0)][1]


def test_exact_ties_go_to_the_lower_layer_and_head_in_every_round():
    rng = np.random.default_rng(1)
    values = rng.normal(0, 0.1, size=(20, 2, 3))
    values[:, 1, 1] = 5.0 + rng.normal(size=20)
    values[:, 0, 2] = values[:, 1, 1]  # identical in every prompt: L0H2 wins every tie, as Ranking.heads does
    unc = ranking_uncertainty(scored_from(values), SMALL, k=1, n_boot=100)
    assert ranking_of(scored_from(values), SMALL).top(1) == [Head(0, 2)] == unc.top_k
    assert unc.p_top[Head(0, 2)] == 1.0 and unc.p_top[Head(1, 1)] == 0.0
    assert unc.stable_core == [Head(0, 2)]


def test_groups_move_together_duplicates_do_not_shrink_the_ci():
    rng = np.random.default_rng(2)
    n_groups, m = 25, 4
    unique = rng.normal(size=(n_groups, 2, 3))
    dup = np.repeat(unique, m, axis=0)  # each group: m copies of one prompt
    groups = [f"g{i}" for i in range(n_groups) for _ in range(m)]
    by_group = ranking_uncertainty(scored_from(dup), SMALL, k=2, groups=groups, n_boot=200, seed=4)
    one_each = ranking_uncertainty(scored_from(unique), SMALL, k=2, n_boot=200, seed=4)
    as_prompts = ranking_uncertainty(scored_from(dup), SMALL, k=2, n_boot=200, seed=4)
    assert by_group.n_units == n_groups and by_group.n_prompts == n_groups * m
    for h in SMALL.all_heads():  # groups of equal size: resampling groups == resampling their values
        np.testing.assert_allclose(by_group.ci[h], one_each.ci[h], rtol=1e-12, atol=1e-12)
    ratio = np.mean([by_group.ci_width(h) / as_prompts.ci_width(h) for h in SMALL.all_heads()])
    assert ratio > 1.6  # ~sqrt(m) = 2: treating the copies as independent fakes precision


def test_uncounted_prompts_are_ignored():
    rng = np.random.default_rng(4)
    good = rng.normal(size=(24, 2, 3))
    junk = np.full((6, 2, 3), 1e6)
    junk[:, 0, 1] = np.nan  # not even finite: never read
    values = np.concatenate([good[:10], junk[:3], good[10:], junk[3:]])
    counted = np.array([True] * 10 + [False] * 3 + [True] * 14 + [False] * 3)
    g_good = [f"g{i // 3}" for i in range(24)]
    groups = g_good[:10] + ["g0", "junk", "junk"] + g_good[10:] + ["junk"] * 3  # a group with none counted
    for g_all, g_ref in ((None, None), (groups, g_good)):
        got = ranking_uncertainty(scored_from(values, counted), SMALL, k=2, groups=g_all, n_boot=100, sizes=[4])
        ref = ranking_uncertainty(scored_from(good), SMALL, k=2, groups=g_ref, n_boot=100, sizes=[4])
        assert got.to_json() == ref.to_json()
        assert got.n_prompts == 24


def test_narrowing_core_grows_and_ci_shrinks_with_the_number_of_prompts():
    rng = np.random.default_rng(7)
    shape = HeadShape(6, 8, 2, 4)
    n = 240
    values = rng.normal(0, 1.5, size=(n, 6, 8))
    real = [(1, 3), (2, 0), (3, 5), (4, 4), (5, 1)]
    for l, h in real:
        values[:, l, h] += 1.2
    sizes = [8, 30, 120, 240]
    unc = ranking_uncertainty(scored_from(values), shape, k=5, n_boot=200, sizes=sizes, seed=0)
    rows = unc.narrowing
    assert [r["n_units"] for r in rows] == sizes
    cores = [r["core_size"] for r in rows]
    widths = [r["mean_ci_width_top_k"] for r in rows]
    overlaps = [r["mean_top_k_overlap"] for r in rows]
    assert cores == sorted(cores) and cores[0] <= 1 and cores[-1] == 5, cores
    for (n1, a), (n2, b) in zip(zip(sizes, widths), zip(sizes[1:], widths[1:])):  # width ~ 1/sqrt(n)
        assert 0.8 < (a / b) / np.sqrt(n2 / n1) < 1.25, widths
    assert overlaps == sorted(overlaps) and overlaps[-1] > 0.95, overlaps
    assert set(unc.stable_core) == {Head(*x) for x in real}
    # the full-size row is the main result
    assert rows[-1]["core_size"] == len(unc.stable_core)
    assert rows[-1]["mean_ci_width_top_k"] == pytest.approx(np.mean([unc.ci_width(h) for h in unc.top_k]))


def test_default_sizes():
    assert default_sizes(100) == [25, 50, 75, 100]
    assert default_sizes(3) == [2, 3]
    assert default_sizes(2) == [2]
    unc = ranking_uncertainty(scored_from(np.random.default_rng(0).normal(size=(12, 2, 3))), SMALL, k=1, n_boot=50)
    assert [r["n_units"] for r in unc.narrowing] == [3, 6, 9, 12]


# --------------------------------------------------------------------------- serialisation


@pytest.fixture(scope="module")
def example():
    values = np.random.default_rng(9).normal(size=(16, 2, 3))
    scored = scored_from(values)
    groups = [f"g{i // 2}" for i in range(16)]
    return scored, ranking_uncertainty(scored, SMALL, k=2, groups=groups, n_boot=60, seed=3)


def test_uncertainty_json_round_trip(example):
    _, unc = example
    data = json.loads(json.dumps(unc.to_json()))  # plain JSON types only
    assert data["ci"]["L0H1"] == list(unc.ci[Head(0, 1)])
    assert all(isinstance(h, str) for h in data["stable_core"] + data["top_k"])
    back = RankingUncertainty.from_json(data)
    assert back == unc
    assert back.to_json() == unc.to_json()
    with pytest.raises(ValueError, match="not a valid rh ranking uncertainty.*format"):
        RankingUncertainty.from_json({**data, "format": "x"})


def test_ranking_carries_its_uncertainty_through_json_and_files(example, tmp_path):
    scored, unc = example
    plain = ranking_of(scored, SMALL)
    carried = with_uncertainty(plain, unc)
    assert plain.uncertainty is None and carried.scores == plain.scores
    assert uncertainty_of(carried) == unc and uncertainty_of(plain) is None
    back = Ranking.from_json(json.loads(json.dumps(carried.to_json())))
    assert back == carried and uncertainty_of(back) == unc
    path = carried.save(tmp_path / "r.json")
    assert uncertainty_of(Ranking.load(path)) == unc
    assert carried.to_csv() == plain.to_csv()  # CSV unchanged


def test_old_ranking_json_without_the_key_still_loads(example, tmp_path):
    scored, _ = example
    plain = ranking_of(scored, SMALL)
    data = plain.to_json()
    assert "uncertainty" not in data  # files written without uncertainty look as before
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    loaded = Ranking.load(old)
    assert loaded.uncertainty is None and loaded.scores == plain.scores
    assert Ranking.from_json({**data, "uncertainty": None}).uncertainty is None
    with pytest.raises(ValueError, match="uncertainty is a list"):
        Ranking.from_json({**data, "uncertainty": [1]})


def test_with_uncertainty_refuses_a_foreign_ranking(example):
    scored, unc = example
    plain = ranking_of(scored, SMALL)
    other_method = Ranking("wu24", SMALL, dict(plain.scores))
    with pytest.raises(ValueError, match="'sum_attention' scores but the ranking is by 'wu24'"):
        with_uncertainty(other_method, unc)
    big = HeadShape(3, 3, 1, 4)
    with pytest.raises(ValueError, match="2 x 3 heads but the ranking is for 3 x 3"):
        with_uncertainty(Ranking("sum_attention", big, {h: 0.0 for h in big.all_heads()}), unc)
    flipped = Ranking("sum_attention", SMALL, {h: -v for h, v in plain.scores.items()})
    with pytest.raises(ValueError, match="top 2 .* differs .* other prompts"):
        with_uncertainty(flipped, unc)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def scored6():
    return scored_from(np.random.default_rng(0).normal(size=(10, 2, 3)))


@pytest.mark.parametrize("k", [0, 7, -1, 2.0, True, None])
def test_bad_k(scored6, k):
    with pytest.raises(ValueError, match=r"k=.*1 <= k <= 6.*6 heads"):
        ranking_uncertainty(scored6, SMALL, k=k)


@pytest.mark.parametrize("n_boot", [49, 0, 100.0])
def test_bad_n_boot(scored6, n_boot):
    with pytest.raises(ValueError, match=r"n_boot=.*at least 50"):
        ranking_uncertainty(scored6, SMALL, k=1, n_boot=n_boot)


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1])
def test_bad_level(scored6, level):
    with pytest.raises(ValueError, match=r"level=.*strictly between 0 and 1"):
        ranking_uncertainty(scored6, SMALL, k=1, level=level)


def test_bad_core_threshold_and_sizes(scored6):
    with pytest.raises(ValueError, match=r"core_threshold=.*\(0, 1\]"):
        ranking_uncertainty(scored6, SMALL, k=1, core_threshold=0)
    with pytest.raises(ValueError, match=r"sizes\[i\]=11.*2 <= sizes\[i\] <= 10.*there are 10"):
        ranking_uncertainty(scored6, SMALL, k=1, sizes=[5, 11])
    with pytest.raises(ValueError, match="sizes is empty"):
        ranking_uncertainty(scored6, SMALL, k=1, sizes=[])


def test_shape_mismatch(scored6):
    with pytest.raises(ValueError, match=r"shape \(10, 2, 3\) but the model has 3 layers x 3 heads.*HeadShape"):
        ranking_uncertainty(scored6, HeadShape(3, 3, 1, 4), k=1)


def test_fewer_than_two_counted_units():
    values = np.random.default_rng(0).normal(size=(5, 2, 3))
    with pytest.raises(ValueError, match=r"only 1 counted prompt .*1 counted prompts of 5.*at least 2.*score more"):
        ranking_uncertainty(scored_from(values, [False, True, False, False, False]), SMALL, k=1)
    with pytest.raises(ValueError, match=r"only 1 counted group .*groups=None"):
        ranking_uncertainty(scored_from(values), SMALL, k=1, groups=["a"] * 5)
    with pytest.raises(ValueError, match=r"only 0 counted prompts"):
        ranking_uncertainty(scored_from(values, [False] * 5), SMALL, k=1)


def test_bad_groups_and_non_finite_scores(scored6):
    with pytest.raises(ValueError, match=r"groups has 3 labels but scored has 10 prompts.*s.group"):
        ranking_uncertainty(scored6, SMALL, k=1, groups=["a", "b", "c"])
    with pytest.raises(ValueError, match="one string"):
        ranking_uncertainty(scored6, SMALL, k=1, groups="abcdefghij")
    values = np.random.default_rng(0).normal(size=(4, 2, 3))
    values[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"non-finite score for counted prompt 'p2'"):
        ranking_uncertainty(scored_from(values), SMALL, k=1)
