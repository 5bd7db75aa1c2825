"""Decisions of the claims the field relies on beyond the seeds (CLAIMS.md, "Beyond the seeds"):
ID-7 (identification methods agree), ID-8 (retrieval heads gather in KV groups), CA-7 (the top
heads stay necessary among distractor needles, and ablating them raises distractor answers),
CA-8 (compression safety: a sink plus a recent window for every head outside the top K).

Pure functions from arrays to verdicts, like :mod:`rh.rules.claims`, so that
:mod:`rh.calibration` runs the very same rules on simulated data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import replace

import numpy as np

from rh.rules.claims import agreement, floor_reason, inconclusive, necessity
from rh.rules.core import Bounds, Power, decide_bounds
from rh.rules.paired import paired_family, paired_tests, rule_power
from rh.rules.verdict import Verdict

__all__ = ["method_agreement", "group_pair_null", "kv_clustering", "distractor_necessity", "compression_safety",
           "compression_bounds",
           "ID8_TEST", "CA7_TEST", "CA8_TEST"]


# ------------------------------------------------------------------------------------------ ID-7

def method_agreement(method: str, scores_ref: np.ndarray, scores_other: np.ndarray, *, k: int, min_effect: float,
                     same_prompts: bool, weights_ref: np.ndarray | None = None,
                     weights_other: np.ndarray | None = None, alpha: float = 0.05, n_boot: int = 400, seed: int = 0,
                     reference: str = "sum_attention", baseline_accuracy: float | None = None,
                     baseline_floor: float = 0.5, family: int = 1) -> Verdict:
    """ID-7: another identification method's top K and the reference method's share all but fewer
    than Δ heads (:func:`rh.rules.claims.agreement`, the rule of ID-3 and ID-4: each top K bounded
    by inference for ranks over its own prompts, never against uniformly random head sets).

    ``same_prompts``: both methods scored the same prompts (QRHead's query-focused score on the
    identification prompts); False for the content-free echo and induction scores, whose inputs are
    random repeated tokens. ``family``: how many methods are decided together (Bonferroni)."""
    return agreement("ID-7", scores_ref, scores_other, k=k, min_effect=min_effect, same_prompts=same_prompts,
                     weights_a=weights_ref, weights_b=weights_other, alpha=alpha, n_boot=n_boot, seed=seed,
                     params={"method": method, "k": k}, what=f"{reference} vs {method}",
                     baseline_accuracy=baseline_accuracy, baseline_floor=baseline_floor, family=family)


def methods_agreement(scores_ref: np.ndarray, others: Mapping[str, tuple[np.ndarray, np.ndarray | None, bool]], *,
                      k: int, min_effect: float, alpha: float = 0.05, n_boot: int = 400, seed: int = 0,
                      reference: str = "sum_attention", baseline_accuracy: float | None = None,
                      baseline_floor: float = 0.5) -> dict[str, Verdict]:
    """ID-7 for every further method at once, decided as one family (the bands Bonferroni-corrected
    across the methods): ``others[method] = (scores, weights or None, same_prompts)``, each as
    :func:`method_agreement` takes them."""
    return {m: method_agreement(m, scores_ref, sc, k=k, min_effect=min_effect, same_prompts=same, weights_other=w,
                                alpha=alpha, n_boot=n_boot, seed=seed, reference=reference,
                                baseline_accuracy=baseline_accuracy, baseline_floor=baseline_floor,
                                family=len(others))
            for m, (sc, w, same) in others.items()}


# ------------------------------------------------------------------------------------------ ID-8

ID8_TEST = ("exact conditional test of the number T of same-KV-group pairs among the top-K heads, every layer keeping "
            "its count of top heads: supported when P(T >= t) under uniform placement is <= α; refuted when "
            "P(T <= t) is <= α under the exponentially tilted placement (weight e^(λ·pairs)) whose expected "
            "same-group share is chance + Δ; the interval inverts the same family")


def _layer_pair_pmf(c: int, n_heads: int, group: int) -> np.ndarray:
    """Distribution of the same-group pairs when ``c`` of a layer's ``n_heads`` query heads, in
    groups of ``group`` (one KV head each), are chosen uniformly without replacement: a dynamic
    programme over the groups (ways to place ``used`` heads with ``pairs`` same-group pairs), so a
    70B layer (64 heads in groups of 8) costs microseconds, not an enumeration."""
    n_groups = n_heads // group
    max_pairs = c * (c - 1) // 2
    ways = np.zeros((c + 1, max_pairs + 1), dtype=object)  # exact integers: C(64, 32) overflows floats' precision
    ways[0, 0] = 1
    for _ in range(n_groups):
        nxt = np.zeros_like(ways)
        for used in range(c + 1):
            for pairs in range(max_pairs + 1):
                w = ways[used, pairs]
                if not w:
                    continue
                for m in range(0, min(group, c - used) + 1):
                    nxt[used + m, pairs + m * (m - 1) // 2] += w * math.comb(group, m)
        ways = nxt
    total = math.comb(n_heads, c)
    return np.array([x / total for x in ways[c]], dtype=float)


def group_pair_null(layer_counts: Sequence[int], n_heads: int, group: int) -> np.ndarray:
    """Exact null distribution of the same-KV-group pair count over all layers (the layers'
    placements are independent under the null): the convolution of :func:`_layer_pair_pmf`."""
    pmf = np.ones(1)
    for c in layer_counts:
        if c >= 2:
            pmf = np.convolve(pmf, _layer_pair_pmf(int(c), n_heads, group))
    return pmf


def _same_group_pairs(heads: np.ndarray, n_heads: int, group: int) -> tuple[int, int, np.ndarray]:
    """(same-group pairs, within-layer pairs, per-layer counts) of flat head indices ``layer * n_heads + h``."""
    layers = heads // n_heads
    cells = heads // group  # (layer, KV group) as one index: a group never spans two layers
    _, per_layer = np.unique(layers, return_counts=True)
    _, per_cell = np.unique(cells, return_counts=True)
    return (int((per_cell * (per_cell - 1) // 2).sum()), int((per_layer * (per_layer - 1) // 2).sum()),
            np.bincount(layers))


def _equal_pairs(keys: np.ndarray) -> np.ndarray:
    """Per row of ``keys`` ``[rounds, K]``, the number of pairs of entries with equal keys
    (``sum(c * (c - 1) // 2)`` over the counts ``c`` of each distinct key): after sorting, each entry
    pairs with the equal entries before it, as many as its distance from the start of its run."""
    s = np.sort(keys, axis=1)
    pos = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    start = np.zeros(s.shape, dtype=bool)
    start[:, :1] = True
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    run_start = np.maximum.accumulate(np.where(start, pos, 0), axis=1)
    return (pos - run_start).sum(axis=1)


def _boot_effects(boot_tops: np.ndarray, n_heads: int, group: int, chance: float) -> np.ndarray:
    """θ of each bootstrap top K ``[rounds, K]`` (the same-group share of its within-layer pairs
    minus chance), in row order, leaving out the rows with no within-layer pair: per row what
    :func:`_same_group_pairs` counts, for all rows at once."""
    if boot_tops.ndim != 2 or boot_tops.shape[1] == 0:
        effs = []
        for row in boot_tops:
            t_b, p_b, _ = _same_group_pairs(row, n_heads, group)
            if p_b:
                effs.append(t_b / p_b - chance)
        return np.asarray(effs, dtype=float)
    same = _equal_pairs(boot_tops // group)
    pairs = _equal_pairs(boot_tops // n_heads)
    keep = pairs > 0
    return same[keep] / pairs[keep] - chance


def _tilted(pmf: np.ndarray, lam: float) -> np.ndarray:
    """The exact null ``pmf`` of T tilted by ``e^(λ T)`` and renormalised: the distribution of T
    when each placement of a layer's heads is weighted by e^(λ · its same-group pairs) (the weight
    factorises over layers, so tilting the convolution tilts each layer's term)."""
    t = np.arange(pmf.size)
    with np.errstate(divide="ignore"):
        lw = np.where(pmf > 0, np.log(np.where(pmf > 0, pmf, 1.0)) + lam * t, -np.inf)
    w = np.exp(lw - lw.max())
    return w / w.sum()


def _solve_tilt(pmf: np.ndarray, f, target: float) -> float:
    """The λ at which ``f(tilted pmf)`` (nondecreasing in λ) meets ``target``, by bisection; ±inf
    where it is beyond what any λ gives."""
    lo, hi = -60.0, 60.0
    if f(_tilted(pmf, lo)) >= target:
        return -math.inf
    if f(_tilted(pmf, hi)) < target:
        return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(_tilted(pmf, mid)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tilted_family(pmf: np.ndarray, t_obs: int, pairs: int, chance: float, min_effect: float,
                  alpha: float) -> dict[str, Any]:
    """ID-8's refutation, interval and power from one exponential family of T's distributions:
    the exact null tilted by e^(λ T) (:func:`_tilted`), whose expected excess θ(λ) = E_λ[T] / pairs
    - chance rises with λ (λ = 0: uniform placement, the support test's null).

    - ``p_refute``: P(T <= t_obs) at the λ where θ = Δ (None where no λ reaches Δ: the per-layer
      counts cannot show that excess);
    - ``ci``: the exact (1 - 2α) interval of θ, inverting the two one-sided tests of the family;
    - ``power_support`` at θ = Δ and ``power_refute`` at θ = 0: each test's rejection region under
      the other boundary's distribution."""
    t = np.arange(pmf.size)
    support = t[pmf > 0]
    tmin, tmax = int(support.min()), int(support.max())

    def theta(lam: float) -> float:
        if lam == -math.inf:
            return tmin / pairs - chance
        if lam == math.inf:
            return tmax / pairs - chance
        return float(_tilted(pmf, lam) @ t) / pairs - chance

    lam_delta = _solve_tilt(pmf, lambda q: float(q @ t) / pairs - chance, min_effect)
    at_delta = None if math.isinf(lam_delta) else _tilted(pmf, lam_delta)
    p_ref = None if at_delta is None else float(min(1.0, at_delta[: t_obs + 1].sum()))
    lam_lo = -math.inf if t_obs <= tmin else _solve_tilt(pmf, lambda q: float(q[t_obs:].sum()), alpha)
    lam_hi = math.inf if t_obs >= tmax else _solve_tilt(pmf, lambda q: -float(q[: t_obs + 1].sum()), -alpha)
    null_tail = np.cumsum(pmf[::-1])[::-1]  # P0(T >= t)
    crit_sup = next((int(x) for x in t if null_tail[x] <= alpha), None)
    power_sup = power_ref = None
    if at_delta is not None:
        power_sup = float(at_delta[crit_sup:].sum()) if crit_sup is not None else 0.0
        delta_cdf = np.cumsum(at_delta)  # P_Δ(T <= t)
        crit_ref = max((int(x) for x in t if delta_cdf[x] <= alpha), default=None)
        power_ref = float(pmf[: crit_ref + 1].sum()) if crit_ref is not None else 0.0
    return {"p_refute": p_ref, "ci": (theta(lam_lo), theta(lam_hi)), "lambda_at_delta": lam_delta,
            "max_effect": tmax / pairs - chance, "power_support": power_sup, "power_refute": power_ref}


def kv_clustering(top: Sequence[int], boot_tops: np.ndarray | None, *, n_layers: int, n_heads: int, n_kv_heads: int,
                  min_effect: float, alpha: float = 0.05, k: int | None = None,
                  baseline_accuracy: float | None = None, baseline_floor: float = 0.5) -> Verdict:
    """ID-8: the top-K heads gather in some KV groups more than chance.

    ``top``: the ranking's top K as flat indices ``layer * n_heads + head``; ``boot_tops``
    ``[rounds, K]``: the top K of rankings from prompts resampled by group (:mod:`rh.uncertainty`),
    or None; used only to report how stable the effect is across resampled rankings.

    Effect θ = the share of within-layer pairs of top heads that read the same KV head, minus the
    share chance gives, ``(G - 1) / (H - 1)`` for groups of G among H query heads. Both tests treat
    the placement of each layer's top heads as random, given the layer's count of them (the same
    conditioning for both sides, :func:`tilted_family`): supported when uniform placement rejects;
    refuted when the placement that would give an excess of Δ on average is rejected in the other
    direction. (It used to refute from a bootstrap over prompts, which sees only the ranking's noise:
    refutations at p = 1/501 beside support p-values of 0.07-0.9, and half the runs refuted where the
    placement propensity was exactly Δ.)"""
    params = {"k": int(k if k is not None else len(top))}
    name = "same-KV-group share of within-layer top-head pairs minus chance"
    if n_kv_heads >= n_heads:
        return inconclusive("ID-8", params, f"not applicable: every query head has its own KV head ({n_heads} query, "
                            f"{n_kv_heads} KV heads per layer), so there are no KV groups to gather in", ID8_TEST,
                            alpha, min_effect=min_effect, effect_name=name)
    if n_heads % n_kv_heads:
        raise ValueError(f"kv_clustering: {n_heads} query heads do not split into {n_kv_heads} equal KV groups")
    floor = floor_reason(baseline_accuracy, baseline_floor)
    if floor:
        return inconclusive("ID-8", params, floor, ID8_TEST, alpha, min_effect=min_effect, effect_name=name)
    group = n_heads // n_kv_heads
    chance = (group - 1) / (n_heads - 1)
    top = np.asarray(top, dtype=int)
    t_obs, pairs, counts = _same_group_pairs(top, n_heads, group)
    counts = np.pad(counts, (0, max(0, n_layers - counts.size)))
    details = {"same_group_pairs": t_obs, "within_layer_pairs": pairs, "chance_share": chance, "group_size": group,
               "n_layers": n_layers, "n_heads": n_heads, "layer_counts": counts.tolist(), "top_heads": [f"L{i // n_heads}H{i % n_heads}" for i in top.tolist()]}
    if pairs == 0:
        return inconclusive("ID-8", params, f"no layer holds two of the top {len(top)} heads: the per-layer counts "
                            "leave no pair whose KV groups could coincide (use a larger K)", ID8_TEST, alpha,
                            details=details, min_effect=min_effect, effect_name=name)
    pmf = group_pair_null(counts.tolist(), n_heads, group)
    p_sup = float(min(1.0, pmf[t_obs:].sum()))
    share = t_obs / pairs
    effect = share - chance
    details.update({"same_group_share": share, "null_p": p_sup, "null_expected_pairs": float(np.arange(pmf.size) @ pmf)})
    fam = tilted_family(pmf, t_obs, pairs, chance, min_effect, alpha)
    p_ref = fam["p_refute"]
    lo, hi = fam["ci"]
    details.update({"max_effect": fam["max_effect"], "lambda_at_delta": fam["lambda_at_delta"]})
    if boot_tops is not None and len(boot_tops):
        effs = _boot_effects(np.asarray(boot_tops, dtype=int), n_heads, group, chance)
        if effs.size:  # how much the effect moves with the ranking's own noise (not part of the decision)
            details.update({"bootstrap_rounds": int(len(effs)), "bootstrap_mean_effect": float(effs.mean()),
                            "bootstrap_interval": [float(v) for v in np.quantile(effs, [alpha, 1 - alpha])]})
    bounds = Bounds("greater", 0.0, min_effect)
    power = (Power(fam["power_support"], min_effect, fam["power_refute"], 0.0, "exact (tilted conditional family)")
             if fam["power_support"] is not None else
             Power.none(f"these per-layer counts allow an excess of at most {fam['max_effect']:.3f} < Δ"))
    status, why = decide_bounds(p_sup, p_ref if p_ref is not None else 1.0, alpha, bounds, power,
                                what="the same-group excess", n=pairs)
    if p_ref is None and status != "supported":
        why += (f"; these per-layer counts allow an excess of at most {fam['max_effect']:.3f}, below Δ, so Δ cannot be "
                "judged (use a larger K)")
    reason = (f"of {pairs} pairs of top-{len(top)} heads in one layer, {t_obs} share a KV group ({share:.2f}; chance "
              f"{chance:.2f}, expected {details['null_expected_pairs']:.1f} pairs); {why}")
    return Verdict(claim="ID-8", params=params, status=status, reason=reason, test=ID8_TEST, statistic=float(t_obs),
                   p_value=p_sup, p_adjusted=p_sup, effect=effect, ci=(lo, hi),
                   ci_level=1 - 2 * alpha, n=int(pairs), alpha=alpha, effect_name=name,
                   details={**details, "p_refute": p_ref}, min_effect=min_effect, power=power)


# ------------------------------------------------------------------------------------------ CA-7

CA7_TEST = ("accuracy: CA-1's rule (paired test and head-set null against random K-sets) on prompts with distractor "
            "needles; distractor answers: exact paired test of the rise (top-K ablated minus unablated, > 0; < Δ "
            "refutes); Bonferroni across the two parts (each at α/2)")


def distractor_necessity(outcome, base_distractor: np.ndarray, top_distractor: np.ndarray, *, alpha: float = 0.05,
                         baseline_floor: float = 0.5, min_gap: float = 0.2, min_rise: float = 0.1,
                         n_boot: int = 10_000, seed: int = 0, n_distractors: int | None = None) -> dict[str, Verdict]:
    """CA-7 from one :class:`rh.causal.NecessityOutcomes` on distractor prompts and, per item,
    whether the model answered with a distractor's value (the argmax at the first answer position
    is a distractor value's first token) unablated and with the top K ablated.

    Two verdicts: ``part="accuracy"`` (CA-1's rule at one K) and ``part="distractor_rate"``: the
    rise of the distractor-answer rate, paired per item, supported when > 0 is shown, refuted when
    shown below Δ = ``min_rise``. Bonferroni across the two parts."""
    a2 = alpha / 2
    acc = necessity([outcome], alpha=a2, baseline_floor=baseline_floor, min_gap=min_gap, n_boot=n_boot,
                    seed=seed)[outcome.k]
    extra = {"part": "accuracy", "k": outcome.k}
    acc = replace(acc, claim="CA-7", params=extra, test=CA7_TEST,
                  reason=acc.reason + "; Bonferroni across CA-7's two parts (α/2 each)",
                  details={**acc.details, "n_distractors": n_distractors})
    base = np.asarray(base_distractor, float)
    top = np.asarray(top_distractor, float)
    params = {"part": "distractor_rate", "k": outcome.k}
    name = "rise of the distractor-answer rate (top-K ablated minus unablated)"
    base_acc = float(np.mean(outcome.baseline_correct))
    details = {"baseline_distractor_rate": float(base.mean()) if base.size else None,
               "top_distractor_rate": float(top.mean()) if top.size else None,
               "baseline_accuracy": base_acc, "top_accuracy": float(np.mean(outcome.top_correct)),
               "to_distractor": int(((base == 0) & (top == 1)).sum()),
               "from_distractor": int(((base == 1) & (top == 0)).sum()), "n_distractors": n_distractors}
    floor = floor_reason(base_acc, baseline_floor)
    if floor or base.size == 0:
        rate = inconclusive("CA-7", params, floor or "no items", CA7_TEST, a2, int(base.size), details,
                            min_effect=min_rise, effect_name=name)
        return {"accuracy": acc, "distractor_rate": rate}
    bounds = Bounds("greater", 0.0, min_rise)
    diffs = top - base  # +1: the ablation turned the item into a distractor answer
    p_sup, p_ref, ci, mean = paired_tests(diffs, bounds)
    power = rule_power(int(diffs.size), bounds, a2)
    status, why = decide_bounds(p_sup, p_ref, a2, bounds, power, what="the rise", n=int(diffs.size))
    reason = (f"top-{outcome.k} ablation: distractor answers {base.mean():.2f} -> {top.mean():.2f} "
              f"({details['to_distractor']} items turned to a distractor's value, {details['from_distractor']} back; "
              f"effect {mean:+.3f}, one-sided bounds [{ci[0]:+.3f}, {ci[1]:+.3f}]); {why}; Bonferroni across "
              "CA-7's two parts (α/2 each)")
    rate = Verdict(claim="CA-7", params=params, status=status, reason=reason, test=CA7_TEST, statistic=mean,
                   p_value=p_sup, p_adjusted=p_sup, effect=mean, ci=ci, ci_level=1 - 2 * a2, n=int(diffs.size),
                   alpha=a2, effect_name=name, details={**details, "p_refute": p_ref}, min_effect=min_rise,
                   power=power)
    return {"accuracy": acc, "distractor_rate": rate}


# ------------------------------------------------------------------------------------------ CA-8

CA8_TEST = ("exact paired tests, Holm across the arms and K: restricting the heads outside the top K keeps accuracy "
            "(loss < margin shown: supported; > margin shown: refuted); restricting the top K drops it (> 0 "
            "shown: supported; < Δ shown: refuted)")


def compression_bounds(levels, *, margin: float, min_drop: float) -> dict:
    """CA-8's bounds per ``(arm, K)``: restricting the others keeps the loss below ``margin``;
    restricting the top K drops accuracy (above 0; refuted below Δ = ``min_drop``)."""
    out = {}
    for k in levels:
        out[("others", k)] = Bounds("less", margin, margin)
        out[("top", k)] = Bounds("greater", 0.0, min_drop)
    return out


def compression_safety(base: np.ndarray, others: Mapping[int, np.ndarray], top: Mapping[int, np.ndarray], *,
                       margin: float = 0.1, min_drop: float = 0.2, alpha: float = 0.05, baseline_floor: float = 0.5,
                       sink: int = 4, window: int = 64, kv_bytes: Mapping[int, dict] | None = None) -> dict:
    """CA-8 per (arm, K): ``others[K]`` the 0/1 outcomes with every head outside the top K
    restricted to a sink of ``sink`` tokens plus a recent window of ``window``, ``top[K]`` with the
    top K restricted. Keys ``(arm, K)``; the KV-cache bytes the policy would save go into details."""
    base = np.asarray(base, float)
    groups, extra = {}, {}
    bmap = compression_bounds(list(others), margin=margin, min_drop=min_drop)
    for k in others:
        groups[("others", k)] = (base, np.asarray(others[k], float))
        groups[("top", k)] = (base, np.asarray(top[k], float))
        for arm in ("others", "top"):
            extra[(arm, k)] = {"arm": arm, "k": k, "sink": sink, "window": window,
                               "kv_cache": dict((kv_bytes or {}).get(k, {})) if arm == "others" else {}}

    def describe(g, b, a):
        arm, k = g
        who = f"every head outside the top {k}" if arm == "others" else f"the top {k} heads"
        return f"{who} restricted to a {sink}-token sink + {window}-token window: accuracy {b.mean():.2f} -> {a.mean():.2f}"

    out = paired_family("CA-8", groups, param="arm", bounds=bmap, alpha=alpha, baseline_floor=baseline_floor,
                        test=CA8_TEST, effect_name="accuracy loss (baseline - restricted)", describe=describe,
                        extra_details=extra)
    fixed = {}
    for (arm, k), v in out.items():  # params as {"arm", "k"}, the claim's Δ per arm
        fixed[(arm, k)] = replace(v, params={"arm": arm, "k": k, "sink": sink, "window": window},
                                  min_effect=margin if arm == "others" else min_drop)
    return fixed
