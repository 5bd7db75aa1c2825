"""The three-way rule every verdict follows (CLAIMS.md, "How every claim is decided").

A claim's effect θ is oriented by the claim. The claim either says θ exceeds a bound
(``direction="greater"``: "the drop is above 0", "above 10 points") or stays under one
(``direction="less"``: "the loss stays under the margin"). Two one-sided tests decide it:

- **supported** when the test of the claimed direction rejects at α (family-corrected):
  H0 θ <= ``support_bound`` (greater) or θ >= ``support_bound`` (less);
- **refuted** when the test that the effect falls short of the smallest effect of interest Δ
  (``refute_bound``) rejects at α: H0 θ >= Δ (greater) or θ <= Δ (less). For a "drop > 0" claim
  Δ > 0 is the smallest drop that would matter; for a threshold claim ("> 10 points") Δ is the
  threshold itself; for a "keeps accuracy" claim the mirror image;
- **inconclusive** otherwise, with the reason. No path turns "not significant" into refuted.

``support_bound <= refute_bound`` (greater) keeps the two claims apart, but it does not make the
tests exclusive: where the support bound lies below Δ and the effect between them (0 < θ < Δ),
both H0 are false and both tests may reject (at θ = Δ/2, in 6-7% of runs at the quick profile's
sizes). :func:`three_way` then reports *inconclusive*, naming both: the effect exists but is
below the smallest effect of interest, which is neither the claim nor its refutation as stated.

The verdict itself, :class:`~rh.rules.verdict.Verdict` with its typed :class:`Power`, lives beside
this rule in :mod:`rh.rules.verdict` (and is re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as _sps

from rh.rules.verdict import Power, Verdict
from rh.stats import holm

__all__ = ["Power", "Verdict", "Bounds", "three_way", "decide_bounds", "holm_pairs", "TTestResult", "t_test", "t_power"]


@dataclass(frozen=True)
class Bounds:
    """The two boundaries of a claim's effect. ``min_effect`` is Δ, what the verdict reports."""

    direction: str  # "greater": the claim says θ > support_bound; "less": θ < support_bound
    support_bound: float
    refute_bound: float

    def __post_init__(self) -> None:
        if self.direction not in ("greater", "less"):
            raise ValueError(f"Bounds.direction must be 'greater' or 'less', got {self.direction!r}")
        ok = self.support_bound <= self.refute_bound if self.direction == "greater" else (
            self.support_bound >= self.refute_bound)
        if not ok:
            raise ValueError(f"Bounds: for direction {self.direction!r} the refutation boundary {self.refute_bound} "
                             f"must lie beyond the support boundary {self.support_bound} in the claimed direction, "
                             "or support and refutation could both be declared")

    @property
    def min_effect(self) -> float:
        return float(self.refute_bound)


def three_way(p_support: float | None, p_refute: float | None, alpha: float, *, supported_why: str,
              refuted_why: str, neither_why: str) -> tuple[str, str]:
    """``(status, reason)`` from the two family-corrected p-values (None: that test was not run)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"three_way: alpha must lie in (0, 1), got {alpha!r}")
    sup = p_support is not None and p_support < alpha
    ref = p_refute is not None and p_refute < alpha
    if sup and ref:
        # Both reject when the support bound lies below Δ and the effect between them: shown in the
        # claimed direction *and* shown smaller than Δ (at θ = Δ/2 in 6-7% of runs at the quick sizes).
        # The claim's two halves then point different ways: neither is picked silently.
        return "inconclusive", (f"the effect is shown in the claimed direction (p = {p_support:.3g}) and shown "
                                f"smaller than Δ (p = {p_refute:.3g}): it exists but is below the smallest effect "
                                "of interest, so the claim is neither supported nor refuted as stated")
    if sup:
        return "supported", supported_why
    if ref:
        return "refuted", refuted_why
    return "inconclusive", neither_why


def decide_bounds(p_support: float, p_refute: float, alpha: float, bounds: Bounds, power: Power | None = None,
                  *, what: str = "the effect", n: int | None = None) -> tuple[str, str]:
    """:func:`three_way` with the reasons spelled from ``bounds`` (family-corrected p-values)."""
    side = ">" if bounds.direction == "greater" else "<"
    away = "<" if bounds.direction == "greater" else ">"
    tail = ""
    if power is not None and power.support is not None and power.refute is not None:
        tail = f"; power to support {power.support:.2f}, to refute {power.refute:.2f}" + (f" at n = {n}" if n else "")
    return three_way(
        p_support, p_refute, alpha,
        supported_why=f"{what} is {side} {bounds.support_bound:g} (adjusted p = {p_support:.3g})",
        refuted_why=f"{what} is {away} Δ = {bounds.refute_bound:g} (adjusted p = {p_refute:.3g})",
        neither_why=(f"neither {side} {bounds.support_bound:g} (adjusted p = {p_support:.3g}) nor {away} Δ = "
                     f"{bounds.refute_bound:g} (adjusted p = {p_refute:.3g}) is shown{tail}"))


def holm_pairs(p_support: dict, p_refute: dict) -> tuple[dict, dict]:
    """Holm within the family, separately for the support and the refutation p-values."""
    ks = list(p_support)
    adj_s = dict(zip(ks, holm([p_support[k] for k in ks]))) if ks else {}
    kr = list(p_refute)
    adj_r = dict(zip(kr, holm([p_refute[k] for k in kr]))) if kr else {}
    return adj_s, adj_r


class TTestResult(NamedTuple):
    """One-sample one-sided t tests of a mean against two bounds, scipy-style fields."""

    mean: float
    sd: float
    n: int
    pvalue_greater: float  # H0 mean <= bound_greater
    pvalue_less: float  # H0 mean >= bound_less
    ci: tuple[float, float]  # one-sided (1 - alpha) lower and upper bounds


def t_test(x, bound_greater: float, bound_less: float, *, alpha: float = 0.05) -> TTestResult:
    """Student's t tests of the mean of ``x`` (continuous per-sample effects, e.g. log-probability
    drops): one of H0 mean <= ``bound_greater``, one of H0 mean >= ``bound_less``. A constant
    sample has no spread to estimate: both p are 1 (nothing is decided from it)."""
    v = np.asarray(x, dtype=float).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    if n < 2:
        return TTestResult(float(v.mean()) if n else math.nan, math.nan, n, 1.0, 1.0, (-math.inf, math.inf))
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    if sd == 0:
        return TTestResult(mean, 0.0, n, 1.0, 1.0, (mean, mean))
    se = sd / math.sqrt(n)
    t = _sps.t(n - 1)
    pg = float(t.sf((mean - bound_greater) / se))
    pl = float(t.cdf((mean - bound_less) / se))
    q = float(t.ppf(1 - alpha))
    return TTestResult(mean, sd, n, pg, pl, (mean - q * se, mean + q * se))


def t_power(n: int, sd: float, distance: float, alpha: float) -> float | None:
    """Power of a one-sided one-sample t test at level ``alpha`` when the true mean lies ``distance``
    beyond the null boundary, spread ``sd`` (noncentral t). None when sd is unknown."""
    if n < 2 or not (sd > 0) or not math.isfinite(sd):
        return None
    df = n - 1
    crit = _sps.t.ppf(1 - alpha, df)
    return float(_sps.nct.sf(crit, df, distance / (sd / math.sqrt(n))))
