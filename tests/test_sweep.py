"""CA-9 (the ablation curve over a sweep of K) and CA-10 (minimality of the top-K set): the rules
against independent computations of their tests, and the mechanisms on the tiny model against the
passes written out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rh.rules.sweep import ablation_curve, curve_band, curve_levels, minimality


def _betting_p_below(x, m, cap=0.95):
    """Waudby-Smith and Ramdas' betting p-value of "mean >= m", written out one trial at a time:
    the Kelly bet from the trials before (one pseudo-trial at m with the Bernoulli(m) variance)."""
    xs, best, log_k = [m], 0.0, 0.0
    for v in x:
        mu = sum(xs) / len(xs)
        var = (m * (1 - m) + sum((a - mu) ** 2 for a in xs)) / len(xs)  # the pseudo-trial's variance, then the data
        gap = m - mu
        lam = min(max(gap / max(var + gap * gap, 1e-12), 0.0), cap / (1 - m)) if gap > 0 else 0.0
        log_k += math.log(max(1 + lam * (m - v), 1e-300))
        best = max(best, log_k)
        xs.append(v)
    return min(1.0, math.exp(-best))


def test_curve_levels_are_the_fractions_of_the_heads_rounded_and_capped():
    assert curve_levels(270, (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)) == [3, 5, 14, 27, 54, 135]
    assert curve_levels(32, (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)) == [1, 2, 3, 6, 16]  # repeats merged
    assert curve_levels(10, (0.9,)) == [5]  # at most half: a random set from outside the top K must exist
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        curve_levels(270, (0.0, 0.5))
    with pytest.raises(ValueError, match="at least 2 heads"):
        curve_levels(1, (0.5,))


def _curve(n, top_rate, rand_rate, levels=4, seed=0):
    rng = np.random.default_rng(seed)
    base = np.ones(n)
    top = (rng.random((n, levels)) < top_rate).astype(float)
    rand = (rng.random((n, levels)) < rand_rate).astype(float)
    return base, top, rand


def test_the_curve_rule_decides_from_betting_tests_of_the_per_item_area():
    """Supported, refuted and inconclusive as the two betting p-values (computed here trial by trial)
    say; the area is the mean over items of the mean gap over K."""
    for n, top_rate, rand_rate, seed in [(40, 0.2, 0.9, 1), (60, 0.8, 0.8, 2), (12, 0.5, 0.7, 3), (40, 0.6, 0.8, 4)]:
        base, top, rand = _curve(n, top_rate, rand_rate, seed=seed)
        v = ablation_curve(base, top, rand, [1, 2, 4, 8], min_area=0.1, alpha=0.05, n_boot=200)
        area = (rand - top).mean(axis=1)
        x = (area + 1) / 2
        p_sup = _betting_p_below(1 - x, 0.5)
        p_ref = _betting_p_below(x, 0.55)
        assert v.details["p_support"] == pytest.approx(p_sup, rel=1e-9)
        assert v.details["p_refute"] == pytest.approx(p_ref, rel=1e-9)
        assert v.effect == pytest.approx(area.mean())
        want = "supported" if p_sup < 0.05 and p_ref >= 0.05 else "refuted" if p_ref < 0.05 and p_sup >= 0.05 \
            else "inconclusive"
        assert v.status == want, (n, top_rate, rand_rate, v.reason)
    strong = ablation_curve(*_curve(40, 0.1, 0.9, seed=5), [1, 2, 4, 8], n_boot=200)
    same = ablation_curve(*_curve(80, 0.7, 0.7, seed=6)[:2], _curve(80, 0.7, 0.7, seed=6)[1], [1, 2, 4, 8], n_boot=200)
    assert strong.supported and same.status == "refuted"  # identical curves: an area of exactly 0
    assert strong.min_effect == 0.1 and strong.claim == "CA-9"


def test_the_curve_rule_refuses_a_model_below_the_floor_and_bad_shapes():
    base, top, rand = _curve(40, 0.1, 0.9)
    v = ablation_curve(np.zeros(40), top, rand, [1, 2, 4, 8])
    assert v.inconclusive and "floor" in v.reason
    with pytest.raises(ValueError, match="expected"):
        ablation_curve(base, top[:, :3], rand[:, :3], [1, 2, 4, 8])


def test_the_band_is_simultaneous_over_k():
    """The band holds at every K at once: wider than the pointwise 95% intervals, and in repeated
    samples from a known curve it covers the whole true curve in about 95% of them."""
    rng = np.random.default_rng(7)
    true_gap = np.array([0.1, 0.3, 0.5, 0.2])
    covered = 0
    reps = 200
    for r in range(reps):
        top = (rng.random((60, 4)) < 0.4).astype(float)
        rand = (rng.random((60, 4)) < 0.4 + true_gap).astype(float)
        gap, lo, hi = curve_band(top, rand, n_boot=400, seed=r)
        covered += bool(np.all((lo <= true_gap) & (true_gap <= hi)))
        if r == 0:
            d = rand - top
            point = 1.96 * d.std(axis=0, ddof=1) / np.sqrt(60)
            assert np.all(hi - gap >= point - 1e-9)
    assert 0.90 <= covered / reps <= 0.99


def test_minimality_supports_only_when_every_head_is_shown_needed_and_names_the_others():
    """Per head the exact paired test of the recovery (rh.rules.paired.paired_tests, called here on
    the changes); supported when every head's support p is below α, refuted when a head's Holm-adjusted
    refutation p is, the heads shown not needed and those undecided named."""
    from rh.rules.core import Bounds
    from rh.rules.paired import paired_tests
    from rh.stats import holm

    n = 60
    top = np.zeros(n)
    base = np.ones(n)
    strong = np.r_[np.ones(30), np.zeros(30)]  # recovers half the items
    nothing = np.zeros(n)
    some = np.r_[np.ones(6), np.zeros(54)]
    v = minimality(top, {"L1H1": strong, "L2H2": strong}, base)
    assert v.supported and v.details["needed"] == ["L1H1", "L2H2"]
    v = minimality(top, {"L1H1": strong, "L2H2": nothing, "L3H3": some}, base, min_recovery=0.1)
    ps = {h: paired_tests(c - top, Bounds("greater", 0.0, 0.1)) for h, c in
          {"L1H1": strong, "L2H2": nothing, "L3H3": some}.items()}
    adj = dict(zip(ps, holm([ps[h][1] for h in ps])))
    assert v.details["p_refute_holm"] == pytest.approx(adj)
    assert v.details["p_support"] == pytest.approx({h: ps[h][0] for h in ps})
    assert v.status == "refuted" and v.details["not_needed"] == ["L2H2"]
    assert "L2H2" in v.reason and v.effect == 0.0
    assert v.details["undecided"] == [h for h in ps if ps[h][0] >= 0.05 and adj[h] >= 0.05]
    few = minimality(top[:10], {"L1H1": strong[:10], "L2H2": nothing[:10]}, base[:10])
    assert few.inconclusive and "L2H2" in few.reason  # too few items to show either
    with pytest.raises(ValueError, match="no head"):
        minimality(top, {}, base)


def test_curve_and_minimality_outcomes_equal_the_passes_written_out(tiny, tiny_samples):
    """rh.causal's CA-9 and CA-10 mechanisms, in both phases: every entry equals the teacher-forced
    pass under the ablation opened by hand; each item's random set is its own, outside the top K
    and seeded (the same sets again)."""
    from rh.ablation import ablate
    from rh.causal import curve_outcomes, minimality_outcomes
    from rh.evaluate import teacher_forced
    from rh.rankings import Ranking

    rng = np.random.default_rng(0)
    ranking = Ranking("test", tiny.shape, {h: float(rng.random()) for h in tiny.shape.all_heads()})
    ks = [1, 3, 6]
    for phase in ("all", "decode"):
        out = curve_outcomes(tiny, tiny_samples, ranking, ks, seed=5, batch_size=4, phase=phase)
        again = curve_outcomes(tiny, tiny_samples, ranking, ks, seed=5, batch_size=4, phase=phase)
        assert again.random_heads == out.random_heads
        base = teacher_forced(tiny, tiny_samples, progress=False)["correct"].to_numpy(float)
        np.testing.assert_array_equal(out.base, base)
        for j, k in enumerate(ks):
            with ablate(tiny, ranking.top(k), phase=phase):
                want = teacher_forced(tiny, tiny_samples, progress=False)["correct"].to_numpy(float)
            np.testing.assert_array_equal(out.top[:, j], want)
            assert len({tuple(hs) for hs in out.random_heads[j]}) > 1 or k == 6  # items draw their own sets
            for i, s in enumerate(tiny_samples):
                hs = out.random_heads[j][i]
                assert len(hs) == k and not set(hs) & set(ranking.top(k))
                with ablate(tiny, hs, phase=phase):
                    one = teacher_forced(tiny, [s], progress=False)["correct"].iloc[0]
                assert out.rand[i, j] == one
        heads = ranking.top(3)
        top, dropped = minimality_outcomes(tiny, tiny_samples, heads, batch_size=4, phase=phase)
        assert list(dropped) == [str(h) for h in heads]
        for h in heads:
            with ablate(tiny, [x for x in heads if x != h], phase=phase):
                want = teacher_forced(tiny, tiny_samples, progress=False)["correct"].to_numpy(float)
            np.testing.assert_array_equal(dropped[str(h)], want)


def test_the_figures_draw_the_curve_with_its_band_and_each_heads_recovery():
    """CA-9's and CA-10's report figures draw from the verdicts' details (PNG bytes), and draw
    nothing without such a verdict."""
    from rh.catalogue.causal import curve_figure, minimality_figure

    base, top, rand = _curve(40, 0.2, 0.8)
    curve = ablation_curve(base, top, rand, [3, 5, 14, 27], n_boot=100).to_dict()
    mini = minimality(np.zeros(40), {"L1H1": np.r_[np.ones(20), np.zeros(20)], "L2H2": np.zeros(40)},
                      np.ones(40)).to_dict()
    for fig in (curve_figure([curve, mini]), minimality_figure([curve, mini])):
        assert fig is not None and fig[:8] == b"\x89PNG\r\n\x1a\n"
    assert curve_figure([mini]) is None and minimality_figure([curve]) is None
