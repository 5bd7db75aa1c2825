"""The three-way rule on paired 0/1 outcomes (accuracy before and after an intervention).

Used by CA-3, CA-4, CA-6, IV-1, IV-3 and IV-4, and for CA-1's refutation. Per item the change is
``before - after`` in {-1, 0, +1} (+1: right before, wrong after); θ is its mean, the accuracy
drop. Both one-sided tests are the exact unconditional test of :func:`rh.stats.margin_test`
(trinomial counts ordered by Tango's score), so the size is at most α for every nuisance value.

Power is computed exactly: the p-value of every possible outcome ``(b, c)`` of ``n`` items is
tabulated once and summed under a planted trinomial with a background flip rate of
:data:`FLIP_RATE` each way (the items that change with no net effect).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, xlogy

from rh.rules.core import Bounds, Power, decide_bounds, holm_pairs
from rh.stats import Verdict, _ni_exact_p, _tango_z, margin_test

__all__ = ["FLIP_RATE", "p_table", "paired_power", "paired_family", "paired_tests", "Partial", "family_decided"]

FLIP_RATE = 0.02  # items that flip each way with no net change, assumed by the power figures
_GRID = 129


@functools.lru_cache(maxsize=64)
def p_table(n: int, bound: float) -> np.ndarray:
    """Exact p of H0 θ <= ``bound`` (against θ > bound) for every outcome: ``[b, c]`` grid, b = +1
    changes, c = -1 changes (NaN where b + c > n). The region of an outcome is every outcome whose
    monotone Tango statistic is at least as large; p is its largest probability on the null boundary."""
    b = np.arange(n + 1)[:, None].astype(float) * np.ones((1, n + 1))
    c = np.ones((n + 1, 1)) * np.arange(n + 1)[None, :].astype(float)
    valid = b + c <= n
    n0 = np.where(valid, n - b - c, 0.0)
    logcoef = np.where(valid, gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n0 + 1), -np.inf)
    z = np.where(valid, _tango_z(b, c, n, bound), -np.inf)
    z = np.maximum.accumulate(z, axis=0)
    z = np.flip(np.maximum.accumulate(np.flip(z, axis=1), axis=1), axis=1)
    vb, vc, vn0, vlog, vz = b[valid], c[valid], n0[valid], logcoef[valid], z[valid]
    order = np.argsort(-vz, kind="stable")
    zs = vz[order]
    # last index of each tie group of z (an outcome's region includes its ties)
    last = np.searchsorted(-zs, -zs + 1e-9 * np.maximum(1.0, np.abs(zs)), side="right") - 1
    s_lo, s_hi = max(0.0, -bound), (1.0 - bound) / 2.0
    best = np.zeros(zs.size)
    for s in np.linspace(s_lo, s_hi, _GRID):
        pp, pm, p0 = min(max(s + bound, 0.0), 1.0), s, min(max(1.0 - 2.0 * s - bound, 0.0), 1.0)
        logp = vlog + xlogy(vb, pp) + xlogy(vc, pm) + xlogy(vn0, p0)
        cum = np.cumsum(np.exp(logp[order]))
        best = np.maximum(best, cum[last])
    out = np.full((n + 1, n + 1), np.nan)
    flat = np.empty(zs.size)
    flat[order] = np.minimum(best, 1.0)
    out[valid] = flat
    return out


def _p_less_table(n: int, bound: float) -> np.ndarray:
    """p of H0 θ >= bound for every outcome: the mirror image (swap b and c, negate the bound)."""
    return p_table(n, -bound).T


@functools.lru_cache(maxsize=4096, typed=True)
def paired_power(n: int, theta: float, bound: float, alternative: str, alpha: float,
                 flip: float = FLIP_RATE) -> float:
    """Exact probability that the one-sided test at ``bound`` rejects at ``alpha`` when the true drop
    is ``theta`` and ``flip`` of the items change each way on top of it. Cached: a family's rule
    asks for the same few powers over and over (a pure function of its arguments)."""
    if n < 1:
        return 0.0
    pp, pm = flip + max(theta, 0.0), flip + max(-theta, 0.0)
    p0 = 1.0 - pp - pm
    if p0 < 0:
        raise ValueError(f"paired_power: theta={theta} with flip rate {flip} is not a distribution")
    table = p_table(n, bound) if alternative == "greater" else _p_less_table(n, bound)
    b = np.arange(n + 1)[:, None] * np.ones((1, n + 1))
    c = np.ones((n + 1, 1)) * np.arange(n + 1)[None, :]
    valid = b + c <= n
    n0 = np.where(valid, n - b - c, 0)
    logp = np.where(valid, gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n0 + 1)
                    + xlogy(b, pp) + xlogy(c, pm) + xlogy(n0, p0), -np.inf)
    reject = valid & (np.nan_to_num(table, nan=1.0) < alpha)
    return float(np.exp(logp[reject]).sum())


_CI = {"on": True}  # the calibration turns the confidence bounds off: only the decisions are simulated


@contextlib.contextmanager
def decisions_only():
    """Within this block paired verdicts carry no confidence bounds (the bisection that inverts the
    exact test is the slow part); decisions and p-values are unchanged."""
    old = _CI["on"]
    _CI["on"] = False
    try:
        yield
    finally:
        _CI["on"] = old


@functools.lru_cache(maxsize=65536)
def _counts_ci(b: int, c: int, n: int) -> tuple[float, float]:
    """One-sided 95% bounds of :func:`rh.stats.margin_test` on counts (outcomes recur)."""
    diffs = np.array([1.0] * b + [-1.0] * c + [0.0] * (n - b - c))
    return margin_test(diffs, 0.0)[1]


def _counts_test(b: int, c: int, n: int, bound: float, alternative: str) -> float:
    """The exact p of H0 θ <= bound ("greater") or θ >= bound ("less") from the tabulated test."""
    table = p_table(n, bound) if alternative == "greater" else _p_less_table(n, bound)
    return float(table[b, c])


def paired_p(diffs: np.ndarray, bound: float, alternative: str) -> float:
    """The exact p of H0 θ <= bound ("greater") or θ >= bound ("less") on changes in {-1, 0, +1}."""
    x = np.asarray(diffs, float)
    return _counts_test(int((x > 0).sum()), int((x < 0).sum()), int(x.size), float(bound), alternative)


def paired_ci(diffs: np.ndarray) -> tuple[float, float]:
    """One-sided 95% lower and upper bounds of the mean change (a 90% interval); NaN inside
    :func:`decisions_only`."""
    x = np.asarray(diffs, float)
    if not _CI["on"]:
        return float("nan"), float("nan")
    return _counts_ci(int((x > 0).sum()), int((x < 0).sum()), int(x.size))


def paired_tests(diffs: np.ndarray, bounds: Bounds) -> tuple[float, float, tuple[float, float], float]:
    """``(p_support, p_refute, (lo, hi), mean)`` on per-item changes in {-1, 0, +1}."""
    x = np.asarray(diffs, float)
    if not np.isin(x, (-1.0, 0.0, 1.0)).all():
        raise ValueError("paired_tests: changes must be differences of paired 0/1 outcomes (values -1, 0, +1)")
    b, c, n = int((x > 0).sum()), int((x < 0).sum()), int(x.size)
    sup_alt, ref_alt = ("greater", "less") if bounds.direction == "greater" else ("less", "greater")
    p_sup = _counts_test(b, c, n, float(bounds.support_bound), sup_alt)
    p_ref = _counts_test(b, c, n, float(bounds.refute_bound), ref_alt)
    ci = _counts_ci(b, c, n) if _CI["on"] else (float("nan"), float("nan"))
    return p_sup, p_ref, ci, float(x.mean())


def rule_power(n: int, bounds: Bounds, alpha: float, *, support_at: float | None = None,
               refute_at: float | None = None) -> Power:
    """Power of the paired rule at ``n`` items and the family's first Holm threshold ``alpha``.

    Support is planted at Δ for "drop > 0" claims (at twice the threshold for threshold claims,
    at no loss for "keeps" claims); refutation at zero effect (at twice the margin for "keeps")."""
    if bounds.direction == "greater":
        sa = support_at if support_at is not None else (
            bounds.refute_bound if bounds.refute_bound > bounds.support_bound else 2 * bounds.support_bound)
        ra = 0.0 if refute_at is None else refute_at
        ps = paired_power(n, sa, bounds.support_bound, "greater", alpha)
        pr = paired_power(n, ra, bounds.refute_bound, "less", alpha)
    else:
        sa = 0.0 if support_at is None else support_at
        ra = refute_at if refute_at is not None else min(2 * bounds.refute_bound, 0.98 - 2 * FLIP_RATE)
        ps = paired_power(n, sa, bounds.support_bound, "less", alpha)
        pr = paired_power(n, ra, bounds.refute_bound, "greater", alpha)
    return Power(ps, sa, pr, ra, "exact", f"n = {n}, level {alpha:.3g}, {FLIP_RATE:.0%} of items flipping "
                 "each way besides the effect")


# --------------------------------------------------------------------------- curtailment


@dataclass(frozen=True)
class Partial:
    """One group's outcomes part-way: the baseline of every item is known, the intervention's of
    some (``after`` NaN where not read yet). ``b``/``c``: right-to-wrong / wrong-to-right among the
    items read; ``u1``/``u0``: unread items right / wrong at baseline. Every completion of the unread
    items ends at ``(b + x, c + y)`` with ``0 <= x <= u1`` and ``0 <= y <= u0``."""

    n: int
    b: int
    c: int
    u1: int
    u0: int
    base_mean: float

    @classmethod
    def of(cls, before, after) -> Partial:
        before, after = np.asarray(before, float), np.asarray(after, float)
        if before.shape != after.shape:
            raise ValueError(f"before has {before.size} items, after {after.size}: the outcomes are paired")
        if np.isnan(before).any():
            raise ValueError("curtailment needs every item's baseline: before has unread (NaN) items")
        read = ~np.isnan(after)
        diffs = before[read] - after[read]
        return cls(int(before.size), int((diffs > 0).sum()), int((diffs < 0).sum()),
                   int((before[~read] == 1).sum()), int((before[~read] == 0).sum()),
                   float(before.mean()) if before.size else float("nan"))

    @property
    def read(self) -> int:
        return self.n - self.u1 - self.u0

    def p_range(self, bound: float, alternative: str) -> tuple[float, float]:
        """The least and the largest exact p over every completion of the unread items."""
        table = p_table(self.n, bound) if alternative == "greater" else _p_less_table(self.n, bound)
        sub = table[self.b: self.b + self.u1 + 1, self.c: self.c + self.u0 + 1]
        return float(np.nanmin(sub)), float(np.nanmax(sub))


def _status(sup: bool, ref: bool) -> str:
    return "inconclusive" if sup == ref else "supported" if sup else "refuted"


def family_ranges(parts: Mapping, bounds: Mapping, baseline_floor: float) -> dict:
    """Per testable group (baseline at or above the floor, some items): ``(lo, hi)`` of the
    Holm-adjusted support and refutation p-values over every completion of every group's unread
    items. Holm's adjusted p-values are nondecreasing in each raw p, so the extremes over the
    product of the groups' completions are Holm of the groups' own extremes."""
    testable = [g for g, pt in parts.items() if pt.n and pt.base_mean >= baseline_floor]
    raw = {}
    for g in testable:
        bd = bounds[g]
        sup_alt, ref_alt = ("greater", "less") if bd.direction == "greater" else ("less", "greater")
        raw[g] = (parts[g].p_range(float(bd.support_bound), sup_alt), parts[g].p_range(float(bd.refute_bound), ref_alt))
    lo_s, lo_r = holm_pairs({g: raw[g][0][0] for g in testable}, {g: raw[g][1][0] for g in testable})
    hi_s, hi_r = holm_pairs({g: raw[g][0][1] for g in testable}, {g: raw[g][1][1] for g in testable})
    return {g: {"p_support": raw[g][0], "p_refute": raw[g][1], "adj_support": (lo_s[g], hi_s[g]),
                "adj_refute": (lo_r[g], hi_r[g])} for g in testable}


def family_decided(groups: Mapping, *, bounds: Bounds | Mapping, alpha: float, baseline_floor: float) -> dict:
    """Each group's status (:func:`paired_family`'s) where no outcome of the unread items (NaN in
    ``after``) of any group can change it, else ``None``: curtailment. Sound, not merely likely:
    a status is returned only if both Holm-adjusted decisions (support < α, refutation < α) are the
    same at every completion of the family, which ``tests/test_curtail.py`` checks against
    enumerating the completions."""
    bmap = bounds if isinstance(bounds, Mapping) else {g: bounds for g in groups}
    return _statuses(groups, family_ranges({g: Partial.of(*groups[g]) for g in groups}, bmap, baseline_floor), alpha)


def _statuses(groups: Mapping, ranges: Mapping, alpha: float) -> dict:
    """:func:`family_decided` from the family's ranges (:func:`family_ranges`)."""
    out = {}
    for g in groups:
        if g not in ranges:  # no items, or a baseline below the floor: inconclusive, whatever the ablation does
            out[g] = "inconclusive"
            continue
        (slo, shi), (rlo, rhi) = ranges[g]["adj_support"], ranges[g]["adj_refute"]
        sup = True if shi < alpha else False if slo >= alpha else None
        ref = True if rhi < alpha else False if rlo >= alpha else None
        out[g] = None if sup is None or ref is None else _status(sup, ref)
    return out


def paired_family(claim: str, groups: Mapping, *, param: str, bounds: Bounds | Mapping, alpha: float,
                  baseline_floor: float, test: str, effect_name: str, describe, extra_params: dict | None = None,
                  extra_details: Mapping | None = None, min_effect: float | None = None) -> dict:
    """One verdict per group from ``groups[g] = (before, after)`` (0/1 arrays, paired), Holm across
    the groups for the support and the refutation p-values separately.

    Inconclusive (named) when the baseline is below ``baseline_floor``: with no retrieval there is no
    room for a drop (a floor), and "keeps accuracy" is empty. ``describe(g, before, after)`` gives
    the reason's opening words (on the items read).

    Curtailed groups: ``after`` may be NaN where an item was not read, when the family's statuses
    were already decided (:func:`family_decided`; anything else is refused). The status is then
    exactly the full evaluation's; the effect and interval are those of the items read and say so,
    and the p-values reported are the largest any completion of the unread items could give."""
    bmap = bounds if isinstance(bounds, Mapping) else {g: bounds for g in groups}
    arrays = {g: (np.asarray(b, float), np.asarray(a, float)) for g, (b, a) in groups.items()}
    curtailed = any(np.isnan(a).any() for _, a in arrays.values())
    decided = ranges = None
    if curtailed:
        ranges = family_ranges({g: Partial.of(*arrays[g]) for g in arrays}, bmap, baseline_floor)
        decided = _statuses(arrays, ranges, alpha)
        open_ = [g for g, st in decided.items() if st is None]
        if open_:
            raise ValueError(f"{claim}: {param} {open_[0]!r} was stopped before the family's statuses were decided: "
                             "evaluate its remaining items")
    rows, reasons = {}, {}
    for g, (before, after) in arrays.items():
        read = ~np.isnan(after)
        diffs = before[read] - after[read]
        if len(before) == 0:
            reasons[g] = "no items"
            rows[g] = (before, after, None)
            continue
        if not diffs.size:
            res = None
        elif curtailed:  # the p-values are the ranges' (over n items); the items read give the estimate
            res = (None, None, paired_ci(diffs), float(diffs.mean()))
        else:
            res = paired_tests(diffs, bmap[g])
        rows[g] = (before, after, res)
        if before.mean() < baseline_floor:
            reasons[g] = (f"baseline accuracy {before.mean():.2f} is below the floor {baseline_floor:.2f}: "
                          "there is no retrieval for the intervention to change (a floor)")
    testable = [g for g in rows if g not in reasons]
    if not curtailed:
        adj_s, adj_r = holm_pairs({g: rows[g][2][0] for g in testable}, {g: rows[g][2][1] for g in testable})
    m = max(len(testable), 1)
    out = {}
    for g, (before, after, res) in rows.items():
        n = len(before)
        read = ~np.isnan(after)
        k = int(read.sum())
        bounds_g = bmap[g]
        power = rule_power(n, bounds_g, alpha / m) if n else None
        params = {param: g, **(extra_params or {})}
        b_read, a_read = before[read], after[read]
        details = {"baseline_accuracy": float(before.mean()) if n else None,
                   "after_accuracy": float(a_read.mean()) if k else None,
                   "right_to_wrong": int(((b_read == 1) & (a_read == 0)).sum()),
                   "wrong_to_right": int(((b_read == 0) & (a_read == 1)).sum()),
                   **dict((extra_details or {}).get(g, {}))}
        name = effect_name
        if curtailed:
            details["curtailed"] = {"items_read": k, "items": n}
            name = f"{effect_name}, on the {k} of {n} items read"
        common = dict(claim=claim, params=params, test=test, n=n, alpha=alpha, effect_name=name,
                      min_effect=bounds_g.min_effect if min_effect is None else min_effect,
                      power=power.to_dict() if power else None)
        if g in reasons:
            out[g] = Verdict(status="inconclusive", reason=reasons[g], statistic=None, p_value=None,
                             p_adjusted=None, effect=None if res is None else res[3],
                             ci=None if res is None else res[2], ci_level=0.90, details=details, **common)
            continue
        if not curtailed:
            p_sup, p_ref, ci, mean = res
            status, why = decide_bounds(adj_s[g], adj_r[g], alpha, bounds_g, power, n=n)
            out[g] = Verdict(status=status, reason=f"{describe(g, before, after)} (effect {mean:+.3f}, one-sided "
                             f"95% bounds [{ci[0]:+.3f}, {ci[1]:+.3f}]); {why}", statistic=mean,
                             p_value=p_sup, p_adjusted=adj_s[g], effect=mean, ci=ci, ci_level=0.90,
                             details={**details, "p_refute": p_ref, "p_refute_adjusted": adj_r[g]}, **common)
            continue
        rg = ranges[g]
        status = decided[g]
        mean = res[3] if res is not None else None
        ci = res[2] if res is not None else None
        shown = (f"effect {mean:+.3f}, one-sided 95% bounds [{ci[0]:+.3f}, {ci[1]:+.3f}], on the items read"
                 if res is not None else "no item read")
        why = _curtailed_why(status, rg, alpha, bounds_g, k, n)
        out[g] = Verdict(status=status, reason=f"{describe(g, b_read, a_read)} ({shown}); {why}", statistic=mean,
                         p_value=rg["p_support"][1], p_adjusted=rg["adj_support"][1], effect=mean, ci=ci,
                         ci_level=0.90, details={**details, "p_refute": rg["p_refute"][1],
                                                 "p_refute_adjusted": rg["adj_refute"][1],
                                                 "curtailed": {"items_read": k, "items": n,
                                                               "p_support_range": list(rg["p_support"]),
                                                               "p_refute_range": list(rg["p_refute"]),
                                                               "adjusted_support_range": list(rg["adj_support"]),
                                                               "adjusted_refute_range": list(rg["adj_refute"])}},
                         **common)
    return out


def _curtailed_why(status: str, rg: Mapping, alpha: float, bounds: Bounds, k: int, n: int) -> str:
    """The reason of a curtailed verdict: the status, and why the unread items cannot change it."""
    side = ">" if bounds.direction == "greater" else "<"
    away = "<" if bounds.direction == "greater" else ">"
    head = (f"decided after {k} of {n} items: no outcome of the other {n - k} could change the status "
            "(curtailment), so it is the full evaluation's")
    if status == "supported":
        return (f"the effect is {side} {bounds.support_bound:g} (adjusted p at most {rg['adj_support'][1]:.3g} "
                f"whatever the unread items show); {head}")
    if status == "refuted":
        return (f"the effect is {away} Δ = {bounds.refute_bound:g} (adjusted p at most {rg['adj_refute'][1]:.3g} "
                f"whatever the unread items show); {head}")
    return (f"neither {side} {bounds.support_bound:g} (adjusted p at least {rg['adj_support'][0]:.3g}) nor {away} "
            f"Δ = {bounds.refute_bound:g} (adjusted p at least {rg['adj_refute'][0]:.3g}) can be shown; {head}")


def exact_p_check(b: int, c: int, n: int, bound: float) -> tuple[float, float]:
    """The tabulated p and :func:`rh.stats._ni_exact_p`'s for one outcome (they differ only by the
    nuisance grid); for tests."""
    return float(p_table(n, bound)[b, c]), _ni_exact_p(b, c, n, bound)
