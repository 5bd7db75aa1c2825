"""Statistics that turn claim outcomes into verdicts (DESIGN.md decision 5, "Verdicts, not booleans").

A claim test computes a statistic, a p-value, an effect size with a confidence interval and n,
corrects p within its parametrized family (Holm), and reports a :class:`Verdict` whose status is
``supported``, ``refuted`` or ``inconclusive``. Everything here is deterministic given its seed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import stats as _sps

__all__ = [
    "STATUSES",
    "Verdict",
    "sign_test_greater",
    "mcnemar_exact",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "holm",
    "headset_null_p",
    "min_attainable_p_sign",
    "decide",
]

STATUSES: tuple[str, ...] = ("supported", "refuted", "inconclusive")


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Convert ``x`` to plain JSON types: numpy scalars/arrays to Python, tuples to lists, non-finite floats to None."""
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    raise TypeError(
        f"cannot convert {type(x).__name__} value {x!r} to JSON; "
        "store numbers, strings, lists or dicts in a Verdict"
    )


def _opt_float(x: Any) -> float | None:
    """``None`` stays ``None``; anything else becomes a Python float."""
    return None if x is None else float(x)


def _fmt(x: float | None, spec: str = ".4g") -> str:
    """Format an optional number for :meth:`Verdict.explain`."""
    if x is None:
        return "n/a"
    return format(x, spec)


# --------------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim under one parameter setting, with the numbers that justify it.

    ``p_adjusted`` is the p-value after correction within the claim's parametrized family (equal
    to ``p_value`` when there is no family); ``effect`` is oriented so that positive means "in the
    direction the claim predicts", and ``effect_name`` says what it measures.
    """

    claim: str
    params: dict
    status: str
    reason: str
    test: str
    statistic: float | None
    p_value: float | None
    p_adjusted: float | None
    effect: float | None
    ci: tuple[float, float] | None
    ci_level: float = 0.95
    n: int = 0
    alpha: float = 0.05
    effect_name: str = ""
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"Verdict status {self.status!r} is not allowed; use one of {', '.join(STATUSES)}"
            )
        if self.ci is not None:
            if len(self.ci) != 2:
                raise ValueError(f"Verdict ci must be a (low, high) pair, got {self.ci!r}")
            object.__setattr__(self, "ci", (float(self.ci[0]), float(self.ci[1])))
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"Verdict alpha must lie in (0, 1), got {self.alpha!r}")
        if not 0.0 < self.ci_level < 1.0:
            raise ValueError(f"Verdict ci_level must lie in (0, 1), got {self.ci_level!r}")

    @property
    def supported(self) -> bool:
        """True when the data support the claim."""
        return self.status == "supported"

    @property
    def refuted(self) -> bool:
        """True when the data do not support the claim (a finding, not an error)."""
        return self.status == "refuted"

    @property
    def inconclusive(self) -> bool:
        """True when preconditions failed, so the claim could not be tested."""
        return self.status == "inconclusive"

    def explain(self) -> str:
        """A multi-line, human-readable account of the verdict and its numbers."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items()) or "(none)"
        if self.ci is None:
            ci = "n/a"
        else:
            ci = f"[{_fmt(self.ci[0])}, {_fmt(self.ci[1])}] ({self.ci_level:.0%} CI)"
        effect_name = f" ({self.effect_name})" if self.effect_name else ""
        lines = [
            f"claim:     {self.claim}",
            f"params:    {params}",
            f"status:    {self.status}",
            f"reason:    {self.reason}",
            f"test:      {self.test}",
            f"statistic: {_fmt(self.statistic)}",
            f"p:         raw {_fmt(self.p_value)}, adjusted {_fmt(self.p_adjusted)}",
            f"effect:    {_fmt(self.effect)}{effect_name}, CI {ci}",
            f"n:         {self.n}",
            f"alpha:     {self.alpha:g}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict: tuples become lists, numpy scalars Python numbers, NaN/inf None."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        """Rebuild a Verdict from :meth:`to_dict` output (e.g. after a JSON round-trip)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Verdict.from_dict got unknown keys {unknown}; allowed: {sorted(names)}")
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"Verdict.from_dict is missing keys {missing}")
        kw = dict(d)
        for key in ("statistic", "p_value", "p_adjusted", "effect"):
            kw[key] = _opt_float(kw[key])
        if kw["ci"] is not None:
            kw["ci"] = (float(kw["ci"][0]), float(kw["ci"][1]))
        for key in ("ci_level", "alpha"):
            if key in kw:
                kw[key] = float(kw[key])
        if "n" in kw:
            kw["n"] = int(kw["n"])
        kw["params"] = dict(kw["params"])
        if "details" in kw:
            kw["details"] = dict(kw["details"])
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# Exact paired tests
# --------------------------------------------------------------------------------------------


def sign_test_greater(diffs: Sequence[float] | np.ndarray) -> tuple[int, int, float]:
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
        return n_pos, n_neg, 1.0
    p = float(_sps.binomtest(n_pos, n, 0.5, alternative="greater").pvalue)
    return n_pos, n_neg, min(1.0, p)


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
) -> tuple[int, int, float]:
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
    if b + c == 0:
        return b, c, 1.0
    p = float(_sps.binomtest(b, b + c, 0.5, alternative=alternative).pvalue)
    return b, c, min(1.0, p)


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
) -> tuple[float, float]:
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
        return s, s

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
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(a - b)`` over paired items (a thin wrapper on :func:`bootstrap_ci`)."""
    a_ = np.asarray(a, dtype=float)
    b_ = np.asarray(b, dtype=float)
    if a_.shape != b_.shape:
        raise ValueError(
            f"paired_bootstrap_ci: a has shape {a_.shape} but b has shape {b_.shape}; "
            "pass paired values for the same items"
        )
    return bootstrap_ci(a_ - b_, np.mean, n_boot=n_boot, level=level, seed=seed)


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
    return (1 + count) / (z.size + 1)


def min_attainable_p_sign(n: int) -> float:
    """Smallest p-value a one-sided sign test on ``n`` non-tied pairs can give: ``0.5 ** n``.

    If it is not below alpha (after correction), the claim cannot be supported and is inconclusive.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"min_attainable_p_sign: n must be a non-negative integer, got {n!r}")
    return 0.5 ** int(n)


def decide(p_adjusted: float, effect: float, alpha: float) -> tuple[str, str]:
    """Supported when ``p_adjusted < alpha`` and ``effect > 0``, else refuted; returns ``(status, reason)``.

    Preconditions that make a claim inconclusive are the caller's to check before calling this.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"decide: alpha must lie in (0, 1), got {alpha!r}")
    if p_adjusted is None or math.isnan(p_adjusted):
        raise ValueError(f"decide: p_adjusted is {p_adjusted!r}; compute a p-value first")
    if effect is None or math.isnan(effect):
        raise ValueError(f"decide: effect is {effect!r}; compute an effect first")
    p_ok = p_adjusted < alpha
    e_ok = effect > 0
    if p_ok and e_ok:
        return "supported", (
            f"effect {effect:.4g} > 0 and adjusted p = {p_adjusted:.4g} < alpha = {alpha:g}"
        )
    failed = []
    if not e_ok:
        failed.append(f"effect {effect:.4g} is not > 0")
    if not p_ok:
        failed.append(f"adjusted p = {p_adjusted:.4g} is not < alpha = {alpha:g}")
    return "refuted", " and ".join(failed)
