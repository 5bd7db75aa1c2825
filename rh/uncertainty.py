"""How sure is a ranking? Bootstrap the prompts (or their groups) behind a ranking and report, per
head, a confidence interval of its mean score and the probability that it is in the top K; the
heads that are almost always there form the ranking's *stable core*, and ``narrowing`` shows how
the core and the intervals change with the number of prompts ("how many samples are enough?").

Definitions (also in :func:`ranking_uncertainty`):

- **Units.** With ``groups`` (one label per prompt, e.g. ``Sample.group``: prompts of one group
  share a haystack window and are not independent) a unit is a group; otherwise a unit is a prompt.
  Only counted prompts (``SampleScores.counted``) weigh; a unit without a counted prompt is no unit.
  Units are numbered in the order of their first counted prompt.
- **One round.** Draw ``n`` units uniformly with replacement (:func:`bootstrap_indices`); the
  round's score of a head is the mean over every counted prompt of every drawn unit, a unit drawn
  twice counting twice (so a group weighs by its number of counted prompts, as in the full mean).
- **CI.** Percentile bootstrap: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
  (``np.quantile``, linear interpolation) of the rounds' means, ``n = n_units``.
- **p_top.** Fraction of rounds in which the head is among the K best, ties broken by
  (layer, head) as :attr:`rh.rankings.Ranking.heads` does.
- **stable_core.** Heads with ``p_top >= core_threshold``, in the full-data ranking's order.
- **narrowing.** For each ``n`` in ``sizes``: ``n_boot`` rounds of ``n`` units (same seed, so the
  row ``n = n_units`` repeats the main result), giving the core size at ``n``, the mean CI width of
  the full-data top-K heads at ``n`` and the mean fraction of the full-data top K that a round's
  top K contains.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rh.heads import Head, HeadShape
from rh.rankings import Ranking
from rh.scoring import SampleScores

FORMAT = "rh.ranking_uncertainty/1"
METHOD = "bootstrap"
CI_TYPE = "percentile"
TIE_RULE = "score descending, then (layer, head) ascending"
MIN_BOOT = 50
# Elements of float64 work arrays per chunk of rounds (~32 MB): bounds memory at 5120 heads x
# 2000 prompts x 500 rounds, where only the [n_boot, n_heads] means of the main run are kept whole.
_CHUNK_ELEMS = 4_000_000

__all__ = [
    "RankingUncertainty",
    "bootstrap_indices",
    "default_sizes",
    "ranking_uncertainty",
    "resampling_units",
    "uncertainty_of",
    "with_uncertainty",
]


@dataclass
class RankingUncertainty:
    """The bootstrap uncertainty of one ranking; see the module docstring for the definitions."""

    method: str  # the scoring method of the ranking (``SampleScores.method``)
    shape: HeadShape
    k: int
    n_boot: int
    level: float
    core_threshold: float
    n_units: int
    unit: str  # "group" | "prompt"
    n_prompts: int  # counted prompts in the units
    seed: int
    top_k: list[Head]  # the full data's top K, best first
    ci: dict[Head, tuple[float, float]]
    p_top: dict[Head, float]
    stable_core: list[Head]
    narrowing: list[dict[str, Any]] = field(default_factory=list)
    resampling: str = METHOD
    ci_type: str = CI_TYPE
    tie_rule: str = TIE_RULE
    # the top K of every main round, flat head indices ``layer * n_heads + head`` ``[n_boot, k]``;
    # kept only with ``return_tops=True`` (ID-8 reads them) and never serialised
    boot_tops: np.ndarray | None = field(default=None, repr=False, compare=False)

    def ci_width(self, head: Head | str) -> float:
        lo, hi = self.ci[Head.parse(head)]
        return hi - lo

    def to_json(self) -> dict[str, Any]:
        order = self.shape.all_heads()
        return {
            "format": FORMAT,
            "method": self.method,
            "resampling": self.resampling,
            "ci_type": self.ci_type,
            "tie_rule": self.tie_rule,
            "shape": self.shape.as_dict(),
            "k": int(self.k),
            "n_boot": int(self.n_boot),
            "level": float(self.level),
            "core_threshold": float(self.core_threshold),
            "n_units": int(self.n_units),
            "unit": self.unit,
            "n_prompts": int(self.n_prompts),
            "seed": int(self.seed),
            "top_k": [str(h) for h in self.top_k],
            "stable_core": [str(h) for h in self.stable_core],
            "ci": {str(h): [float(self.ci[h][0]), float(self.ci[h][1])] for h in order if h in self.ci},
            "p_top": {str(h): float(self.p_top[h]) for h in order if h in self.p_top},
            "narrowing": [_plain(row) for row in self.narrowing],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "ranking uncertainty") -> RankingUncertainty:
        try:
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            unit = str(data["unit"])
            if unit not in ("group", "prompt"):
                raise ValueError(f"unit is {unit!r}, expected 'group' or 'prompt'")
            ci = {}
            for h, v in data["ci"].items():
                lo, hi = (float(x) for x in v)
                ci[Head.parse(h)] = (lo, hi)
            return cls(
                method=str(data["method"]),
                shape=HeadShape(**data["shape"]),
                k=int(data["k"]),
                n_boot=int(data["n_boot"]),
                level=float(data["level"]),
                core_threshold=float(data["core_threshold"]),
                n_units=int(data["n_units"]),
                unit=unit,
                n_prompts=int(data["n_prompts"]),
                seed=int(data["seed"]),
                top_k=[Head.parse(h) for h in data["top_k"]],
                ci=ci,
                p_top={Head.parse(h): float(v) for h, v in data["p_top"].items()},
                stable_core=[Head.parse(h) for h in data["stable_core"]],
                narrowing=[dict(row) for row in data.get("narrowing", [])],
                resampling=str(data.get("resampling", METHOD)),
                ci_type=str(data.get("ci_type", CI_TYPE)),
                tie_rule=str(data.get("tie_rule", TIE_RULE)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source} is not a valid rh ranking uncertainty: {exc}") from exc


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, v in row.items():
        if isinstance(v, (bool, np.bool_)):
            out[key] = bool(v)
        elif isinstance(v, numbers.Integral):
            out[key] = int(v)
        elif isinstance(v, numbers.Real):
            out[key] = float(v)
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- building blocks


def resampling_units(scored: SampleScores, groups: Sequence[str] | None = None) -> tuple[list[np.ndarray], str]:
    """The resampling units as arrays of counted prompt indices, and their kind ("group"/"prompt").

    A unit is a group (with ``groups``, one label per prompt) or a prompt; uncounted prompts are in
    no unit, and a group without a counted prompt is no unit. Units come in the order of their
    first counted prompt.
    """
    counted = np.asarray(scored.counted, dtype=bool).reshape(-1)
    n = int(np.asarray(scored.scores).shape[0])
    if counted.shape[0] != n:
        raise ValueError(
            f"scored.counted has {counted.shape[0]} entries but scored.scores has {n} prompts: "
            "pass the SampleScores as score_samples returned it"
        )
    if groups is None:
        return [np.array([i]) for i in np.flatnonzero(counted)], "prompt"
    if isinstance(groups, str):
        raise ValueError(f"groups={groups!r} is one string: pass one group label per prompt, e.g. "
                         "[s.group for s in samples]")
    labels = list(groups)
    if len(labels) != n:
        raise ValueError(
            f"groups has {len(labels)} labels but scored has {n} prompts: pass one label per prompt, "
            "in the order of scored.ids (e.g. [s.group for s in samples])"
        )
    members: dict[Any, list[int]] = {}
    for i in np.flatnonzero(counted):
        members.setdefault(labels[i], []).append(int(i))
    return [np.array(v) for v in members.values()], "group"


def bootstrap_indices(n_units: int, n_boot: int, *, seed: int, size: int | None = None) -> np.ndarray:
    """The units drawn in each round: ``[n_boot, size]`` integers in ``[0, n_units)`` (``size``
    defaults to ``n_units``), from ``np.random.default_rng(seed).integers``, all rounds in one draw."""
    size = n_units if size is None else int(size)
    return np.random.default_rng(seed).integers(0, n_units, size=(int(n_boot), size))


def default_sizes(n_units: int) -> list[int]:
    """25%, 50%, 75% and 100% of the units (at least 2 each, duplicates dropped)."""
    return sorted({min(n_units, max(2, round(f * n_units))) for f in (0.25, 0.5, 0.75, 1.0)})


def _top_k(means: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the K best per row; ties go to the lower flat index, i.e. (layer, head)."""
    return np.argsort(-means, axis=-1, kind="stable")[..., :k]


def _rounds(unit_sums: np.ndarray, unit_counts: np.ndarray, idx: np.ndarray):
    """Yield ``(start, means)`` for chunks of rounds: ``means[r, h]`` is round r's mean of head h."""
    n_boot, _ = idx.shape
    n_units, n_heads = unit_sums.shape
    chunk = max(1, _CHUNK_ELEMS // max(n_units, n_heads, idx.shape[1]))
    for start in range(0, n_boot, chunk):
        part = idx[start : start + chunk]
        b = part.shape[0]
        offsets = (np.arange(b)[:, None] * n_units + part).ravel()
        counts = np.bincount(offsets, minlength=b * n_units).reshape(b, n_units).astype(float)
        yield start, (counts @ unit_sums) / (counts @ unit_counts)[:, None]


# --------------------------------------------------------------------------- the analysis


def _check_int(name: str, value: Any, lo: int, hi: int | None, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name}={value!r}: choose an integer with {rng}; {fix}")
    return int(value)


def ranking_uncertainty(
    scored: SampleScores,
    shape: HeadShape,
    *,
    k: int,
    groups: Sequence[str] | None = None,
    n_boot: int = 500,
    level: float = 0.95,
    core_threshold: float = 0.9,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    return_tops: bool = False,
) -> RankingUncertainty:
    """Bootstrap the ranking that ``scored`` gives (the mean over counted prompts, as
    :func:`rh.scoring.aggregate`): per-head percentile CIs of the mean score, the probability of
    being in the top ``k``, the stable core and its narrowing with the number of units.

    Resamples ``groups`` (one label per prompt, e.g. ``[s.group for s in samples]``) when given,
    since prompts sharing a haystack window are not independent, else the prompts.
    ``return_tops``: keep every main round's top K (``boot_tops``) for rules that need the
    resampled sets themselves (ID-8).
    """
    scores = np.asarray(scored.scores, dtype=float)
    if scores.ndim != 3 or scores.shape[1:] != (shape.n_layers, shape.n_heads):
        raise ValueError(
            f"scored.scores has shape {scores.shape} but the model has {shape.n_layers} layers x "
            f"{shape.n_heads} heads (expected [n_prompts, {shape.n_layers}, {shape.n_heads}]): pass the "
            "HeadShape of the model that scored the prompts (scores from through_layer runs cannot be ranked)"
        )
    n_total = shape.n_total
    k = _check_int("k", k, 1, n_total, f"the model has {n_total} heads")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < MIN_BOOT:
        raise ValueError(f"n_boot={n_boot!r}: use at least {MIN_BOOT} bootstrap rounds (500 is the default) "
                         "so that the percentile CI and p_top mean something")
    n_boot = int(n_boot)
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level={level!r}: the CI level must lie strictly between 0 and 1, e.g. 0.95")
    level = float(level)
    if (isinstance(core_threshold, bool) or not isinstance(core_threshold, numbers.Real)
            or not 0.0 < float(core_threshold) <= 1.0):
        raise ValueError(f"core_threshold={core_threshold!r}: the p_top a head needs to be in the stable core "
                         "must lie in (0, 1], e.g. 0.9")
    core_threshold = float(core_threshold)
    seed = _check_int("seed", seed, 0, None, "pass a non-negative integer seed")

    units, unit_kind = resampling_units(scored, groups)
    n_units = len(units)
    if n_units < 2:
        raise ValueError(
            f"only {n_units} counted {unit_kind}{'s' if n_units != 1 else ''} "
            f"({int(np.asarray(scored.counted, dtype=bool).sum())} counted prompts of {scores.shape[0]}): "
            f"a bootstrap needs at least 2 counted {unit_kind}s; score more prompts"
            + (" from more haystack groups, or resample prompts (groups=None) if they are independent"
               if unit_kind == "group" else "")
        )
    flat = scores.reshape(scores.shape[0], n_total)
    mask = np.asarray(scored.counted, dtype=bool).reshape(-1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite[mask].all():
        bad = int(np.flatnonzero(mask & ~finite)[0])
        raise ValueError(f"scored.scores has a non-finite score for counted prompt {scored.ids[bad]!r}: "
                         "fix or uncount that prompt before bootstrapping")
    unit_sums = np.stack([flat[u].sum(axis=0) for u in units])  # [n_units, n_heads]
    unit_counts = np.array([len(u) for u in units], dtype=float)
    full_mean = flat[mask].mean(axis=0)  # exactly as aggregate() computes the ranking's scores
    order = _top_k(full_mean, n_total)  # the full-data ranking, as Ranking.heads orders it
    top_idx = order[:k]
    heads = shape.all_heads()

    sizes = default_sizes(n_units) if sizes is None else _check_sizes(sizes, n_units)

    # main run: all n_units per round, every head's means kept for its quantiles
    idx = bootstrap_indices(n_units, n_boot, seed=seed)
    means = np.empty((n_boot, n_total))
    in_top = np.zeros(n_total)
    tops = np.empty((n_boot, k), dtype=int) if return_tops else None
    for start, m in _rounds(unit_sums, unit_counts, idx):
        means[start : start + len(m)] = m
        chunk_top = _top_k(m, k)
        in_top += np.bincount(chunk_top.ravel(), minlength=n_total)
        if tops is not None:
            tops[start : start + len(m)] = chunk_top
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail], axis=0)
    p_top = in_top / n_boot
    core = [heads[i] for i in order if p_top[i] >= core_threshold]

    narrowing = []
    for n in sizes:
        if n == n_units:
            m_lo, m_hi, p_n, overlap = lo[top_idx], hi[top_idx], p_top, _overlap(means, top_idx, k)
        else:
            m_lo, m_hi, p_n, overlap = _subsample(unit_sums, unit_counts, n_boot, n, seed, k, top_idx, tail)
        narrowing.append({
            "n_units": int(n),
            "mean_counted_prompts": float(unit_counts.mean() * n),
            "core_size": int((p_n >= core_threshold).sum()),
            "mean_ci_width_top_k": float(np.mean(m_hi - m_lo)),
            "mean_top_k_overlap": float(overlap),
        })

    return RankingUncertainty(
        method=scored.method, shape=shape, k=k, n_boot=n_boot, level=level, core_threshold=core_threshold,
        n_units=n_units, unit=unit_kind, n_prompts=int(mask.sum()), seed=seed,
        top_k=[heads[i] for i in top_idx],
        ci={heads[i]: (float(lo[i]), float(hi[i])) for i in range(n_total)},
        p_top={heads[i]: float(p_top[i]) for i in range(n_total)},
        stable_core=core, narrowing=narrowing, boot_tops=tops,
    )


def _check_sizes(sizes: Sequence[int], n_units: int) -> list[int]:
    if isinstance(sizes, (str, numbers.Number)):
        raise ValueError(f"sizes={sizes!r}: pass a list of subsample sizes, e.g. {default_sizes(n_units)}")
    out = [_check_int("sizes[i]", n, 2, n_units,
                      f"a subsample size counts units (there are {n_units}); resampling more units than "
                      "the data has would overstate the precision") for n in sizes]
    if not out:
        raise ValueError(f"sizes is empty: pass at least one subsample size, e.g. {default_sizes(n_units)}")
    return sorted(set(out))


def _overlap(means: np.ndarray, top_idx: np.ndarray, k: int) -> float:
    return float(np.isin(_top_k(means, k), top_idx).sum(axis=1).mean() / k)


def _subsample(unit_sums, unit_counts, n_boot, n, seed, k, top_idx, tail):
    """Rounds of ``n`` units: the CI of the full top-K heads, every head's p_top and the overlap."""
    n_total = unit_sums.shape[1]
    idx = bootstrap_indices(len(unit_counts), n_boot, seed=seed, size=n)
    top_means = np.empty((n_boot, len(top_idx)))
    in_top = np.zeros(n_total)
    hits = 0
    for start, m in _rounds(unit_sums, unit_counts, idx):
        top_means[start : start + len(m)] = m[:, top_idx]
        t = _top_k(m, k)
        in_top += np.bincount(t.ravel(), minlength=n_total)
        hits += int(np.isin(t, top_idx).sum())
    lo, hi = np.quantile(top_means, [tail, 1.0 - tail], axis=0)
    return lo, hi, in_top / n_boot, hits / (n_boot * k)


# --------------------------------------------------------------------------- rankings


def with_uncertainty(ranking: Ranking, unc: RankingUncertainty) -> Ranking:
    """A copy of ``ranking`` carrying ``unc`` (as its JSON), after checking they belong together:
    the same scoring method, the same head shape and the same top K."""
    if not isinstance(unc, RankingUncertainty):
        raise ValueError(f"unc is a {type(unc).__name__}: pass the RankingUncertainty that "
                         "ranking_uncertainty returned (or RankingUncertainty.from_json(...))")
    if unc.method != ranking.method:
        raise ValueError(
            f"the uncertainty was computed from {unc.method!r} scores but the ranking is by {ranking.method!r}: "
            "bootstrap the SampleScores that made this ranking"
        )
    if (unc.shape.n_layers, unc.shape.n_heads) != (ranking.shape.n_layers, ranking.shape.n_heads):
        raise ValueError(
            f"the uncertainty is for a model with {unc.shape.n_layers} x {unc.shape.n_heads} heads but the ranking "
            f"is for {ranking.shape.n_layers} x {ranking.shape.n_heads}: bootstrap the scores of this ranking's model"
        )
    if ranking.top(unc.k) != unc.top_k:
        raise ValueError(
            f"the uncertainty's full-data top {unc.k} ({', '.join(map(str, unc.top_k[:5]))}...) differs from the "
            f"ranking's ({', '.join(map(str, ranking.top(unc.k)[:5]))}...): it was computed from other prompts; "
            "bootstrap the SampleScores that made this ranking"
        )
    return dataclasses.replace(ranking, provenance=dict(ranking.provenance),
                               per_setting={name: dict(v) for name, v in ranking.per_setting.items()},
                               uncertainty=unc.to_json())


def uncertainty_of(ranking: Ranking) -> RankingUncertainty | None:
    """The uncertainty a ranking carries, parsed; None when it carries none."""
    if ranking.uncertainty is None:
        return None
    return RankingUncertainty.from_json(ranking.uncertainty, source="the ranking's uncertainty")
