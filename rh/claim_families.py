"""Claim families: what rh knows of each claim besides its test, registered in one place.

A :class:`ClaimFamily` gathers what used to be spread over the package by claim id: the decision
rule and its smallest effect Δ, the calibration simulator and its boundaries, the figures the
report draws from the family's verdicts, and the profile fields its claims are parametrized over.
The module that defines a family registers it (:func:`register_family`); the report draws every
registered figure (``rh.report.report_figures``), ``python -m rh calibrate`` simulates every
registered calibration, and the pytest plugin parametrizes claims from the registered parameters.
No module of the report names a claim id.

rh's own families are registered by :mod:`rh.catalogue` exactly as a team registers its own, in a
conftest or a plugin, either by calling :func:`register_family` or through the hook
``pytest_rh_families`` (``rh.hookspecs``)::

    from rh.claim_families import Calibration, ClaimFamily, Figure

    def pytest_rh_families():
        return [ClaimFamily("LAB-1", title="...", figures=(Figure("LAB-1: ...", draw),),
                            calibration=lambda profile, sizes: Calibration(simulate, 0.0, 0.1, 0.2, 0.0))]

This module is data and a registry: it imports nothing of the model, the report or matplotlib; the
figure functions a family names are called only when a report is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Figure", "Calibration", "Parameter", "ClaimFamily", "register_family", "families", "family",
           "family_of", "register_hooked", "unregister_family", "registry_snapshot", "claim_rows", "draw_figures", "calibrated", "parameters", "CLAIM_ID"]

log = logging.getLogger(__name__)

#: A claim id: letters, a hyphen and a number (``CA-1``, ``LAB-12``).
CLAIM_ID = re.compile(r"^[A-Z][A-Z0-9]*-\d+$")

#: A verdict row (``Verdict.to_dict()``) and the run's metadata, as the report holds them.
Rows = Sequence[Mapping[str, Any]]
DrawFn = Callable[[Rows, Mapping[str, Any]], "bytes | None"]


@dataclass(frozen=True)
class Figure:
    """A figure of a family: ``draw(rows, meta)`` gets the verdict rows of the family's claims (and
    the run's metadata) and returns PNG bytes, or None when the rows hold nothing to draw. A title
    that starts with one of the run's claim ids and a colon (``"CA-1: accuracy vs K"``) is shown in
    that claim's section of the report, any other in the report's global figures."""

    title: str
    draw: DrawFn


@dataclass(frozen=True)
class Calibration:
    """How a family's rule is calibrated at a profile's sizes: ``simulate(profile, sizes, rng,
    effect)`` returns the verdicts of one simulated run with ``effect`` planted (or a mapping
    ``shape name -> simulator`` for data of several shapes: the worst case over them is reported),
    and the effects planted at the support boundary (false support), at the refutation boundary
    (false refute, usually Δ), and for the two powers. ``seed``: the family's own random stream
    (default: from its id), so that adding a family moves no other family's rates."""

    simulate: Callable[..., Sequence[Any]] | Mapping[str, Callable[..., Sequence[Any]]]
    at_support: float
    at_refute: float
    power_support: float
    power_refute: float
    seed: int | None = None


@dataclass(frozen=True)
class Parameter:
    """Claims that ask for the fixture ``fixture`` are parametrized over the profile's field
    ``field`` (``"ablation_levels"``...) or over what ``field(profile)`` returns, each value's test
    id given by ``ids``. ``name``: the key the family's verdicts give the value in their params
    (``"k"``, ``"depth"``...; default the fixture's name), so that a row pytest writes for the claim
    without a verdict (a head set it cannot take) keeps the parameter that sets it apart."""

    fixture: str
    field: str | Callable[[Any], Sequence[Any]]
    ids: Callable[[Any], str] = str
    name: str = ""

    @property
    def param(self) -> str:
        return self.name or self.fixture


@dataclass(frozen=True)
class ClaimFamily:
    """One family of claims: ``id`` (``"CA-1"``; a family deciding several claims together, e.g.
    ``"ID-3/ID-4"``, lists them in ``claims``), a one-line ``title``, its decision ``rule`` (the
    function that turns the data into verdicts), ``delta`` (``profile -> Δ``, the smallest effect
    the claim states), ``calibration`` (``(profile, sizes) -> Calibration``: see
    ``rh.calibration.sizes``), ``figures`` and ``parameters``. Only ``id`` is required: a family
    without a calibration is simply not simulated, one without figures draws none. What its claims
    cost needs no declaring: ``--plan`` runs them dry and counts the passes they hand the runner
    (:mod:`rh.dry`)."""

    id: str
    title: str = ""
    claims: tuple[str, ...] = ()
    rule: Callable[..., Any] | None = None
    delta: Callable[[Any], float] | None = None
    calibration: Callable[[Any, dict], Calibration] | None = None
    figures: tuple[Figure, ...] = ()
    parameters: tuple[Parameter, ...] = ()

    def __post_init__(self) -> None:
        claims = tuple(self.claims) or tuple(self.id.split("/"))
        bad = [c for c in claims if not CLAIM_ID.match(c)]
        if bad:
            raise ValueError(f"claim family {self.id!r}: {bad[0]!r} is not a claim id (letters, a hyphen and a "
                             "number, e.g. 'LAB-1')")
        object.__setattr__(self, "claims", claims)
        object.__setattr__(self, "figures", tuple(self.figures))
        object.__setattr__(self, "parameters", tuple(self.parameters))
        for f in self.figures:
            if not isinstance(f, Figure):
                raise TypeError(f"claim family {self.id!r}: figures are rh.claim_families.Figure values, not "
                                f"{type(f).__name__}")
        for p in self.parameters:
            if not isinstance(p, Parameter):
                raise TypeError(f"claim family {self.id!r}: parameters are rh.claim_families.Parameter values, not "
                                f"{type(p).__name__}")

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF


_REGISTRY: dict[str, ClaimFamily] = {}


def register_family(fam: ClaimFamily) -> ClaimFamily:
    """Register ``fam`` (and return it). Registering the same family again is a no-op; another
    family under a registered id, or claiming a claim id another family decides, is an error
    (two definitions of one claim would make its figure or calibration depend on import order)."""
    if not isinstance(fam, ClaimFamily):
        raise TypeError(f"register_family takes an rh.claim_families.ClaimFamily, not {type(fam).__name__}")
    old = _REGISTRY.get(fam.id)
    if old is not None:
        if old == fam:
            return old
        if _origin(old) != _origin(fam):
            raise ValueError(f"claim family {fam.id!r} is registered already (by {_origin(old)}); give yours "
                             "another id")
        del _REGISTRY[fam.id]  # the same module loaded again (a conftest imported anew): its new definition
    for other in _REGISTRY.values():
        shared = set(other.claims) & set(fam.claims)
        if shared:
            raise ValueError(f"claim {sorted(shared)[0]} belongs to the registered family {other.id!r} already; "
                             f"family {fam.id!r} cannot decide it too")
    taken = {p.fixture: f.id for f in _REGISTRY.values() for p in f.parameters}
    for p in fam.parameters:
        if p.fixture in taken:
            raise ValueError(f"family {fam.id!r}: the fixture {p.fixture!r} is parametrized by family "
                             f"{taken[p.fixture]!r} already; name your parameter's fixture otherwise")
    _REGISTRY[fam.id] = fam
    return fam


def register_hooked(returned: Iterable[Any] | None, into: list[str]) -> None:
    """Register what a ``pytest_rh_families`` hook returned, appending each id to ``into`` as it is
    registered (so a caller can remove exactly those, even after an error part-way); anything but
    a :class:`ClaimFamily` is a TypeError saying what the hook returned."""
    for fam in returned or ():
        if not isinstance(fam, ClaimFamily):
            raise TypeError(f"pytest_rh_families returned {type(fam).__name__}, not an rh.claim_families.ClaimFamily")
        into.append(register_family(fam).id)


def _origin(fam: ClaimFamily) -> str:
    fn = fam.rule or fam.calibration or (fam.figures[0].draw if fam.figures else None)
    return getattr(fn, "__module__", None) or "an earlier registration"


def families() -> tuple[ClaimFamily, ...]:
    """Every registered family, in the order registered."""
    return tuple(_REGISTRY.values())


def family(family_id: str) -> ClaimFamily:
    try:
        return _REGISTRY[family_id]
    except KeyError:
        known = ", ".join(_REGISTRY) or "none (is rh.catalogue imported?)"
        raise ValueError(f"unknown claim family {family_id!r}: choose one of {known}") from None


def family_of(claim: str) -> ClaimFamily | None:
    """The registered family that decides the claim id ``claim``, or None."""
    for fam in _REGISTRY.values():
        if claim in fam.claims:
            return fam
    return None


def calibrated() -> tuple[str, ...]:
    """The ids of the registered families that have a calibration, in the order registered."""
    return tuple(f.id for f in _REGISTRY.values() if f.calibration is not None)


def parameters() -> dict[str, Parameter]:
    """fixture name -> Parameter, over every registered family."""
    return {p.fixture: p for f in _REGISTRY.values() for p in f.parameters}


def claim_rows(verdicts: Rows, *claims: str) -> list[Mapping[str, Any]]:
    """The verdict rows of the claim ids ``claims`` that carry details (a figure's data), in their
    order (a row without any, e.g. an error row, draws nothing)."""
    return [v for v in verdicts if v.get("claim") in claims and isinstance(v.get("details"), Mapping)
            and v.get("details")]


def draw_figures(verdicts: Rows, meta: Mapping[str, Any],
                 fams: Sequence[ClaimFamily] | None = None) -> dict[str, bytes]:
    """title -> PNG bytes: every figure of the registered families (or ``fams``) that has verdict
    rows of its claims to draw. A figure that fails is logged and left out: a figure never costs
    the report."""
    out: dict[str, bytes] = {}
    for fam in families() if fams is None else fams:
        rows = claim_rows(verdicts, *fam.claims)
        if not rows:
            continue
        for fig in fam.figures:
            try:
                data = fig.draw(rows, meta)
            except Exception as exc:  # noqa: BLE001 - any figure's failure is logged, never raised
                log.warning("%s not drawn: %s: %s", fig.title, type(exc).__name__, exc)
                continue
            if data:
                out[fig.title] = data
    return out


def unregister_family(family_id: str) -> None:
    """Remove a registered family (the plugin removes the families a session's hooks gave at the
    end of that session, so that a second session in the same process starts from rh's own)."""
    _REGISTRY.pop(family_id, None)


@contextlib.contextmanager
def registry_snapshot() -> Iterator[None]:
    """Within the block, families may be registered and removed; on leaving, the registry is what
    it was on entering."""
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)

