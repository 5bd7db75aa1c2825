"""What a run costs and what fits: forward passes counted in token-layers, this machine's seconds
per token-layer, and the largest set of claims that fits a wall-clock budget.

A *token-layer* is one token through one decoder layer. Counted by a forward pre-hook on every
decoder layer, it is deterministic (the same prompts, batches and interventions give the same
count on any machine), so a count recorded by one run plans the next run on another machine:
seconds = token-layers x this machine's seconds per token-layer (:func:`calibrate`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLayerCounter:
    """Token-layers executed, per label (the claim or fixture running when they ran).

    ``attach(model)`` adds one forward pre-hook per decoder layer and returns a handle whose
    ``remove()`` takes them all off. ``label`` is what the next passes are charged to."""

    counts: dict[str, int] = field(default_factory=dict)
    label: str = "other"
    total: int = 0
    on_count: Any = None  # called with no arguments after each count (progress reporting)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per label, exclusive of nested labels
    _mark: float = field(default_factory=time.perf_counter, repr=False)

    def _switch(self, label: str) -> None:
        now = time.perf_counter()
        self.seconds[self.label] = self.seconds.get(self.label, 0.0) + now - self._mark
        self._mark = now
        self.label = label

    def attach(self, model: Any) -> "_Handles":
        """Count ``model``'s passes; a copy of it loaded later for the same work (the float32 twin
        identification runs on, :func:`rh.pipeline.identification_model`) is counted too: see
        :func:`counters_of`."""
        from rh.models import decoder_layers

        handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in decoder_layers(model)]
        out = _Handles(handles, self, model)
        model.__dict__.setdefault("_rh_counters", []).append(self)
        return out

    def _hook(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            return
        self.charge(int(hidden.shape[0]) * int(hidden.shape[1]) if hidden.dim() >= 3 else int(hidden.shape[0]))

    _hook._rh_passive = True  # it only counts: rh.prefix.first_modified_layer ignores it

    def charge(self, n: int) -> None:
        """Count ``n`` token-layers to the current label: the hook's count, or those a Ray replica executed."""
        n = int(n)
        self.counts[self.label] = self.counts.get(self.label, 0) + n
        self.total += n
        if self.on_count is not None:
            self.on_count()

    @contextlib.contextmanager
    def charged_to(self, label: str) -> Iterator[None]:
        """Passes inside the block are charged to ``label``; the previous label is restored after."""
        before = self.label
        self._switch(label)
        try:
            yield
        finally:
            self._switch(before)


@dataclass
class _Handles:
    handles: list
    counter: Any = None
    model: Any = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        attached = getattr(self.model, "_rh_counters", None)
        if attached is not None and self.counter in attached:
            attached.remove(self.counter)


def counters_of(model: Any) -> list[TokenLayerCounter]:
    """The counters attached to ``model`` (a transformers model) now."""
    return list(getattr(model, "__dict__", {}).get("_rh_counters", ()))


def calibrate(model: Any, *, batch_size: int, length: int, repeats: int = 2) -> tuple[float, str]:
    """This machine's seconds per token-layer for ``model``: a forward over ``batch_size`` x
    ``length`` random tokens, timed after one warm-up, best of ``repeats``. Returns the figure and
    a line that says how it was measured."""
    import torch

    from rh.models import decoder_layers, hf_model

    hf = hf_model(model)
    n_layers = len(decoder_layers(hf))
    device = getattr(model, "device", None) or next(hf.parameters()).device
    vocab = int(hf.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(device)
    best = float("inf")
    with torch.no_grad():
        hf(input_ids=ids, logits_to_keep=1, use_cache=False)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf(input_ids=ids, logits_to_keep=1, use_cache=False)
            best = min(best, time.perf_counter() - t0)
    per = best / (batch_size * length * n_layers)
    return per, (f"one forward of {batch_size} x {length} tokens x {n_layers} layers took {best:.2f} s "
                 f"(best of {repeats} after a warm-up): {per * 1e6:.2f} us per token-layer")


@dataclass(frozen=True)
class CalibrationTask:
    """:func:`calibrate` as a task (:class:`rh.runner.Task`): run by the runner's executor, it times
    the model where the passes run (a Ray replica's own speed, not the controller's)."""

    batch_size: int
    length: int
    sample_ids: tuple[str, ...] = ()

    def run(self, model: Any, by_id: Any) -> tuple[float, str]:
        return calibrate(model, batch_size=self.batch_size, length=self.length)

    def dry(self, model: Any, by_id: Any) -> tuple[tuple[float, str], int]:
        """A dry run times nothing (:mod:`rh.dry`)."""
        return (float("nan"), "not measured: a dry run"), 0


@dataclass(frozen=True)
class Plan:
    """The claims a budget admits, in the order they run, and why each other one was left out."""

    chosen: tuple[str, ...]
    left_out: dict[str, str]
    cost: float  # planned for the chosen claims, their fixtures included (in the unit of the costs given)
    budget: float
    order: tuple[str, ...] = ()  # every claim with a recorded cost, cheapest marginal cost first


def plan_budget(
    items: Sequence[tuple[str, Iterable[str]]],
    test_cost: Mapping[str, float | None],
    fixture_cost: Mapping[str, float],
    budget: float,
    *,
    unit: str = "token-layers",
) -> Plan:
    """The largest set of tests whose recorded costs fit ``budget`` (token-layers, or seconds).

    ``items`` are (nodeid, fixture names it uses) in collection order; a test costs its own
    token-layers plus those of every fixture it uses that no test chosen before it has paid for
    (session fixtures run once). Greedy by marginal cost, cheapest first, which maximises the
    number of claims checked; a test without a recorded cost is left out (it cannot be planned).
    The chosen tests keep their collection order."""
    fixtures_of = {nid: set(fx) for nid, fx in items}
    left: dict[str, str] = {}
    candidates = []
    for nid, _ in items:
        if test_cost.get(nid) is None:
            left[nid] = "no recorded cost (run it once with --update-expected to record one)"
        else:
            candidates.append(nid)
    paid: set[str] = set()
    spent = 0.0
    chosen: set[str] = set()

    def marginal(nid: str) -> float:
        return float(test_cost[nid] or 0) + sum(float(fixture_cost.get(f, 0)) for f in fixtures_of[nid] - paid)

    pending = list(candidates)
    greedy: list[str] = []
    fits = True
    while pending:
        best = min(pending, key=lambda n: (marginal(n), candidates.index(n)))
        cost = marginal(best)
        if fits and spent + cost > budget:
            fits = False
            for nid in pending:
                left[nid] = f"over budget: needs {marginal(nid):,.0f} more {unit}, {max(budget - spent, 0):,.0f} left"
        if fits:
            spent += cost
            chosen.add(best)
        paid |= fixtures_of[best]
        greedy.append(best)
        pending.remove(best)
    order = [nid for nid, _ in items if nid in chosen]
    return Plan(tuple(order), left, spent, budget, tuple(greedy))


class BudgetExhausted(Exception):
    """The run's wall-clock budget ran out while a claim was running."""


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- savings and per-claim bills

@dataclass
class SavingsLedger:
    """Token-layers the exact savings left out, by kind (``"prefix reuse"``, ``"early stopping"``,
    ``"curtailment"``...): each :class:`rh.run.Run` keeps its own, so a run reports only what it saved."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, token_layers: int) -> None:
        if token_layers:
            self.by_kind[kind] = self.by_kind.get(kind, 0) + int(token_layers)

    def saved(self) -> dict[str, int]:
        """Token-layers left out so far, by kind (a copy)."""
        return dict(self.by_kind)

    def total(self) -> int:
        return sum(self.by_kind.values())

    def open(self) -> None:
        """Record into this ledger every saving noted (:func:`note_saved`) until :meth:`close`; the
        ledger opened last is the one written, so a run opened inside another keeps its own."""
        _OPEN.append(self)

    def close(self) -> None:
        """Stop recording into this ledger (the one opened before it is written again); safe twice,
        and in any order when several are open."""
        for i in range(len(_OPEN) - 1, -1, -1):
            if _OPEN[i] is self:
                del _OPEN[i]
                return


_PROCESS = SavingsLedger()  # every saving noted in this process, whichever ledger was open (or none)
_OPEN: list[SavingsLedger] = []  # the ledgers open now (a module list, not a ContextVar: threads see it too)
_PLAIN = [False]  # inside plain_passes(): every item evaluated (pytest --plain)


@contextlib.contextmanager
def plain_passes() -> Iterator[None]:
    """Within the block the mechanisms read every item: no early stopping of CA-1's random sets, no
    curtailment of the paired families (``pytest --plain``, with prefix reuse off as well)."""
    before = _PLAIN[0]
    _PLAIN[0] = True
    try:
        yield
    finally:
        _PLAIN[0] = before


def stops_early(stop_early: bool | None) -> bool:
    """A mechanism's ``stop_early`` argument: as given, or (None) True unless :func:`plain_passes` is on."""
    return (not _PLAIN[0]) if stop_early is None else bool(stop_early)


def note_saved(kind: str, token_layers: int) -> None:
    """Record ``token_layers`` that a saving (``"prefix reuse"``, ``"early stopping"``, ``"curtailment"``) did
    not run: into the ledger of the run open now (the one opened last, :meth:`SavingsLedger.open`), and
    into the process's, which alone receives a saving noted with no run open."""
    _PROCESS.note(kind, token_layers)
    if _OPEN:
        _OPEN[-1].note(kind, token_layers)


def saved_token_layers() -> dict[str, int]:
    """Token-layers left out by each kind of saving so far in this process, whichever run was open
    (a copy): what a caller measuring a block's savings by difference reads. A run's own:
    :meth:`rh.run.Run.saved`."""
    return _PROCESS.saved()


def _per_claim(verdicts: Iterable[Mapping[str, Any]], plain: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in verdicts:
        tl = v.get("token_layers_with_fixtures", v.get("token_layers"))
        if tl is None:
            continue
        claim = str(v.get("claim") or v.get("nodeid") or "?")
        out[claim] = out.get(claim, 0) + int(tl) + (int(v.get("saved_with_fixtures") or 0) if plain else 0)
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def claim_costs(verdicts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Token-layers per claim id: each verdict's own passes plus those of the fixtures first set up
    for it (a fixture shared by several claims is billed to the first that ran)."""
    return _per_claim(verdicts, plain=False)


def claim_plain(verdicts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Token-layers per claim id the plain passes would have cost: its bill (:func:`claim_costs`) plus
    what the exact savings left out while it and the fixtures first set up for it ran."""
    return _per_claim(verdicts, plain=True)


def format_cost(cost: Mapping[str, Any]) -> str:
    """The forward passes' bill as lines: the total, what the savings left out, then per claim."""
    total = int(cost.get("total") or 0)
    lines = [f"{total:,} token-layers (tokens x decoder layers executed)"]
    saved = {k: int(v) for k, v in (cost.get("saved") or {}).items() if v}
    if saved:
        plain = total + sum(saved.values())
        parts = ", ".join(f"{k} {v:,}" for k, v in saved.items())
        lines.append(f"left out by exact savings: {parts}; the plain passes would be {plain:,} "
                     f"(this run: {total / plain:.0%} of them)")
    by_claim = cost.get("by_claim") or {}
    plain_by = cost.get("plain_by_claim") or {}
    if by_claim:
        width = max(len(c) for c in by_claim)
        for claim, tl in by_claim.items():
            share = f" ({tl / total:.0%})" if total else ""
            plain = int(plain_by.get(claim) or 0)
            paid = f"; plain {plain:,}, paid {tl / plain:.0%} of it" if plain > tl else ""
            lines.append(f"  {claim.ljust(width)}  {int(tl):>14,}{share}{paid}")
    return "\n".join(lines)
