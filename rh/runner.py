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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from rh.ablation import Ablation
from rh.niah import Sample
from rh.units import Packet, Unit, check_prompts, plan_packets, run_packet, unit_frames

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

    @classmethod
    def of(cls, model: Any, **kw: Any) -> Layout:
        p = getattr(model, "provenance", {}) or {}
        dev = str(p.get("device", "cpu"))
        return cls(model=str(p.get("model_id", getattr(model, "key", "model"))), revision=str(p.get("revision", "")),
                   dtype=str(p.get("dtype", "")), quant=str(p.get("quant", "none")), device=dev.split(":")[0],
                   attn=str(p.get("attn_implementation", "sdpa")),
                   device_map=str(p["device_map"]) if p.get("device_map") is not None else None, **kw)

    def key(self) -> str:
        return json.dumps([self.model, self.revision, self.dtype, self.quant, self.device, self.attn])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_key(layout_key: str, condition: Ablation, sample: Sample) -> str | None:
    """The stored row's key, or None where the row is not stored (mean ablation)."""
    if condition.method == "mean" and condition.heads:
        return None
    params = list(getattr(condition, "params", ()))  # a window restriction's sink and window, a patch's place...
    on = bool(condition.heads or params)  # the baseline alone has neither: its rows are keyed as such
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
    next run with the same ``path`` reads it back. A line that does not parse as a row (a torn
    last line, an edit) is skipped and counted in ``skipped``: its row is computed again."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, tuple] = {}
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
            row = valid_row(rec.get("row")) if rec is not None else None
            key = rec.get("key") if rec is not None else None
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

    def put(self, items: Sequence[tuple[str | None, tuple]]) -> None:
        lines = []
        for key, row in items:
            if key is None:
                continue
            self.rows[key] = row
            lines.append(json.dumps({"key": key, "row": list(row)}) + "\n")
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
    token-layers prefix reuse saved."""

    scores: list[tuple]
    token_layers: int | None = None
    saved: dict[str, int] = field(default_factory=dict)


class Executor(Protocol):
    name: str

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int]) -> Iterator[Done]:
        """Run ``packets``; yield one :class:`Done` per packet, in order."""

    def close(self) -> None: ...


class LocalExecutor:
    """The packets run here, on the controller's model (prefix reuse as the session set it up)."""

    name = "local"

    def __init__(self, model: Any):
        self.model = model

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int]) -> Iterator[Done]:
        for p in packets:
            yield Done(run_packet(self.model, p, by_id))

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
        self.reused = 0  # rows served from the store

    def run(self, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit], *,
            batch_size: int = 8, reader: Callable[[], contextlib.AbstractContextManager] | None = None,
            ) -> list[pd.DataFrame]:
        """One frame per unit. ``reader``: a zero-argument callable opening a context that reads the
        forwards and changes nothing (:func:`rh.attention.reading_rows`): every row then runs in
        this process inside it, none read from the store or shipped to the executor (the reader
        must see each one), in the packets :func:`rh.units.plan_packets` gives (the same forwards
        and token-layers as without it), and the rows are stored after as computed ones are.
        :meth:`computes_here` says whether that costs nothing more than running without it."""
        by_id = samples if isinstance(samples, Mapping) else {s.id: s for s in samples}
        check_prompts(units, by_id)
        if reader is not None:
            return self._run_reading(by_id, units, reader, batch_size)
        if not self.pristine():  # an intervention or a weight edit is active: run here, as it stands, unstored
            from rh.units import run_units

            return run_units(self.model, by_id, units, batch_size=batch_size)
        lk = self.layout.key()
        scores: dict[tuple[int, str], tuple] = {}
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
                if got is not None:
                    scores[(j, i)] = got
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
            from rh.prefix import active_hints

            hints = sorted(active_hints(self.model))
            for p, done in zip(packets, self.executor.execute(packets, by_id, hints)):
                if len(done.scores) != len(p.rows):
                    raise RuntimeError(f"the {self.executor.name} executor returned {len(done.scores)} rows for a "
                                       f"packet of {len(p.rows)}: its results are not used")
                put = []
                for (tj, i), sc in zip(p.rows, done.scores):
                    row = valid_row(sc)
                    if row is None:
                        raise RuntimeError(f"the {self.executor.name} executor returned {sc!r} for prompt {i!r} "
                                           f"under {todo[tj].condition.name!r}: not a row of {_ROW_TYPES}")
                    scores[origin[tj][i]] = row
                    put.append((keys[origin[tj][i]], row))
                self.store.put(put)
                self.computed += len(p.rows)
                if done.token_layers is not None and self.charge is not None:
                    self.charge(done.token_layers)
                if done.saved:
                    from rh.budget import note_saved

                    for kind, n in done.saved.items():
                        note_saved(kind, n)
        for (j, i), k in keys.items():  # rows another unit of this call computed
            if (j, i) not in scores:
                scores[(j, i)] = scores[first[k]]
                self.reused += 1
        return unit_frames(units, by_id, scores)

    def computes_here(self, samples: Sequence[Sample] | Mapping[str, Sample], units: Sequence[Unit]) -> bool:
        """Whether :meth:`run` would compute every row of ``units`` in this process anyway: the
        executor is local and no row is stored (or the model is not pristine: nothing is then
        stored or shipped). Then a ``reader`` rides on the passes for free; otherwise it would
        recompute stored rows or take rows off the replicas."""
        if not self.pristine():
            return True
        if self.executor.name != "local":
            return False
        by_id = samples if isinstance(samples, Mapping) else {s.id: s for s in samples}
        lk = self.layout.key()
        return all(self.store.get(row_key(lk, u.condition, by_id[i])) is None for u in units for i in u.sample_ids)

    def _run_reading(self, by_id: Mapping[str, Sample], units: Sequence[Unit],
                     reader: Callable[[], contextlib.AbstractContextManager], batch_size: int) -> list[pd.DataFrame]:
        from rh.evaluate import SCORES
        from rh.units import run_units

        pure = self.pristine()  # before the reader goes on: it hooks the model, and changes nothing
        with reader():
            frames = run_units(self.model, by_id, units, batch_size=batch_size)
        self.computed += sum(len(u.sample_ids) for u in units)
        if pure:
            lk = self.layout.key()
            put = []
            for u, df in zip(units, frames):
                for i, values in zip(u.sample_ids, df[list(SCORES)].itertuples(index=False)):
                    row = valid_row(tuple(v.item() if hasattr(v, "item") else v for v in values))
                    if row is None:
                        raise RuntimeError(f"prompt {i!r} under {u.condition.name!r} gave {tuple(values)!r}: not a row")
                    put.append((row_key(lk, u.condition, by_id[i]), row))
            self.store.put(put)
        return frames

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
        batch_size: int = 8, reader: Callable[[], contextlib.AbstractContextManager] | None = None,
        ) -> list[pd.DataFrame]:
    """Run ``units`` through ``model``'s runner: one frame per unit, as
    :func:`rh.evaluate.teacher_forced` gives it under the unit's condition (``reader``: see
    :meth:`Runner.run`)."""
    return runner_for(model).run(samples, units, batch_size=batch_size, reader=reader)


def run_one(model: Any, samples: Sequence[Sample], condition: Ablation, *, batch_size: int = 8,
            reader: Callable[[], contextlib.AbstractContextManager] | None = None) -> pd.DataFrame:
    """``with condition.open(model): teacher_forced(model, samples, condition=condition.name)``, as a unit."""
    return run(model, samples, [Unit(condition, tuple(s.id for s in samples))], batch_size=batch_size,
               reader=reader)[0]
