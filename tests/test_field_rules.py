"""The decision rules of ID-7, ID-8, CA-7 and CA-8 (rh.rules.field), against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from rh.causal import NecessityOutcomes
from rh.rules.field import (
    _layer_pair_pmf,
    compression_safety,
    distractor_necessity,
    group_pair_null,
    kv_clustering,
    method_agreement,
)



def _brute_pairs(counts, n_heads, group):
    """The same-group pair count's distribution by enumerating every placement of every layer."""
    per_layer = []
    for c in counts:
        dist = {}
        combos = list(itertools.combinations(range(n_heads), c))
        for combo in combos:
            cells = np.bincount(np.array(combo) // group, minlength=n_heads // group)
            t = int((cells * (cells - 1) // 2).sum())
            dist[t] = dist.get(t, 0) + 1 / len(combos)
        per_layer.append(dist)
    total = {}
    for combo in itertools.product(*[list(d.items()) for d in per_layer]):
        t = sum(x for x, _ in combo)
        total[t] = total.get(t, 0) + math.prod(p for _, p in combo)
    out = np.zeros(max(total) + 1)
    for t, p in total.items():
        out[t] = p
    return out


@pytest.mark.parametrize("counts,n_heads,group", [([3, 2, 4], 9, 3), ([2, 2], 8, 4), ([5, 1, 3], 8, 2)])
def test_the_pair_null_equals_enumerating_every_placement(counts, n_heads, group):
    got = group_pair_null(counts, n_heads, group)
    want = _brute_pairs(counts, n_heads, group)
    assert got.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.pad(got, (0, max(0, want.size - got.size))),
                               np.pad(want, (0, max(0, got.size - want.size))), atol=1e-12)


def test_two_heads_of_a_layer_share_a_group_with_probability_g_minus_1_over_h_minus_1():
    assert _layer_pair_pmf(2, 9, 3)[1] == pytest.approx(2 / 8)


def _flat(pairs, n_heads=9):
    return np.array([l * n_heads + h for l, h in pairs])


def test_kv_clustering_supports_top_heads_packed_into_groups():
    # 8 layers, each holding all three heads of KV group 0: 24 of 24 pairs share a group (chance 0.25)
    top = _flat([(l, h) for l in range(8) for h in (0, 1, 2)])
    v = kv_clustering(top, np.tile(top, (50, 1)), n_layers=30, n_heads=9, n_kv_heads=3, min_effect=0.15, baseline_accuracy=1.0)
    assert v.status == "supported", v.reason
    assert v.details["same_group_pairs"] == 24 and v.details["within_layer_pairs"] == 24
    assert v.p_value == pytest.approx((1 / 28) ** 8)  # each layer: C(3,3)*3 groups / C(9,3) = 3/84
    assert v.effect == pytest.approx(1 - 0.25)


def _three_per_layer(lam: float) -> tuple[float, float]:
    """Three of a layer's 9 heads (3 KV groups of 3) under placement weight e^(λ·pairs), counted by
    hand rather than by rh's programme: 27 placements with no same-group pair, 3 * 3 * 6 = 54 with
    one (two heads in a group, the third elsewhere), 3 with three (a whole group). Returns
    (P(no pair), expected same-group share of the layer's 3 pairs)."""
    import math

    w0, w1, w3 = 27.0, 54.0 * math.exp(lam), 3.0 * math.exp(3 * lam)
    z = w0 + w1 + w3
    return w0 / z, (w1 * 1 + w3 * 3) / z / 3


def test_kv_clustering_refutes_top_heads_spread_one_per_group_by_the_exact_tilted_test():
    """8 layers, one top head per KV group: T = 0. The refutation's p is P(T = 0) under the placement
    whose expected same-group share is chance + Δ, here (P_λ(no pair in a layer))^8, checked against a
    hand count of the placements; without resampled rankings it refutes all the same (exact test)."""
    from scipy.optimize import brentq

    top = _flat([(l, h) for l in range(8) for h in (0, 3, 6)])  # one head in each KV group: share 0
    lam = brentq(lambda x: _three_per_layer(x)[1] - (0.25 + 0.15), -5, 5)
    want = _three_per_layer(lam)[0] ** 8
    for boot in (np.tile(top, (50, 1)), None):
        v = kv_clustering(top, boot, n_layers=30, n_heads=9, n_kv_heads=3, min_effect=0.15, baseline_accuracy=1.0)
        assert v.status == "refuted", v.reason
        assert v.details["p_refute"] == pytest.approx(want, rel=1e-6)
        assert v.ci[0] == pytest.approx(-0.25)  # T at its minimum: the interval starts at the lowest excess
        # the upper end: the λ at which P(T = 0) = α, i.e. P_λ(no pair)^8 = α, read back as an excess
        lam_hi = brentq(lambda x: _three_per_layer(x)[0] ** 8 - 0.05, -5, 5)
        assert v.ci[1] == pytest.approx(_three_per_layer(lam_hi)[1] - 0.25, abs=1e-6)
        assert v.power.support is not None and v.power.refute is not None


def test_kv_clustering_at_the_boundary_is_not_refuted_and_an_unreachable_delta_is_not_judged():
    """Half the layers whole groups, half spread: share 0.5, above chance + Δ = 0.4: not refuted.
    A Δ no placement with these counts could show (max excess 0.75) is said, not refuted."""
    top = _flat([(l, h) for l in range(4) for h in (0, 1, 2)] + [(l, h) for l in range(4, 8) for h in (0, 3, 6)])
    v = kv_clustering(top, None, n_layers=30, n_heads=9, n_kv_heads=3, min_effect=0.15, baseline_accuracy=1.0)
    assert v.status != "refuted" and v.details["p_refute"] > 0.05
    spread = _flat([(l, h) for l in range(8) for h in (0, 3, 6)])
    v = kv_clustering(spread, None, n_layers=30, n_heads=9, n_kv_heads=3, min_effect=0.8, baseline_accuracy=1.0)
    assert v.status == "inconclusive" and "cannot be judged" in v.reason and v.details["p_refute"] is None


def test_kv_clustering_is_not_applicable_without_grouped_query_attention_and_needs_pairs():
    v = kv_clustering(_flat([(0, 0), (0, 1)]), None, n_layers=2, n_heads=9, n_kv_heads=9, min_effect=0.15, baseline_accuracy=1.0)
    assert v.status == "inconclusive" and "not applicable" in v.reason
    v = kv_clustering(_flat([(0, 0), (1, 1), (2, 2)]), None, n_layers=3, n_heads=9, n_kv_heads=3, min_effect=0.15, baseline_accuracy=1.0)
    assert v.status == "inconclusive" and "no layer holds two" in v.reason
    v = kv_clustering(_flat([(0, 0), (0, 1)]), None, n_layers=3, n_heads=9, n_kv_heads=3, min_effect=0.15,
                      baseline_accuracy=0.1)
    assert v.status == "inconclusive" and "floor" in v.reason


def _outcome(n, base_acc, top_acc, rand_acc, draws=49, seed=0):
    rng = np.random.default_rng(seed)
    base = (np.arange(n) < base_acc * n).astype(float)
    top = (np.arange(n) < top_acc * n).astype(float)
    rand = (rng.random((draws, n)) < rand_acc / base_acc).astype(float) * base
    z = np.zeros(n)
    return NecessityOutcomes(4, [], [], base, z, top, z, rand, np.zeros((draws, n)), pd.DataFrame())


def test_distractor_rate_rise_is_supported_and_no_rise_refuted():
    o = _outcome(100, 1.0, 0.2, 0.95)
    base_d = np.zeros(100)
    rise = distractor_necessity(o, base_d, (np.arange(100) < 40).astype(float), n_boot=500, min_rise=0.1)
    assert rise["distractor_rate"].status == "supported", rise["distractor_rate"].reason
    assert rise["distractor_rate"].effect == pytest.approx(0.4)
    assert rise["accuracy"].claim == "CA-7" and rise["accuracy"].params == {"part": "accuracy", "k": 4}
    assert rise["accuracy"].status == "supported", rise["accuracy"].reason
    assert rise["accuracy"].alpha == pytest.approx(0.025)  # Bonferroni across the two parts
    flat = distractor_necessity(o, base_d, base_d.copy(), n_boot=500, min_rise=0.1)
    assert flat["distractor_rate"].status == "refuted", flat["distractor_rate"].reason


def test_distractor_rule_names_the_floor():
    o = _outcome(50, 0.2, 0.0, 0.2)
    v = distractor_necessity(o, np.zeros(50), np.ones(50), n_boot=200)
    assert v["distractor_rate"].status == "inconclusive" and "floor" in v["distractor_rate"].reason
    assert v["accuracy"].status == "inconclusive"


def test_compression_safety_decides_each_arm_against_its_own_bound():
    n = 200
    base = np.ones(n)
    keep = base.copy()
    keep[:2] = 0  # loses 1%: within the 0.1 margin
    broken = base.copy()
    broken[:120] = 0  # the top K restricted loses 60%
    out = compression_safety(base, {10: keep, 60: broken}, {10: broken, 60: base.copy()}, margin=0.1, min_drop=0.2,
                             kv_bytes={10: {"saved_fraction": 0.5}})
    assert set(out) == {("others", 10), ("top", 10), ("others", 60), ("top", 60)}
    assert out[("others", 10)].status == "supported" and out[("others", 10)].min_effect == 0.1
    assert out[("top", 10)].status == "supported" and out[("top", 10)].min_effect == 0.2
    assert out[("others", 60)].status == "refuted"  # the other heads' restriction loses more than the margin
    assert out[("top", 60)].status == "refuted"  # the top K's restriction is shown to cost less than Δ
    assert out[("others", 10)].details["kv_cache"] == {"saved_fraction": 0.5}
    assert out[("others", 10)].params == {"arm": "others", "k": 10, "sink": 4, "window": 64}


def test_method_agreement_of_a_method_with_its_own_noisy_copy_is_supported():
    rng = np.random.default_rng(0)
    mu = np.sort(rng.gamma(1.0, 1.0, 270))[::-1] * 3
    a = mu[None] + rng.normal(0, 0.5, (64, 270))
    b = mu[None] + rng.normal(0, 0.5, (64, 270))
    v = method_agreement("echo", a, b, k=10, min_effect=2.0, same_prompts=False, baseline_accuracy=1.0)
    assert v.claim == "ID-7" and v.params == {"method": "echo", "k": 10}
    assert v.status == "supported", v.reason
    shuffled = b[:, rng.permutation(270)]
    v = method_agreement("echo", a, shuffled, k=10, min_effect=2.0, same_prompts=False, baseline_accuracy=1.0)
    assert v.status == "refuted", v.reason


def test_id7_is_decided_as_one_family_across_the_methods():
    """Three methods decided together: each member is method_agreement with its bands at α / (2 x 3)
    (Bonferroni across the methods); the shuffled copies, whose top heads are others, are refuted."""
    from rh.rules.field import methods_agreement

    rng = np.random.default_rng(0)
    mu = np.sort(rng.gamma(1.0, 1.0, 270))[::-1] * 3
    a = mu[None] + rng.normal(0, 0.5, (64, 270))
    others = {"echo": (mu[None] + rng.normal(0, 0.5, (64, 270)), None, False),
              "induction": (rng.normal(0, 0.5, (64, 270)) + mu[rng.permutation(270)][None], None, False),
              "qrhead": (rng.normal(0, 0.5, (64, 270)) + mu[rng.permutation(270)][None], None, True)}
    fam = methods_agreement(a, others, k=10, min_effect=2.0, n_boot=100, baseline_accuracy=1.0)
    for m, (sc, _, same) in others.items():
        alone = method_agreement(m, a, sc, k=10, min_effect=2.0, same_prompts=same, n_boot=100, baseline_accuracy=1.0,
                                 family=3)
        assert fam[m].status == alone.status and fam[m].details == alone.details
        assert fam[m].details["band_level"] == pytest.approx(1 - 0.05 / 6)
    assert fam["echo"].status != "refuted"
    assert fam["induction"].status == fam["qrhead"].status == "refuted"


def test_every_field_figure_draws_from_the_rules_verdicts_and_the_report_names_the_core():
    """The figures read the details the rules write (a renamed key would blank a figure silently)."""
    import rh.catalogue  # noqa: F401 - the families whose figures these are
    from rh.heads import HeadShape
    from rh.report import provenance, report_figures
    from rh.scoring import SampleScores
    from rh.uncertainty import ranking_uncertainty

    rng = np.random.default_rng(1)
    mu = np.sort(rng.gamma(1.0, 1.0, 270))[::-1] * 3
    a, b = mu[None] + rng.normal(0, 0.5, (64, 270)), mu[None] + rng.normal(0, 0.5, (64, 270))
    top = _flat([(l, h) for l in range(8) for h in (0, 1, 2)])
    o = _outcome(100, 1.0, 0.2, 0.95)
    verdicts = [method_agreement("qrhead", a, b, k=10, min_effect=2.0, same_prompts=True, baseline_accuracy=1.0),
                kv_clustering(top, None, n_layers=30, n_heads=9, n_kv_heads=3, min_effect=0.15, baseline_accuracy=1.0),
                *distractor_necessity(o, np.zeros(100), np.ones(100), n_boot=200).values(),
                *compression_safety(np.ones(80), {10: np.ones(80)}, {10: np.zeros(80)},
                                    kv_bytes={10: {"saved_fraction": 0.6}}).values()]
    shape = HeadShape(30, 9, 3, 64)
    scored = SampleScores("sum_attention", [str(i) for i in range(64)], a.reshape(64, 30, 9), np.ones(64, bool),
                          [{}] * 64)
    unc = ranking_uncertainty(scored, shape, k=10, groups=[f"g{i // 2}" for i in range(64)], n_boot=100).to_json()
    figs = report_figures([v.to_dict() for v in verdicts], {"ranking_uncertainty": unc})
    assert sorted(t.split(":")[0] for t in figs) == ["CA-7", "CA-8", "ID-7", "ID-8", "Ranking uncertainty"], sorted(figs)
    assert all(png.startswith(b"\x89PNG") for png in figs.values())
    assert report_figures([], {}) == {}
    line = provenance({"ranking_uncertainty": unc})["ranking's stable core"]
    assert f"{len(unc['stable_core'])} of the top 10" in line and "core size by units resampled" in line
