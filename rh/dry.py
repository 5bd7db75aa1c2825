"""A dry run: the claims' own code, with every forward pass counted and none computed (``--plan``).

``pytest claims/ --plan`` runs every collected claim as a run would, on the model loaded without
its weights (:func:`rh.models.load_model` with ``weights=False``: the config, the tokenizer and the
architecture on the meta device), with the session's runner executing its work units on a
:class:`DryExecutor`. The claims build the same prompts, the same units and the same tasks a run
builds, and hand them to the same runner; the dry executor counts the token-layers each packet and
each task would run, from the packet's own batch (rows x padded width x layers, as
:class:`rh.budget.TokenLayerCounter` counts them), and gives back made-up rows, so the claim goes on
to its next passes. The plan is the plain count (a dry run is a plain one: no prefix reuse, no early
stopping, no curtailment, which would stop on made-up outcomes), an upper bound of a run's.

Made-up outcomes are chosen so that a claim takes its longest way: every row without an
intervention is correct (no baseline falls below a floor that would skip the rest), an intervened
row is correct or not by a hash of its prompt and condition. Nothing made up leaves the dry run:
it writes no ranking into the cache (the plugin hands it a copy), no results store, journal, report
or expected file.

A task (:class:`rh.runner.Task`: a pass that gives something other than rows, such as Wu24's
generation or integrated gradients) declares what it would run with a ``dry(model, by_id)`` method
returning ``(made-up result, token-layers)``; ``tests/test_dry.py`` holds each one's count equal to
what the counter counts when the task runs. A task without ``dry`` makes its claim's plan unknown
(:class:`NotPlanned`), never 0. A pass a claim runs on the model directly, outside the runner,
cannot run on a model without weights: its claim's plan is unknown too, with the error.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rh.niah import Sample
from rh.units import Packet

__all__ = ["DryExecutor", "NotPlanned", "Tally", "dry_running", "is_dry", "packet_token_layers", "batch_tokens",
           "unit_hash", "made_up_row", "made_up_array"]

_DRY: ContextVar[bool] = ContextVar("rh_dry_run", default=False)


class NotPlanned(RuntimeError):
    """A pass the dry run cannot count (a task that declares no ``dry``)."""


def is_dry() -> bool:
    """Whether a dry run (``--plan``) is running: no weights, no pass computed, nothing written."""
    return _DRY.get()


@contextlib.contextmanager
def dry_running() -> Iterator[None]:
    """Within the block, :func:`is_dry` is True (a :class:`rh.run.Run` with ``dry=True`` holds it open)."""
    token = _DRY.set(True)
    try:
        yield
    finally:
        _DRY.reset(token)


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) fixed by ``parts`` (the made-up outcomes: the same on every dry run)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def batch_tokens(samples: Sequence[Sample], batch_size: int, *, with_answer: bool) -> list[int]:
    """Tokens of each forward :func:`rh.batching.make_batches` would cut from ``samples``: rows x
    the longest row (left padding included), as the counter counts them."""
    from rh.batching import batch_order, row_length

    seqs = [row_length(s, with_answer=with_answer) for s in samples]
    return [len(rows) * max(seqs[i] for i in rows)
            for rows in batch_order(list(samples), max(1, batch_size), with_answer=with_answer)]


def packet_token_layers(packet: Packet, by_id: Mapping[str, Sample], n_layers: int) -> int:
    """The token-layers one packet runs in a plain pass (:func:`rh.units.run_packet`): one forward of
    its rows, padded to the longest, through every layer (a prompt-only packet: the prompts alone,
    through layer ``through``). A fan packet runs only outside ``--plain``, never dry."""
    if packet.fan:
        raise NotPlanned("a decode-phase fan packet runs only with prefix reuse; a dry run is plain")
    samples = [by_id[i] for i in packet.sample_ids]
    (tokens,) = batch_tokens(samples, len(samples), with_answer=not packet.prompt_only)
    layers = n_layers if packet.through is None else int(packet.through) + 1
    return tokens * layers


def made_up_row(sample: Sample, condition: Any, heads: Sequence[Any] = ()) -> tuple[bool, float, float, int]:
    """A row as :func:`rh.evaluate.score_batch` gives it, made up: correct without an intervention,
    by a hash of the prompt and the condition with one (``heads``: a side-by-side row's own, where
    ``condition`` is None)."""
    from rh.runner import intervenes

    heads = tuple(heads) or tuple(getattr(condition, "heads", ()) or ())
    if not heads and not intervenes(condition):
        correct, u = True, 0.9
    else:
        u = unit_hash(sample.id, getattr(condition, "name", ""), heads)
        correct = u < 0.5
    p = 0.55 + 0.4 * u if correct else 0.05 + 0.4 * u
    answer = int(sample.answer_ids[0]) if len(sample.answer_ids) else 0
    return correct, math.log(p), p, answer if correct else answer + 1


@dataclass
class Tally:
    """What one label (a fixture, a claim's body) asked for: its rows by condition name (side-by-side
    rows by how many heads they zero), and its tasks by kind."""

    rows: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)


class DryExecutor:
    """The runner's executor in a dry run: each packet's and task's token-layers, counted from
    what it would run and charged as a replica's are; made-up rows, readings and results back."""

    name = "dry"

    def __init__(self, model: Any, label: Any = None):
        self.model = model
        self.n_layers = int(model.shape.n_layers)
        self.label = label or (lambda: "")  # the label charged now (the counter's)
        self.tallies: dict[str, Tally] = defaultdict(Tally)

    def _note(self, kind: str, what: str, n: int) -> None:
        """``n`` more rows of ``what`` (a condition's name), or tasks of that kind, for the label charged now."""
        t = self.tallies[self.label() or ""]
        bucket = t.rows if kind == "rows" else t.tasks
        bucket[what] = bucket.get(what, 0) + n

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int],
                reading: Any = None) -> Iterator[Any]:
        from rh.runner import Done

        for p in packets:
            tl = packet_token_layers(p, by_id, self.n_layers)
            if p.prompt_only:
                scores = [None] * len(p.rows)
                what = f"clean prompt read ({reading.key() if reading is not None else 'nothing'})"
            else:
                heads = p.heads or [()] * len(p.rows)
                scores = [made_up_row(by_id[i], p.condition, heads[r]) for r, (_, i) in enumerate(p.rows)]
            read = None
            if reading is not None:  # the reading's own made-up values where it has them (made_up)
                width = int(reading.width)
                made = getattr(reading, "made_up", None)
                read = [list(made(i)) if made is not None else made_up_array((width,), i, reading.key()).tolist()
                        for _, i in p.rows]
            if p.prompt_only or p.condition is not None:
                self._note("rows", what if p.prompt_only else p.condition.name, len(p.rows))
            else:  # side-by-side rows, each with its own zero-ablated heads: named by how many
                names = [f"{len(h)} head{'s' if len(h) > 1 else ''} zeroed" if h else "clean" for h in p.heads]
                for name in dict.fromkeys(names):
                    self._note("rows", name, names.count(name))
            yield Done(scores, token_layers=tl, read=read)

    def call(self, tasks: Sequence[Any], by_id: Mapping[str, Sample]) -> Iterator[tuple[Any, int, dict]]:
        for t in tasks:
            dry = getattr(t, "dry", None)
            if dry is None:
                raise NotPlanned(f"{type(t).__name__} declares no dry run (a dry(model, by_id) method giving a "
                                 "made-up result and its token-layers): its claim's cost is unknown")
            result, tl = dry(self.model, by_id)
            self._note("tasks", type(t).__name__, 1)
            yield result, int(tl), {}

    def close(self) -> None:
        pass


def made_up_array(shape: Sequence[int], *key: Any) -> np.ndarray:
    """Numbers in [0, 1) of ``shape``, fixed by ``key`` (made-up scores and readings)."""
    seed = int(unit_hash(*key) * 2**32)
    return np.random.default_rng(seed).random(tuple(shape))
