"""The one runner: every teacher-forced pass a claim needs goes through it as work units.

A claim declares its passes as :class:`rh.units.Unit` values and calls :func:`run` (or
:func:`run_one` for one condition). The runner of the model (:func:`runner_for`; the plugin
installs one per session, a plain in-process one serves otherwise)

1. looks each row -- one condition on one prompt -- up in its :class:`ResultStore`, keyed by the
   row and the model's layout (:class:`Layout`), so a row asked for twice (a shared baseline) or
   computed by a run that died is not computed again;
2. plans the missing rows into packets (:func:`rh.units.plan_packets`: the same batches whatever
   runs them, so the same forwards and the same token-layers);
3. hands the packets to its executor: :class:`LocalExecutor` (this process, this model: prefix
   reuse as before) or :class:`rh.ray_executor.RayExecutor` (model replicas as Ray actors);
4. stores each packet's rows as they come back, charges the token-layers to the claim running
   (counted by the replica that ran them; a packet rerun after a lost replica is counted once),
   and returns one frame per unit.

A row's key holds the model (its id, revision, dtype, quantization, device type and attention
kernel), the condition's heads, method and phase, and the prompt's tokens (its ids and the gold
answer's): not the condition's name, which only labels rows. Mean ablation depends on reference
activations that are not part of the condition's value, so its rows are never stored.

A :class:`Reading` rides on the rows' own forwards: a value (picklable, keyed) that opens a context
reading each forward without changing it (ID-5's needle mass, read in the task baselines' passes).
Its values per row are stored beside the row, keyed by the row and the reading, and computed
wherever the row is: on a replica as in this process, so a reading never costs a pass of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from rh.ablation import Ablation
from rh.niah import Sample
from rh.units import Packet, Unit, check_prompts, check_readable, plan_packets, read_packet, read_units, unit_frames

log = logging.getLogger(__name__)

#: a stored row: what rh.evaluate.score_batch gives (correct, logprob, first_token_prob, first_argmax)
_ROW_TYPES = (bool, float, float, int)


@dataclass(frozen=True)
class Layout:
    """Where and how the passes run. :meth:`key` (what can change a row's outcome: the model, its
    revision, dtype, quantization, device type and attention kernel) keys the stored rows; the rest
    (executor, replicas, their threads or GPUs, the device map) is provenance."""

    model: str
    revision: str = ""
    dtype: str = ""
    quant: str = "none"
    device: str = "cpu"
    attn: str = "sdpa"
    executor: str = "local"
    replicas: int = 1
    threads_per_replica: int | None = None
    gpus_per_replica: float | None = None
    device_map: str | None = None
    controller_weights: bool = True  # False: this process holds the architecture alone (the replicas, the weights)

    @classmethod
    def of(cls, model: Any, **kw: Any) -> Layout:
        p = getattr(model, "provenance", {}) or {}
        dev = str(p.get("device", "cpu"))
        return cls(model=str(p.get("model_id", getattr(model, "key", "model"))), revision=str(p.get("revision", "")),
                   dtype=str(p.get("dtype", "")), quant=str(p.get("quant", "none")), device=dev.split(":")[0],
                   attn=str(p.get("attn_implementation", "sdpa")),
                   device_map=str(p["device_map"]) if p.get("device_map") is not None else None,
                   controller_weights=bool(getattr(model, "holds_weights", True)), **kw)

    def key(self) -> str:
        return json.dumps([self.model, self.revision, self.dtype, self.quant, self.device, self.attn])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def intervenes(condition: Any) -> bool:
    """Whether ``condition`` changes the forward: heads it acts on, or parameters of its own (a
    window restriction's sink and window, a patch's place...). The baseline (or None) has neither."""
    return bool(getattr(condition, "heads", ()) or getattr(condition, "params", ()))


def row_key(layout_key: str, condition: Ablation, sample: Sample) -> str | None:
    """The stored row's key, or None where the row is not stored (mean ablation)."""
    if condition.method == "mean" and condition.heads:
        return None
    params = list(getattr(condition, "params", ()))  # a window restriction's sink and window, a patch's place...
    on = intervenes(condition)  # the baseline alone has neither: its rows are keyed as such
    # "decode" rows are keyed as Wu24's protocol (ablated from the prompt's last token on): a store
    # written before that carries rows of the earlier phase (from the first answer token on), not served
    phase = ("decode@last-prompt-token" if condition.phase == "decode" else condition.phase) if on else ""
    fields = [layout_key, [str(h) for h in condition.heads], condition.method if on else "",
              phase, list(sample.input_ids), list(sample.answer_ids)]
    text = json.dumps(fields + [params] if params else fields)
    return hashlib.sha256(text.encode()).hexdigest()


def valid_row(value: Any) -> tuple | None:
    """A row as score_batch gives it, or None if ``value`` is not one (a torn or foreign record)."""
    if not isinstance(value, (list, tuple)) or len(value) != len(_ROW_TYPES):
        return None
    try:
        correct, logprob, p, argmax = value
        if not isinstance(correct, bool) or isinstance(argmax, bool) or int(argmax) != argmax:
            return None
        return bool(correct), float(logprob), float(p), int(argmax)
    except (TypeError, ValueError):
        return None


class Reading(Protocol):
    """What a forward is read for beside its rows: a picklable value (it travels to the replicas
    with the packets). :meth:`open` is a context in which every teacher-forced forward of ``model``
    (:func:`rh.units.run_packet`) adds ``{sample id: width floats}`` to the dict it yields, changing
    nothing the model computes; :meth:`key` names what is read (it keys the stored values). A
    reading with ``stored = False`` (IV-5's residual streams: too large for the store) is never kept
    in nor served from the store: its rows are computed again with it whenever it is asked for."""

    width: int

    def key(self) -> str: ...

    def open(self, model: Any) -> contextlib.AbstractContextManager[dict[str, Any]]: ...


def read_key(row: str | None, reading: Reading) -> str | None:
    """The stored reading's key: the row's and the reading's (None where the row is not stored)."""
    return None if row is None else hashlib.sha256(f"{row}\0{reading.key()}".encode()).hexdigest()


def valid_read(value: Any, width: int) -> tuple[float, ...] | None:
    """A reading's values for one row (``width`` numbers), or None if ``value`` is not that."""
    try:
        values = list(value)
    except TypeError:
        return None
    if len(values) != width or any(isinstance(v, (bool, str)) for v in values):
        return None
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def check_store_path(path: str | os.PathLike) -> None:
    """Refuse a store path that cannot be a file: a folder, or a file in a folder that does not exist."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--store {path}: is a folder; give a file, e.g. {path / 'rows.jsonl'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--store {path}: its folder {path.parent} does not exist; create it or give "
                                "another path")


class ResultStore:
    """Rows computed so far, by key; with ``path``, also appended to a JSON-lines file as each
    packet returns (one line a row, flushed), so a run that dies keeps what it computed and the
    next run with the same ``path`` reads it back. A reading's values for a row (:class:`Reading`)
    are lines of their own (``{"key", "read"}``). A line that does not parse as either (a torn last
    line, an edit) is skipped and counted in ``skipped``: its row is computed again."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, tuple] = {}
        self.reads: dict[str, tuple[float, ...]] = {}
        self.skipped = 0
        self.loaded = 0
        self._fh = None
        if self.path is not None:
            check_store_path(self.path)
            if self.path.exists():
                self._load()

    def _load(self) -> None:
        from rh.journal import read_json_lines

        for rec in read_json_lines(self.path):
            key = rec.get("key") if isinstance(rec, dict) else None
            if isinstance(key, str) and isinstance(rec.get("read"), list):
                got = valid_read(rec["read"], len(rec["read"]))
                if got is not None:
                    self.reads[key] = got
                    continue
            row = valid_row(rec.get("row")) if isinstance(rec, dict) else None
            if row is None or not isinstance(key, str):
                self.skipped += 1
                continue
            self.rows[key] = row
        self.loaded = len(self.rows)
        if self.skipped:
            log.warning("rh store %s: %d line(s) are not rows (torn or edited); their rows are computed again",
                        self.path, self.skipped)

    def get(self, key: str | None) -> tuple | None:
        return None if key is None else self.rows.get(key)

    def get_read(self, key: str | None, width: int) -> tuple[float, ...] | None:
        got = None if key is None else self.reads.get(key)
        return got if got is not None and len(got) == width else None

    def put(self, items: Sequence[tuple[str | None, tuple]],
            reads: Sequence[tuple[str | None, tuple[float, ...]]] = ()) -> None:
        """Keep ``items`` (row key, row) and ``reads`` (read key, a reading's values)."""
        lines = []
        for key, row in items:
            if key is None:
                continue
            self.rows[key] = row
            lines.append(json.dumps({"key": key, "row": list(row)}) + "\n")
        for key, values in reads:
            if key is None:
                continue
            values = tuple(float(v) for v in values)
            self.reads[key] = values
            lines.append(json.dumps({"key": key, "read": list(values)}) + "\n")
        if self.path is not None and lines:
            if self._fh is None:
                from rh.journal import open_for_append

                self._fh = open_for_append(self.path)
            self._fh.write("".join(lines))
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class Done:
    """What one packet gave back: its rows' scores (in the packet's order), the token-layers it
    executed (None where the model's own counter counted them, in this process) and the
    token-layers prefix reuse saved; with a reading, its values per row (in the packet's order)."""

    scores: list[tuple]
    token_layers: int | None = None
    saved: dict[str, int] = field(default_factory=dict)
    read: list | None = None


class Task(Protocol):
    """A pass that gives back something other than rows or a reading (IV-6's integrated gradients: a
    backward pass): a frozen, picklable value naming its prompts (``sample_ids``) whose
    ``run(model, by_id)`` returns a picklable result. An executor with ``call`` runs it where the
    model is (a replica); its token-layers are charged as the rows' are. Not stored."""

    sample_ids: tuple[str, ...]

    def run(self, model: Any, by_id: Mapping[str, Sample]) -> Any: ...


class Executor(Protocol):
    name: str

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int],
                reading: Reading | None = None) -> Iterator[Done]:
        """Run ``packets``; yield one :class:`Done` per packet, in order (with ``reading`` open
        around each packet's forward, and its values per row in ``Done.read``)."""

    def close(self) -> None: ...


class LocalExecutor:
    """The packets run here, on the controller's model (prefix reuse as the session set it up)."""

    name = "local"

    def __init__(self, model: Any):
        self.model = model

    def call(self, tasks: Sequence[Task], by_id: Mapping[str, Sample]) -> Iterator[tuple[Any, int | None, dict]]:
        """Each task's result, in order (token-layers counted by the model's own counter, here)."""
        for t in tasks:
            yield t.run(self.model, by_id), None, {}

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int],
                reading: Reading | None = None) -> Iterator[Done]:
        for p in packets:
            scores, read = read_packet(self.model, p, by_id, reading)
            yield Done(scores, read=read)

    def close(self) -> None:
        pass


class Runner:
    """The model's runner: a store, an executor and where token-layers counted elsewhere go."""

    def __init__(self, model: Any, *, executor: Executor | None = None, store: ResultStore | None = None,
                 layout: Layout | None = None, charge: Any = None):
        self.model = model
        self.executor = executor or LocalExecutor(model)
        self.store = store or ResultStore()
        self.layout = layout or Layout.of(model, executor=self.executor.name)
        self.charge = charge  # called with token-layers counted outside this process
        self._weights = _weights(model)
        self.computed = 0  # rows computed by this runner
        self.prompts_read = 0  # prompt-only readings computed (read_prompts)
        self.prompts_reused = 0  # prompt-only readings served from the store
        self.reused = 0  # rows served from the store

    def run(self, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], *,
            batch_size: int = 8) -> list[pd.DataFrame]:
        """One frame per unit, as :func:`rh.evaluate.teacher_forced` gives it under the unit's condition."""
        return self._run(samples, units, batch_size, None)[0]

    def read(self, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], reading: Reading, *,
             batch_size: int = 8) -> tuple[list[pd.DataFrame], list[dict[str, np.ndarray]]]:
        """:meth:`run`, with ``reading`` read in the rows' forwards: the frames, and per unit
        ``{prompt id: the reading's values}``. A row is served from the store only where its
        reading's values are stored beside it; otherwise row and reading are computed together, by
        the executor (on a replica as in this process), in the packets :func:`rh.units.plan_packets`
        gives: the reading never costs a forward of its own."""
        frames, read = self._run(samples, units, batch_size, reading)
        return frames, read  # type: ignore[return-value]

    def read_prompts(self, samples: Sequence[Sample], reading: Reading, *, batch_size: int = 8,
                     through: int | None = None) -> dict[str, np.ndarray]:
        """``reading`` read in clean forwards of the prompts alone (no answer tokens, no rows: the
        hub's attention profile, IV-5's residual streams), through layer ``through`` (None: every
        layer): ``{prompt id: values}``. Work units like the rows: the executor runs them (on a
        replica as in this process, token-layers charged as the rows' are), and the values are kept
        in the store under the prompt's clean row and the reading (unless ``reading.stored`` is
        False), so a resumed run or a second caller reads them with no forward. ``through`` must
        reach the deepest layer the reading reads (it does not change the values)."""
        from rh.units import prompt_packets

        samples = list({s.id: s for s in samples}.values())
        by_id = {s.id: s for s in samples}
        width = reading.width
        pristine = self.pristine()  # else an intervention or a weight edit is active: read here, as it stands
        kept = pristine and getattr(reading, "stored", True)
        executor = self.executor if pristine else LocalExecutor(self.model)
        lk = self.layout.key()
        keys = {s.id: read_key(row_key(lk, Ablation.baseline(), s), reading) for s in samples}
        out: dict[str, tuple[float, ...]] = {}
        for s in samples:
            got = self.store.get_read(keys[s.id], width) if kept else None
            if got is not None:
                out[s.id] = got
                self.prompts_reused += 1
        todo = [s for s in samples if s.id not in out]
        if todo:
            packets = prompt_packets(todo, batch_size, through=through)
            for p, done in zip(packets, executor.execute(packets, by_id, [], reading)):
                values = self._read_values(p, done.read, width, reading)
                out.update(values)
                self.store.put([], [(keys[i], v) for i, v in values.items()] if kept else [])
                self.prompts_read += len(p.rows)
                self._bill(done.token_layers, done.saved)
        return {i: np.asarray(out[i], dtype=float) for i in by_id}

    def call(self, samples: Sequence[Sample], tasks: Sequence[Task]) -> list[Any]:
        """Each task's result, in order, run by the executor (on Ray, on the replicas, one task a
        replica at a time), its token-layers charged as the rows' are; here, where the executor
        cannot run tasks or the model is not pristine (an intervention on: it runs as it stands)."""
        by_id = {s.id: s for s in samples}
        missing = sorted({i for t in tasks for i in t.sample_ids if i not in by_id})
        if missing:
            raise KeyError(f"tasks name prompts that were not given: {missing[:5]}")
        run_there = getattr(self.executor, "call", None)
        if run_there is None or not self.pristine():
            return [t.run(self.model, by_id) for t in tasks]
        out = []
        for t, (result, tl, saved) in zip(tasks, run_there(list(tasks), by_id)):
            out.append(result)
            self._bill(tl, saved)
        if len(out) != len(tasks):
            raise RuntimeError(f"the {self.executor.name} executor returned {len(out)} results for {len(tasks)} tasks")
        return out

    def _bill(self, token_layers: int | None, saved: Mapping[str, int]) -> None:
        """Charge what an executor counted elsewhere (None: this process's counter counted it) and
        note the exact savings it made."""
        if token_layers is not None and self.charge is not None:
            self.charge(token_layers)
        if saved:
            from rh.budget import note_saved

            for kind, n in saved.items():
                note_saved(kind, n)

    def _read_values(self, packet: Packet, read: Sequence[Any] | None, width: int,
                     reading: Reading) -> dict[str, tuple[float, ...]]:
        if read is None or len(read) != len(packet.rows):
            raise RuntimeError(f"the {self.executor.name} executor returned no reading of {reading.key()} for a packet "
                               f"of {len(packet.rows)} prompts: its results are not used")
        out = {}
        for (_, i), got in zip(packet.rows, read):
            values = valid_read(got, width) if got is not None else None
            if values is None:
                raise RuntimeError(f"the clean forward of prompt {i!r} gave {str(got)[:80]} as the reading "
                                   f"{reading.key()}: not {width} numbers")
            if not np.isfinite(values).all():
                raise RuntimeError(f"the clean forward of prompt {i!r} left part of the reading {reading.key()} unread "
                                   "(NaN): a layer it reads was not run; pass through= the deepest layer it reads")
            out[i] = values
        return out

    def _run(self, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], batch_size: int,
             reading: Reading | None) -> tuple[list[pd.DataFrame], list[dict[str, np.ndarray]] | None]:
        by_id = samples if isinstance(samples, Mapping) else {s.id: s for s in samples}
        check_prompts(units, by_id)
        if not self.pristine():  # an intervention or a weight edit is active: run here, as it stands, unstored
            return self._run_here(by_id, units, batch_size, reading)
        lk = self.layout.key()
        width = reading.width if reading is not None else 0
        kept = reading is not None and getattr(reading, "stored", True)  # a reading too large to keep: read again
        scores: dict[tuple[int, str], tuple] = {}
        reads: dict[tuple[int, str], tuple[float, ...]] = {}
        first: dict[str, tuple[int, str]] = {}  # a key asked twice in this call is computed once
        todo: list[Unit] = []
        origin: list[dict[str, tuple[int, str]]] = []  # todo unit's row -> the caller's (unit, prompt)
        keys: dict[tuple[int, str], str | None] = {}
        for j, u in enumerate(units):
            rows = []
            for i in u.sample_ids:
                k = row_key(lk, u.condition, by_id[i])
                keys[(j, i)] = k
                got = self.store.get(k)
                got_read = (self.store.get_read(read_key(k, reading), width) if kept else None) if reading is not None \
                    else ()
                if got is not None and got_read is not None:
                    scores[(j, i)] = got
                    if reading is not None:
                        reads[(j, i)] = got_read
                    self.reused += 1
                elif k is not None and k in first:
                    continue
                else:
                    if k is not None:
                        first[k] = (j, i)
                    rows.append(i)
            if rows:
                todo.append(Unit(u.condition, tuple(rows)))
                origin.append({i: (j, i) for i in rows})
        if todo:
            packets = plan_packets(todo, by_id, batch_size)
            if reading is not None:
                check_readable(packets)  # before any forward
            from rh.prefix import active_hints

            hints = sorted(active_hints(self.model))
            done_iter = (self.executor.execute(packets, by_id, hints, reading) if reading is not None
                         else self.executor.execute(packets, by_id, hints))
            for p, done in zip(packets, done_iter):
                if len(done.scores) != len(p.rows):
                    raise RuntimeError(f"the {self.executor.name} executor returned {len(done.scores)} rows for a "
                                       f"packet of {len(p.rows)}: its results are not used")
                if reading is not None and (done.read is None or len(done.read) != len(p.rows)):
                    raise RuntimeError(f"the {self.executor.name} executor returned no reading of {reading.key()} "
                                       f"for a packet of {len(p.rows)} rows: its results are not used")
                put, put_read = [], []
                for r, ((tj, i), sc) in enumerate(zip(p.rows, done.scores)):
                    row = valid_row(sc)
                    if row is None:
                        raise RuntimeError(f"the {self.executor.name} executor returned {sc!r} for prompt {i!r} "
                                           f"under {todo[tj].condition.name!r}: not a row of {_ROW_TYPES}")
                    scores[origin[tj][i]] = row
                    put.append((keys[origin[tj][i]], row))
                    if reading is not None:
                        values = valid_read(done.read[r], width) if done.read[r] is not None else None
                        if values is None:
                            raise RuntimeError(f"the forward of prompt {i!r} under {todo[tj].condition.name!r} "
                                               f"gave {done.read[r]!r} as the reading {reading.key()}: not "
                                               f"{width} numbers")
                        reads[origin[tj][i]] = values
                        if kept:
                            put_read.append((read_key(keys[origin[tj][i]], reading), values))
                self.store.put(put, put_read)
                self.computed += len(p.rows)
                self._bill(done.token_layers, done.saved)
        for (j, i), k in keys.items():  # rows another unit of this call computed
            if (j, i) not in scores:
                scores[(j, i)] = scores[first[k]]
                if reading is not None:
                    reads[(j, i)] = reads[first[k]]
                self.reused += 1
        frames = unit_frames(units, by_id, scores)
        if reading is None:
            return frames, None
        return frames, _per_unit(units, reads)

    def _run_here(self, by_id: Mapping[str, Sample], units: Sequence[Unit], batch_size: int,
                  reading: Reading | None) -> tuple[list[pd.DataFrame], list[dict[str, np.ndarray]] | None]:
        """The units run in this process on the model as it stands (not pristine): nothing stored."""
        scores, reads = read_units(self.model, by_id, units, reading, batch_size)
        frames = unit_frames(units, by_id, scores)
        if reading is None:
            return frames, None
        missed = [i for (j, i), v in reads.items() if v is None]
        if missed:
            raise RuntimeError(f"the forwards did not show the reading {reading.key()} for prompts {missed[:5]}")
        return frames, _per_unit(units, reads)

    def pristine(self) -> bool:
        """Whether the model computes what it computed when the runner was made: no intervention
        hooked on it, no weight replaced or edited in place. Otherwise a unit describes only part of
        what runs, so it is neither stored nor shipped elsewhere."""
        from rh.models import decoder_layers
        from rh.prefix import first_modified_layer

        return first_modified_layer(self.model) == len(decoder_layers(self.model)) and _weights(self.model) == self._weights

    def close(self) -> None:
        self.store.close()
        self.executor.close()


def _per_unit(units: Sequence[Unit], reads: Mapping[tuple[int, str], Any]) -> list[dict[str, np.ndarray]]:
    """A reading's values by (unit index, prompt id), as one ``{prompt id: values}`` per unit."""
    return [{i: np.asarray(reads[(j, i)], dtype=float) for i in u.sample_ids} for j, u in enumerate(units)]


def _weights(model: Any) -> tuple:
    """Every parameter of the model by identity and version counter (an in-place edit bumps it)."""
    from rh.models import hf_model

    return tuple((id(t), t._version) for t in hf_model(model).parameters())


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hf(model: Any) -> Any:
    from rh.models import hf_model

    return hf_model(model)


def runner_for(model: Any) -> Runner:
    """The runner installed on ``model`` (:func:`use_runner`), else a plain in-process one."""
    got = _RUNNERS.get(_hf(model))
    return got if got is not None else Runner(model)


@contextlib.contextmanager
def use_runner(model: Any, runner: Runner) -> Iterator[Runner]:
    """Within the block, every unit run on ``model`` goes through ``runner``; it is closed after."""
    hf = _hf(model)
    before = _RUNNERS.get(hf)
    _RUNNERS[hf] = runner
    try:
        yield runner
    finally:
        if before is None:
            _RUNNERS.pop(hf, None)
        else:
            _RUNNERS[hf] = before
        runner.close()


def run(model: Any, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], *,
        batch_size: int = 8) -> list[pd.DataFrame]:
    """Run ``units`` through ``model``'s runner: one frame per unit, as
    :func:`rh.evaluate.teacher_forced` gives it under the unit's condition."""
    return runner_for(model).run(samples, units, batch_size=batch_size)


def read(model: Any, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], reading: Reading, *,
         batch_size: int = 8) -> tuple[list[pd.DataFrame], list[dict[str, np.ndarray]]]:
    """:func:`run` with ``reading`` read in the same forwards (:meth:`Runner.read`)."""
    return runner_for(model).read(samples, units, reading, batch_size=batch_size)


def read_prompts(model: Any, samples: Sequence[Sample], reading: Reading, *, batch_size: int = 8,
                 through: int | None = None) -> dict[str, np.ndarray]:
    """``reading`` read in clean prompt-only forwards through ``model``'s runner (:meth:`Runner.read_prompts`)."""
    return runner_for(model).read_prompts(samples, reading, batch_size=batch_size, through=through)


def call(model: Any, samples: Sequence[Sample], tasks: Sequence[Task]) -> list[Any]:
    """Run ``tasks`` through ``model``'s runner (:meth:`Runner.call`): each one's result, in order."""
    return runner_for(model).call(samples, tasks)


def run_one(model: Any, samples: Sequence[Sample], condition: Ablation, *, batch_size: int = 8) -> pd.DataFrame:
    """``with condition.open(model): teacher_forced(model, samples, condition=condition.name)``, as a unit."""
    return run(model, samples, [Unit(condition, tuple(s.id for s in samples))], batch_size=batch_size)[0]


def read_one(model: Any, samples: Sequence[Sample], condition: Ablation, reading: Reading, *,
             batch_size: int = 8) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """:func:`run_one` with ``reading`` read in the same forwards (:func:`read`): the frame and
    ``{prompt id: the reading's values}``."""
    (frame,), (got,) = read(model, samples, [Unit(condition, tuple(s.id for s in samples))], reading,
                            batch_size=batch_size)
    return frame, got
