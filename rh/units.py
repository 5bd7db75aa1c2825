"""Work units: a forward pass a claim needs, declared as a value, and the runner that executes them.

A :class:`Unit` is plain data: a condition (:class:`rh.ablation.Ablation`: which heads, how, in
which phase) and the ids of the prompts it evaluates, teacher-forced. It is frozen, hashable and
made of strings, ints and tuples, so it can be counted, keyed and shipped.

:func:`run_units` executes a list of units on one model and returns one frame per unit, each the
frame ``with condition.open(model): teacher_forced(model, prompts)`` gives. Rows of *different*
units share a forward where their conditions allow it: zero-ablations of any heads (and the
baseline) run side by side in one batch, each row with its own heads zeroed at the ``o_proj``
input (:func:`ablate_rows`), so CA-1's and CA-7's random head sets, each needing a prompt or two
at a time under early stopping, fill whole batches instead of running one small forward after
another. A batch costs the same arithmetic per row as the separate passes, and on a small model
far less time per row (the tiny model: 8.3 ms for one row alone, 4.3 ms a row in a batch of 8,
one thread). Other conditions (mean, query or logit ablation, decode-only phase) run as
before, one condition at a time.

Exactness: each row computes what it computes alone: the same prompt, the same heads zeroed at
the same place; left padding gives every real token its own position (``rh.batching``). As with
any batching, the floating-point sums may differ in the last bits with the batch's composition
(``tests/test_units.py`` holds correctness equal and log-probabilities within 1e-5 of the
separate passes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from rh.ablation import Ablation, _head_mask, _shape_of, unpruned_modules
from rh.batching import batch_order, make_batches
from rh.compression import Restriction
from rh.evaluate import rows_frame, score_batch
from rh.heads import Head, heads_by_layer
from rh.niah import Sample


#: What a condition declares (:class:`rh.ablation.Ablation` and :class:`rh.compression.Restriction`
#: here; IV-2's patching and IV-3's attention overrides, :class:`rh.interventions.Patch` and
#: :class:`rh.interventions.Override`): a name, the heads it touches, its method and phase, the
#: values besides those that set its rows (``params``, part of a stored row's key), and ``open``.
CONDITION_ATTRIBUTES = ("name", "heads", "method", "phase", "params", "open")


def is_condition(value: Any) -> bool:
    """Whether ``value`` declares a condition a :class:`Unit` can take: the attributes of
    :data:`CONDITION_ATTRIBUTES` and a hash (a frozen value of plain data, so it can be keyed and
    shipped to a replica)."""
    if not all(hasattr(value, a) for a in CONDITION_ATTRIBUTES):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True)
class Unit:
    """Evaluate the prompts ``sample_ids`` teacher-forced under ``condition`` (an ablation, a
    window restriction, a patch or an attention override: any value :func:`is_condition` accepts)."""

    condition: Ablation | Restriction | Any
    sample_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not is_condition(self.condition):
            raise TypeError("a Unit's condition declares a name, heads, method, phase, params and open (an "
                            "rh.ablation.Ablation, rh.compression.Restriction, rh.interventions.Patch or Override) "
                            f"and is hashable, not {type(self.condition).__name__}")
        object.__setattr__(self, "sample_ids", tuple(str(i) for i in self.sample_ids))
        if not self.sample_ids:
            raise ValueError(f"unit {self.condition.name!r} names no prompt")

    @property
    def side_by_side(self) -> bool:
        """Whether its rows may share a forward with other units' rows (zero-ablation in every
        position, or no ablation)."""
        c = self.condition
        return isinstance(c, Ablation) and (not c.heads or (c.method == "zero" and c.phase == "all"))


@contextlib.contextmanager
def ablate_rows(model, rows: Sequence[Sequence[Head]]) -> Iterator[None]:
    """Within the block, row ``i`` of every forward of ``model`` has the heads ``rows[i]`` zeroed
    at the ``o_proj`` input (``ablate``'s zero method, one head set per row). The forwards must be
    ``len(rows)`` rows wide. Every hook goes in ``finally``."""
    shape = _shape_of(model, None)
    per_row = [heads_by_layer(list(hs)) for hs in rows]
    layers = sorted({layer for by in per_row for layer in by})
    modules = unpruned_modules(model, [h for hs in rows for h in hs], shape, "ablate")
    handles = []
    try:
        cpu = torch.device("cpu")
        for layer in layers:
            mask = torch.stack([_head_mask(shape.n_heads, shape.head_dim, by.get(layer, ()), cpu) for by in per_row])
            mask = mask[:, None, :]  # [rows, 1, heads x head_dim]: every position of the row

            def pre_hook(module, args, kwargs, mask=mask):
                x = args[0]
                if x.shape[0] != mask.shape[0]:
                    raise RuntimeError(f"ablate_rows holds head sets for {mask.shape[0]} rows; this forward has "
                                       f"{x.shape[0]}")
                return (x.masked_fill(mask.to(x.device), 0.0), *args[1:]), kwargs

            handles.append(modules[layer].o_proj.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Packet:
    """One forward's rows, the atom the runners ship: at most ``batch_size`` rows, each a unit
    (its index in the call) and a prompt id. ``condition`` is the one condition every row runs
    under, or ``None`` for side-by-side rows, each with its own zero-ablated ``heads``.

    The packets of a call depend on its units and the batch size alone (:func:`plan_packets`), so
    every executor runs the same forwards: the same batches, the same padding, the same
    token-layers."""

    rows: tuple[tuple[int, str], ...]
    condition: Ablation | None = None
    heads: tuple[tuple[Head, ...], ...] = ()

    @property
    def sample_ids(self) -> tuple[str, ...]:
        return tuple(i for _, i in self.rows)


def check_prompts(units: Sequence[Unit], by_id: Mapping[str, Sample]) -> None:
    """Refuse units that name prompts not in ``by_id``, naming the first few."""
    missing = sorted({i for u in units for i in u.sample_ids if i not in by_id})
    if missing:
        raise KeyError(f"units name prompts that were not given: {missing[:5]}")


def plan_packets(units: Sequence[Unit], by_id: Mapping[str, Sample], batch_size: int) -> list[Packet]:
    """The forwards that execute ``units``: each unit that cannot share a forward gets the batches
    :func:`rh.evaluate.teacher_forced` would run it in, then the rows of every side-by-side unit
    are batched together, shortest first (:func:`rh.batching.batch_order`)."""
    check_prompts(units, by_id)
    out: list[Packet] = []
    for j, u in enumerate(units):
        if not u.side_by_side:
            samples = [by_id[i] for i in u.sample_ids]
            for rows in batch_order(samples, batch_size, with_answer=True):
                out.append(Packet(tuple((j, u.sample_ids[r]) for r in rows), u.condition))
    shared = [(j, i) for j, u in enumerate(units) if u.side_by_side for i in u.sample_ids]
    for rows in batch_order([by_id[i] for _, i in shared], batch_size, with_answer=True):
        picked = tuple(shared[r] for r in rows)
        out.append(Packet(picked, None, tuple(units[j].condition.heads for j, _ in picked)))
    return out


def run_packet(model, packet: Packet, by_id: Mapping[str, Sample]) -> list[tuple]:
    """One teacher-forced forward over the packet's rows: per row, in the packet's order,
    :data:`rh.evaluate.SCORES`."""
    samples = [by_id[i] for i in packet.sample_ids]
    (batch,) = make_batches(samples, len(samples), model.tokenizer.pad_token_id, with_answer=True)
    out: list[tuple | None] = [None] * len(samples)
    ctx = packet.condition.open(model) if packet.condition is not None else \
        ablate_rows(model, [packet.heads[r] for r in batch.index])
    with ctx:
        for r, res in zip(batch.index, score_batch(model, batch)):
            out[r] = res
    return out  # type: ignore[return-value]


def unit_frames(units: Sequence[Unit], by_id: Mapping[str, Sample], scores: Mapping[tuple[int, str], tuple],
                ) -> list[pd.DataFrame]:
    """Each unit's frame (:func:`rh.evaluate.rows_frame`) from the scores of its rows, keyed by
    (unit index, prompt id)."""
    return [rows_frame([by_id[i] for i in u.sample_ids], [scores[(j, i)] for i in u.sample_ids], u.condition.name)
            for j, u in enumerate(units)]


def run_units(model, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], *,
              batch_size: int = 8) -> list[pd.DataFrame]:
    """Execute ``units`` on ``model`` in this process: one frame per unit, in order, each with the
    rows :func:`rh.evaluate.teacher_forced` gives (``condition`` = the unit's condition's name)."""
    by_id = samples if isinstance(samples, Mapping) else {s.id: s for s in samples}
    scores: dict[tuple[int, str], tuple] = {}
    for packet in plan_packets(units, by_id, batch_size):
        scores.update(zip(packet.rows, run_packet(model, packet, by_id)))
    return unit_frames(units, by_id, scores)
