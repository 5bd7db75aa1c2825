"""Attention heads as values: ``Head(layer, head)``, parsing, validation against a model shape,
and seeded random draws."""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

_HEAD_RE = re.compile(r"^\s*(?:L(?P<l1>\d+)H(?P<h1>\d+)|(?P<l2>\d+)\s*[-_,:]\s*(?P<h2>\d+))\s*$", re.I)


@dataclass(frozen=True)
class HeadShape:
    """The attention geometry of a decoder: what every head index is validated against."""

    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def all_heads(self) -> list[Head]:
        return [Head(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def as_dict(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}


class Head(NamedTuple):
    """One query head: ``layer`` and ``head`` are 0-based. Prints as ``L16H1``."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, spec: str | tuple[int, int] | list[int] | Head) -> Head:
        """Parse ``"L16H1"``, ``"16-1"`` (Wu24), ``(16, 1)`` or ``[16, 1]`` into a ``Head``."""
        if isinstance(spec, Head):
            return spec
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in spec
        ):
            return cls(int(spec[0]), int(spec[1]))
        if isinstance(spec, str):
            m = _HEAD_RE.match(spec)
            if m:
                layer = m.group("l1") or m.group("l2")
                head = m.group("h1") or m.group("h2")
                return cls(int(layer), int(head))
        raise ValueError(
            f"cannot parse head {spec!r}: write it as 'L16H1', '16-1' or (16, 1) "
            "with 0-based layer and head indices"
        )


def parse_heads(specs: Iterable[str | tuple[int, int] | Head]) -> list[Head]:
    """Parse many head specs, keeping order. One string is refused rather than read character by
    character (``"L0H1"`` would otherwise be the heads 'L', '0', 'H', '1')."""
    if isinstance(specs, str):
        raise ValueError(f"heads={specs!r} is one string: pass a list of heads, e.g. [{', '.join(repr(x.strip()) for x in specs.split(',') if x.strip())}]")
    return [Head.parse(s) for s in specs]


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """Query-head indices per layer, in the order given: how per-layer hooks and interventions
    receive a head set."""
    out: dict[int, list[int]] = {}
    for h in heads:
        out.setdefault(h.layer, []).append(h.head)
    return out


def validate_heads(heads: Iterable[Head | str | tuple[int, int]], shape: HeadShape) -> list[Head]:
    """Parse and check every head exists in ``shape``; duplicates are an error, order is kept."""
    out = parse_heads(heads)
    seen: set[Head] = set()
    for h in out:
        if not (0 <= h.layer < shape.n_layers and 0 <= h.head < shape.n_heads):
            raise ValueError(
                f"head {h} is outside the model: it has layers 0..{shape.n_layers - 1} and "
                f"query heads 0..{shape.n_heads - 1} per layer"
            )
        if h in seen:
            raise ValueError(f"head {h} is listed twice; give each head once")
        seen.add(h)
    return out


def random_heads(shape: HeadShape, k: int, *, exclude: Iterable[Head] = (), seed: int) -> list[Head]:
    """Draw ``k`` distinct heads uniformly from the model, never one in ``exclude``, reproducibly.

    Unlike the Wu24 code, the exclusion compares ``Head`` values (not lists against tuples) and
    the draw is seeded.
    """
    excluded = set(validate_heads(set(parse_heads(exclude)), shape))
    pool = [h for h in shape.all_heads() if h not in excluded]
    if k < 0:
        raise ValueError(f"k={k}: the number of heads to draw must be >= 0")
    if k > len(pool):
        raise ValueError(
            f"cannot draw k={k} random heads: only {len(pool)} of the model's {shape.n_total} heads "
            f"remain after excluding {len(excluded)}; lower k"
        )
    return random.Random(seed).sample(pool, k)


def layer_matched_heads(shape: HeadShape, top: Sequence[Head], *, seed: int) -> list[Head]:
    """``len(top)`` heads from outside ``top`` with ``top``'s count in every layer (seeded), so a
    control ablates as deep in the network as ``top`` does. A layer with too few heads outside
    ``top`` gives its shortfall to the nearest layers that have heads to spare."""
    import numpy as np

    need: dict[int, int] = {}
    for h in top:
        need[h.layer] = need.get(h.layer, 0) + 1
    taken = set(top)
    free = {l: [h for h in shape.all_heads() if h.layer == l and h not in taken] for l in range(shape.n_layers)}
    rng = np.random.default_rng(seed)
    out: list[Head] = []
    short = 0
    for layer in sorted(need):
        pool = free[layer]
        m = min(need[layer], len(pool))
        out += [pool[i] for i in rng.choice(len(pool), m, replace=False)] if m else []
        free[layer] = [h for h in pool if h not in set(out)]
        short += need[layer] - m
        if short:
            for other in sorted(range(shape.n_layers), key=lambda x: (abs(x - layer), x)):
                while short and free[other]:
                    out.append(free[other].pop(int(rng.integers(len(free[other])))))
                    short -= 1
    return out
