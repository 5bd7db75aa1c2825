"""``Ranking``: every head of a model ordered by a retrieval score, with the provenance that made
it; saved as JSON, cached under ``fixtures/rankings/`` by that provenance, never reused for a
model of another shape (design decision 4)."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from rh.heads import Head, HeadShape, random_heads
from rh.io import atomic_write_json

FORMAT = "rh.ranking/1"
# Bump when a scoring method changes what it computes, so stale cached rankings are not reused.
SCORING_VERSION = 1


@dataclass
class Ranking:
    """All heads of a model, best first, by ``method``; ``scores`` maps each head to its mean."""

    method: str
    shape: HeadShape
    scores: dict[Head, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    per_setting: dict[str, dict[Head, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = set(self.shape.all_heads())
        got = set(self.scores)
        if got != expected:
            extra = sorted(got - expected)[:3]
            missing = sorted(expected - got)[:3]
            raise ValueError(
                f"a ranking must score every head of its {self.shape.n_layers}x{self.shape.n_heads} "
                f"model exactly once (extra: {[str(h) for h in extra]}, missing: {[str(h) for h in missing]})"
            )
        bad = [h for h in sorted(self.scores) if not math.isfinite(self.scores[h])]
        if bad:  # NaN breaks the sort in ``heads``, so top(k) would be arbitrary
            raise ValueError(
                f"a ranking needs a finite score for every head; {len(bad)} are not "
                f"(e.g. {bad[0]}={self.scores[bad[0]]}): check the scoring run for NaN/inf"
            )

    @property
    def heads(self) -> list[Head]:
        """Heads best first; ties broken by (layer, head) so the order is deterministic."""
        return sorted(self.scores, key=lambda h: (-self.scores[h], h.layer, h.head))

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= self.shape.n_total:
            raise ValueError(f"k={k!r}: choose 0 <= k <= {self.shape.n_total}, the number of heads in the model")
        return int(k)

    def top(self, k: int) -> list[Head]:
        return self.heads[: self._check_k(k)]

    def bottom(self, k: int) -> list[Head]:
        k = self._check_k(k)
        return self.heads[len(self.heads) - k :] if k else []

    def random_outside_top(self, k: int, *, seed: int) -> list[Head]:
        """``k`` heads drawn uniformly (seeded) from outside the top ``k``."""
        return random_heads(self.shape, k, exclude=self.top(k), seed=seed)

    def check_shape(self, shape: HeadShape) -> None:
        """Refuse a ranking computed for a model of another shape."""
        if (self.shape.n_layers, self.shape.n_heads) != (shape.n_layers, shape.n_heads):
            raise ValueError(
                f"this ranking is for a model with {self.shape.n_layers} layers x {self.shape.n_heads} heads "
                f"({self.provenance.get('model_id', 'unknown model')}), but the model has "
                f"{shape.n_layers} x {shape.n_heads}: compute a ranking for this model (--recompute) "
                "or pass the ranking that belongs to it"
            )

    # ----------------------------------------------------------------- serialisation

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "shape": self.shape.as_dict(),
            "provenance": self.provenance,
            "heads": [
                {"head": str(h), "layer": h.layer, "index": h.head, "score": float(self.scores[h]), "rank": r + 1}
                for r, h in enumerate(self.heads)
            ],
            "per_setting": {
                name: {str(h): float(v) for h, v in sorted(vals.items())} for name, vals in self.per_setting.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "ranking") -> Ranking:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            shape = HeadShape(**data["shape"])
            scores: dict[Head, float] = {}
            for row in data["heads"]:
                head = Head.parse(row["head"])
                if head in scores:
                    raise ValueError(f"head {head} is listed twice")
                scores[head] = float(row["score"])
            per_setting = {
                name: {Head.parse(h): float(v) for h, v in vals.items()}
                for name, vals in data.get("per_setting", {}).items()
            }
            return cls(data["method"], shape, scores, dict(data.get("provenance", {})), per_setting)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source} is not a valid rh ranking: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, *, shape: HeadShape | None = None) -> Ranking:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ranking file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"ranking file {str(path)!r} is not valid JSON (truncated?): {exc}") from exc
        ranking = cls.from_json(data, source=f"ranking file {str(path)!r}")
        if shape is not None:
            ranking.check_shape(shape)
        return ranking


# --------------------------------------------------------------------------- cache


def cache_key(provenance: dict[str, Any]) -> str:
    """A short digest of the provenance fields that determine a ranking's content."""
    keyed = {k: v for k, v in provenance.items() if k not in ("rh_version", "created", "runtime_s")}
    keyed["scoring_version"] = SCORING_VERSION
    blob = json.dumps(keyed, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(cache_dir: str | Path, provenance: dict[str, Any]) -> Path:
    model = str(provenance.get("model_id", "model")).replace("/", "_")
    method = provenance.get("method", "ranking")
    return Path(cache_dir) / f"{model}-{method}-{cache_key(provenance)}.json"


def cached_ranking(
    cache_dir: str | Path,
    provenance: dict[str, Any],
    compute: Callable[[], Ranking],
    *,
    shape: HeadShape,
    recompute: bool = False,
) -> tuple[Ranking, Path, bool]:
    """Load the ranking for ``provenance`` from the cache, or compute and store it.

    Returns ``(ranking, path, hit)``. A file lock makes concurrent workers (pytest-xdist) compute
    once; the write is atomic, so a killed run leaves the old file or none.
    """
    path = cache_path(cache_dir, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and not recompute:
            return Ranking.load(path, shape=shape), path, True
        ranking = compute()
        ranking.check_shape(shape)
        ranking.save(path)
        return ranking, path, False
