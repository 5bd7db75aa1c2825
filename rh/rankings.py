"""``Ranking``: every head of a model ordered by a retrieval score, with the provenance that made
it; saved as JSON, cached under ``fixtures/rankings/`` by that provenance, never reused for a
model of another shape (design decision 4)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rh.heads import Head, HeadShape, layer_matched_heads, random_heads
from rh.io import atomic_write_json, atomic_write_text, file_lock, no_duplicate_keys

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
    # Bootstrap uncertainty (rh.uncertainty.RankingUncertainty.to_json()); None when not computed.
    uncertainty: dict[str, Any] | None = None

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

    def random_layer_matched(self, k: int, *, seed: int) -> list[Head]:
        """``k`` heads from outside the top ``k`` with the top K's count in every layer (seeded):
        :func:`rh.heads.layer_matched_heads`."""
        return layer_matched_heads(self.shape, self.top(k), seed=seed)

    def restricted(self, shape: HeadShape) -> Ranking:
        """This ranking over the heads of a smaller grid alone (layers < ``shape.n_layers``, heads <
        ``shape.n_heads``): their scores and so their order among themselves, e.g. the heads two models
        of different shapes share (ID-6). Per-setting scores are restricted with them; the bootstrap
        uncertainty, computed over all heads, is dropped."""
        if shape.n_layers > self.shape.n_layers or shape.n_heads > self.shape.n_heads:
            raise ValueError(
                f"cannot restrict a {self.shape.n_layers}x{self.shape.n_heads} ranking to a larger grid "
                f"{shape.n_layers}x{shape.n_heads}: give a grid of at most its layers and heads")
        keep = set(shape.all_heads())
        return Ranking(self.method, shape, {h: v for h, v in self.scores.items() if h in keep},
                       {**self.provenance, "restricted_to": f"{shape.n_layers}x{shape.n_heads}"},
                       {name: {h: v for h, v in vals.items() if h in keep} for name, vals in self.per_setting.items()})

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
        out = {
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
        if self.uncertainty is not None:  # absent otherwise, so files without it read as before
            out["uncertainty"] = self.uncertainty
        return out

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
            uncertainty = data.get("uncertainty")
            if uncertainty is not None and not isinstance(uncertainty, dict):
                raise ValueError(f"uncertainty is a {type(uncertainty).__name__}, expected an object or null")
            return cls(data["method"], shape, scores, dict(data.get("provenance", {})), per_setting,
                       None if uncertainty is None else dict(uncertainty))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source} is not a valid rh ranking: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write our JSON, or CSV when ``path`` ends in ``.csv``; atomically either way."""
        if str(path).lower().endswith(".csv"):
            return atomic_write_text(path, self.to_csv())
        return atomic_write_json(path, self.to_json())

    def to_csv(self) -> str:
        """One row per head: layer, head, score, rank, then one column per setting. The first line
        is a ``#`` comment carrying the format, shape, method and provenance as JSON."""
        settings = sorted(self.per_setting)
        buf = io.StringIO()
        meta = {"format": FORMAT, "method": self.method, "shape": self.shape.as_dict(), "provenance": self.provenance}
        buf.write("# " + json.dumps(meta, sort_keys=True, default=str) + "\n")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "head", "score", "rank", *settings])
        for r, h in enumerate(self.heads):
            w.writerow([h.layer, h.head, repr(float(self.scores[h])), r + 1,
                        *(repr(float(self.per_setting[k][h])) if h in self.per_setting[k] else "" for k in settings)])
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path, *, shape: HeadShape | None = None) -> Ranking:
        """Load a ranking file in any supported format (see :func:`load_ranking`)."""
        return load_ranking(path, shape=shape)


# --------------------------------------------------------------------------- external formats

FORMATS = ("rh-json", "rh-csv", "seed003", "wu24")


def load_ranking(path: str | Path, *, shape: HeadShape | None = None, fmt: str = "auto") -> Ranking:
    """Load our JSON or CSV, seed 003's ``head_rankings`` JSON, or Wu24's ``{"layer-head": [scores]}``.

    The format is detected from the content unless ``fmt`` names it. External files carry no head
    shape, so it is inferred from the heads they list (which must then be every head of that grid);
    pass ``shape`` to check the ranking against a model: a mismatch is refused.
    """
    path = Path(path)
    where = f"ranking file {str(path)!r}"
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown ranking format {fmt!r}: use one of {', '.join(FORMATS)} or 'auto'")
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not a text file ({exc.reason} at byte {exc.start}): give the JSON or CSV "
                         "ranking itself") from None
    if fmt == "rh-csv" or (fmt == "auto" and (path.suffix.lower() == ".csv" or text.startswith("# "))):
        ranking = _from_csv(text, where)
    else:
        try:
            data = json.loads(text, object_pairs_hook=no_duplicate_keys(where, ": give each head once"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON (truncated?): {exc}") from exc
        if fmt == "auto":
            fmt = _detect(data, where)
        if fmt == "rh-json":
            ranking = Ranking.from_json(data, source=where)
        elif fmt == "seed003":
            ranking = _from_seed003(data, where, shape)
        else:
            ranking = _from_wu24(data, where, shape)
        if fmt != "rh-json":  # ours carries its provenance already
            ranking.provenance.setdefault("source_file", str(path))
            ranking.provenance.setdefault("source_format", fmt)
    if shape is not None:
        ranking.check_shape(shape)
    return ranking


def _detect(data: Any, where: str) -> str:
    if isinstance(data, dict) and (str(data.get("format", "")).startswith("rh.") or "heads" in data):
        return "rh-json"  # ours, possibly damaged: from_json says what is wrong
    if isinstance(data, dict) and isinstance(data.get("head_rankings"), list):
        return "seed003"
    if isinstance(data, dict) and data and all(re.fullmatch(r"\d+-\d+", str(k)) for k in data):
        return "wu24"
    raise ValueError(
        f"{where} is in no known format: expected rh's ranking JSON (format {FORMAT!r}), seed 003's "
        "{'head_rankings': [...]} or Wu24's {'layer-head': [scores]}; convert it, or name its format (rh audit "
        "--format; fmt= in rh.published.load_heads)"
    )


def _grid(scores: dict[Head, float], where: str, shape: HeadShape | None) -> HeadShape:
    """The shape the heads span; every head of it must be present."""
    if not scores:
        raise ValueError(f"{where} lists no heads")
    if shape is None:
        n_layers = max(h.layer for h in scores) + 1
        n_heads = max(h.head for h in scores) + 1
        shape = HeadShape(n_layers, n_heads, n_heads, 0)  # KV heads and head_dim are not in these files
    expected = shape.n_layers * shape.n_heads
    if len(scores) != expected:
        raise ValueError(
            f"{where} scores {len(scores)} heads but a {shape.n_layers} x {shape.n_heads} model has {expected}: "
            "the file is truncated or for another model"
        )
    return shape


def _from_seed003(data: dict, where: str, shape: HeadShape | None) -> Ranking:
    scores: dict[Head, float] = {}
    try:
        for row in data["head_rankings"]:
            h = Head.parse(row["head"])
            if h in scores:
                raise ValueError(f"head {h} is listed twice")
            scores[h] = float(row["score"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not a valid seed-003 head_rankings file: {exc}") from exc
    grid = _grid(scores, where, shape)
    prov = {k: data[k] for k in ("method", "model_key", "model_name", "question", "total_tokens",
                                 "needle_position", "samples_processed", "timestamp") if k in data}
    return Ranking(str(data.get("method", "summed_attention")), grid, scores, prov)


def _from_wu24(data: dict, where: str, shape: HeadShape | None) -> Ranking:
    scores: dict[Head, float] = {}
    try:
        for key, values in data.items():
            vals = [float(v) for v in (values if isinstance(values, list) else [values])]
            if not vals:
                raise ValueError(f"head {key} has no scores")
            head = Head.parse(key)
            if head in scores:  # "0-1" and "0-01" name one head
                raise ValueError(f"head {head} is listed twice (as {key!r} and an equivalent key)")
            scores[head] = float(np.mean(vals))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not a valid Wu24 head-score file: {exc}") from exc
    grid = _grid(scores, where, shape)
    return Ranking("wu24", grid, scores, {"n_trials": int(max(len(v) if isinstance(v, list) else 1
                                                                for v in data.values()))})


def _from_csv(text: str, where: str) -> Ranking:
    lines = text.splitlines()
    try:
        meta = json.loads(lines[0][2:]) if lines and lines[0].startswith("# ") else {}
        rows = list(csv.DictReader(lines[1:] if meta else lines))
        missing = [c for c in ("layer", "head", "score") if not rows or c not in rows[0]]
        if missing:
            raise ValueError(f"no {', '.join(repr(c) for c in missing)} column (a ranking CSV has the header "
                             "layer,head,score[,rank,...])" if rows else "no rows")
        scores = {Head(int(r["layer"]), int(r["head"])): float(r["score"]) for r in rows}
        if len(scores) != len(rows):
            raise ValueError("a head is listed twice")
        settings = [c for c in (rows[0].keys() if rows else []) if c not in ("layer", "head", "score", "rank")]
        per_setting = {k: {Head(int(r["layer"]), int(r["head"])): float(r[k]) for r in rows if r[k] not in ("", None)}
                       for k in settings}
        shape = HeadShape(**meta["shape"]) if "shape" in meta else _grid(scores, where, None)
        return Ranking(meta.get("method", "csv"), shape, scores, dict(meta.get("provenance", {})), per_setting)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{where} is not a valid rh ranking CSV: {exc}") from exc


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


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def entry_checksum(data: dict[str, Any], path: str | Path) -> dict[str, str]:
    """A cache entry's checksums: of its JSON content (everything but the checksum itself, in a
    canonical form) and of the per-sample scores file beside it, where there is one. The cache key
    hashes the provenance, so these are what tell a changed entry from the one rh wrote."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    out = {"content_sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}
    samples = _sha256_file(Path(path).with_suffix(".samples.npz"))
    if samples is not None:
        out["samples_sha256"] = samples
    return out


def check_entry(path: str | Path) -> None:
    """Refuse a cache entry whose content or per-sample scores are not what rh wrote (edited by
    hand, half-copied, or written by an rh without checksums)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("checksum"), dict):
        raise ValueError(f"{path.name} carries no checksum (written by an older rh, or not by rh), so its "
                         "content cannot be trusted")
    want, got = data["checksum"], entry_checksum(data, path)
    if want.get("content_sha256") != got["content_sha256"]:
        raise ValueError(f"{path.name} was changed after rh wrote it: its content does not match its checksum")
    if want.get("samples_sha256") != got.get("samples_sha256"):
        raise ValueError(f"the per-sample scores beside {path.name} are not those it was written with "
                         "(changed, missing or added)")


def cached_ranking(
    cache_dir: str | Path,
    provenance: dict[str, Any],
    compute: Callable[[], Ranking],
    *,
    shape: HeadShape,
    recompute: bool = False,
) -> tuple[Ranking, Path, bool]:
    """Load the ranking for ``provenance`` from the cache, or compute and store it.

    Returns ``(ranking, path, hit)``. A lock per entry makes concurrent workers (pytest-xdist)
    compute once; it leaves no file behind (:func:`rh.io.file_lock`: its file, in ``.locks/``, is
    removed on release, and the folder once empty). The write is atomic, so a killed run leaves the
    old file or none.
    """
    path = cache_path(cache_dir, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / ".locks" / (path.name + ".lock")):
        if path.exists() and not recompute:
            try:
                check_entry(path)
                return Ranking.load(path, shape=shape), path, True
            except ValueError as exc:
                raise ValueError(f"the cached ranking is unreadable ({exc}): rerun with --recompute to compute it "
                                 "again (the file is replaced)") from None
        ranking = compute()
        ranking.check_shape(shape)
        data = ranking.to_json()
        data["checksum"] = entry_checksum(data, path)
        atomic_write_json(path, data)
        return ranking, path, False
