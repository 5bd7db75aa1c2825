"""Curtailment: a paired family's interventions evaluated item by item until its statuses are decided.

The paired families (CA-3, CA-4, CA-6, CA-8, IV-3: :func:`rh.rules.paired.paired_family`) compare
each item's baseline outcome with its outcome under an intervention. Once the items read so far
settle every status whatever the other items would show (:func:`rh.rules.paired.family_decided`,
proved against enumerating the completions in ``tests/test_curtail.py``), the rest cannot change
the verdicts, so they are not evaluated. The statuses are exactly the full evaluation's; the effect
and interval a verdict reports are those of the items read, and it says how many.

:func:`curtailed` takes the family's arms (an arm: the prompts, their baseline outcomes, and the
intervention as a work unit's condition or as a function that evaluates some prompts), reads each
arm's items a batch at a time: the batches its baseline ran in, in an order seeded by the claim (so
the items read are a random set of batches and their effect an unbiased estimate), each evaluated
alone, so that the pass finds the residual stream the baseline kept for that very batch (prefix
reuse, :mod:`rh.prefix`). In waves: each wave reads every undecided arm's next batch, then asks the
family's rule what is decided. The passes left out go to the savings ledger as ``"curtailment"``
(:func:`rh.budget.note_saved`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rh.ablation import Ablation
from rh.compression import Restriction
from rh.niah import Sample
from rh.progress import track
from rh.seeds import derive_seed

__all__ = ["Arm", "curtailed", "item_order", "paired_decider"]

Decide = Callable[[Mapping[Hashable, tuple[np.ndarray, np.ndarray]]], Mapping[Hashable, "str | None"]]


@dataclass(frozen=True)
class Arm:
    """One group of a paired family: ``samples`` and their baseline 0/1 outcomes ``before`` (in the
    samples' order), and the intervention: ``condition`` (run as a work unit), ``evaluate`` (a
    function from a list of samples to their 0/1 outcomes under the intervention, run here), or
    ``known`` (every outcome, evaluated already: the arm reads nothing but counts in the family)."""

    samples: Sequence[Sample]
    before: np.ndarray
    condition: Ablation | Restriction | Any | None = None  # any work unit's condition (rh.units.is_condition)
    evaluate: Callable[[list[Sample]], np.ndarray] | None = None
    known: np.ndarray | None = None  # every outcome already evaluated (an arm another claim reads in full)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.condition, self.evaluate, self.known)) != 1:
            raise ValueError("an Arm's intervention is a condition (a work unit), an evaluate function, or its known "
                             "outcomes: give one")
        if self.known is not None and (len(self.known) != len(self.samples) or np.isnan(self.known).any()):
            raise ValueError("an Arm's known outcomes are every sample's, in the samples' order")
        if len(self.before) != len(self.samples):
            raise ValueError(f"an Arm has {len(self.samples)} samples and {len(self.before)} baseline outcomes")


def item_order(samples: Sequence[Sample], batch_size: int, seed: int) -> list[list[int]]:
    """The fixed order an arm's items are read in: the batches its baseline ran in
    (:func:`rh.batching.batch_order`), in an order seeded by the claim. Reading whole baseline
    batches keeps prefix reuse: an intervention's pass over one of them finds the residual stream
    its baseline kept for that very batch (:mod:`rh.prefix`)."""
    from rh.batching import batch_order

    blocks = batch_order(samples, batch_size, with_answer=True)
    rng = np.random.default_rng(derive_seed(seed, "curtailment", len(samples)))
    return [blocks[i] for i in rng.permutation(len(blocks))]


def paired_decider(*, bounds, alpha: float, baseline_floor: float) -> Decide:
    """The decide function of a :func:`rh.rules.paired.paired_family` with these bounds."""
    from rh.rules.paired import family_decided

    return lambda groups: family_decided(groups, bounds=bounds, alpha=alpha, baseline_floor=baseline_floor)


def curtailed(model, arms: Mapping[Hashable, Arm], decide: Decide, *, seed: int, batch_size: int = 8,
              stop_early: bool | None = None, what: str = "items") -> dict[Hashable, np.ndarray]:
    """Each arm's outcomes under its intervention, NaN where curtailment left an item unread (with
    ``stop_early=False``, or inside :func:`rh.budget.plain_passes`, every item). ``decide(groups)``
    maps ``{arm: (before, after)}`` to each arm's status where decided, else None:
    :func:`paired_decider`."""
    from rh.budget import stops_early
    from rh.runner import run
    from rh.units import Unit

    stop_early = stops_early(stop_early)
    after = {g: np.full(len(a.samples), np.nan) if a.known is None else np.asarray(a.known, float).copy()
             for g, a in arms.items()}
    order = {g: item_order(a.samples, batch_size, seed) if a.known is None else [] for g, a in arms.items()}
    pos = {g: 0 for g in arms}  # batches read so far
    total = sum(len(a.samples) for a in arms.values() if a.known is None)

    def status() -> dict:
        return dict(decide({g: (arms[g].before, after[g]) for g in arms})) if stop_early else {g: None for g in arms}

    with contextlib.closing(track(range(total + 1), what, unit="item")) as bar:
        next(bar, None)
        while True:
            st = status()
            unread = [g for g in arms if pos[g] < len(order[g])]
            live = [g for g in unread if st[g] is None]
            if not live and any(s is None for s in st.values()):
                live = unread  # an arm held open by Holm's coupling: the others read on
            if not live:
                break
            for g in live:  # each arm's next baseline batch, alone in its pass: its prefix is kept
                rows = order[g][pos[g]]
                pos[g] += 1
                part = [arms[g].samples[i] for i in rows]
                if arms[g].condition is not None:
                    (df,) = run(model, part, [Unit(arms[g].condition, tuple(s.id for s in part))],
                                batch_size=batch_size)
                    after[g][rows] = df["correct"].to_numpy(float)
                else:
                    after[g][rows] = np.asarray(arms[g].evaluate(part), float)
                for _ in rows:
                    next(bar, None)
    skipped = [arms[g].samples[i] for g in arms for i in np.flatnonzero(np.isnan(after[g]))]
    if skipped:  # the passes the plain path would have run: each prompt and its answer but the last token
        from rh.budget import note_saved

        note_saved("curtailment", sum(len(s.input_ids) + len(s.answer_ids) - 1 for s in skipped)
                   * model.shape.n_layers)
    return after
