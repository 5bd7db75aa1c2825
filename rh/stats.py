"""Statistics that turn claim outcomes into verdicts (DESIGN.md decision 5, "Verdicts, not booleans").

A claim test computes a statistic, a p-value, an effect size with a confidence interval and n,
corrects p within its parametrized family (Holm), and reports a :class:`Verdict` whose status is
``supported``, ``refuted`` or ``inconclusive``. Everything here is deterministic given its seed.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _sps

__all__ = [
    "SignTestResult",
    "McNemarResult",
    "ConfidenceInterval",
    "OverlapResult",
    "CorrelationResult",
    "NonInferiorityResult",
    "MarginResult",
    "TrendResult",
    "FractionResult",
    "FractionBounds",
    "RatioTestResult",
    "margin_test",
    "sign_test_greater",
    "mcnemar_exact",
    "mcnemar_p",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "holm",
    "headset_null_p",
    "min_attainable_p_sign",
    "topk_overlap_test",
    "intersection_null_p",
    "spearman_test",
    "spearman_ci",
    "non_inferiority",
    "trend_test",
    "fraction_ci",
    "proportion_ci",
    "bootstrap_fraction_ci",
    "ratio_test_greater",
    "wilcoxon_pvalues",
    "sign_pvalues",
    "sign_power",
    "min_attainable_p_binomial",
    "min_attainable_p_mcnemar",
    "min_attainable_p_wilcoxon",
    "min_attainable_p_kendall",
    "min_attainable_p_page",
    "min_attainable_p_headset",
]

def __getattr__(name: str) -> Any:
    """``rh.stats.Verdict`` and ``format_power``: they live beside the three-way rule now
    (:mod:`rh.rules.verdict`); imported from here they still work."""
    if name in ("Verdict", "Power", "STATUSES", "format_power"):
        from rh.rules import verdict

        return getattr(verdict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Results of the tests below: named tuples in the style of scipy.stats (``res.pvalue``, ``res.ci``)
# that still unpack as the plain tuples they used to be.

class SignTestResult(NamedTuple):
    n_pos: int
    n_neg: int
    pvalue: float


class McNemarResult(NamedTuple):
    b: int  # pairs right -> wrong (first true, second false)
    c: int
    pvalue: float


class ConfidenceInterval(NamedTuple):
    low: float
    high: float


class OverlapResult(NamedTuple):
    overlap: int
    expected: float
    pvalue: float


class CorrelationResult(NamedTuple):
    statistic: float
    pvalue: float


class NonInferiorityResult(NamedTuple):
    mean: float
    ci: tuple[float, float]
    holds: bool
    pvalue: float


class MarginResult(NamedTuple):
    mean: float
    ci: tuple[float, float]
    pvalue: float


class TrendResult(NamedTuple):
    statistic: float
    pvalue: float


class FractionResult(NamedTuple):
    fraction: float
    ci: tuple[float, float]


class FractionBounds(NamedTuple):
    low: float
    high: float
    pvalue: float | None


class RatioTestResult(NamedTuple):
    median: float
    pvalue: float



# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _opt_float(x: Any) -> float | None:
    """``None`` stays ``None``; anything else becomes a Python float."""
    return None if x is None else float(x)


# --------------------------------------------------------------------------------------------
# Exact paired tests
# --------------------------------------------------------------------------------------------


def sign_test_greater(diffs: Sequence[float] | np.ndarray) -> SignTestResult:
    """Exact one-sided sign test that paired differences are positive.

    Zeros (ties) are dropped; returns ``(n_pos, n_neg, p)`` with
    ``p = P(Binomial(n_pos + n_neg, 1/2) >= n_pos)``, and ``p = 1.0`` when every difference is
    zero. For 0/1 outcomes of one paired comparison this is the exact McNemar test.
    """
    d = np.asarray(diffs, dtype=float).ravel()
    if np.isnan(d).any():
        raise ValueError("sign_test_greater: diffs contain NaN; drop or fix those pairs first")
    n_pos = int(np.count_nonzero(d > 0))
    n_neg = int(np.count_nonzero(d < 0))
    n = n_pos + n_neg
    if n == 0:
        return SignTestResult(n_pos, n_neg, 1.0)
    p = float(_sps.binomtest(n_pos, n, 0.5, alternative="greater").pvalue)
    return SignTestResult(n_pos, n_neg, min(1.0, p))


def _as_bool_1d(x: Any, name: str) -> np.ndarray:
    """Validate a 1-D array of booleans or 0/1 values and return it as bool."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"mcnemar_exact: {name} must be 1-D, got shape {a.shape}")
    if a.dtype != bool:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"mcnemar_exact: {name} must hold booleans or 0/1 values")
        a = a.astype(bool)
    return a


def mcnemar_exact(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    alternative: str = "greater",
) -> McNemarResult:
    """Exact (binomial) McNemar test on paired correctness of outcomes A and B on the same items.

    Returns ``(b, c, p)`` where ``b = #(A correct and B wrong)`` and ``c = #(A wrong and B
    correct)``; concordant pairs carry no information and are ignored. Under H0 ``b ~
    Binomial(b + c, 1/2)``. ``alternative="greater"`` tests that A beats B more often than the
    reverse (``p = P(X >= b)``), ``"less"`` the opposite, ``"two-sided"`` either. For CA-1, A is
    "correct after ablating random heads" and B "correct after ablating the top-K heads".
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(
            f"mcnemar_exact: alternative {alternative!r} is not one of 'greater', 'less', 'two-sided'"
        )
    a = _as_bool_1d(correct_a, "correct_a")
    b_ = _as_bool_1d(correct_b, "correct_b")
    if a.shape[0] != b_.shape[0]:
        raise ValueError(
            f"mcnemar_exact: correct_a has length {a.shape[0]} but correct_b has length "
            f"{b_.shape[0]}; pass outcomes for the same items in the same order"
        )
    b = int(np.count_nonzero(a & ~b_))
    c = int(np.count_nonzero(~a & b_))
    return McNemarResult(b, c, mcnemar_p(b, c, alternative))


def mcnemar_p(b: int, c: int, alternative: str = "greater") -> float:
    """:func:`mcnemar_exact`'s p from its discordant counts ``b`` and ``c`` (1 when there are none)."""
    if b + c == 0:
        return 1.0
    return min(1.0, float(_sps.binomtest(b, b + c, 0.5, alternative=alternative).pvalue))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------

_BOOT_CHUNK_ELEMS = 4_000_000  # resampled elements held in memory at once


def _accepts_axis(fn: Callable) -> bool:
    """True when ``fn`` takes an ``axis`` keyword, so the bootstrap can be vectorised."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return "axis" in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.mean,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap confidence interval of ``statistic`` over resamples of the first axis.

    Resamples rows with replacement using ``np.random.default_rng(seed)``. A statistic taking an
    ``axis`` keyword (``np.mean``, ``np.median``, ...) is evaluated on whole chunks of resamples
    at once; any other callable is applied to one resample at a time and must return a scalar.
    Constant input gives the degenerate interval ``(s, s)``.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim == 0:
        raise ValueError("bootstrap_ci: values must be a sequence, got a scalar")
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci: values is empty; need at least one observation")
    if np.isnan(x).any():
        raise ValueError("bootstrap_ci: values contain NaN; drop or fix them first")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must lie in (0, 1), got {level!r}")
    if int(n_boot) < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot!r}")
    n_boot = int(n_boot)

    if np.all(x == x[0]):
        s = float(np.asarray(statistic(x)).item())
        return ConfidenceInterval(s, s)

    rng = np.random.default_rng(seed)
    row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)))
    out = np.empty(n_boot, dtype=float)
    if _accepts_axis(statistic):
        chunk = max(1, _BOOT_CHUNK_ELEMS // (n * row))
        for start in range(0, n_boot, chunk):
            m = min(chunk, n_boot - start)
            idx = rng.integers(0, n, size=(m, n))
            res = np.asarray(statistic(x[idx], axis=1), dtype=float)
            if res.shape != (m,):
                raise ValueError(
                    "bootstrap_ci: statistic must reduce each resample to a scalar; "
                    f"got shape {res.shape[1:]} per resample"
                )
            out[start : start + m] = res
    else:
        for i in range(n_boot):
            idx = rng.integers(0, n, size=n)
            out[i] = float(np.asarray(statistic(x[idx])).item())
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(out, [tail, 1.0 - tail])
    return ConfidenceInterval(float(lo), float(hi))


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap CI of ``mean(a - b)`` over paired items (a thin wrapper on :func:`bootstrap_ci`)."""
    a_ = np.asarray(a, dtype=float)
    b_ = np.asarray(b, dtype=float)
    if a_.shape != b_.shape:
        raise ValueError(
            f"paired_bootstrap_ci: a has shape {a_.shape} but b has shape {b_.shape}; "
            "pass paired values for the same items"
        )
    return ConfidenceInterval(*bootstrap_ci(a_ - b_, np.mean, n_boot=n_boot, level=level, seed=seed))


# --------------------------------------------------------------------------------------------
# Multiple comparisons and permutation nulls
# --------------------------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    With the m p-values sorted ascending, ``adj_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))``
    (1-based), so adjusted values are monotone in the sorted order and capped at 1. Controls the
    family-wise error rate across a parametrized claim family without independence assumptions.
    """
    p = list(pvalues)
    for i, v in enumerate(p):
        if v is None or not isinstance(v, (int, float, np.integer, np.floating)) or math.isnan(v):
            raise ValueError(f"holm: p-value #{i} is {v!r}; every p-value must be a number in [0, 1]")
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"holm: p-value #{i} is {v!r}, outside [0, 1]")
    m = len(p)
    if m == 0:
        return []
    arr = np.asarray(p, dtype=float)
    order = np.argsort(arr, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * arr[order])
    adj_sorted = np.maximum.accumulate(scaled)
    adj = np.empty(m, dtype=float)
    adj[order] = adj_sorted
    return [float(v) for v in adj]


def headset_null_p(observed: float, null: Sequence[float] | np.ndarray) -> float:
    """Permutation-style p-value of ``observed`` against statistics from random head sets.

    ``p = (1 + #{null >= observed}) / (N + 1)`` (Phipson & Smyth 2010), which is never 0 and is
    exact when the null draws are exchangeable with the observed set. Null values within a
    relative 1e-14 of ``observed`` count as ties (>=), so float noise cannot shrink p.
    """
    z = np.asarray(null, dtype=float).ravel()
    if z.size == 0:
        raise ValueError("headset_null_p: null is empty; draw at least one random head set")
    if np.isnan(z).any():
        raise ValueError("headset_null_p: null contains NaN")
    obs = float(observed)
    if math.isnan(obs):
        raise ValueError("headset_null_p: observed is NaN")
    tol = abs(obs) * 1e-14 if math.isfinite(obs) else 0.0
    count = int(np.count_nonzero(z >= obs - tol))
    return headset_null_p_of_count(count, z.size)


def headset_null_p_of_count(at_least: int, draws: int) -> float:
    """:func:`headset_null_p` from its count: ``at_least`` of ``draws`` random head sets reach the
    observed statistic (ties included). For rules that decide each draw's side without its value."""
    if draws < 1:
        raise ValueError("headset_null_p: null is empty; draw at least one random head set")
    return (1 + int(at_least)) / (int(draws) + 1)


def min_attainable_p_sign(n: int) -> float:
    """Smallest p-value a one-sided sign test on ``n`` non-tied pairs can give: ``0.5 ** n``.

    If it is not below alpha (after correction), the claim cannot be supported and is inconclusive.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"min_attainable_p_sign: n must be a non-negative integer, got {n!r}")
    return 0.5 ** int(n)


# --------------------------------------------------------------------------------------------
# Input validation shared by the tests below
# --------------------------------------------------------------------------------------------

_ALTERNATIVES = ("greater", "less", "two-sided")


def _finite_1d(x: Any, name: str, fn: str, *, min_len: int = 1) -> np.ndarray:
    """``x`` as a 1-D float array of at least ``min_len`` finite values, else a ValueError naming it."""
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: {name} must be a sequence of numbers, got {type(x).__name__}") from None
    if a.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {a.shape}; pass one value per item")
    if a.shape[0] < min_len:
        raise ValueError(f"{fn}: {name} has {a.shape[0]} values; need at least {min_len}")
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: {name} contains NaN or infinite values; drop or fix those items first")
    return a


def _is_real(x: Any) -> bool:
    """A real number (not a bool, not NaN)."""
    return (not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, float, np.integer, np.floating))
            and not math.isnan(x))


def _check_level(level: float, fn: str) -> float:
    if not _is_real(level) or not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level must lie in (0, 1) (e.g. 0.95), got {level!r}")
    return float(level)


def _check_count(x: Any, name: str, fn: str, *, minimum: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def _as_item_set(items: Any, name: str, fn: str) -> set:
    """A collection of distinct hashable items (heads) as a set; strings and duplicates are refused."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ValueError(f"{fn}: {name} must be a collection of heads (e.g. ranking.top(k)), got {items!r}")
    lst = list(items)
    try:
        s = set(lst)
    except TypeError:
        raise ValueError(f"{fn}: {name} holds unhashable items; pass Head values or (layer, head) tuples") from None
    if len(s) != len(lst):
        raise ValueError(f"{fn}: {name} lists {len(lst) - len(s)} item(s) more than once; give each head once")
    return s


# --------------------------------------------------------------------------------------------
# Overlap of head sets (ID-3, ID-4, ID-5, ID-6)
# --------------------------------------------------------------------------------------------


def topk_overlap_test(a: Any, b: Any, n_total: int) -> OverlapResult:
    """One-sided hypergeometric test that two head sets overlap more than chance.

    Tested: ``|A ∩ B|`` for head sets A and B (sizes may differ) out of ``n_total`` heads.
    Null: B is a uniformly random ``|B|``-subset of the ``n_total`` heads, independent of A, so
    ``|A ∩ B| ~ Hypergeom(n_total, |A|, |B|)`` (Fisher's exact test on the 2x2 membership
    table). Alternative: the overlap is larger. Returns ``(overlap, expected, p)`` with
    ``expected = |A| |B| / n_total`` and ``p = P(X >= overlap)``.
    """
    fn = "topk_overlap_test"
    n = _check_count(n_total, "n_total", fn, minimum=1)
    sa, sb = _as_item_set(a, "a", fn), _as_item_set(b, "b", fn)
    if len(sa | sb) > n:
        raise ValueError(
            f"{fn}: a and b hold {len(sa | sb)} distinct heads but n_total is {n}; "
            "pass the model's total number of heads (shape.n_total)"
        )
    overlap = len(sa & sb)
    expected = len(sa) * len(sb) / n
    p = float(_sps.hypergeom.sf(overlap - 1, n, len(sa), len(sb)))
    return OverlapResult(overlap, expected, min(1.0, max(0.0, p)))


def _intersection_pmf(sizes: Sequence[int], n_total: int) -> np.ndarray:
    """Exact pmf of ``|S_1 ∩ ... ∩ S_m|`` for independent uniform subsets of the given sizes.

    Sequentially: given ``|S_1 ∩ ... ∩ S_j| = i``, intersecting with an independent uniform
    ``s``-subset leaves ``Hypergeom(n_total, i, s)`` items. The distribution does not depend on
    the order, so the smallest set goes first (fewest states).
    """
    order = sorted(sizes)
    top = order[0]
    pmf = np.zeros(top + 1)
    pmf[top] = 1.0
    states = np.arange(top + 1)
    for s in order[1:]:
        trans = _sps.hypergeom.pmf(states[None, :], n_total, states[:, None], s)  # [from i, to k]
        pmf = pmf @ np.nan_to_num(trans)
    return pmf


def intersection_null_p(
    sets: Sequence[Any], n_total: int, *, draws: int = 10_000, seed: int = 0, method: str = "exact"
) -> OverlapResult:
    """Is the intersection of m head sets larger than for independent random sets of the same sizes?

    Tested: the size of ``S_1 ∩ ... ∩ S_m`` (e.g. per-task top-K sets; ID-5's general heads).
    Null: the sets are independent uniformly random subsets of the ``n_total`` heads with the
    observed sizes. Alternative: the intersection is larger. Returns ``(observed, expected, p)``
    with ``expected = n_total * prod(|S_j| / n_total)``.

    ``method="exact"`` (default) computes ``P(X >= observed)`` from the exact null distribution
    (a chain of hypergeometric steps); ``"monte_carlo"`` draws ``draws`` sets of random subsets
    (seeded) and gives ``p = (1 + #{X >= observed}) / (draws + 1)`` — kept as an independent check.
    Rejecting independence is a weak claim: heads that attend strongly in general can sit in
    every task's top-K without being retrieval heads; report which heads they are.
    """
    fn = "intersection_null_p"
    n = _check_count(n_total, "n_total", fn, minimum=1)
    if isinstance(sets, (str, bytes)) or not hasattr(sets, "__iter__"):
        raise ValueError(f"{fn}: sets must be a list of head sets, got {sets!r}")
    ss = [_as_item_set(s, f"sets[{i}]", fn) for i, s in enumerate(sets)]
    if len(ss) < 2:
        raise ValueError(f"{fn}: got {len(ss)} set(s); an intersection null needs at least two sets")
    union = set().union(*ss)
    if len(union) > n:
        raise ValueError(
            f"{fn}: the sets hold {len(union)} distinct heads but n_total is {n}; "
            "pass the model's total number of heads"
        )
    if method not in ("exact", "monte_carlo"):
        raise ValueError(f"{fn}: method {method!r} is not one of 'exact', 'monte_carlo'")
    sizes = [len(s) for s in ss]
    observed = len(set.intersection(*ss))
    expected = float(n * np.prod([s / n for s in sizes]))
    if method == "exact":
        pmf = _intersection_pmf(sizes, n)
        p = float(pmf[observed:].sum())
        return OverlapResult(observed, expected, min(1.0, max(0.0, p)))
    n_draws = _check_count(draws, "draws", fn, minimum=1)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMS // n)
    count = 0
    for start in range(0, n_draws, chunk):
        m = min(chunk, n_draws - start)
        member = np.ones((m, n), dtype=bool)
        for s in sizes:
            keys = rng.random((m, n))
            if s == 0:
                member[:] = False
                continue
            kth = np.partition(keys, s - 1, axis=1)[:, s - 1 : s]
            member &= keys <= kth
        count += int(np.count_nonzero(member.sum(axis=1) >= observed))
    return OverlapResult(observed, expected, (1 + count) / (n_draws + 1))


# --------------------------------------------------------------------------------------------
# Rank correlation (ID-3, ID-6)
# --------------------------------------------------------------------------------------------

_SPEARMAN_EXACT_MAX_N = 8  # n! permutations enumerated exactly up to here


def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Mid-ranks along the last axis."""
    return _sps.rankdata(a, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows (NaN where a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = (xc * yc).sum(axis=-1)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _paired_xy(x: Any, y: Any, fn: str, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    xa = _finite_1d(x, "x", fn, min_len=min_len)
    ya = _finite_1d(y, "y", fn, min_len=min_len)
    if xa.shape != ya.shape:
        raise ValueError(
            f"{fn}: x has {xa.shape[0]} values but y has {ya.shape[0]}; pass paired values for the same items"
        )
    for name, v in (("x", xa), ("y", ya)):
        if np.all(v == v[0]):
            raise ValueError(f"{fn}: {name} is constant, so a rank correlation is undefined; check the scores")
    return xa, ya


def spearman_test(x: Any, y: Any, alternative: str = "greater") -> CorrelationResult:
    """Spearman's rank correlation of paired scores (e.g. every head's score in two settings).

    Tested: rho between ``x`` and ``y`` (mid-ranks for ties). Null: x and y are independent, so
    every pairing of their values is equally likely. Alternative: ``"greater"`` (default, a
    positive association — stable rankings), ``"less"`` or ``"two-sided"``. For n <= 8 the p-value
    is the exact permutation p (all n! pairings, ties included); above that, scipy's t
    approximation, which is accurate at the hundreds of heads a ranking holds. Rejecting
    independence is weaker than "stable": read rho and :func:`spearman_ci` too.
    """
    fn = "spearman_test"
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"{fn}: alternative {alternative!r} is not one of {', '.join(_ALTERNATIVES)}")
    xa, ya = _paired_xy(x, y, fn, 3)
    rho = float(_sps.spearmanr(xa, ya).statistic)
    if xa.shape[0] <= _SPEARMAN_EXACT_MAX_N:
        res = _sps.permutation_test(
            (_rank_rows(xa), _rank_rows(ya)), lambda u, v, axis=-1: _pearson_rows(u, v),
            permutation_type="pairings", vectorized=True, n_resamples=np.inf, alternative=alternative,
        )
        p = float(res.pvalue)
    else:
        p = float(_sps.spearmanr(xa, ya, alternative=alternative).pvalue)
    return CorrelationResult(rho, min(1.0, max(0.0, p)))


def spearman_ci(
    x: Any, y: Any, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> ConfidenceInterval:
    """Percentile bootstrap CI (two-sided ``level``) of Spearman's rho, resampling paired items.

    Items (heads) are resampled with replacement and re-ranked (mid-ranks) in each resample; the
    rare resample whose ranks are constant is dropped. Treats the items as exchangeable units.
    """
    fn = "spearman_ci"
    level = _check_level(level, fn)
    n_boot = _check_count(n_boot, "n_boot", fn, minimum=1)
    xa, ya = _paired_xy(x, y, fn, 3)
    n = xa.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // (4 * n))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start : start + m] = _pearson_rows(_rank_rows(xa[idx]), _rank_rows(ya[idx]))
    out = out[np.isfinite(out)]
    if out.size == 0:
        raise ValueError(f"{fn}: every resample was constant; x and y need more distinct values")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(out, [tail, 1.0 - tail])
    return ConfidenceInterval(float(lo), float(hi))


# --------------------------------------------------------------------------------------------
# Non-inferiority (CA-3)
# --------------------------------------------------------------------------------------------

_NI_EXACT_MAX_N = 400  # exact unconditional test up to this many samples, Tango's score test above
_NI_GRID = 64  # nuisance grid on the null boundary, refined around its maximum


def _tango_z(b: np.ndarray, c: np.ndarray, n: int, delta0: float) -> np.ndarray:
    """Tango's (1998) score statistic for H0: p(+1) - p(-1) = delta0 on paired 0/1 outcomes.

    ``b`` counts +1 changes, ``c`` counts -1 changes; the variance uses the restricted MLE of
    p(-1), the larger root of ``2n q^2 - B q - C = 0``.
    """
    b = np.asarray(b, dtype=float)
    c = np.asarray(c, dtype=float)
    n0 = n - b - c
    d = delta0
    B = b * (1 - d) + c * (1 - 3 * d) - 2 * n0 * d
    C = c * d * (1 - d)
    q = (B + np.sqrt(np.maximum(B * B + 8 * n * C, 0.0))) / (4 * n)
    q = np.clip(q, max(0.0, -d), (1 - d) / 2)
    var = n * (2 * q + d - d * d)
    num = b - c - n * d
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return z



@functools.lru_cache(maxsize=4)
def _trinomial_table(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every outcome ``(b, c)`` of n paired 0/1 comparisons (b changes of +1, c of -1) as
    ``(n+1, n+1)`` grids: b, c, n0 = n - b - c, validity ``b + c <= n`` and the log multinomial
    coefficient."""
    from scipy.special import gammaln

    b = np.broadcast_to(np.arange(n + 1)[:, None], (n + 1, n + 1)).astype(float)
    c = np.broadcast_to(np.arange(n + 1)[None, :], (n + 1, n + 1)).astype(float)
    valid = b + c <= n
    n0 = np.where(valid, n - b - c, 0.0)
    logcoef = np.where(valid, gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n0 + 1), -np.inf)
    for a in (b, c, valid, n0, logcoef):
        a.setflags(write=False)
    return b, c, valid, n0, logcoef


def _ni_exact_p(b_obs: int, c_obs: int, n: int, delta0: float) -> float:
    """Exact unconditional p of H0: p(+1) - p(-1) <= delta0 against ">", for counts of +1 (b) and -1 (c).

    Outcomes are ordered by Tango's score statistic made monotone (an outcome with more +1s or
    fewer -1s never ranks lower), and p is the largest probability of an outcome at least as
    extreme as the observed one over the nuisance parameter on the null boundary (grid, then
    refined around the maximum). Monotonicity makes the boundary the worst case of the whole null.
    """
    from scipy.special import xlogy

    b, c, valid, n0, logcoef = _trinomial_table(n)
    z = np.where(valid, _tango_z(b, c, n, delta0), -np.inf)
    z = np.maximum.accumulate(z, axis=0)  # max over fewer +1s
    z = np.flip(np.maximum.accumulate(np.flip(z, axis=1), axis=1), axis=1)  # and over more -1s
    z_obs = z[b_obs, c_obs]
    region = valid & (z >= z_obs - 1e-9 * max(1.0, abs(z_obs)))
    rb, rc, rn0, rlog = b[region], c[region], n0[region], logcoef[region]

    def prob(s: np.ndarray) -> np.ndarray:
        p_minus = s[:, None]
        p_plus = np.clip(s + delta0, 0.0, 1.0)[:, None]
        p_zero = np.clip(1.0 - 2.0 * s - delta0, 0.0, 1.0)[:, None]
        logp = rlog + xlogy(rb, p_plus) + xlogy(rc, p_minus) + xlogy(rn0, p_zero)
        return np.exp(logp).sum(axis=1)

    s_lo, s_hi = max(0.0, -delta0), (1.0 - delta0) / 2.0
    grid = np.linspace(s_lo, s_hi, _NI_GRID)
    vals = prob(grid)
    i = int(np.argmax(vals))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, _NI_GRID - 1)], 33)
    return float(min(1.0, max(vals.max(), prob(fine).max())))


def _ni_score_p(b_obs: int, c_obs: int, n: int, delta0: float) -> float:
    """Asymptotic p of Tango's score test of H0: p(+1) - p(-1) <= delta0 against ">"."""
    return float(_sps.norm.sf(_tango_z(np.array(b_obs), np.array(c_obs), n, delta0)))


def _ni_lower_bound(pfun: Callable[[float], float], b: int, c: int, n: int, alpha: float) -> float:
    """sup{d : pfun(d) < alpha}, the test-inversion lower confidence bound of p(+1) - p(-1)."""
    if c == n:
        return -1.0
    lo, hi = -1.0, (b - c) / n
    if pfun(hi) < alpha:
        return hi
    for _ in range(16):  # bracket width 2 / 2**16 = 3e-5
        mid = (lo + hi) / 2.0
        if pfun(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def non_inferiority(
    changes: Any,
    delta: float,
    *,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    method: str = "auto",
) -> NonInferiorityResult:
    """Non-inferiority of a mean per-sample change with margin ``delta`` (CA-3: ablating the K
    lowest-scoring heads costs less than ``delta`` accuracy).

    Tested: the mean of ``changes`` (per sample, outcome after the intervention minus before).
    Null: mean <= -delta (a loss of at least ``delta``). Alternative: mean > -delta.
    Returns ``(mean, (lo, hi), holds, p)``: ``lo`` and ``hi`` are the one-sided ``level``
    lower and upper confidence bounds (together a two-sided ``2 level - 1`` interval — the
    conventional 90% CI for a 5% one-sided test); ``holds`` is True when ``lo`` clears ``-delta``,
    i.e. when ``p < 1 - level``.

    For differences of paired 0/1 outcomes (values in {-1, 0, +1}; ``method="auto"`` or
    ``"exact"``) p is an exact unconditional test on the trinomial counts, ordered by Tango's
    score statistic, and the bounds invert that test; above 400 samples (or ``"score"``) Tango's
    asymptotic score test is used. Why not a t-test or a sign/Wilcoxon test: the t-test is badly
    anti-conservative for the typical CA-3 data, where most changes are 0 and a few are -1 (with
    no -1 at all its standard error is 0 and any n "proves" non-inferiority), and sign and
    signed-rank tests are about medians, not the mean. The exact test's size is at most
    ``1 - level`` for every nuisance value. ``n_boot`` and ``seed`` are used only by
    ``method="bootstrap"`` (chosen by "auto" for non-lattice data): percentile bootstrap bounds and
    ``p = (1 + #{bootstrap means <= -delta}) / (n_boot + 1)`` — asymptotic only, and unreliable for
    small or nearly constant samples.
    """
    fn = "non_inferiority"
    x = _finite_1d(changes, "changes", fn)
    if not _is_real(delta) or not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"{fn}: delta (the margin) must be a finite number >= 0, got {delta!r}")
    delta = float(delta)
    level = _check_level(level, fn)
    alpha = 1.0 - level
    if method not in ("auto", "exact", "score", "bootstrap"):
        raise ValueError(f"{fn}: method {method!r} is not one of 'auto', 'exact', 'score', 'bootstrap'")
    n = x.shape[0]
    mean = float(x.mean())
    lattice = bool(np.isin(x, (-1.0, 0.0, 1.0)).all())
    if method == "auto":
        method = ("exact" if n <= _NI_EXACT_MAX_N else "score") if lattice else "bootstrap"
    if method in ("exact", "score"):
        if not lattice:
            raise ValueError(
                f"{fn}: method={method!r} needs changes of paired 0/1 outcomes (values -1, 0, +1); "
                "use method='bootstrap' for continuous changes"
            )
        if delta >= 1.0:
            raise ValueError(f"{fn}: delta={delta} >= 1 allows every outcome; choose a margin below 1")
        b = int(np.count_nonzero(x > 0))
        c = int(np.count_nonzero(x < 0))
        test = _ni_exact_p if method == "exact" else _ni_score_p
        p = test(b, c, n, -delta)
        lo = _ni_lower_bound(lambda d: test(b, c, n, d), b, c, n, alpha)
        hi = -_ni_lower_bound(lambda d: test(c, b, n, d), c, b, n, alpha)
        return NonInferiorityResult(mean, (lo, hi), bool(p < alpha), p)
    n_boot = _check_count(n_boot, "n_boot", fn, minimum=1)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // n)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        boot[start : start + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    lo, hi = (float(v) for v in np.quantile(boot, [alpha, level]))
    p = (1 + int(np.count_nonzero(boot <= -delta))) / (n_boot + 1)
    return NonInferiorityResult(mean, (lo, hi), bool(lo > -delta), float(p))


def margin_test(
    changes: Any, bound: float, *, alternative: str = "greater", level: float = 0.95
) -> MarginResult:
    """Exact test that the mean of paired 0/1 differences lies beyond ``bound`` (IV-1, IV-2).

    ``changes`` are per-sample differences of paired 0/1 outcomes (values -1, 0, +1), e.g. the
    accuracy drop ``baseline - ablated``. ``alternative="greater"``: H0 mean <= bound against
    mean > bound ("the drop exceeds 10 points"); ``"less"``: H0 mean >= bound against mean <
    bound ("the drop stays under 5 points"). The same exact unconditional test on the trinomial
    counts as :func:`non_inferiority` (which is the case ``alternative="greater"``, ``bound =
    -delta`` on the change). Returns ``(mean, (lo, hi), p)`` with one-sided ``level`` bounds.
    """
    fn = "margin_test"
    x = _finite_1d(changes, "changes", fn)
    if not bool(np.isin(x, (-1.0, 0.0, 1.0)).all()):
        raise ValueError(f"{fn}: changes must be differences of paired 0/1 outcomes (values -1, 0, +1)")
    if not _is_real(bound) or not -1.0 < float(bound) < 1.0:
        raise ValueError(f"{fn}: bound must lie strictly between -1 and 1, got {bound!r}")
    if alternative not in ("greater", "less"):
        raise ValueError(f"{fn}: alternative {alternative!r} is not one of 'greater', 'less'")
    level = _check_level(level, fn)
    alpha = 1.0 - level
    n = x.shape[0]
    b = int(np.count_nonzero(x > 0))
    c = int(np.count_nonzero(x < 0))
    test = _ni_exact_p if n <= _NI_EXACT_MAX_N else _ni_score_p
    lo = _ni_lower_bound(lambda d: test(b, c, n, d), b, c, n, alpha)
    hi = -_ni_lower_bound(lambda d: test(c, b, n, d), c, b, n, alpha)
    if alternative == "greater":
        p = test(b, c, n, float(bound))
    else:
        p = test(c, b, n, -float(bound))
    return MarginResult(float(x.mean()), (lo, hi), float(p))


# --------------------------------------------------------------------------------------------
# Trend over levels (CA-2)
# --------------------------------------------------------------------------------------------

_KENDALL_EXACT_MAX = 8  # levels enumerated exactly (8! = 40320 orderings)
_PAGE_EXACT_MAX_LEVELS = 8
_PAGE_EXACT_MAX_COST = 5e7  # convolution work allowed for the exact tied Page null


@functools.lru_cache(maxsize=16)
def _perms(k: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(k))), dtype=np.int64)


@functools.lru_cache(maxsize=1024)
def _page_row_dist(ranks2: tuple[int, ...], pred: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """Null distribution of one row's contribution ``2 * sum_j pred_j R_pi(j)`` over all orderings."""
    vals = (np.asarray(ranks2)[_perms(len(ranks2))] * np.asarray(pred)).sum(axis=1)
    lo = int(vals.min())
    return lo, np.bincount(vals - lo) / vals.shape[0]


def _page_tied(ranks: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Page's L with mid-ranks and its one-sided p under within-row permutation (ties allowed).

    Exact (rows are independent, so the null is the convolution of per-row distributions) when
    affordable, else normal with the exact permutation mean and variance of each row.
    """
    n, k = ranks.shape
    L = float((ranks * pred).sum())
    ranks2 = np.rint(2 * ranks).astype(np.int64)
    pred_t = tuple(int(v) for v in pred)
    ps = np.sort(pred)
    width = 2 * int(ps @ np.arange(1, k + 1) - ps @ np.arange(k, 0, -1)) + 1  # untied rows vary most
    if k <= _PAGE_EXACT_MAX_LEVELS and n * n * width * width / 2 <= _PAGE_EXACT_MAX_COST:
        total_lo, pmf = 0, np.ones(1)
        for row in ranks2:
            lo, d = _page_row_dist(tuple(sorted(int(v) for v in row)), pred_t)
            total_lo += lo
            pmf = np.convolve(pmf, d)
        obs = int(round(2 * L)) - total_lo
        p = float(pmf[max(obs, 0) :].sum()) if obs < pmf.shape[0] else 0.0
        return L, min(1.0, max(0.0, p))
    pc = pred - pred.mean()
    rc = ranks - ranks.mean(axis=1, keepdims=True)
    mean = float((ranks.mean(axis=1, keepdims=True) * pred).sum())
    var = float((pc @ pc) * (rc * rc).sum() / (k - 1))
    if var == 0:
        return L, 1.0
    return L, float(_sps.norm.sf((L - mean) / math.sqrt(var)))


def trend_test(levels: Any, values: Any) -> TrendResult:
    """One-sided test that an outcome increases with the level (CA-2: the top-K drop grows with K).

    ``values`` is one number per level (1-D) or paired per-sample outcomes ``[samples, levels]``
    (2-D), columns in the order of ``levels`` (which need not be sorted, but must be distinct).

    - 2-D: Page's L (``scipy.stats.page_trend_test``, exact for small tables): within each sample
      the levels are ranked by outcome and L sums rank x predicted rank. Null: within every
      sample, the outcomes at the different levels are exchangeable (no effect of the level).
      Alternative: outcomes rise with the level. scipy's null assumes no ties within a row; with
      ties (0/1 outcomes have many) the same L is referred to its exact permutation distribution
      given the ties (the convolution of the rows' distributions; normal with exact moments when
      that is too large), since the untied null would be wrong. Two levels reduce to a sign test.
    - 1-D: Kendall's tau-b against the level, p exact over all orderings of the values (ties
      included) for up to 8 levels, else scipy's. Null: every ordering is equally likely.
      With few levels the smallest attainable p is large (1/k!: 0.17 for 3 levels, 0.042 for 4);
      see :func:`min_attainable_p_kendall` — such a p cannot support a claim, so call it
      inconclusive rather than refuted.

    Returns ``(statistic, p)``: L for 2-D, tau-b for 1-D (0 and p = 1 for constant values).
    """
    fn = "trend_test"
    lev = _finite_1d(levels, "levels", fn, min_len=2)
    if np.unique(lev).shape[0] != lev.shape[0]:
        raise ValueError(f"{fn}: levels {lev.tolist()} repeat a value; give each level once")
    try:
        v = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: values must be numbers, one per level or [samples, levels]") from None
    if v.ndim not in (1, 2) or v.shape[-1] != lev.shape[0]:
        raise ValueError(
            f"{fn}: values has shape {v.shape} but there are {lev.shape[0]} levels; pass one value per level "
            "or a [samples, levels] array"
        )
    if v.size == 0:
        raise ValueError(f"{fn}: values is empty; pass at least one sample")
    if not np.isfinite(v).all():
        raise ValueError(f"{fn}: values contain NaN or infinite entries; drop or fix those samples first")
    k = lev.shape[0]
    if v.ndim == 1:
        if np.all(v == v[0]):
            return TrendResult(0.0, 1.0)
        tau = float(_sps.kendalltau(lev, v).statistic)
        if k <= _KENDALL_EXACT_MAX:
            sx = np.sign(lev[:, None] - lev[None, :])
            vp = v[_perms(k)]
            s_perm = (np.sign(vp[:, :, None] - vp[:, None, :]) * sx).sum(axis=(1, 2)) / 2
            s_obs = float((np.sign(v[:, None] - v[None, :]) * sx).sum() / 2)
            p = float(np.mean(s_perm >= s_obs - 1e-9))
        else:
            ties = np.unique(v).shape[0] != k
            p = float(_sps.kendalltau(lev, v, alternative="greater", method="asymptotic" if ties else "exact").pvalue)
        return TrendResult(tau, min(1.0, max(0.0, p)))
    pred = _sps.rankdata(lev).astype(np.int64)
    ranks = _sps.rankdata(v, axis=1)
    if k >= 3 and v.shape[0] >= 2 and all(np.unique(r).shape[0] == k for r in ranks):
        res = _sps.page_trend_test(v, predicted_ranks=pred)
        return TrendResult(float(res.statistic), min(1.0, max(0.0, float(res.pvalue))))
    return TrendResult(*_page_tied(ranks, pred))


# --------------------------------------------------------------------------------------------
# Proportions (ID-1)
# --------------------------------------------------------------------------------------------


def fraction_ci(flags: Any, *, level: float = 0.95, method: str = "wilson") -> FractionResult:
    """A proportion and its two-sided ``level`` confidence interval (``scipy.stats.binomtest``).

    ``flags`` are booleans or 0/1 (e.g. "this head's score is above 0.1"); ``method`` is
    ``"wilson"`` (default; sensible at 0/n and n/n), ``"wilsoncc"`` or ``"exact"``
    (Clopper-Pearson, conservative). Returns ``(fraction, (lo, hi))``. Treats the flags as
    independent trials; for heads scored on shared samples use :func:`bootstrap_fraction_ci`.
    """
    fn = "fraction_ci"
    a = np.asarray(flags)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{fn}: flags must be a non-empty 1-D sequence of booleans or 0/1, got shape {a.shape}")
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{fn}: flags must hold booleans or 0/1 values")
    level = _check_level(level, fn)
    if method not in ("wilson", "wilsoncc", "exact"):
        raise ValueError(f"{fn}: method {method!r} is not one of 'wilson', 'wilsoncc', 'exact'")
    k, n = int(a.astype(bool).sum()), int(a.shape[0])
    return FractionResult(k / n, proportion_ci(k, n, level=level, method=method))


def proportion_ci(successes: int, n: int, *, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided ``level`` confidence interval of the proportion ``successes / n``
    (``scipy.stats.binomtest(...).proportion_ci``); ``(nan, nan)`` when ``n == 0``.

    ``method`` is ``"wilson"`` (default; sensible at 0/n and n/n, where the normal interval is
    not), ``"wilsoncc"`` (with continuity correction) or ``"exact"`` (Clopper-Pearson,
    conservative). ``successes`` and ``n`` are integers with ``0 <= successes <= n``.
    """
    fn = "proportion_ci"
    n = _check_count(n, "n", fn)
    successes = _check_count(successes, "successes", fn)
    if successes > n:
        raise ValueError(f"{fn}: successes must be at most n, got {successes} of {n}")
    level = _check_level(level, fn)
    if method not in ("wilson", "wilsoncc", "exact"):
        raise ValueError(f"{fn}: method {method!r} is not one of 'wilson', 'wilsoncc', 'exact'")
    if n == 0:
        return (float("nan"), float("nan"))
    ci = _sps.binomtest(successes, n).proportion_ci(confidence_level=level, method=method)
    return (float(ci.low), float(ci.high))


def bootstrap_fraction_ci(
    scores: Any,
    threshold: float,
    max_fraction: float | None = None,
    *,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> FractionBounds:
    """Bootstrap over samples of the fraction of heads whose mean score exceeds ``threshold`` (ID-1).

    ``scores`` is ``[n_samples, n_heads]`` (per-sample retrieval scores). The statistic is the
    fraction of heads with ``mean over samples > threshold``; samples (rows) are resampled with
    replacement. Returns ``(lo, hi, p)``: the two-sided ``level`` percentile interval and, when
    ``max_fraction`` is given, a one-sided bootstrap p for H0: fraction >= max_fraction against
    "fewer than max_fraction", ``p = (1 + #{resampled fraction >= max_fraction}) / (n_boot + 1)``
    (``None`` without it). ``hi < max_fraction`` at ``level = 1 - 2 alpha`` is the one-sided
    alpha decision. Approximate: the statistic jumps when a head's mean crosses the threshold, so
    the interval is only as good as the bootstrap of a non-smooth statistic.
    """
    fn = "bootstrap_fraction_ci"
    try:
        s = np.asarray(scores, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: scores must be a numeric [n_samples, n_heads] array") from None
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"{fn}: scores must be [n_samples, n_heads] with at least one of each, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{fn}: scores contain NaN or infinite values; drop the samples that produced them")
    if not _is_real(threshold) or not math.isfinite(threshold):
        raise ValueError(f"{fn}: threshold must be a finite number, got {threshold!r}")
    if max_fraction is not None and not (_is_real(max_fraction) and 0.0 <= float(max_fraction) <= 1.0):
        raise ValueError(f"{fn}: max_fraction must be a number in [0, 1] or None, got {max_fraction!r}")
    level = _check_level(level, fn)
    n_boot = _check_count(n_boot, "n_boot", fn, minimum=1)
    n, h = s.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(n, h))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        counts = np.zeros((m, n))
        np.add.at(counts, (np.arange(m)[:, None], idx), 1.0)
        means = counts @ s / n  # [m, heads]: each resample's per-head mean
        out[start : start + m] = (means > threshold).mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(out, [tail, 1.0 - tail])
    p = None if max_fraction is None else (1 + int(np.count_nonzero(out >= float(max_fraction)))) / (n_boot + 1)
    return FractionBounds(float(lo), float(hi), p)


# --------------------------------------------------------------------------------------------
# Ratios (ID-2)
# --------------------------------------------------------------------------------------------


def ratio_test_greater(ratios: Any, threshold: float) -> RatioTestResult:
    """One-sided Wilcoxon signed-rank test that per-sample ratios exceed ``threshold``. The ratio
    claims (ID-2, ID-5, IV-6) no longer use it: they claim a median, and this tests the pseudo-median
    (:func:`sign_pvalues`, :func:`rh.rules.claims.ratio_rule`).

    Tested: ``d = log(ratio) - log(threshold)`` per sample (e.g. attention mass per needle token
    over the uniform share). Null: d is symmetric about 0 (the typical ratio is the threshold).
    Alternative: d is shifted above 0. The log scale makes ratios symmetric enough for the
    signed-rank test and treats 2x above and 2x below alike. Exact p for up to 50 untied nonzero
    d (scipy; zeros dropped); with ties scipy enumerates up to 13 and is asymptotic beyond.
    Returns ``(median ratio, p)``.
    """
    fn = "ratio_test_greater"
    r = _finite_1d(ratios, "ratios", fn)
    if (r <= 0).any():
        raise ValueError(f"{fn}: ratios must be > 0 (a ratio of attention masses); got min {r.min()!r}")
    if not _is_real(threshold) or not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"{fn}: threshold must be a finite number > 0, got {threshold!r}")
    d = np.log(r) - math.log(threshold)
    d = d[d != 0]
    med = float(np.median(r))
    if d.size == 0:
        return RatioTestResult(med, 1.0)
    p = float(_sps.wilcoxon(d, alternative="greater").pvalue)
    return RatioTestResult(med, min(1.0, max(0.0, p)))


def sign_pvalues(samples: Sequence[Any], alternative: str) -> list[float]:
    """The exact sign test of H0 "the median is 0" per 1-D sample: ``"greater"`` (against a median
    above 0) is P(Binomial(m, 1/2) >= positives), ``"less"`` P(Binomial(m, 1/2) <= positives),
    with m the nonzero values (zeros dropped, as a tie at the median tells neither side). A sample
    holding NaN gets NaN, as scipy's tests propagate it.

    Why the sign test, not the signed-rank test, for the ratio claims (ID-2, ID-5, IV-6): they are
    about the *median* ratio, and the signed-rank test is a test of the pseudo-median (the median of
    pairwise means), which skewed log ratios pull away from the median: with right-skewed log
    ratios whose median is exactly the threshold it supported in 12.6% of simulated runs at α = 0.05.
    The sign test's size is at most α for any continuous distribution with that median."""
    if alternative not in ("greater", "less"):
        raise ValueError(f"sign_pvalues: alternative {alternative!r} is not 'greater' or 'less'")
    out = []
    for x in samples:
        x = np.asarray(x, float)
        pos, m = int((x > 0).sum()), int((x != 0).sum())
        if np.isnan(x).any():  # NaN in, NaN out
            out.append(math.nan)
        else:
            out.append(1.0 if m == 0 else float(_sps.binomtest(pos, m, 0.5, alternative=alternative).pvalue))
    return out


def sign_power(n: int, q: float, alpha: float) -> float:
    """Exact power of the one-sided sign test ("greater") on ``n`` values each above the tested
    median with probability ``q``: P(Binomial(n, q) >= c), c the fewest positives with p < α."""
    if n < 1:
        return 0.0
    k = np.arange(n + 1)
    ok = k[_sps.binom.sf(k - 1, n, 0.5) < alpha]
    if ok.size == 0:
        return 0.0
    return float(_sps.binom.sf(int(ok[0]) - 1, n, min(max(q, 0.0), 1.0)))


def _wilcoxon_method(x: np.ndarray) -> str | None:
    """The method ``scipy.stats.wilcoxon(x)``'s ``method="auto"`` picks for one 1-D sample of finite
    nonzero values (asymptotic above 50 values; exact without ties; asymptotic with ties above 13),
    or None where it picks a permutation test (ties, at most 13 values) or ``x`` is not such a sample."""
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all() or (x == 0).any():
        return None
    if x.size > 50:
        return "asymptotic"
    a = np.sort(np.abs(x))
    if not (a[1:] == a[:-1]).any():
        return "exact"
    return "asymptotic" if x.size > 13 else None


def wilcoxon_pvalues(samples: Sequence[Any], alternative: str) -> list[float]:
    """``float(scipy.stats.wilcoxon(x, alternative=alternative).pvalue)`` for each 1-D sample ``x``,
    with scipy's defaults, the same values as one call per sample but batched: the samples of one
    length for which scipy would pick the same method (see :func:`_wilcoxon_method`) go through one
    vectorised call with that method named, so its per-call overhead is paid once per batch, not
    once per sample. Samples with zeros, non-finite values or a permutation test get their own call."""
    xs = [np.asarray(x, dtype=float) for x in samples]
    out: list[float | None] = [None] * len(xs)
    batches: dict[tuple[int, str], list[int]] = {}
    for i, x in enumerate(xs):
        method = _wilcoxon_method(x)
        if method is None:
            out[i] = float(_sps.wilcoxon(x, alternative=alternative).pvalue)
        else:
            batches.setdefault((x.size, method), []).append(i)
    for (_, method), idx in batches.items():
        p = _sps.wilcoxon(np.stack([xs[i] for i in idx]), alternative=alternative, method=method, axis=1).pvalue
        for i, v in zip(idx, np.atleast_1d(p)):
            out[i] = float(v)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Smallest attainable p-values (preconditions for "inconclusive")
# --------------------------------------------------------------------------------------------


def min_attainable_p_binomial(n: int, p0: float = 0.5, alternative: str = "greater") -> float:
    """Smallest p an exact binomial test with ``n`` trials and null success rate ``p0`` can give.

    ``"greater"``: ``p0 ** n`` (all successes); ``"less"``: ``(1 - p0) ** n``; ``"two-sided"``:
    the smaller of scipy's two-sided p at 0 and at n successes. ``n = 0`` gives 1.
    """
    fn = "min_attainable_p_binomial"
    n = _check_count(n, "n", fn)
    if not (_is_real(p0) and 0.0 < float(p0) < 1.0):
        raise ValueError(f"{fn}: p0 must lie in (0, 1), got {p0!r}")
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"{fn}: alternative {alternative!r} is not one of {', '.join(_ALTERNATIVES)}")
    if n == 0:
        return 1.0
    p0 = float(p0)
    if alternative == "greater":
        return p0**n
    if alternative == "less":
        return (1.0 - p0) ** n
    return float(min(_sps.binomtest(x, n, p0).pvalue for x in (0, n)))


def min_attainable_p_mcnemar(n_discordant: int, alternative: str = "greater") -> float:
    """Smallest p of :func:`mcnemar_exact` with ``n_discordant = b + c`` discordant pairs:
    ``0.5 ** n`` one-sided, ``min(1, 2 * 0.5 ** n)`` two-sided. Also the bound for a McNemar test
    on n samples, since b + c <= n."""
    return min_attainable_p_binomial(n_discordant, 0.5, alternative)


def min_attainable_p_wilcoxon(n: int) -> float:
    """Smallest one-sided p of the exact Wilcoxon signed-rank test on ``n`` nonzero untied values: ``0.5 ** n``."""
    return min_attainable_p_binomial(n, 0.5, "greater")


def min_attainable_p_kendall(n_levels: int) -> float:
    """Smallest one-sided p of the exact trend test on one value per level (:func:`trend_test`, 1-D):
    ``1 / n_levels!`` (the values in perfect order; ties only make it larger). 3 levels: 0.167."""
    k = _check_count(n_levels, "n_levels", "min_attainable_p_kendall", minimum=1)
    return 1.0 / math.factorial(k)


def min_attainable_p_page(n_samples: int, n_levels: int) -> float:
    """Smallest one-sided p of the exact Page test: ``(1 / n_levels!) ** n_samples`` (every sample
    perfectly ordered, no ties; ties make it larger, and an all-tied sample contributes nothing)."""
    fn = "min_attainable_p_page"
    n = _check_count(n_samples, "n_samples", fn)
    k = _check_count(n_levels, "n_levels", fn, minimum=1)
    return (1.0 / math.factorial(k)) ** n


def min_attainable_p_headset(draws: int) -> float:
    """Smallest :func:`headset_null_p` with ``draws`` random head sets: ``1 / (draws + 1)``.

    Passing ``p < alpha / m`` (Holm over m levels) needs ``draws > m / alpha - 1``: at least 20
    random sets for one level at 0.05, 60 for three levels."""
    d = _check_count(draws, "draws", "min_attainable_p_headset", minimum=1)
    return 1.0 / (d + 1)
