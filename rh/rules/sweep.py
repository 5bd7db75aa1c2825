"""Rules over many ablation conditions at once: CA-9 (the top-K drop exceeds the random-K drop over
the whole sweep of K) and CA-10 (minimality: every head of the top-K set is needed).

CA-9 scores a localisation by its whole curve, as MIB's faithfulness areas do: per item the mean,
over the sweep of K, of (correct with K random heads ablated) - (correct with the top K ablated),
a value in [-1, 1] whose mean over items is the area between the two accuracy curves (per unit of
the sweep). Both one-sided tests are betting tests of a bounded mean (Waudby-Smith and Ramdas,
:func:`rh.rules.claims.betting_p_below`), valid for any distribution of the per-item areas:
skewed, zero-inflated, with items that every condition loses or none does. The figure's band is
simultaneous over K (the largest studentised deviation over K, bootstrapped over items).

CA-10 tests each head h of the top-K set by the paired change of dropping h from the ablated set
(correct with the top K but h ablated, minus correct with the top K ablated: +1 where h's return
recovers the item). The claim is an intersection ("every head is needed"): supported when every
head's recovery is shown above 0 (an intersection-union test: each at α, no correction needed);
refuted when some head's recovery is shown below δ (a union: Holm across the heads); the verdict
names the heads shown not needed and those left undecided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rh.rules.core import Bounds, three_way
from rh.rules.verdict import Verdict
from rh.stats import holm

__all__ = ["curve_levels", "curve_area", "curve_band", "minimality", "CURVE_TEST", "MINIMAL_TEST"]

CURVE_TEST = ("betting tests of the mean per-item area between the random-K and top-K accuracy curves "
              "(valid for any distribution on [-1, 1])")
MINIMAL_TEST = ("per head: exact paired test of the recovery from dropping it from the ablated set; support by "
                "intersection-union (every head at α), refutation Holm across heads")


def curve_levels(n_heads: int, fractions: Sequence[float]) -> list[int]:
    """The K of each fraction of the model's ``n_heads`` heads (rounded, at least 1, at most all
    but one so a random set from outside the top K exists), without repeats, ascending."""
    if n_heads < 2:
        raise ValueError(f"curve_levels: a sweep of K needs at least 2 heads, the model has {n_heads}")
    bad = [f for f in fractions if not 0.0 < float(f) < 1.0]
    if bad or not fractions:
        raise ValueError(f"curve_fractions={tuple(fractions)!r}: give fractions of the heads strictly between 0 and 1, "
                         "e.g. (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)")
    return sorted({min(max(1, int(round(float(f) * n_heads))), n_heads // 2) for f in fractions})


def curve_area(top: np.ndarray, rand: np.ndarray) -> np.ndarray:
    """Per item, the mean over K of random-K minus top-K correctness (``[n, levels]`` each)."""
    top, rand = np.asarray(top, float), np.asarray(rand, float)
    if top.shape != rand.shape or top.ndim != 2:
        raise ValueError(f"curve_area: top {top.shape} and random {rand.shape} must both be [items, levels]")
    return (rand - top).mean(axis=1)


def curve_band(top: np.ndarray, rand: np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gap, lo, hi)`` per K: the mean of random - top correctness and a band that holds at every K
    at once with ``level`` (bootstrap over items of the largest studentised deviation over K)."""
    d = np.asarray(rand, float) - np.asarray(top, float)
    n = d.shape[0]
    gap = d.mean(axis=0)
    se = d.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(gap)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = d[idx].mean(axis=1)  # [n_boot, levels]
    scale = np.where(se > 0, se, np.inf)
    crit = float(np.quantile(np.max(np.abs(boot - gap) / scale, axis=1), level)) if n > 1 else 0.0
    half = np.where(se > 0, crit * se, 0.0)
    return gap, np.clip(gap - half, -1.0, 1.0), np.clip(gap + half, -1.0, 1.0)


def _area_ps(area: np.ndarray, min_area: float) -> tuple[float, float]:
    from rh.rules.claims import betting_p_below

    x = (np.asarray(area, float) + 1.0) / 2.0  # [0, 1]; the area is 0 at x = 1/2, Δ at (1 + Δ) / 2
    p_support = float(betting_p_below(1.0 - x, 0.5)[0])  # the mean of 1 - x below 1/2: the area above 0
    p_refute = float(betting_p_below(x, (1.0 + min_area) / 2.0)[0])  # the area below Δ
    return p_support, p_refute


def ablation_curve(base: np.ndarray, top: np.ndarray, rand: np.ndarray, ks: Sequence[int], *, min_area: float = 0.1,
                   alpha: float = 0.05, baseline_floor: float = 0.5, params: Mapping | None = None,
                   n_boot: int = 2000, seed: int = 0, details: Mapping | None = None) -> Verdict:
    """CA-9 from per-item 0/1 outcomes: ``base`` ``[n]`` (no ablation), ``top`` and ``rand``
    ``[n, len(ks)]`` (the top K and random K ablated, one random set per item and K). Supported
    when the area between the curves is shown above 0, refuted when shown below ``min_area``
    (Δ), inconclusive otherwise or when the baseline is below ``baseline_floor``."""
    from rh.rules.claims import floor_reason, inconclusive

    params = dict(params or {})
    base = np.asarray(base, float)
    top, rand = np.asarray(top, float), np.asarray(rand, float)
    if top.shape != (base.size, len(ks)):
        raise ValueError(f"ablation_curve: top has shape {top.shape}, expected ({base.size}, {len(ks)})")
    if not 0.0 < min_area < 1.0:
        raise ValueError(f"ablation_curve: min_area={min_area} must lie in (0, 1)")
    acc = float(base.mean()) if base.size else None
    why = floor_reason(acc, baseline_floor)
    if why is not None or base.size < 2:
        return inconclusive("CA-9", params, why or "fewer than 2 items", CURVE_TEST, alpha, n=int(base.size),
                            min_effect=min_area)
    area = curve_area(top, rand)
    p_sup, p_ref = _area_ps(area, min_area)
    bounds = Bounds("greater", 0.0, min_area)
    gap, lo, hi = curve_band(top, rand, n_boot=n_boot, seed=seed)
    boot = np.random.default_rng(seed).integers(0, area.size, size=(n_boot, area.size))
    ci = tuple(float(q) for q in np.quantile(area[boot].mean(axis=1), [0.025, 0.975]))
    status, reason = three_way(
        p_sup, p_ref, alpha,
        supported_why=f"the area between the random-K and top-K curves is > 0 over K = {list(ks)} (p = {p_sup:.3g})",
        refuted_why=f"the area between the curves is < Δ = {min_area:g} over K = {list(ks)} (p = {p_ref:.3g})",
        neither_why=(f"neither > 0 (p = {p_sup:.3g}) nor < Δ = {min_area:g} (p = {p_ref:.3g}) is shown for the area "
                     f"between the curves over K = {list(ks)} at n = {area.size}"))
    out = {"ks": [int(k) for k in ks], "baseline_accuracy": acc,
           "top_accuracy": top.mean(axis=0).round(4).tolist(), "random_accuracy": rand.mean(axis=0).round(4).tolist(),
           "gap": gap.round(4).tolist(), "band_lo": lo.round(4).tolist(), "band_hi": hi.round(4).tolist(),
           "band": "simultaneous 95% over K (bootstrap of the largest studentised deviation)",
           "ks_band_above_0": [int(k) for k, l in zip(ks, lo) if l > 0], "area": float(area.mean()),
           "p_support": p_sup, "p_refute": p_ref, **dict(details or {})}
    return Verdict(claim="CA-9", params=params, status=status, reason=reason, test=CURVE_TEST, statistic=float(area.mean()),
                   p_value=min(p_sup, p_ref), p_adjusted=p_sup if status != "refuted" else p_ref,
                   effect=float(area.mean()), ci=ci, n=int(area.size), alpha=alpha,
                   effect_name="area between the random-K and top-K accuracy curves (mean gap over the sweep)",
                   details=out, min_effect=bounds.min_effect)


def minimality(top: np.ndarray, dropped: Mapping[str, np.ndarray], base: np.ndarray, *, min_recovery: float = 0.1,
               alpha: float = 0.05, baseline_floor: float = 0.5, params: Mapping | None = None,
               details: Mapping | None = None) -> Verdict:
    """CA-10 from per-item 0/1 outcomes: ``top`` (the top-K set ablated), ``dropped[h]`` (the set but
    head ``h`` ablated) and ``base`` (no ablation). Supported when every head's recovery is shown
    above 0, refuted when some head's is shown below ``min_recovery`` (δ, Holm across heads),
    inconclusive otherwise (naming the heads undecided) or when the baseline is below the floor."""
    from rh.rules.claims import floor_reason, inconclusive
    from rh.rules.paired import paired_ci, paired_tests

    params = dict(params or {})
    top, base = np.asarray(top, float), np.asarray(base, float)
    if not dropped:
        raise ValueError("minimality: no head was dropped from the set: give one outcome array per head")
    if not 0.0 < min_recovery < 1.0:
        raise ValueError(f"minimality: min_recovery={min_recovery} must lie in (0, 1)")
    acc = float(base.mean()) if base.size else None
    why = floor_reason(acc, baseline_floor)
    if why is not None:
        return inconclusive("CA-10", params, why, MINIMAL_TEST, alpha, n=int(base.size), min_effect=min_recovery)
    bounds = Bounds("greater", 0.0, min_recovery)
    heads = list(dropped)
    rec, p_sup, p_ref, ci = {}, {}, {}, {}
    for h in heads:
        change = np.asarray(dropped[h], float) - top  # +1: the head's return recovers the item
        p_sup[h], p_ref[h], _, rec[h] = paired_tests(change, bounds)
        ci[h] = paired_ci(change)
    p_ref_adj = dict(zip(heads, holm([p_ref[h] for h in heads])))
    needed = [h for h in heads if p_sup[h] < alpha]
    not_needed = [h for h in heads if p_ref_adj[h] < alpha]
    undecided = [h for h in heads if h not in needed and h not in not_needed]
    weakest = min(heads, key=lambda h: (rec[h], h))
    p_all = max(p_sup.values())  # intersection-union: every head must be shown needed
    p_any = min(p_ref_adj.values())
    status, reason = three_way(
        p_all, p_any, alpha,
        supported_why=f"each of the {len(heads)} heads recovers accuracy when dropped from the ablated set "
                      f"(largest p = {p_all:.3g})",
        refuted_why=(f"{len(not_needed)} of the {len(heads)} heads are shown to recover less than δ = "
                     f"{min_recovery:g}: not needed ({', '.join(not_needed)}; Holm p = {p_any:.3g})"),
        neither_why=(f"{len(needed)} of the {len(heads)} heads are shown needed and none is shown to recover less "
                     f"than δ = {min_recovery:g} (smallest Holm p = {p_any:.3g}); undecided: {', '.join(undecided)}"))
    out = {"heads": heads, "recovery": {h: round(float(rec[h]), 4) for h in heads},
           "recovery_ci": {h: [float(x) for x in ci[h]] for h in heads},
           "p_support": {h: float(p_sup[h]) for h in heads}, "p_refute_holm": {h: float(p_ref_adj[h]) for h in heads},
           "needed": needed, "not_needed": not_needed, "undecided": undecided,
           "baseline_accuracy": acc, "top_accuracy": float(top.mean()), **dict(details or {})}
    return Verdict(claim="CA-10", params=params, status=status, reason=reason, test=MINIMAL_TEST,
                   statistic=float(rec[weakest]), p_value=p_all if status != "refuted" else p_any,
                   p_adjusted=p_all if status != "refuted" else p_any, effect=float(rec[weakest]),
                   ci=tuple(ci[weakest]) if all(np.isfinite(ci[weakest])) else None, ci_level=0.90, n=int(top.size),
                   alpha=alpha, effect_name=f"the smallest recovery of one head dropped from the set ({weakest})",
                   details=out, min_effect=bounds.min_effect)
