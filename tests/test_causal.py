"""CA-1's decision rule on synthetic outcomes, and its outcome gathering on the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from rh.causal import NecessityOutcomes, necessity_outcomes, necessity_verdicts
from rh.heads import Head
from rh.rankings import Ranking



DRAWS = 59  # enough for the head-set null to pass Holm with two levels (1/60 < 0.05/2)


def _outcomes(k, base, top, rand):
    """Outcomes with ``rand`` repeated to DRAWS random sets when one row is given."""
    base, top, rand = (np.asarray(x, dtype=float) for x in (base, top, rand))
    rand = np.atleast_2d(rand)
    if len(rand) == 1:
        rand = np.repeat(rand, DRAWS, axis=0)
    return NecessityOutcomes(k, [Head(0, 0)], [[Head(0, 1)]] * len(rand), base, base - 1, top, top - 1,
                             rand, rand - 1, pd.DataFrame())


def test_clear_effect_is_supported_with_the_exact_paired_p_and_holm():
    from rh.stats import _ni_exact_p

    n = 16
    outs = [
        _outcomes(5, [1] * n, [1] * 8 + [0] * 8, np.ones((DRAWS, n))),  # 8 samples worse
        _outcomes(10, [1] * n, [0] * n, np.ones((DRAWS, n))),  # all 16 worse
    ]
    v = necessity_verdicts(outs, alpha=0.05, n_boot=2000)
    # the head-set null: the top-K drop exceeds all 59 random drops, p = 1/60
    head_p = 1 / (DRAWS + 1)
    assert v[10].details["sign_test_p"] == pytest.approx(binomtest(16, 16, 0.5, alternative="greater").pvalue)
    assert v[10].details["headset_null_p"] == pytest.approx(head_p)
    # the paired test: item i against random draw i, +1 where only the top K lost it (an independent
    # computation: the exact unconditional test of rh.stats on the counts)
    assert v[5].details["paired_p"] == pytest.approx(_ni_exact_p(8, 0, n, 0.0), abs=2e-3)
    assert v[10].p_value == pytest.approx(max(v[10].details["paired_p"], head_p))
    assert v[5].p_value == pytest.approx(max(v[5].details["paired_p"], head_p))
    # Holm with m=2: smallest p doubled, the other max(its own, previous)
    ps = sorted([v[5].p_value, v[10].p_value])
    assert sorted([v[5].p_adjusted, v[10].p_adjusted]) == pytest.approx([2 * ps[0], max(2 * ps[0], ps[1])])
    assert v[10].supported and v[5].supported
    assert v[10].effect == pytest.approx(1.0) and v[5].effect == pytest.approx(8 / 16)
    lo, hi = v[5].ci
    assert lo <= 8 / 16 <= hi and v[5].min_effect == 0.2 and v[5].power.support is not None
    # 1 of 16 worse: neither a gap > 0 nor one < 0.2 is shown, so inconclusive (never refuted)
    v1 = necessity_verdicts([_outcomes(5, [1] * n, [1] * 15 + [0], np.ones((DRAWS, n)))], n_boot=500)[5]
    assert v1.inconclusive and "neither" in v1.reason


def test_a_harmful_top_set_that_is_no_outlier_among_random_sets_is_not_supported():
    """Every sample is worse than the random mean, but 10 of the random sets are as harmful as the
    top set: the head-set null p = 11/60 stops the support, and the gap is not shown below Δ either."""
    n = 16
    rand = np.ones((DRAWS, n))
    rand[:10] = 0.0
    v = necessity_verdicts([_outcomes(5, [1] * n, [0] * n, rand)], n_boot=500)[5]
    assert v.details["headset_null_p"] == pytest.approx(11 / 60)
    assert v.inconclusive and v.p_value == pytest.approx(11 / 60)


def test_too_few_random_draws_is_inconclusive():
    n = 16
    v = necessity_verdicts([_outcomes(5, [1] * n, [0] * n, np.ones((10, n)))], n_boot=500)[5]
    assert v.inconclusive and "draws" in v.reason


def test_no_difference_is_refuted_because_the_gap_is_shown_below_delta():
    n = 16
    v = necessity_verdicts([_outcomes(5, [1] * n, [1] * 12 + [0] * 4, [[1] * 12 + [0] * 4])], n_boot=500)[5]
    # 16 items, none differing: P(no +1 | gap >= 0.2) <= 0.8**16 = 0.028 < 0.05
    assert v.refuted and "< Δ" in v.reason and v.details["p_refute"] < 0.05


def test_random_sets_that_destroy_retrieval_leave_no_room_for_a_gap():
    n = 16
    v = necessity_verdicts([_outcomes(5, [1] * n, [1] * n, [[0] * n])], n_boot=500)[5]
    assert v.inconclusive and "ceiling" in v.reason and v.effect < 0


def test_low_baseline_and_too_few_samples_are_inconclusive():
    n = 16
    low = necessity_verdicts([_outcomes(5, [1] * 4 + [0] * 12, [0] * n, [[1] * n])], n_boot=500)[5]
    assert low.inconclusive and "floor" in low.reason and low.p_adjusted is None
    few = necessity_verdicts([_outcomes(5, [1] * 4, [0] * 4, [[1] * 4]), _outcomes(6, [1] * 4, [0] * 4, [[1] * 4])],
                             n_boot=500)
    # 0.5**4 = 0.0625 can never pass alpha/2
    assert all(v.inconclusive and "samples" in v.reason for v in few.values())


def _ranking(shape):
    scores = {h: float(i) for i, h in enumerate(reversed(shape.all_heads()))}
    return Ranking("test", shape, scores)


def test_outcomes_on_the_tiny_model_use_disjoint_seeded_random_sets(tiny, tiny_samples):
    r = _ranking(tiny.shape)
    a = necessity_outcomes(tiny, tiny_samples, r, 3, draws=2, seed=7, batch_size=6)
    b = necessity_outcomes(tiny, tiny_samples, r, 3, draws=2, seed=7, batch_size=6)
    assert a.top_heads == r.top(3) == [Head(0, 0), Head(0, 1), Head(0, 2)]
    assert a.random_heads == b.random_heads
    for heads in a.random_heads:
        assert len(set(heads)) == 3 and not set(heads) & set(a.top_heads)
    assert a.random_correct.shape == (2, len(tiny_samples))
    np.testing.assert_array_equal(a.top_logprob, b.top_logprob)
    assert set(a.frame["condition"]) == {"baseline", "top3", "random3#0", "random3#1"}
    # the top-3 condition really ablated something: its log-probs differ from the baseline's
    assert not np.allclose(a.top_logprob, a.baseline_logprob)


def test_a_ranking_of_another_shape_is_refused(tiny, tiny_samples):
    from rh.heads import HeadShape

    with pytest.raises(ValueError, match="layers"):
        necessity_outcomes(tiny, tiny_samples, _ranking(HeadShape(2, 8, 2, 8)), 2, draws=1)


# ---------------------------------------------------------------------------- CA-3's decision rule


def test_ca3_rule_supported_refuted_and_inconclusive():
    from rh.causal import inverse_verdicts
    from rh.stats import non_inferiority

    n = 80
    base = np.ones(n)
    kept = base.copy()
    kept[:2] = 0  # lose 2 of 80: well within a 0.1 margin
    lost = np.r_[np.ones(20), np.zeros(60)]  # 1.00 -> 0.25
    v = inverse_verdicts(base, {10: kept, 50: lost}, [10, 50], margin=0.1, n_boot=100)
    assert v[10].supported and v[50].refuted
    assert "Δ = 0.1" in v[50].reason and v[50].min_effect == 0.1
    p10 = non_inferiority(kept - base, 0.1, level=0.95)[3]  # the same exact test, computed independently
    assert v[10].p_value == pytest.approx(p10, abs=2e-3)
    assert v[10].p_adjusted == pytest.approx(min(1.0, 2 * v[10].p_value))  # Holm: the smaller of two p doubles
    # 16 samples cannot show non-inferiority at margin 0.1 even with no change, but a collapse is refuted
    small = inverse_verdicts(np.ones(16), {10: np.ones(16), 50: np.r_[np.ones(4), np.zeros(12)]}, [10, 50],
                             margin=0.1, n_boot=100)
    assert small[10].inconclusive and "power to support" in small[10].reason
    assert small[50].refuted
    # a baseline below the floor has nothing to keep
    low = inverse_verdicts(np.r_[np.ones(3), np.zeros(13)], {10: np.zeros(16)}, [10], n_boot=100)
    assert low[10].inconclusive and "below the floor" in low[10].reason


def test_ca5_states_why_it_has_no_power(tiny, tiny_samples):
    """CA-5 is an exact identity on the heads' outputs, with no test that could err: its verdict says
    so in place of a power (the report shows the reason). Catches a CA-5 verdict with no power at all,
    or with numbers invented for a check that has no error rate."""
    from rh.causal import evaluate_baseline, mechanism_comparison

    samples = list(tiny_samples[:4])
    v = mechanism_comparison(tiny, samples, [Head(1, 2), Head(2, 5)], evaluate_baseline(tiny, samples))
    assert v.power.method == "none" and v.power.support is None and v.power.refute is None
    assert "exact identity" in v.power.note
