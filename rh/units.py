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
one thread). Other conditions (mean, query or logit ablation, window restrictions, patches)
run as before, one condition at a time.

Decode-phase ablations (Wu24's protocol: the prompt's clean prefill shared by every condition)
run as *fan* packets (:func:`run_fan`): the clean prompt but its last token is prefilled once per
prompt and kept, and each condition pays only its answer steps (the last prompt token and the
answer but its last), zero-ablations side by side.

Exactness: each row computes what it computes alone: the same prompt, the same heads zeroed at
the same place; left padding gives every real token its own position (``rh.batching``). As with
any batching, the floating-point sums may differ in the last bits with the batch's composition
(``tests/test_units.py`` holds correctness equal and log-probabilities within 1e-5 of the
separate passes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import weakref
from collections import OrderedDict
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
from rh.memory import oom_guard
from rh.models import cache_bytes, cache_kwarg, output_cache
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


def fans_out(condition: Any) -> bool:
    """Whether rows of ``condition`` run from the clean prompt's cache (:func:`run_fan`): an
    ablation of some heads in the decode phase (Wu24's protocol), outside ``--plain``."""
    from rh.budget import stops_early

    return isinstance(condition, Ablation) and bool(condition.heads) and condition.phase == "decode" \
        and stops_early(None)


@dataclass(frozen=True)
class Packet:
    """One forward's rows, the atom the runners ship: at most ``batch_size`` rows, each a unit
    (its index in the call) and a prompt id. ``condition`` is the one condition every row runs
    under, or ``None`` for side-by-side rows, each with its own zero-ablated ``heads``.

    A *fan* packet (``fan=True``) holds the decode-phase rows of one prompt (:func:`fans_out`):
    the clean prompt but its last token is prefilled once, and the rows' answer steps run from
    that cache ``width`` rows at a time (:func:`run_fan`).

    The packets of a call depend on its units and the batch size alone (:func:`plan_packets`), so
    every executor runs the same forwards: the same batches, the same padding, the same
    token-layers."""

    rows: tuple[tuple[int, str], ...]
    condition: Ablation | None = None
    heads: tuple[tuple[Head, ...], ...] = ()
    fan: bool = False
    width: int = 0
    #: a clean forward of the prompts alone, run for a reading (:func:`rh.runner.read_prompts`): no
    #: answer tokens and no rows; ``through``: the deepest layer the reading needs (the layers after
    #: it are not run), None: every layer
    prompt_only: bool = False
    through: int | None = None

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
    fan: dict[str, list[int]] = {}  # prompt -> the zero-ablating decode-phase units that name it
    for j, u in enumerate(units):
        if fans_out(u.condition):
            for i in u.sample_ids:
                if u.condition.method == "zero":
                    fan.setdefault(i, []).append(j)
                else:  # one condition at a time: its hooks act on every row
                    out.append(Packet(((j, i),), u.condition, fan=True, width=1))
        elif not u.side_by_side:
            samples = [by_id[i] for i in u.sample_ids]
            for rows in batch_order(samples, batch_size, with_answer=True):
                out.append(Packet(tuple((j, u.sample_ids[r]) for r in rows), u.condition))
    shared = [(j, i) for j, u in enumerate(units) if u.side_by_side for i in u.sample_ids]
    for rows in batch_order([by_id[i] for _, i in shared], batch_size, with_answer=True):
        picked = tuple(shared[r] for r in rows)
        out.append(Packet(picked, None, tuple(units[j].condition.heads for j, _ in picked)))
    for i, js in fan.items():
        out.append(Packet(tuple((j, i) for j in js), None, tuple(units[j].condition.heads for j in js), fan=True,
                          width=batch_size))
    return out


def run_packet(model, packet: Packet, by_id: Mapping[str, Sample]) -> list[tuple]:
    """One teacher-forced forward over the packet's rows (a fan packet: :func:`run_fan`): per
    row, in the packet's order, :data:`rh.evaluate.SCORES`."""
    if packet.fan:
        return run_fan(model, packet, by_id)
    if packet.prompt_only:
        return run_prompts(model, packet, by_id)
    samples = [by_id[i] for i in packet.sample_ids]
    (batch,) = make_batches(samples, len(samples), model.tokenizer.pad_token_id, with_answer=True)
    out: list[tuple | None] = [None] * len(samples)
    ctx = packet.condition.open(model) if packet.condition is not None else \
        ablate_rows(model, [packet.heads[r] for r in batch.index])
    with ctx:
        for r, res in zip(batch.index, score_batch(model, batch)):
            out[r] = res
    return out  # type: ignore[return-value]


def prompt_packets(samples: Sequence[Sample], batch_size: int, *, through: int | None = None) -> list[Packet]:
    """The clean prompt-only forwards that read ``samples`` (:func:`rh.runner.read_prompts`):
    batches of prompts of like length, shortest first (:func:`rh.batching.batch_order`)."""
    return [Packet(tuple((0, samples[r].id) for r in rows), Ablation.baseline(), prompt_only=True, through=through)
            for rows in batch_order(list(samples), batch_size, with_answer=False)]


def run_prompts(model, packet: Packet, by_id: Mapping[str, Sample]) -> list[None]:
    """One clean forward over the packet's prompts alone (left-padded, the last logit only), through
    layer ``packet.through`` (the layers after it, which cannot change what the earlier ones
    compute, are not run: counted as saved, as the shorter captures are). It scores nothing (a
    reading open around it reads it): one None per row."""
    from rh.batching import running
    from rh.models import decoder_layers, layer_slice

    samples = [by_id[i] for i in packet.sample_ids]
    (batch,) = make_batches(samples, len(samples), model.tokenizer.pad_token_id, with_answer=False)
    hf = model.model
    n_layers = len(decoder_layers(hf))
    stop = n_layers if packet.through is None else int(packet.through) + 1
    if not 0 < stop <= n_layers:
        raise ValueError(f"a prompt-only packet through layer {packet.through}: the model has layers 0..{n_layers - 1}")
    with torch.no_grad(), running(batch), (layer_slice(hf, 0, stop) if stop < n_layers else contextlib.nullcontext()):
        hf(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
    if stop < n_layers:
        from rh.budget import note_saved

        note_saved("shorter captures", int(batch.input_ids.numel()) * (n_layers - stop))
    return [None] * len(samples)


def check_readable(packets: Sequence[Packet]) -> None:
    """Refuse a reading over ``packets`` where one would not see its rows' own forwards."""
    for p in packets:
        if p.fan or len(set(p.sample_ids)) != len(p.sample_ids):
            raise ValueError("a reading rides on teacher-forced forwards of distinct prompts: not on decode-phase "
                             "rows run from a cache, nor on a forward that holds one prompt twice; read units of "
                             "one condition in the 'all' phase, one unit per prompt")


def read_packet(model, packet: Packet, by_id: Mapping[str, Sample], reading: Any = None,
                ) -> tuple[list[tuple], list[list[float] | None] | None]:
    """:func:`run_packet`, with ``reading`` (:class:`rh.runner.Reading`) open around its forward:
    the rows' scores and, per row in the packet's order, the values the reading took (None where it
    took none). A reading reads teacher-forced forwards of distinct prompts: a fan packet (decode
    steps from a cache) or one prompt twice in a forward is refused."""
    if reading is None:
        return run_packet(model, packet, by_id), None
    check_readable([packet])
    ids = packet.sample_ids
    with reading.open(model) as got:
        scores = run_packet(model, packet, by_id)
    return scores, [None if got.get(i) is None else [float(x) for x in got[i]] for i in ids]


#: bytes of clean prefills :func:`run_fan` keeps per model for the packets to come (least recently
#: used out first; ``RH_PREFILL_CACHE_MB``)
PREFILL_CACHE_BYTES = int(float(os.environ.get("RH_PREFILL_CACHE_MB", "1024")) * 2**20)
_PREFILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_prefills(model) -> None:
    """Drop the clean prefills :func:`run_fan` keeps for ``model``."""
    _PREFILLS.pop(getattr(model, "model", model), None)


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    return [t for layer in getattr(cache, "layers", ()) for t in vars(layer).values() if isinstance(t, torch.Tensor)]


def _prefill(model, prefix: Sequence[int]) -> tuple[Any, bool]:
    """The KV cache of the clean ``prefix`` (one row), and whether it was computed now. Kept
    per model, keyed by the tokens and by the weights that computed it (identity and version:
    an edit invalidates it), only while nothing modifies the model (no hook, no intervention);
    with something active it is computed under it and not kept."""
    from rh.prefix import _signature, first_modified_layer

    hf = model.model
    n_layers = model.shape.n_layers
    keep = first_modified_layer(model) >= n_layers
    key = (tuple(prefix), _signature(hf, n_layers)) if keep else None
    held = _PREFILLS.setdefault(hf, OrderedDict()) if keep else None
    if held is not None and key in held:
        held.move_to_end(key)
        return held[key][0], False
    ids = torch.tensor([list(prefix)], device=model.device)
    with torch.no_grad(), oom_guard("the clean prefill of a decode-phase condition", batch_size=1, length=len(prefix)):
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if held is not None:
        size = cache_bytes(cache)
        if size <= PREFILL_CACHE_BYTES:
            held[key] = (cache, size)
            while sum(n for _, n in held.values()) > PREFILL_CACHE_BYTES:
                held.popitem(last=False)
    return cache, True


def _rows_of(cache: Any, rows: int) -> Any:
    """A cache of ``rows`` rows, each the one row of ``cache``, which stays as it was."""
    shared = {id(t): t for t in _cache_tensors(cache)}  # the layers are copied, their tensors not
    out = copy.deepcopy(cache, memo=shared)
    out.batch_repeat_interleave(rows)
    return out


def run_fan(model, packet: Packet, by_id: Mapping[str, Sample]) -> list[tuple]:
    """A fan packet's rows (:class:`Packet`), as Wu24's masking loop computes them: the prompt but
    its last token prefilled without ablation (once per prompt, :func:`_prefill`), then the last
    prompt token and the answer but its last token fed from that cache under each row's
    condition, ``width`` rows per forward. Every position of those forwards is a decoding step,
    so the condition applies to all of them: the rows equal the teacher-forced passes with the
    condition in the decode phase (``tests/test_units.py``), for the answer's tokens and one
    prefill instead of the whole prompt per condition. What that saved against the full passes
    is noted as ``"shared prefill"``."""
    from rh.budget import note_saved
    from rh.evaluate import score_logits

    (pid,) = set(packet.sample_ids)
    s = by_id[pid]
    ids, answer = list(s.input_ids), list(s.answer_ids)
    prefix, steps = ids[:-1], [ids[-1], *answer[:-1]]
    cache, fresh = _prefill(model, prefix) if prefix else (None, False)
    width = packet.width or len(packet.rows)
    out: list[tuple] = []
    for start in range(0, len(packet.rows), width):
        rows = range(start, min(start + width, len(packet.rows)))
        ctx = dataclasses.replace(packet.condition, phase="all").open(model) if packet.condition is not None else \
            ablate_rows(model, [packet.heads[r] for r in rows])
        x = torch.tensor([steps] * len(rows), device=model.device)
        with torch.no_grad(), ctx, oom_guard("decode-phase answer steps", batch_size=len(rows), length=len(ids)):
            past = cache_kwarg(model.model, _rows_of(cache, len(rows))) if cache is not None else {}
            logits = model.model(input_ids=x, **past, use_cache=cache is not None, logits_to_keep=len(answer)).logits
        out.extend(score_logits(logits, [s] * len(rows)))
    n_layers = model.shape.n_layers
    full = len(packet.rows) * (len(ids) + len(answer) - 1)
    note_saved("shared prefill", (full - len(packet.rows) * len(steps) - (len(prefix) if fresh else 0)) * n_layers)
    return out


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
    return unit_frames(units, by_id, read_units(model, by_id, units, None, batch_size)[0])


def read_units(model, by_id: Mapping[str, Sample], units: Sequence[Unit], reading: Any, batch_size: int,
               ) -> tuple[dict[tuple[int, str], tuple], dict[tuple[int, str], Any]]:
    """Every packet of ``units`` run here, ``reading`` (or None) open around each: the scores and
    the reading's values, each by (unit index, prompt id)."""
    scores: dict[tuple[int, str], tuple] = {}
    reads: dict[tuple[int, str], Any] = {}
    packets = plan_packets(units, by_id, batch_size)
    if reading is not None:
        check_readable(packets)  # before any forward
    for packet in packets:
        got, read = read_packet(model, packet, by_id, reading)
        scores.update(zip(packet.rows, got))
        if read is not None:
            reads.update(zip(packet.rows, read))
    return scores, reads
