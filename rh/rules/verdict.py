"""A verdict and its power: the outcome of one claim under one parameter setting, with the
numbers that justify it, beside the three-way rule that decides it (:mod:`rh.rules.core`, which
re-exports both). ``rh.stats.Verdict`` still imports it, for the claims written against it."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from rh.io import jsonable

__all__ = ["STATUSES", "Power", "Verdict", "format_power"]

STATUSES: tuple[str, ...] = ("supported", "refuted", "inconclusive")


def _refuse_unknown(cls: type, d: dict) -> None:
    """``cls.from_dict`` takes only the dataclass's own fields."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict got unknown keys {unknown}; allowed: {sorted(names)}")


def _opt_float(x: Any) -> float | None:
    """``None`` stays ``None``; anything else becomes a Python float."""
    return None if x is None else float(x)


@dataclass(frozen=True)
class Power:
    """Power of a rule at the sizes used: P(supported | θ = support_at), P(refuted | θ = refute_at)."""

    support: float | None
    support_at: float | None
    refute: float | None
    refute_at: float | None
    method: str
    note: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for k in ("support", "refute", "support_at", "refute_at"):
            if out[k] is not None:
                out[k] = round(float(out[k]), 4)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Power:
        """The inverse of :meth:`to_dict` (a report's or journal's power)."""
        _refuse_unknown(cls, d)
        return cls(**{k: d.get(k) for k in ("support", "support_at", "refute", "refute_at")},
                   method=str(d.get("method", "")), note=str(d.get("note", "")))

    @classmethod
    def none(cls, why: str) -> Power:
        """A claim with no statistical test (an exact identity, a missing model): power is not defined."""
        return cls(None, None, None, None, "none", why)


def format_power(power: Power | dict | None) -> str:
    """``support 0.83 at 0.1, refute 0.91 at 0`` (or the reason power is not stated)."""
    if isinstance(power, Power):
        power = power.to_dict()
    if not power:
        return "n/a"
    parts = []
    for side in ("support", "refute"):
        if power.get(side) is not None:
            parts.append(f"{side} {power[side]:.2f} at {_fmt(power.get(side + '_at'))}")
    text = ", ".join(parts) or "not computed"
    if power.get("note"):
        text += f" ({power['note']})"
    return text


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
    min_effect: float | None = None  # the claim's smallest effect of interest (the refutation boundary)
    power: Power | None = None  # power to support and to refute at these sizes (a dict of it is converted)

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
        if isinstance(self.power, dict):  # Power.to_dict(): a report, journal or older caller's form
            object.__setattr__(self, "power", Power.from_dict(self.power))
        elif self.power is not None and not isinstance(self.power, Power):
            raise TypeError(f"Verdict power is an rh.rules.Power (or its dict), not {type(self.power).__name__}")

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
            f"min effect: {_fmt(self.min_effect)}",
            f"power:     {format_power(self.power)}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict: tuples become lists, numpy scalars Python numbers, NaN/inf None."""
        out = {f.name: jsonable(getattr(self, f.name), strict=True) for f in fields(self) if f.name != "power"}
        out["power"] = self.power.to_dict() if self.power is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        """Rebuild a Verdict from :meth:`to_dict` output (e.g. after a JSON round-trip)."""
        _refuse_unknown(cls, d)
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"Verdict.from_dict is missing keys {missing}")
        kw = dict(d)
        for key in ("statistic", "p_value", "p_adjusted", "effect", "min_effect"):
            if key not in kw:
                continue
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
