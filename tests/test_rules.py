"""The three-way rule, family by family (rh.rules): too little data gives *inconclusive*, never
refuted; an effect below Δ with enough data gives *refuted*; an effect above Δ gives *supported*.
Power figures are checked against an independent Monte-Carlo of the real tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rh.causal import NecessityOutcomes
from rh.rules import Bounds, paired_power, three_way
from rh.rules.claims import (
    agreement,
    difficulty,
    dose_response,
    drop_family,
    general_heads_rule,
    incremental,
    inverse,
    necessity,
    override,
    position,
    ratio_rule,
    transplant,
)
import rh.catalogue  # noqa: F401
from rh.claim_families import calibrated
from rh.rules.paired import exact_p_check, p_table
from rh.rules.verdict import Verdict
from rh.stats import _ni_exact_p



def _pairs(n: int, lost: int, gained: int = 0, base_acc: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n items, the first ``round(base_acc n)`` right at baseline; ``lost`` of them wrong after,
    ``gained`` of the wrong ones right after."""
    right = int(round(base_acc * n))
    base = np.r_[np.ones(right), np.zeros(n - right)]
    after = base.copy()
    after[:lost] = 0
    after[right:right + gained] = 1
    return base, after


# ------------------------------------------------------------------------------------ the rule


def test_three_way_never_turns_not_significant_into_refuted():
    assert three_way(0.2, 0.3, 0.05, supported_why="s", refuted_why="r", neither_why="n") == ("inconclusive", "n")
    assert three_way(0.01, 0.9, 0.05, supported_why="s", refuted_why="r", neither_why="n")[0] == "supported"
    assert three_way(0.9, 0.01, 0.05, supported_why="s", refuted_why="r", neither_why="n")[0] == "refuted"
    assert three_way(None, None, 0.05, supported_why="s", refuted_why="r", neither_why="n")[0] == "inconclusive"
    assert three_way(0.01, 0.01, 0.05, supported_why="s", refuted_why="r", neither_why="n")[0] == "inconclusive"


def test_bounds_refuse_a_refutation_boundary_inside_the_claim():
    with pytest.raises(ValueError, match="refutation boundary"):
        Bounds("greater", 0.2, 0.1)
    with pytest.raises(ValueError, match="refutation boundary"):
        Bounds("less", 0.1, 0.2)


def test_the_tabulated_exact_test_is_the_stats_module_test():
    """Power and decisions use the table; it must be the same test as rh.stats.margin_test."""
    for n, bound in ((12, 0.0), (16, 0.2), (30, -0.1)):
        for b in range(0, n + 1, 2):
            for c in range(0, n + 1 - b, 3):
                tab, direct = exact_p_check(b, c, n, bound)
                assert tab == pytest.approx(direct, abs=2e-3), (n, bound, b, c)
    assert np.isnan(p_table(5, 0.0)[4, 4])  # b + c > n is no outcome


def test_exact_power_matches_a_monte_carlo_of_the_real_test():
    rng = np.random.default_rng(0)
    n, theta, alpha, flip = 24, 0.3, 0.05, 0.02
    hits = 0
    reps = 1500
    for _ in range(reps):
        u = rng.random(n)
        b, c = int((u < theta + flip).sum()), int(((u >= theta + flip) & (u < theta + 2 * flip)).sum())
        hits += _ni_exact_p(b, c, n, 0.0) < alpha  # the test margin_test runs, not the table
    mc = hits / reps
    assert paired_power(n, theta, 0.0, "greater", alpha, flip) == pytest.approx(mc, abs=4 * math.sqrt(mc * (1 - mc) / reps))


# ------------------------------------------------------------------------------------ paired families


@pytest.mark.parametrize("fn", ["drop", "incremental"])
def test_paired_drop_claims_three_ways(fn):
    def run(base, after):
        if fn == "drop":
            return drop_family("CA-6", {"d": (base, after)}, param="depth", n_heads=3, min_drop=0.2)["d"]
        return incremental(base, {1: after}, ["L0H0"], min_drop=0.1)[1]

    few = run(*_pairs(6, 1))  # 6 items: a drop of 1/6 proves nothing either way
    assert few.inconclusive and "neither" in few.reason and few.power.support < 0.8
    assert run(*_pairs(200, 2)).refuted  # a 1-point drop on 200 items: below Δ
    assert run(*_pairs(200, 100)).supported  # a 50-point drop
    v = run(*_pairs(200, 100))
    assert v.min_effect == (0.2 if fn == "drop" else 0.1) and 0 < v.power.support <= 1
    assert v.ci[0] <= v.effect <= v.ci[1] and v.ci_level == 0.90


def test_a_floor_is_inconclusive_and_named():
    v = drop_family("CA-4", {"t": _pairs(200, 0, base_acc=0.1)}, param="task", n_heads=3)["t"]
    assert v.inconclusive and "floor" in v.reason


def test_keep_accuracy_claims_are_the_mirror_image():
    def ca3(base, after):
        return inverse(base, {10: after}, [10], margin=0.1)[10]

    assert ca3(*_pairs(10, 0)).inconclusive  # no change, but 10 items cannot show it
    assert ca3(*_pairs(300, 3)).supported  # a 1-point loss on 300 items: within the margin
    assert ca3(*_pairs(300, 150)).refuted  # a 50-point loss: accuracy is not kept
    hub = override(*_pairs(300, 3)[:1], {"hub": _pairs(300, 3)[1]}, keep=0.9)["hub"]
    assert hub.supported and hub.min_effect == pytest.approx(0.1)


def test_iv2_needs_all_three_arms_and_refutes_only_on_a_shown_shortfall():
    base, hub = _pairs(200, 100)
    _, other = _pairs(200, 1)
    assert position(base, hub, other).supported
    _, small_hub = _pairs(200, 2)
    assert position(base, small_hub, other).refuted  # the hub drop is shown below 10 points
    b, h = _pairs(12, 6)
    assert position(b, h, _pairs(12, 0)[1]).inconclusive  # 12 items cannot show "< 5 points"


def test_iv4_keeps_the_function_or_not():
    base, abl = _pairs(300, 150)
    assert transplant(base, abl, _pairs(300, 5)[1]).supported
    assert transplant(base, abl, _pairs(300, 140)[1]).refuted
    assert transplant(base, base, base).inconclusive  # ablating does not hurt: no function to keep


def test_iv4_power_is_the_exact_paired_power_at_its_margin_also_where_it_stops_early():
    """IV-4's margin is (1 - keep) x function = 0.2 x (0.9 - 0.4) = 0.1 here; its power is the exact
    paired power at n = 60 (support with no loss, refutation at twice the margin), whether it
    decides, stops at the floor or finds the function not shown. Catches a verdict that stops early
    without power, a margin of keep x function or of the bare function, and a number stated where
    the heads carry no function (the margin is then not positive: power is not defined)."""
    n = 60
    base = np.r_[np.ones(54), np.zeros(6)]  # 0.9
    abl = np.r_[np.ones(24), np.zeros(36)]  # 0.4
    want = (paired_power(n, 0.0, 0.1, "less", 0.05), paired_power(n, 0.2, 0.1, "greater", 0.05))
    assert 0.01 < want[0] < 0.99 and 0.01 < want[1] < 0.99
    decided = transplant(base, abl, base)
    floor = transplant(base, abl, base, baseline_floor=0.95)
    assert floor.inconclusive and "floor" in floor.reason
    for v in (decided, floor):
        assert (v.power.support, v.power.refute) == pytest.approx(want, abs=5e-5), v.power  # a verdict rounds to 4 places
        assert (v.power.support_at, v.power.refute_at) == pytest.approx((0.0, 0.2))
    weak = transplant(base, np.r_[np.ones(53), np.zeros(7)], base)  # function 0.017, not shown
    assert weak.inconclusive and "no function" in weak.reason
    assert weak.power.support == pytest.approx(paired_power(n, 0.0, 0.2 / 60, "less", 0.05), abs=1e-12)
    none = transplant(base, base, base)
    assert none.power.method == "none" and none.power.support is None and "not positive" in none.power.note


# ------------------------------------------------------------------------------------ CA-1, CA-2


def _outcomes(k: int, n: int, top_lost: int, rand_lost: int, draws: int = 49) -> NecessityOutcomes:
    base = np.ones(n)
    top = base.copy()
    top[:top_lost] = 0
    rand = np.ones((draws, n))
    rng = np.random.default_rng(k)
    for d in range(draws):
        rand[d, rng.choice(n, rand_lost, replace=False)] = 0
    z = np.zeros(n)
    return NecessityOutcomes(k, [], [], base, z, top, z, rand, np.zeros((draws, n)), None)


def test_ca1_three_ways():
    sup = necessity([_outcomes(10, 60, 40, 1)], min_gap=0.2, n_boot=100)[10]
    assert sup.supported and sup.min_effect == 0.2
    ref = necessity([_outcomes(10, 300, 3, 2)], min_gap=0.2, n_boot=100)[10]
    assert ref.refuted, ref.reason
    few = necessity([_outcomes(10, 6, 1, 1)], min_gap=0.2, n_boot=100)[10]
    assert few.inconclusive


def test_ca1_ceiling_and_per_k_draws():
    ceiling = necessity([_outcomes(10, 60, 60, 55)], min_gap=0.2, n_boot=100)[10]
    assert ceiling.inconclusive and "ceiling" in ceiling.reason
    # the draws check reads each K's own draws (a K with 3 draws is inconclusive, not refuted)
    v = necessity([_outcomes(10, 300, 3, 2, draws=3), _outcomes(20, 300, 3, 2, draws=49)], min_gap=0.2, n_boot=50)
    assert v[10].inconclusive and "draws" in v[10].reason
    assert v[20].status != "inconclusive" or "draws" not in v[20].reason


def _ca1(status: str) -> dict:
    return {k: Verdict(claim="CA-1", params={"k": k}, status=status, reason="", test="", statistic=None,
                       p_value=None, p_adjusted=None, effect=0.3, ci=None) for k in (10, 20)}


def test_ca2_three_ways_on_log_probability():
    rng = np.random.default_rng(0)
    n, levels = 60, [5, 10, 20, 40]
    base = np.full(n, -0.1)
    growing = {k: base - (1 + 0.1 * k + rng.normal(0, 0.5, n)) for k in levels}
    flat = {k: base - (2 + rng.normal(0, 0.5, n)) for k in levels}
    assert dose_response(base, growing, _ca1("supported"), min_growth=1.0, baseline_accuracy=0.9).supported
    assert dose_response(base, flat, _ca1("supported"), min_growth=1.0, baseline_accuracy=0.9).refuted
    two = {k: growing[k] for k in levels[:2]}
    assert "three" in dose_response(base, two, _ca1("supported"), baseline_accuracy=0.9).reason
    # a ceiling in accuracy is not a ceiling in log-probability: a trend still shows
    assert not dose_response(base, growing, _ca1("inconclusive"), baseline_accuracy=0.9).supported


# ------------------------------------------------------------------------------------ IV-7


def _strata(n: int, extra_on_hard: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    lp = -np.exp(rng.uniform(-4, 0, n))  # answer log-prob at baseline, all correct
    from rh.rules.claims import log_odds

    lo = log_odds(lp)
    hard = lo < np.median(lo)
    new_lo = lo - 1.5 - extra_on_hard * hard - rng.normal(0, 0.3, n)
    new_lp = -np.log1p(np.exp(-new_lo))
    return np.ones(n), lp, new_lp


def test_iv7_a_uniform_shift_is_not_an_interaction():
    assert difficulty(*_strata(200, 0.0)).refuted  # same log-odds drop everywhere: below Δ
    assert difficulty(*_strata(200, 2.0)).supported
    assert difficulty(*_strata(6, 2.0)).inconclusive


@pytest.mark.parametrize("n, extra", [(9, 0.4), (40, 0.5), (200, 0.1)])
def test_iv7_is_welchs_test_written_out(n, extra):
    """IV-7's p-values and interval (scipy's Welch test) against the Welch-Satterthwaite formulas
    by hand, on the same hard and easy halves (an odd n leaves the middle item out)."""
    from scipy import stats as sps

    from rh.rules.claims import log_odds

    correct, lp, new_lp = _strata(n, extra, seed=n)
    v = difficulty(correct, lp, new_lp, min_effect=0.5, alpha=0.05)
    lo = log_odds(lp)
    drop = lo - log_odds(new_lp)
    order = np.argsort(lo, kind="stable")
    hard, easy = drop[order[:n // 2]], drop[order[n - n // 2:]]
    a, b = hard.var(ddof=1) / hard.size, easy.var(ddof=1) / easy.size
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a ** 2 / (hard.size - 1) + b ** 2 / (easy.size - 1))
    diff = hard.mean() - easy.mean()
    t = sps.t(df)
    assert v.effect == pytest.approx(diff, rel=1e-12) and v.statistic == pytest.approx(diff / se, rel=1e-9)
    assert v.p_value == pytest.approx(t.sf(diff / se), rel=1e-9, abs=1e-300)
    assert v.details["p_refute"] == pytest.approx(t.cdf((diff - 0.5) / se), rel=1e-9, abs=1e-300)
    q = t.ppf(0.95)
    assert v.ci == pytest.approx((diff - q * se, diff + q * se), rel=1e-9) and v.ci_level == pytest.approx(0.9)


# ------------------------------------------------------------------------------------ ratios, ID-5, agreement


def test_ratio_rule_three_ways():
    rng = np.random.default_rng(1)
    kw = dict(support_ratio=10.0, refute_ratio=10.0, test="", effect_name="", describe="")
    assert ratio_rule("ID-2", np.exp(rng.normal(np.log(40), 0.5, 30)), **kw).supported
    assert ratio_rule("ID-2", np.exp(rng.normal(np.log(2), 0.5, 30)), **kw).refuted
    assert ratio_rule("ID-2", np.exp(rng.normal(np.log(40), 0.5, 4)), **kw).inconclusive


def test_id5_per_head_tests_across_tasks():
    rng = np.random.default_rng(2)
    acc = {"a": 0.9, "b": 0.9}
    good = {t: np.exp(rng.normal(np.log(50), 0.5, (30, 2))) for t in acc}
    assert general_heads_rule(good, ["L1H1", "L2H2"], ratio=10, accuracy=acc).supported
    bad = {"a": good["a"], "b": np.exp(rng.normal(np.log(1), 0.5, (30, 2)))}  # not retrieving in task b
    assert general_heads_rule(bad, ["L1H1", "L2H2"], ratio=10, accuracy=acc).refuted
    floor = general_heads_rule(good, ["L1H1"], ratio=10, accuracy={"a": 0.0, "b": 0.9})
    assert floor.inconclusive and "floor" in floor.reason
    empty = general_heads_rule({t: np.zeros((30, 0)) for t in acc}, [], ratio=10, accuracy=acc)
    assert empty.inconclusive and "no head" in empty.reason


def test_agreement_against_self_agreement():
    rng = np.random.default_rng(3)
    n, heads, k = 40, 100, 10
    mu = np.r_[np.linspace(6, 4, k), np.zeros(heads - k)]
    A = mu + rng.normal(0, 1, (n, heads))
    B = mu + rng.normal(0, 1, (n, heads))
    same = agreement("ID-4", A, B, k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.9, n_boot=200)
    assert same.supported, same.reason
    C = np.r_[np.zeros(heads - k), np.linspace(6, 4, k)] + rng.normal(0, 1, (n, heads))
    assert agreement("ID-4", A, C, k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.9, n_boot=200).refuted
    noisy = agreement("ID-3", A[:10] * 0 + rng.normal(0, 1, (10, heads)), B[:10] * 0 + rng.normal(0, 1, (10, heads)),
                      k=k, min_effect=2, same_prompts=False, baseline_accuracy=0.9, n_boot=200)
    assert noisy.inconclusive and "pin down 0 and 0 heads" in noisy.reason  # noise pins down no top K
    assert agreement("ID-4", A, B, k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.0).inconclusive


def test_rank_bands_cover_every_heads_mean_at_once():
    """Simultaneous coverage: over 200 simulated runs (64 prompts, 120 heads of unequal spread, a
    prompt effect shared by every head, skewed noise), the bands miss some head's centered mean in
    at most α of runs (plus Monte-Carlo error). The mean is centered as the bands are: each head's
    true mean minus the mean over heads."""
    from rh.rules.claims import rank_bands

    rng = np.random.default_rng(11)
    heads, n, runs, alpha = 120, 64, 200, 0.1
    mu = np.sort(rng.gamma(1.0, 1.0, heads))[::-1]
    sd = rng.uniform(0.3, 1.5, heads)
    misses = 0
    for r in range(runs):
        noise = (rng.exponential(1.0, (n, heads)) - 1.0) * sd  # right-skewed, mean 0
        x = mu + rng.normal(0, 0.5, (n, 1)) + noise
        lo, hi, _ = rank_bands(x, None, alpha, n_boot=300, rng=np.random.default_rng(r))
        target = mu - mu.mean()
        misses += bool(((target < lo) | (target > hi)).any())
    assert misses / runs <= alpha + 2.33 * np.sqrt(alpha * (1 - alpha) / runs), misses


def test_top_membership_follows_its_definition():
    """Surely in the top K: the lower end clears the upper ends of at least H - K other heads; surely
    out: at least K other heads' lower ends clear its upper end. Counted head by head."""
    from rh.rules.claims import top_membership

    rng = np.random.default_rng(12)
    for _ in range(50):
        heads, k = int(rng.integers(3, 30)), int(rng.integers(1, 6))
        mid = rng.normal(0, 1, heads)
        half = rng.uniform(0.05, 1.0, heads)
        lo, hi = mid - half, mid + half
        got_in, got_out = top_membership(lo, hi, k)
        for h in range(heads):
            others = [g for g in range(heads) if g != h]
            assert got_in[h] == (sum(hi[g] < lo[h] for g in others) >= heads - k)
            assert got_out[h] == (sum(lo[g] > hi[h] for g in others) >= k)


def test_layer_matched_controls_copy_the_top_k_layers():
    from collections import Counter

    from rh.heads import HeadShape
    from rh.rankings import Ranking

    shape = HeadShape(4, 3, 1, 8)
    heads = shape.all_heads()
    # the top 4: three heads of layer 2 and one of layer 0; layer 2 has no head to spare
    scores = {h: (10.0 if h.layer == 2 else 5.0 if (h.layer, h.head) == (0, 0) else 0.0) for h in heads}
    r = Ranking("x", shape, scores)
    top = r.top(4)
    for seed in range(5):
        m = r.random_layer_matched(4, seed=seed)
        assert len(m) == 4 and len(set(m)) == 4 and not set(m) & set(top)
        c = Counter(h.layer for h in m)
        assert c[0] == 1 and c[2] == 0 and c[1] + c[3] == 3  # layer 2's shortfall goes to its neighbours
    scores = {h: float(h.head * 10 + h.layer) for h in heads}  # the top 2: head 2 of layers 3 and 2
    r2 = Ranking("y", shape, scores)
    assert Counter(h.layer for h in r2.random_layer_matched(2, seed=0)) == Counter(h.layer for h in r2.top(2))


def test_the_profile_chooses_the_deciding_control():
    o = _outcomes(10, 60, 40, 1)
    from dataclasses import replace

    matched = replace(o, matched_correct=np.ones_like(o.random_correct) * 0 + o.top_correct[None, :],
                      matched_logprob=o.random_logprob)
    uni = necessity([matched], min_gap=0.2, n_boot=50)[10]
    lm = necessity([matched], min_gap=0.2, n_boot=50, control="layer_matched")[10]
    assert uni.supported and "layer_matched" in uni.details
    assert not lm.supported  # matched sets hurt exactly as much as the top K: no gap
    with pytest.raises(ValueError, match="layer-matched draws"):
        necessity([o], control="layer_matched")


@pytest.mark.parametrize("family", calibrated())
def test_every_calibration_simulator_runs_its_rule_at_the_quick_sizes(family):
    """The unit tier's check of the calibration machinery (the rates themselves, at hundreds of runs,
    are the slow tier's ``tests/test_calibration.py``): each family's simulator feeds its real rule
    at the quick profile's sizes for SmolLM2's shape, and every rate is a proportion of the runs."""
    from rh.heads import HeadShape
    from rh.profiles import get_profile
    from rh.calibration import calibrate, sizes

    profile = get_profile("quick", HeadShape(30, 9, 3, 64))
    r = calibrate(family, profile, reps=2, seed=0)
    assert r.family == family and r.reps == 2 and r.sizes == sizes(profile)
    for rate in (r.false_support, r.false_refute, r.power_support, r.power_refute):
        assert 0.0 <= rate <= 1.0, r  # a share of the runs' verdicts (NaN would mean no verdict at all)


def test_the_ratio_claims_test_the_median_with_exact_sign_tests():
    """ID-2, ID-5 and IV-6 claim a median ratio. The sign test's p is the binomial tail counted by
    hand, and a sample whose median sits below the threshold is never supported however far above
    it the other prompts lie (the signed-rank test weighs those magnitudes: it tests the
    pseudo-median, which right-skewed log ratios pull above the median)."""
    import math

    from rh.rules.claims import ratio_rule
    from rh.stats import sign_pvalues

    def tail(k, m):  # P(Binomial(m, 1/2) >= k)
        return sum(math.comb(m, j) for j in range(k, m + 1)) / 2 ** m

    x = np.array([0.5, 1.2, -0.3, 0.0, 2.0, 0.1, -1.0, 0.7])  # 5 above, 2 below, one tie dropped
    assert sign_pvalues([x], "greater")[0] == pytest.approx(tail(5, 7))
    assert sign_pvalues([x], "less")[0] == pytest.approx(1 - tail(6, 7))  # P(at most 5 of 7 above)
    assert math.isnan(sign_pvalues([np.array([1.0, np.nan])], "greater")[0])
    ratios = np.r_[np.full(9, 9.0), np.full(7, 1e6)]  # median 9x: below 10x, however large the rest
    v = ratio_rule("ID-2", ratios, support_ratio=10.0, refute_ratio=10.0, alpha=0.05, test="t", effect_name="e",
                   describe="d")
    assert v.status != "supported" and v.p_value == pytest.approx(tail(7, 16))
    v = ratio_rule("ID-2", np.full(16, 40.0), support_ratio=10.0, refute_ratio=10.0, alpha=0.05, test="t",
                   effect_name="e", describe="d")
    assert v.status == "supported" and v.p_value == pytest.approx(0.5 ** 16)


def test_both_one_sided_tests_rejecting_is_inconclusive_and_says_the_effect_is_real_but_small():
    status, why = three_way(0.001, 0.002, 0.05, supported_why="s", refuted_why="r", neither_why="n")
    assert status == "inconclusive" and "below the smallest effect of interest" in why


def test_iv2_reports_the_delta_of_the_arm_that_refuted():
    """A non-hub arm shown to hurt by more than its 0.05 refutes IV-2 on its own: the verdict's Δ is
    that arm's, not the hub arm's 0.10."""
    from rh.rules.claims import position

    n = 80
    base = np.ones(n)
    hub = np.r_[np.zeros(40), np.ones(40)]  # the hub drop is large: the hub arm does not refute
    other = np.r_[np.zeros(30), np.ones(50)]  # the non-hub arm drops 0.375: shown above 0.05
    v = position(base, hub, other, hub_min=0.10, nonhub_max=0.05)
    assert v.status == "refuted" and v.min_effect == 0.05
    v = position(base, np.ones(n), np.ones(n), hub_min=0.10, nonhub_max=0.05)  # no hub drop: the hub arm refutes
    assert v.status == "refuted" and v.min_effect == 0.10


def test_id5_states_a_numeric_power_that_a_monte_carlo_of_the_rule_reproduces():
    """ID-5's stated power to support (one candidate at 4x the threshold in every task, log ratios
    normal at the observed spread) against the rule run on such data: within Monte-Carlo error."""
    from rh.rules.claims import general_heads_rule

    rng = np.random.default_rng(0)
    n, sd, ratio = 24, 1.5, 10.0

    def data(median):
        return {t: np.exp(np.log(median) + rng.normal(0, sd, (n, 1))) for t in ("a", "b")}

    acc = {"a": 0.9, "b": 0.9}
    stated = general_heads_rule(data(4 * ratio), ["h"], ratio=ratio, accuracy=acc).power
    assert stated.method.startswith("exact binomial") and 0 < stated.support < 1
    runs = 600
    hits = sum(general_heads_rule(data(4 * ratio), ["h"], ratio=ratio, accuracy=acc).status == "supported"
               for _ in range(runs))
    assert abs(hits / runs - stated.support) < 4 * math.sqrt(0.25 / runs) + 0.05  # the spread is estimated


# ------------------------------------------------------------------------ agreement's power (ID-3, ID-4, ID-7)


def _swap_block(mu: np.ndarray, k: int, d: int) -> np.ndarray:
    """The same profile of means with the last d of the top K and the next d heads swapped: the two
    top-K sets differ by exactly d heads."""
    out = mu.copy()
    out[k - d:k], out[k:k + d] = mu[k:k + d], mu[k - d:k]
    return out


def test_agreement_power_matches_the_rule_run_on_simulated_rankings():
    """The power the verdict states against a brute-force run of the whole rule (bootstrap bands
    and all) on rankings drawn from the planted truth: support when both top-5 sets are the same,
    refutation when 4 of 5 differ (Δ = 2). Catches support and refutation swapped, the refutation
    planted at the wrong number of differing heads, and bands simulated without the rule's
    re-estimated, floored standard errors (its support power was then 0.26 too high here)."""
    from rh.rules.claims import _band_fit, agreement_power
    from rh.rules.paired import decisions_only

    heads, k, n, sig, delta, runs = 40, 5, 24, 1.0, 2, 150
    mu = np.r_[np.linspace(2.7, 2.1, k), np.linspace(0.3, 0, heads - k)]
    rng = np.random.default_rng(5)
    c = float(np.median([_band_fit(mu + rng.normal(0, sig, (n, heads)), None, 0.025, n_boot=200, rng=rng)[2]
                         for _ in range(15)]))
    se = np.full(heads, sig / np.sqrt(n))
    fit = (mu - mu.mean(), se, c, se, float(n))
    power = agreement_power(fit, fit, k, delta)
    assert power.support_at == 0 and power.refute_at == 4
    sup = ref = 0
    with decisions_only():  # the rule's decisions only (its own power is not needed here)
        for r in range(runs):
            a = mu + rng.normal(0, sig, (n, heads))
            kw = dict(k=k, min_effect=delta, same_prompts=False, baseline_accuracy=0.9, n_boot=200, seed=r)
            sup += agreement("ID-4", a, mu + rng.normal(0, sig, (n, heads)), **kw).supported
            ref += agreement("ID-4", a, _swap_block(mu, k, 4) + rng.normal(0, sig, (n, heads)), **kw).refuted
    assert 0.2 < power.support < 0.9 and 0.2 < power.refute < 0.95, power  # a point where the check can fail
    assert abs(power.support - sup / runs) < 0.12, (power, sup / runs)
    assert abs(power.refute - ref / runs) < 0.12, (power, ref / runs)


def test_agreement_verdicts_state_their_power_or_zero_where_nothing_can_be_decided():
    """The verdict carries agreement_power of its own data (not a placeholder); with fewer than 8
    prompts the rule decides nothing, so both powers are exactly 0; a floor states the power the
    rule would have had on the same scores; K = Δ leaves nothing to refute."""
    from rh.rules.claims import _band_fit, agreement_power

    rng = np.random.default_rng(3)
    n, heads, k = 30, 60, 6
    mu = np.r_[np.linspace(4, 3, k), np.zeros(heads - k)]
    a, b = mu + rng.normal(0, 1, (n, heads)), mu + rng.normal(0, 1, (n, heads))
    v = agreement("ID-4", a, b, k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.9, n_boot=100, seed=7)
    r = np.random.default_rng(7)
    fa, fb = _band_fit(a, None, 0.025, n_boot=100, rng=r), _band_fit(b, None, 0.025, n_boot=100, rng=r)
    assert v.power == agreement_power(fa, fb, k, 2, seed=7)
    assert v.power.support is not None and v.power.support > 0.5  # a clear top K: support is likely
    few = agreement("ID-4", a[:6], b[:6], k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.9)
    assert few.inconclusive and (few.power.support, few.power.refute) == (0.0, 0.0)
    floor = agreement("ID-4", a, b, k=k, min_effect=2, same_prompts=True, baseline_accuracy=0.1, n_boot=100, seed=7)
    assert floor.inconclusive and floor.power == v.power
    tight = agreement("ID-4", a, b, k=2, min_effect=2, same_prompts=True, baseline_accuracy=0.9, n_boot=100, seed=7)
    assert tight.power.refute == 0.0 and "cannot refute" in tight.power.note


# ------------------------------------------------------------------------ ratio claims' power (ID-2, IV-6)


def _hand_sign_power(n: int, distance: float, sd: float, alpha: float) -> float:
    """P(Binomial(n, Φ(distance / sd)) >= c), c the fewest positives of n whose one-sided sign-test
    p is below α, by summing the binomial terms."""
    from math import comb

    from scipy.stats import norm

    tail = lambda k, q: sum(comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(k, n + 1))  # noqa: E731
    c = next(k for k in range(n + 1) if tail(k, 0.5) < alpha)
    return tail(c, float(norm.cdf(distance / sd)))


def test_ratio_power_is_the_hand_computed_binomial_and_zero_where_no_sign_test_can_reject():
    """Catches a wrong critical count, support planted at the wrong median or refutation at the
    wrong distance, and the too-few-prompts verdict (ID-2, IV-6) left without a number: 4 prompts
    give at best p = 1/16 > 0.05, so both powers are exactly 0."""
    from rh.rules.claims import ratio_power

    rng = np.random.default_rng(8)
    r = np.exp(rng.normal(np.log(3), 0.9, 25))
    sd = float(np.log(r).std(ddof=1))
    p = ratio_power(r, support_ratio=1.0, refute_ratio=2.0, alpha=0.05)
    assert (p.support_at, p.refute_at) == (pytest.approx(2.0), 1.0)
    assert p.support == pytest.approx(_hand_sign_power(25, math.log(2.0), sd, 0.05), abs=1e-12)
    assert p.refute == pytest.approx(_hand_sign_power(25, math.log(2.0), sd, 0.05), abs=1e-12)
    p10 = ratio_power(r, support_ratio=10.0, refute_ratio=10.0, alpha=0.05)  # ID-2: one threshold, support at 2x
    assert p10.support_at == pytest.approx(20.0)
    assert p10.support == pytest.approx(_hand_sign_power(25, math.log(2.0), sd, 0.05), abs=1e-12)
    assert p10.refute == pytest.approx(_hand_sign_power(25, math.log(10.0), sd, 0.05), abs=1e-12)
    few = ratio_rule("ID-2", r[:4], support_ratio=10, refute_ratio=10, test="t", effect_name="e", describe="d")
    assert few.inconclusive and (few.power.support, few.power.refute) == (0.0, 0.0)
    full = ratio_rule("ID-2", r, support_ratio=10, refute_ratio=10, test="t", effect_name="e", describe="d")
    assert full.power == p10
