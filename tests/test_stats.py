"""Unit tests of rh.stats against independent computations (hand tables, closed forms, textbook cases)."""

from __future__ import annotations

import dataclasses
import json
import math
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rh.stats import (
    Verdict,
    bootstrap_ci,
    decide,
    headset_null_p,
    holm,
    mcnemar_exact,
    min_attainable_p_sign,
    paired_bootstrap_ci,
    sign_test_greater,
)

pytestmark = pytest.mark.unit


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


# ---------------------------------------------------------------- decide


def test_decide():
    status, reason = decide(0.01, 0.2, 0.05)
    assert status == "supported"
    assert "0.01" in reason and "0.2" in reason
    status, reason = decide(0.2, 0.3, 0.05)
    assert status == "refuted" and "0.2" in reason and "alpha" in reason
    status, reason = decide(0.001, -0.1, 0.05)
    assert status == "refuted" and "-0.1" in reason and "alpha" not in reason
    status, reason = decide(0.05, 0.0, 0.05)  # both boundaries fail
    assert status == "refuted" and "effect" in reason and "alpha" in reason
    with pytest.raises(ValueError):
        decide(float("nan"), 0.1, 0.05)


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
