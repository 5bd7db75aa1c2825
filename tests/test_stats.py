"""Unit tests of rh.stats against independent computations (hand tables, closed forms, textbook cases)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from math import comb

import numpy as np
import pytest
import scipy.stats as sps
from hypothesis import given, settings
from hypothesis import strategies as st

from rh.heads import Head
from rh.rules.verdict import Verdict
from rh.stats import (
    bootstrap_ci,
    bootstrap_fraction_ci,
    fraction_ci,
    headset_null_p,
    holm,
    intersection_null_p,
    mcnemar_exact,
    min_attainable_p_binomial,
    min_attainable_p_headset,
    min_attainable_p_kendall,
    min_attainable_p_mcnemar,
    min_attainable_p_page,
    min_attainable_p_sign,
    min_attainable_p_wilcoxon,
    non_inferiority,
    paired_bootstrap_ci,
    proportion_ci,
    ratio_test_greater,
    sign_test_greater,
    spearman_ci,
    spearman_test,
    topk_overlap_test,
    trend_test,
)



def upper_tail(n: int, x: int) -> float:
    """P(Binomial(n, 1/2) >= x), summed by hand."""
    return sum(comb(n, k) for k in range(x, n + 1)) / 2**n


# ---------------------------------------------------------------- sign test


def test_sign_test_hand_case_drops_ties():
    diffs = [1, 1, 0.5, -2, 0, 0, 3, 1, -0.1, 2]  # 6 positive, 2 negative, 2 ties
    n_pos, n_neg, p = sign_test_greater(diffs)
    assert (n_pos, n_neg) == (6, 2)
    assert p == pytest.approx(upper_tail(8, 6), rel=1e-12)
    assert p == pytest.approx((28 + 8 + 1) / 256, rel=1e-12)


def test_sign_test_all_ties_gives_one():
    assert sign_test_greater([0, 0, 0]) == (0, 0, 1.0)
    assert sign_test_greater([]) == (0, 0, 1.0)


def test_sign_test_all_positive_hits_min_attainable_p():
    for n in (1, 5, 12):
        _, _, p = sign_test_greater(np.ones(n))
        assert p == pytest.approx(0.5**n, rel=1e-12)
        assert min_attainable_p_sign(n) == 0.5**n
    assert min_attainable_p_sign(0) == 1.0
    with pytest.raises(ValueError):
        min_attainable_p_sign(-1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=-3, max_value=3), max_size=40))
def test_sign_test_matches_binomial_tail(diffs):
    pos = sum(d > 0 for d in diffs)
    neg = sum(d < 0 for d in diffs)
    n_pos, n_neg, p = sign_test_greater(diffs)
    assert (n_pos, n_neg) == (pos, neg)
    expected = upper_tail(pos + neg, pos) if pos + neg else 1.0
    assert p == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_sign_test_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        sign_test_greater([1.0, float("nan")])


# ---------------------------------------------------------------- McNemar


def test_mcnemar_hand_table():
    # pairs (A, B): 5x (1,0), 1x (0,1), 3x (1,1), 2x (0,0)  ->  b = 5, c = 1
    a = [1] * 5 + [0] * 1 + [1] * 3 + [0] * 2
    b = [0] * 5 + [1] * 1 + [1] * 3 + [0] * 2
    assert mcnemar_exact(a, b) == pytest.approx((5, 1, 7 / 64))
    assert mcnemar_exact(a, b, alternative="less")[2] == pytest.approx(63 / 64)
    # two-sided: outcomes at least as unlikely as 5 of 6 are {0, 1, 5, 6}
    assert mcnemar_exact(a, b, alternative="two-sided")[2] == pytest.approx(14 / 64)
    # swapping A and B swaps b and c
    assert mcnemar_exact(b, a)[:2] == (1, 5)
    assert mcnemar_exact(b, a)[2] == pytest.approx(upper_tail(6, 1))


def test_mcnemar_equals_sign_test_on_differences():
    rng = np.random.default_rng(1)
    a = rng.random(60) < 0.7
    b = rng.random(60) < 0.5
    bb, cc, p = mcnemar_exact(a, b)
    n_pos, n_neg, p_sign = sign_test_greater(a.astype(int) - b.astype(int))
    assert (bb, cc) == (n_pos, n_neg)
    assert p == pytest.approx(p_sign)
    assert p == pytest.approx(upper_tail(bb + cc, bb))


def test_mcnemar_concordant_only_gives_one():
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError, match=r"length 3.*length 2"):
        mcnemar_exact([1, 0, 1], [1, 0])


def test_mcnemar_bad_input():
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_exact([1], [0], alternative="bigger")
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([2, 0], [1, 0])


# ---------------------------------------------------------------- Holm


def test_holm_textbook_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    adj = holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_handles_edges():
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == pytest.approx([0.2])
    assert holm([]) == []


@pytest.mark.parametrize("bad", [[0.1, float("nan")], [0.1, None], [1.5], [-0.1]])
def test_holm_rejects_bad_p(bad):
    with pytest.raises(ValueError):
        holm(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=20))
def test_holm_properties(ps):
    adj = holm(ps)
    m = len(ps)
    assert len(adj) == m
    for p, q in zip(ps, adj):
        assert p <= q + 1e-15
        assert q <= 1.0
    for i in range(m):
        for j in range(m):
            if ps[i] < ps[j]:
                assert adj[i] <= adj[j]
            if ps[i] == ps[j]:
                assert adj[i] == adj[j]
    i_min = int(np.argmin(ps))
    assert adj[i_min] == pytest.approx(min(1.0, m * ps[i_min]))
    # brute-force definition: adj_i = max over p_j <= p_i of min(1, (m - rank_j) * p_j)
    order = sorted(range(m), key=lambda k: ps[k])
    for i in range(m):
        expected = max(
            min(1.0, (m - r) * ps[order[r]]) for r in range(m) if ps[order[r]] <= ps[i]
        )
        assert adj[i] == pytest.approx(expected)


# ---------------------------------------------------------------- head-set null


def test_headset_null_p_hand_cases():
    null = [0.1, 0.2, 0.3, 0.4]
    assert headset_null_p(0.9, null) == pytest.approx(1 / 5)
    assert headset_null_p(0.25, null) == pytest.approx(3 / 5)
    assert headset_null_p(0.0, null) == 1.0
    assert headset_null_p(0.3, null) == pytest.approx(3 / 5)  # the tie counts as >=
    assert headset_null_p(0.5, [0.5] * 9) == 1.0
    assert headset_null_p(0.1 + 0.2, [0.3]) == 1.0  # float noise does not break a tie


def test_headset_null_p_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        headset_null_p(1.0, [])
    with pytest.raises(ValueError):
        headset_null_p(float("nan"), [1.0])
    with pytest.raises(ValueError):
        headset_null_p(1.0, [float("nan")])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_constant_is_degenerate():
    lo, hi = bootstrap_ci([0.1] * 50)
    assert lo == hi == pytest.approx(0.1)
    assert bootstrap_ci([3.0]) == (3.0, 3.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(3).normal(size=40)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    lo, hi = bootstrap_ci(x, seed=7)
    assert lo < x.mean() < hi
    # the percentile CI of the mean is close to the normal-theory interval
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_bootstrap_vectorised_matches_loop():
    x = np.random.default_rng(4).exponential(size=30)
    fast = bootstrap_ci(x, np.median, n_boot=2000, seed=5)
    # the same resampling, done one resample at a time by hand
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(x), size=(2000, len(x)))
    reps = np.array([np.median(x[i]) for i in idx])
    expected = np.quantile(reps, [0.025, 0.975])
    assert fast == pytest.approx(tuple(expected))
    # a statistic without an axis keyword takes the loop path and gives a sane interval
    lo, hi = bootstrap_ci(x, lambda v: float(np.median(v)), n_boot=500, seed=5)
    assert lo <= np.median(x) <= hi


def test_bootstrap_coverage_on_normal_data():
    rng = np.random.default_rng(12345)
    reps, n, mu = 200, 50, 2.0
    covered = 0
    for r in range(reps):
        x = rng.normal(mu, 1.5, size=n)
        lo, hi = bootstrap_ci(x, n_boot=1000, seed=r)
        covered += lo <= mu <= hi
    assert 0.88 * reps <= covered <= 0.99 * reps


def test_paired_bootstrap_ci():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert paired_bootstrap_ci(a, a - 0.5) == pytest.approx((0.5, 0.5))
    b = np.random.default_rng(6).normal(size=4)
    assert paired_bootstrap_ci(a, b, seed=2) == bootstrap_ci(a - b, seed=2)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- named results


def test_results_are_named_and_still_unpack():
    res = sign_test_greater([1.0, 1.0, -1.0, 0.0])
    n_pos, n_neg, p = res
    assert (res.n_pos, res.n_neg, res.pvalue) == (n_pos, n_neg, p) == (2, 1, 0.5)
    assert "decide" not in dir(__import__("rh.stats").stats)  # "not significant" has no path to "refuted"


# ---------------------------------------------------------------- Verdict


def make_verdict(**kw) -> Verdict:
    base = dict(
        claim="CA-1",
        params={"k": 10},
        status="supported",
        reason="top-K ablation drops accuracy by 0.3 more than random-K (p_adj = 0.002).",
        test="exact McNemar (one-sided)",
        statistic=12.0,
        p_value=0.001,
        p_adjusted=0.002,
        effect=0.3,
        ci=(0.18, 0.42),
        n=40,
        effect_name="accuracy drop, top-K minus random-K",
        details={"b": 12, "c": 0},
    )
    base.update(kw)
    return Verdict(**base)


def test_verdict_round_trip_through_json():
    v = make_verdict()
    d = json.loads(json.dumps(v.to_dict()))
    assert d["ci"] == [0.18, 0.42]
    assert Verdict.from_dict(d) == v


def test_verdict_to_dict_converts_numpy_and_nan():
    v = make_verdict(
        statistic=np.float64("nan"),
        p_value=np.float32(0.25),
        effect=np.float64(0.1),
        ci=(np.float64(0.0), np.float64(0.2)),
        n=np.int64(7),
        details={"arr": np.array([1, 2]), "x": np.float64(float("inf")), "t": (1, np.int32(2))},
    )
    d = v.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN/Infinity left
    assert d["statistic"] is None
    assert type(d["p_value"]) is float and type(d["n"]) is int
    assert d["details"] == {"arr": [1, 2], "x": None, "t": [1, 2]}
    back = Verdict.from_dict(json.loads(text))
    assert back.statistic is None and back.ci == (0.0, 0.2) and back.n == 7


def test_verdict_status_validation_and_properties():
    with pytest.raises(ValueError, match=r"'maybe'.*supported.*refuted.*inconclusive"):
        make_verdict(status="maybe")
    v = make_verdict(status="inconclusive", p_value=None, p_adjusted=None, ci=None)
    assert v.inconclusive and not v.supported and not v.refuted
    assert make_verdict(status="refuted").refuted
    assert make_verdict().supported
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.status = "supported"  # type: ignore[misc]


def test_verdict_from_dict_rejects_bad_keys():
    d = make_verdict().to_dict()
    with pytest.raises(ValueError, match="unknown"):
        Verdict.from_dict({**d, "extra": 1})
    del d["claim"]
    with pytest.raises(ValueError, match="missing"):
        Verdict.from_dict(d)


def test_verdict_explain_has_the_numbers():
    text = make_verdict().explain()
    for piece in (
        "CA-1", "k=10", "supported", "exact McNemar", "12", "0.001", "0.002",
        "0.3", "0.18", "0.42", "95%", "40", "0.05", "accuracy drop",
    ):
        assert piece in text
    assert len(text.splitlines()) >= 8
    assert "n/a" in make_verdict(status="inconclusive", ci=None, statistic=None).explain()


# ---------------------------------------------------------------- top-K overlap (hypergeometric)


def hyper_upper_tail(n_total: int, na: int, nb: int, x: int) -> float:
    """P(|A ∩ B| >= x) for a random nb-subset B and a fixed na-set A, summed with math.comb."""
    return sum(comb(na, j) * comb(n_total - na, nb - j) for j in range(x, min(na, nb) + 1)) / comb(n_total, nb)


def test_topk_overlap_matches_hand_hypergeometric_sums():
    a = [Head(0, h) for h in range(5)]
    b = [Head(0, 3), Head(0, 4), Head(1, 0), Head(1, 1), Head(1, 2), Head(1, 3), Head(1, 4)]
    overlap, expected, p = topk_overlap_test(a, b, 32)
    assert overlap == 2
    assert expected == pytest.approx(5 * 7 / 32)
    assert p == pytest.approx(hyper_upper_tail(32, 5, 7, 2), rel=1e-10)
    # sizes 10 and 10 of 270 heads (SmolLM2), 4 shared
    a = list(range(10))
    b = list(range(6, 16))
    assert topk_overlap_test(a, b, 270)[2] == pytest.approx(hyper_upper_tail(270, 10, 10, 4), rel=1e-10)
    # identical sets: p = 1 / C(n, k)
    assert topk_overlap_test(a, a, 270)[2] == pytest.approx(1 / comb(270, 10), rel=1e-8)
    # no overlap, or an empty set: p = 1
    assert topk_overlap_test([1, 2], [3, 4], 10)[2] == pytest.approx(1.0)
    assert topk_overlap_test([], [3, 4], 10) == (0, 0.0, 1.0)


def test_topk_overlap_equals_brute_force_enumeration_of_random_sets():
    n, a = 8, {0, 1, 2}
    for b in ({0, 1, 5, 6}, {2, 3, 4, 5}, {0, 1, 2, 7}, {3, 4, 5, 6}):
        obs = len(a & b)
        subsets = list(itertools.combinations(range(n), len(b)))
        brute = sum(len(a & set(s)) >= obs for s in subsets) / len(subsets)
        assert topk_overlap_test(a, b, n)[2] == pytest.approx(brute, rel=1e-12)


def test_topk_overlap_rejects_bad_input():
    with pytest.raises(ValueError, match="more than once"):
        topk_overlap_test([1, 1, 2], [2, 3], 10)
    with pytest.raises(ValueError, match="n_total"):
        topk_overlap_test([1, 2, 3], [4, 5, 6], 5)
    with pytest.raises(ValueError, match="n_total"):
        topk_overlap_test([1], [1], 0)
    with pytest.raises(ValueError, match="collection"):
        topk_overlap_test("L1H2", [1], 10)


# ---------------------------------------------------------------- intersection null (ID-5)


def brute_intersection_tail(n: int, sizes: tuple[int, ...], obs: int) -> tuple[float, float]:
    """P(|S_1 ∩ ... ∩ S_m| >= obs) and E|∩| by enumerating every tuple of subsets."""
    hits, total, acc = 0, 0, 0
    for combo in itertools.product(*(itertools.combinations(range(n), s) for s in sizes)):
        size = len(set.intersection(*map(set, combo)))
        hits += size >= obs
        acc += size
        total += 1
    return hits / total, acc / total


@pytest.mark.parametrize("sets", [
    [{0, 1}, {0, 1, 2}, {0, 3, 4}],  # sizes 2, 3, 3 of 6; intersection {0}
    [{0, 1, 2}, {0, 1, 3}, {0, 1, 4}],  # intersection {0, 1}
    [{0, 1, 2, 3}, {4, 5}, {0, 4, 5}],  # empty intersection: p = 1
])
def test_intersection_null_exact_equals_enumeration(sets):
    n = 6
    observed, expected, p = intersection_null_p(sets, n)
    assert observed == len(set.intersection(*sets))
    brute_p, brute_mean = brute_intersection_tail(n, tuple(len(s) for s in sets), observed)
    assert p == pytest.approx(brute_p, rel=1e-10)
    assert expected == pytest.approx(brute_mean, rel=1e-10)


def test_intersection_null_of_two_sets_is_the_overlap_test_and_monte_carlo_agrees():
    a, b = set(range(10)), set(range(7, 17))
    obs, exp, p = intersection_null_p([a, b], 60)
    assert (obs, exp) == (3, pytest.approx(100 / 60))
    assert p == pytest.approx(topk_overlap_test(a, b, 60)[2], rel=1e-10)
    sets = [set(range(8)), set(range(4, 12)), set(range(2, 10)), {3, 4, 5, 6, 20, 21, 22, 23}]
    obs, exp, p_exact = intersection_null_p(sets, 40)
    obs2, _, p_mc = intersection_null_p(sets, 40, method="monte_carlo", draws=20_000, seed=3)
    assert obs == obs2 == 3
    se = math.sqrt(p_exact * (1 - p_exact) / 20_000)
    assert abs(p_mc - p_exact) < 4 * se + 1 / 20_001
    assert intersection_null_p(sets, 40, method="monte_carlo", draws=500, seed=3) == \
        intersection_null_p(sets, 40, method="monte_carlo", draws=500, seed=3)


def test_intersection_null_rejects_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        intersection_null_p([{1, 2}], 10)
    with pytest.raises(ValueError, match="n_total"):
        intersection_null_p([{1, 2, 3}, {4, 5, 6}], 5)
    with pytest.raises(ValueError, match="method"):
        intersection_null_p([{1}, {1}], 5, method="bayes")
    with pytest.raises(ValueError, match="more than once"):
        intersection_null_p([[1, 1], [1]], 5)


# ---------------------------------------------------------------- Spearman (ID-3, ID-6)


X12 = [0.91, 0.40, 0.77, 0.10, 0.55, 0.62, 0.05, 0.33, 0.80, 0.71, 0.20, 0.48]
Y12 = [0.85, 0.35, 0.60, 0.22, 0.70, 0.52, 0.01, 0.30, 0.90, 0.40, 0.25, 0.45]


def test_spearman_matches_scipy_spearmanr_above_eight_items():
    for alt in ("greater", "less", "two-sided"):
        ref = sps.spearmanr(X12, Y12, alternative=alt)
        rho, p = spearman_test(X12, Y12, alternative=alt)
        assert rho == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue)
    # ties (Wu24 scores have many zeros) use mid-ranks, as spearmanr does
    x = [0, 0, 0, 0.2, 0.5, 0, 0.1, 0.9, 0, 0.3]
    y = [0, 0.1, 0, 0.3, 0.4, 0, 0, 0.8, 0.05, 0.2]
    assert spearman_test(x, y)[0] == pytest.approx(sps.spearmanr(x, y).statistic)


@pytest.mark.parametrize("x, y", [
    ([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]),
    ([0.3, 0.1, 0.5, 0.2, 0.9], [0.2, 0.0, 0.0, 0.1, 0.7]),  # a tie in y
    ([1, 2, 3], [3, 2, 1]),
])
def test_spearman_exact_permutation_p_for_few_items(x, y):
    rho_obs = sps.spearmanr(x, y).statistic
    perms = [sps.spearmanr(x, [y[i] for i in perm]).statistic for perm in itertools.permutations(range(len(y)))]
    brute = np.mean([r >= rho_obs - 1e-12 for r in perms])
    rho, p = spearman_test(x, y)
    assert rho == pytest.approx(rho_obs)
    assert p == pytest.approx(brute)


def test_spearman_ci_is_the_paired_bootstrap_of_rho():
    x, y = np.array(X12), np.array(Y12)
    lo, hi = spearman_ci(x, y, level=0.9, n_boot=500, seed=4)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, len(x), size=(500, len(x)))
    reps = np.array([sps.spearmanr(x[i], y[i]).statistic for i in idx])
    reps = reps[np.isfinite(reps)]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])))
    assert lo < sps.spearmanr(x, y).statistic < hi <= 1.0
    assert spearman_ci(x, y, n_boot=200, seed=1) == spearman_ci(x, y, n_boot=200, seed=1)


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError, match="constant"):
        spearman_test([1, 1, 1, 1], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="paired"):
        spearman_test([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="NaN"):
        spearman_test([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 3"):
        spearman_test([1, 2], [1, 2])
    with pytest.raises(ValueError, match="alternative"):
        spearman_test([1, 2, 3], [1, 2, 3], alternative="up")
    with pytest.raises(ValueError, match="level"):
        spearman_ci([1, 2, 3], [1, 2, 3], level=95)


# ---------------------------------------------------------------- non-inferiority (CA-3)


def trinomial_pmf(n: int, p_plus: float, p_minus: float) -> dict[tuple[int, int], float]:
    """P(b changes of +1, c of -1) by scipy's multinomial, for every (b, c)."""
    dist = sps.multinomial(n, [p_plus, p_minus, 1.0 - p_plus - p_minus])
    return {(b, c): float(dist.pmf([b, c, n - b - c])) for b in range(n + 1) for c in range(n + 1 - b)}


def changes_from(b: int, c: int, n: int) -> np.ndarray:
    return np.array([1.0] * b + [-1.0] * c + [0.0] * (n - b - c))


def test_non_inferiority_hand_case_no_change_at_all():
    # 20 samples, none changed. The least favourable null (p(-1) = 0.1, p(+1) = 0) gives this
    # outcome with probability 0.9**20, and no other outcome is at least as extreme there.
    mean, (lo, hi), holds, p = non_inferiority(np.zeros(20), 0.1)
    assert mean == 0.0
    assert p == pytest.approx(0.9**20, rel=1e-6)
    assert not holds and lo < -0.1 < 0 < hi
    # 60 unchanged samples rule out a loss of 0.1; p is at least the endpoint's 0.9**60 (other
    # nuisance values, with some +1 changes, make more outcomes "at least as extreme")
    _, (lo, _), holds, p = non_inferiority(np.zeros(60), 0.1)
    assert holds and 0.9**60 <= p < 0.05 and -0.1 < lo < 0


def test_non_inferiority_exact_size_is_at_most_alpha_everywhere_in_the_null():
    # size = P(p < 0.05) summed exactly over every outcome, at points on and inside H0: mean <= -delta
    n, delta = 15, 0.2
    pvals = {bc: non_inferiority(changes_from(*bc, n), delta)[3] for bc in trinomial_pmf(n, 0.1, 0.1)}
    for p_plus, p_minus in [(0.0, 0.2), (0.1, 0.3), (0.3, 0.5), (0.0, 0.35), (0.05, 0.6)]:
        pmf = trinomial_pmf(n, p_plus, p_minus)
        size = sum(pr for bc, pr in pmf.items() if pvals[bc] < 0.05)
        assert size <= 0.05 + 1e-9, (p_plus, p_minus, size)
    # the one-sided t-test on the same data is far above alpha at (0, delta): no loss seen -> "proof"
    pmf = trinomial_pmf(n, 0.0, delta)
    t_size = 0.0
    for (b, c), pr in pmf.items():
        x = changes_from(b, c, n)
        t_p = 0.0 if x.std() == 0 else sps.ttest_1samp(x, -delta, alternative="greater").pvalue
        t_size += pr * (t_p < 0.05)
    assert t_size > 0.15


def test_non_inferiority_lower_bound_coverage_by_simulation():
    rng = np.random.default_rng(2024)
    n, reps = 30, 1000
    for p_plus, p_minus in [(0.02, 0.08), (0.1, 0.1), (0.0, 0.15)]:
        true = p_plus - p_minus
        cache: dict[tuple[int, int], tuple[float, float]] = {}
        cover_lo = cover_hi = 0
        draws = rng.multinomial(n, [p_plus, p_minus, 1 - p_plus - p_minus], size=reps)
        for b, c, _ in draws:
            if (b, c) not in cache:
                cache[(b, c)] = non_inferiority(changes_from(b, c, n), 0.1)[1]
            lo, hi = cache[(b, c)]
            assert lo <= (b - c) / n <= hi
            cover_lo += lo <= true
            cover_hi += hi >= true
        # each one-sided 95% bound must cover in >= 95% of runs, allowing 2.33 binomial SDs of noise
        floor = 0.95 - 2.33 * math.sqrt(0.95 * 0.05 / reps)
        assert cover_lo / reps >= floor, (p_plus, p_minus, cover_lo / reps)
        assert cover_hi / reps >= floor, (p_plus, p_minus, cover_hi / reps)


def test_non_inferiority_score_method_matches_tango_with_a_numerical_restricted_mle():
    from scipy.optimize import minimize_scalar

    n, b, c, delta = 200, 6, 14, 0.1
    d0 = -delta

    def negll(q):  # restricted log-likelihood in q = p(-1), with p(+1) = q + d0
        return -(b * np.log(q + d0) + c * np.log(q) + (n - b - c) * np.log(1 - 2 * q - d0))

    q = minimize_scalar(negll, bounds=(-d0 + 1e-12, (1 - d0) / 2 - 1e-12), method="bounded",
                        options={"xatol": 1e-12}).x
    z = (b - c - n * d0) / math.sqrt(n * (2 * q + d0 - d0**2))
    mean, (lo, hi), holds, p = non_inferiority(changes_from(b, c, n), delta, method="score")
    assert p == pytest.approx(sps.norm.sf(z), rel=1e-5)
    assert mean == pytest.approx(-0.04) and holds == (p < 0.05) and lo < mean < hi
    # the exact test at a moderate n lands close to the asymptotic one
    p_exact = non_inferiority(changes_from(3, 7, 100), delta, method="exact")[3]
    p_score = non_inferiority(changes_from(3, 7, 100), delta, method="score")[3]
    assert p_exact == pytest.approx(p_score, rel=0.5)


def test_non_inferiority_bootstrap_path_for_continuous_changes():
    x = np.random.default_rng(5).normal(0.02, 0.1, size=40)
    mean, (lo, hi), holds, p = non_inferiority(x, 0.05, level=0.95, n_boot=2000, seed=3)
    rng = np.random.default_rng(3)
    boot = x[rng.integers(0, 40, size=(2000, 40))].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boot, [0.05, 0.95])))
    assert p == pytest.approx((1 + np.sum(boot <= -0.05)) / 2001)
    assert mean == pytest.approx(x.mean()) and holds == (lo > -0.05)


def test_non_inferiority_rejects_bad_input():
    with pytest.raises(ValueError, match="delta"):
        non_inferiority([0, 0, 1], -0.1)
    with pytest.raises(ValueError, match="level"):
        non_inferiority([0, 0, 1], 0.1, level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        non_inferiority([0, float("nan")], 0.1)
    with pytest.raises(ValueError, match="0/1"):
        non_inferiority([0.5, 0.0], 0.1, method="exact")
    with pytest.raises(ValueError, match="method"):
        non_inferiority([0, 0], 0.1, method="t")
    with pytest.raises(ValueError, match="at least 1"):
        non_inferiority([], 0.1)


# ---------------------------------------------------------------- trend (CA-2)


def brute_page_p(values: np.ndarray, levels) -> float:
    """Page's L p by permuting every row independently (all (k!)^n tables), mid-ranks for ties."""
    pred = sps.rankdata(levels)
    ranks = sps.rankdata(values, axis=1)
    L_obs = (ranks * pred).sum()
    k = values.shape[1]
    rows = [[r[list(perm)] for perm in itertools.permutations(range(k))] for r in ranks]
    hits = total = 0
    for table in itertools.product(*rows):
        hits += (np.array(table) * pred).sum() >= L_obs - 1e-9
        total += 1
    return hits / total


def test_page_trend_matches_brute_force_and_scipy_without_ties():
    v = np.array([[0.1, 0.5, 0.9], [0.2, 0.1, 0.6], [0.0, 0.3, 0.2]])
    L, p = trend_test([2, 4, 8], v)
    ref = sps.page_trend_test(v, method="exact")
    assert L == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert p == pytest.approx(brute_page_p(v, [2, 4, 8]))


@pytest.mark.parametrize("v", [
    [[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]],  # 0/1 drops: ties in every row
    [[0.1, 0.1, 0.3], [0.0, 0.2, 0.5], [0.4, 0.2, 0.2]],
])
def test_page_trend_with_ties_is_the_exact_permutation_p(v):
    v = np.array(v, dtype=float)
    L, p = trend_test([5, 10, 20], v)
    assert L == pytest.approx((sps.rankdata(v, axis=1) * [1, 2, 3]).sum())
    assert p == pytest.approx(brute_page_p(v, [5, 10, 20]))


def test_page_trend_columns_follow_the_levels_and_two_levels_is_a_sign_test():
    v = np.random.default_rng(0).normal(size=(6, 4))
    order = [2, 0, 3, 1]
    levels = np.array([1, 2, 4, 8])
    assert trend_test(levels[order], v[:, order]) == pytest.approx(trend_test(levels, v))
    d = np.random.default_rng(1).integers(0, 2, size=(25, 2)).astype(float)
    d[:12, 1] = 1.0
    assert trend_test([5, 10], d)[1] == pytest.approx(sign_test_greater(d[:, 1] - d[:, 0])[2])


@pytest.mark.parametrize("top, seed, tol", [(0.5, 7, 0.02), (0.45, 8, 0.004)])  # p about 0.19 and 0.006
def test_page_trend_large_tied_tables_use_the_normal_approximation_close_to_permutation(top, seed, tol):
    rng = np.random.default_rng(seed)
    v = (rng.random((40, 9)) < np.linspace(0.4, top, 9)).astype(float)  # 9 levels: too many to enumerate
    L, p = trend_test(np.arange(9), v)
    pred = np.arange(1, 10)
    ranks = sps.rankdata(v, axis=1)
    perm = np.array([(rng.permuted(ranks, axis=1) * pred).sum() for _ in range(4000)])
    p_mc = (1 + np.sum(perm >= L - 1e-9)) / 4001
    assert p == pytest.approx(p_mc, abs=tol)


def test_kendall_trend_on_one_value_per_level():
    # no ties: scipy's exact Kendall test
    levels, vals = [5, 10, 20, 30, 40], [0.1, 0.3, 0.2, 0.5, 0.6]
    tau, p = trend_test(levels, vals)
    ref = sps.kendalltau(levels, vals, alternative="greater", method="exact")
    assert tau == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # ties: enumerate every ordering of the values by hand
    vals = [0.1, 0.3, 0.3, 0.5]
    tau_obs = sps.kendalltau([1, 2, 3, 4], vals).statistic
    perms = [sps.kendalltau([1, 2, 3, 4], [vals[i] for i in q]).statistic for q in itertools.permutations(range(4))]
    brute = np.mean(np.array(perms) >= tau_obs - 1e-12)
    assert trend_test([1, 2, 3, 4], vals) == (pytest.approx(tau_obs), pytest.approx(brute))
    # three levels in perfect order can never pass 0.05
    assert trend_test([2, 4, 8], [0.1, 0.2, 0.9])[1] == pytest.approx(1 / 6) == min_attainable_p_kendall(3)
    assert trend_test([2, 4, 8], [0.3, 0.3, 0.3]) == (0.0, 1.0)
    # many levels: scipy's test
    lv = np.arange(12)
    vals = lv + np.random.default_rng(2).normal(0, 3, 12)
    ref = sps.kendalltau(lv, vals, alternative="greater", method="exact")
    assert trend_test(lv, vals)[1] == pytest.approx(ref.pvalue)


def test_trend_rejects_bad_input():
    with pytest.raises(ValueError, match="repeat"):
        trend_test([2, 2, 4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="shape"):
        trend_test([2, 4, 8], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="NaN"):
        trend_test([2, 4, 8], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="at least 2"):
        trend_test([2], [0.1])


# ---------------------------------------------------------------- fractions (ID-1)


def test_fraction_ci_matches_hand_wilson_and_clopper_pearson():
    flags = [True] * 7 + [False] * 33
    frac, (lo, hi) = fraction_ci(flags, level=0.95)
    z, n, ph = sps.norm.ppf(0.975), 40, 7 / 40
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert frac == 7 / 40 and (lo, hi) == pytest.approx((centre - half, centre + half))
    _, (lo, hi) = fraction_ci(flags, level=0.9, method="exact")
    assert lo == pytest.approx(sps.beta.ppf(0.05, 7, 34)) and hi == pytest.approx(sps.beta.ppf(0.95, 8, 33))
    _, (lo, hi) = fraction_ci([0] * 20)
    assert lo == 0.0 and 0 < hi < 0.2
    with pytest.raises(ValueError, match="0/1"):
        fraction_ci([0, 2])
    with pytest.raises(ValueError, match="method"):
        fraction_ci([0, 1], method="wald")
    with pytest.raises(ValueError, match="non-empty"):
        fraction_ci([])


def wilson_by_hand(k: int, n: int, level: float) -> tuple[float, float]:
    """The Wilson score interval written out (rh.evaluate's former wilson_interval), clamped to [0, 1]."""
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 17, 40, 100, 1000])
def test_proportion_ci_is_the_wilson_interval(n, level):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lo, hi = proportion_ci(k, n, level=level)
        assert (lo, hi) == pytest.approx(wilson_by_hand(k, n, level), rel=1e-12, abs=1e-14), (k, n, level)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        assert type(lo) is float and type(hi) is float
    assert proportion_ci(0, n, level=level)[0] == 0.0 and proportion_ci(n, n, level=level)[1] == 1.0


def test_proportion_ci_published_values_methods_and_fraction_ci():
    # published Wilson 95% intervals: 3/4 -> (0.3006, 0.9544), 0/4 -> (0, 0.4899)
    assert proportion_ci(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert proportion_ci(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)
    lo, hi = proportion_ci(7, 40, level=0.9, method="exact")  # Clopper-Pearson from the beta quantiles
    assert lo == pytest.approx(sps.beta.ppf(0.05, 7, 34)) and hi == pytest.approx(sps.beta.ppf(0.95, 8, 33))
    lo_cc, hi_cc = proportion_ci(7, 40, method="wilsoncc")
    lo_w, hi_w = proportion_ci(7, 40)
    assert lo_cc < lo_w and hi_cc > hi_w  # the continuity correction widens the interval
    assert proportion_ci(np.int64(2), np.int64(5)) == proportion_ci(2, 5)
    flags = [1, 0, 0, 1, 1, 0, 0]
    assert fraction_ci(flags, level=0.9, method="wilsoncc") == (3 / 7, proportion_ci(3, 7, level=0.9, method="wilsoncc"))


def test_proportion_ci_is_nan_without_data_and_refuses_bad_input():
    lo, hi = proportion_ci(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="at most n"):
        proportion_ci(5, 4)
    with pytest.raises(ValueError, match="successes must be an integer >= 0"):
        proportion_ci(-1, 4)
    with pytest.raises(ValueError, match="successes must be an integer"):
        proportion_ci(1.5, 4)
    with pytest.raises(ValueError, match="successes must be an integer"):
        proportion_ci(True, 4)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        proportion_ci(0, -1)
    with pytest.raises(ValueError, match="n must be an integer"):
        proportion_ci(1, 4.0)
    with pytest.raises(ValueError, match="level must lie in"):
        proportion_ci(1, 4, level=1.0)
    with pytest.raises(ValueError, match="level must lie in"):
        proportion_ci(1, 4, level=95)
    with pytest.raises(ValueError, match="method 'wald'"):
        proportion_ci(1, 4, method="wald")


def test_bootstrap_fraction_ci_resamples_samples():
    rng = np.random.default_rng(8)
    scores = rng.random((25, 40)) * np.linspace(0, 0.3, 40)  # heads with rising mean scores
    lo, hi, p = bootstrap_fraction_ci(scores, 0.1, 0.5, level=0.9, n_boot=800, seed=2)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 25, size=(800, 25))
    reps = np.array([(scores[i].mean(axis=0) > 0.1).mean() for i in idx])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])))
    assert p == pytest.approx((1 + np.sum(reps >= 0.5)) / 801)
    assert lo <= (scores.mean(axis=0) > 0.1).mean() <= hi
    assert bootstrap_fraction_ci(scores, 0.1, n_boot=50)[2] is None
    same = np.tile(np.linspace(0, 1, 10), (6, 1))  # identical samples: no sampling variation
    assert bootstrap_fraction_ci(same, 0.5, n_boot=50)[:2] == (0.5, 0.5)
    with pytest.raises(ValueError, match="n_samples, n_heads"):
        bootstrap_fraction_ci(np.ones(5), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_fraction_ci(np.full((3, 3), np.nan), 0.1)
    with pytest.raises(ValueError, match="max_fraction"):
        bootstrap_fraction_ci(np.ones((3, 3)), 0.1, 1.5)


# ---------------------------------------------------------------- ratios (ID-2)


def brute_signed_rank_p(d: np.ndarray) -> float:
    """P(W+ >= observed) over all 2^n sign flips of |d| (no zeros, no ties)."""
    ranks = sps.rankdata(np.abs(d))
    w_obs = ranks[d > 0].sum()
    ws = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    return float(np.mean(np.array(ws) >= w_obs))


def test_ratio_test_is_the_signed_rank_test_on_log_scale():
    ratios = np.array([12.0, 31.0, 8.5, 19.0, 55.0, 11.0, 7.0, 24.0])
    med, p = ratio_test_greater(ratios, 10.0)
    assert med == pytest.approx(np.median(ratios))
    assert p == pytest.approx(brute_signed_rank_p(np.log(ratios) - math.log(10.0)))
    # scale-free: 2x above and 2x below the threshold weigh alike
    assert ratio_test_greater(ratios * 3, 30.0)[1] == pytest.approx(p)
    # every ratio above the threshold: the smallest reachable p
    assert ratio_test_greater([11, 12, 13, 14, 15], 10)[1] == pytest.approx(min_attainable_p_wilcoxon(5))
    # ratios exactly at the threshold carry no evidence
    assert ratio_test_greater([10.0, 10.0], 10.0)[1] == 1.0
    with pytest.raises(ValueError, match="> 0"):
        ratio_test_greater([1.0, 0.0], 10.0)
    with pytest.raises(ValueError, match="threshold"):
        ratio_test_greater([1.0, 2.0], 0.0)


# ---------------------------------------------------------------- smallest attainable p


def test_min_attainable_p_values_are_reached_by_the_tests_themselves():
    for n in (1, 4, 9):
        assert min_attainable_p_binomial(n) == pytest.approx(sign_test_greater(np.ones(n))[2])
        assert min_attainable_p_mcnemar(n) == pytest.approx(mcnemar_exact([1] * n, [0] * n)[2])
        assert min_attainable_p_mcnemar(n, "two-sided") == pytest.approx(
            mcnemar_exact([1] * n, [0] * n, alternative="two-sided")[2])
    assert min_attainable_p_binomial(5, 0.2, "less") == pytest.approx(0.8**5)
    assert min_attainable_p_binomial(0) == 1.0
    assert min_attainable_p_mcnemar(4) == min_attainable_p_sign(4)
    assert min_attainable_p_kendall(4) == pytest.approx(trend_test([1, 2, 3, 4], [1, 2, 3, 4])[1])
    perfect = np.tile([0.1, 0.5, 0.9], (3, 1))
    assert min_attainable_p_page(3, 3) == pytest.approx(trend_test([1, 2, 3], perfect)[1]) == pytest.approx(1 / 216)
    assert min_attainable_p_headset(19) == pytest.approx(headset_null_p(1.0, np.zeros(19))) == 0.05
    for bad in (lambda: min_attainable_p_binomial(-1), lambda: min_attainable_p_binomial(3, 1.0),
                lambda: min_attainable_p_binomial(3, alternative="up"), lambda: min_attainable_p_kendall(0),
                lambda: min_attainable_p_headset(0), lambda: min_attainable_p_page(2, 0)):
        with pytest.raises(ValueError):
            bad()


def test_a_verdicts_power_is_typed_and_survives_its_json_round_trip():
    """Verdict sits beside the rule core with a typed Power: a dict (a report's, a journal's, an older
    claim's) becomes a Power, the JSON form is Power.to_dict(), and from_dict gives the same verdict
    back. Catches a power left as a dict (attribute access fails), one serialised as a string, and
    rh.stats.Verdict no longer importable for claims written against it."""
    import json

    import rh.stats
    from rh.rules.core import Power as CorePower
    from rh.rules.verdict import Power, Verdict, format_power

    pw = Power(0.8, 0.1, 0.9, 0.0, "exact binomial", "n = 40")
    v = Verdict(claim="LAB-1", params={"k": 3}, status="supported", reason="r", test="t", statistic=1.0,
                p_value=0.01, p_adjusted=0.02, effect=0.3, ci=(0.1, 0.5), n=40, power=pw)
    assert v.power.support == 0.8 and CorePower is Power and rh.stats.Verdict is Verdict
    row = json.loads(json.dumps(v.to_dict()))
    assert row["power"] == pw.to_dict() and Verdict.from_dict(row) == v
    as_dict = Verdict(**{**row, "ci": tuple(row["ci"])})
    assert isinstance(as_dict.power, Power) and as_dict.power == pw
    assert format_power(pw) == format_power(pw.to_dict()) == "support 0.80 at 0.1, refute 0.90 at 0 (n = 40)"
    with pytest.raises(TypeError, match="rh.rules.Power"):
        Verdict(claim="X-1", params={}, status="refuted", reason="", test="", statistic=None, p_value=None,
                p_adjusted=None, effect=None, ci=None, power=0.8)
    with pytest.raises(ValueError, match="unknown keys"):
        Power.from_dict({"support": 0.5, "speed": 2})
