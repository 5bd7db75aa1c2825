"""Causal necessity (claim CA-1): ablate the top-K heads of a ranking and, as the control, K heads
drawn at random from outside the top K; compare retrieval on the same validation samples.

Outcomes are gathered once per K (:func:`necessity_outcomes`) and turned into one Holm-corrected
family of verdicts (:func:`necessity_verdicts`), so a parametrized claim reads its own K's verdict.

``phase="decode"`` runs a claim's ablations under Wu24's masking protocol (the heads ablated while
decoding only: from the prompt's last token on, the prompt's clean prefill shared by every
condition, :mod:`rh.units`); its verdicts carry ``phase="decode"`` in their params
(:func:`in_phase`), so they sit beside the all-positions ones (whose params name no phase).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import pandas as pd

from rh.progress import track
from rh.ablation import Ablation, ablate
from rh.heads import Head
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking
from rh.recording import attn_z, head_slice, recording
from rh.rules.claims import side_decided
from rh.rules.verdict import Power
from rh.seeds import derive_seed
from rh.stats import Verdict
from rh.runner import call, run, run_one
from rh.units import Unit

log = logging.getLogger(__name__)

TEST_NAME = ("head-set null (top-K drop ranked among random K-sets) and exact one-sided sign test on paired "
             "per-sample accuracy, the larger p Holm-corrected across K")


@dataclass
class NecessityOutcomes:
    """Per-sample outcomes for one K: ``*_correct`` are 0/1, ``*_logprob`` the answer log-prob.
    ``random_*`` have one row per random draw; NaN where early stopping left an item unevaluated
    (:func:`necessity_outcomes`: every entry CA-1's rule reads is evaluated)."""

    k: int
    top_heads: list[Head]
    random_heads: list[list[Head]]
    baseline_correct: np.ndarray
    baseline_logprob: np.ndarray
    top_correct: np.ndarray
    top_logprob: np.ndarray
    random_correct: np.ndarray  # [draws, n]
    random_logprob: np.ndarray  # [draws, n]
    frame: pd.DataFrame  # every row of every condition, for the report
    matched_correct: np.ndarray | None = None  # [matched draws, n]: random K-sets with the top K's layers
    matched_logprob: np.ndarray | None = None


def _arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return df["correct"].to_numpy(dtype=float), df["logprob"].to_numpy(dtype=float)


def in_phase(verdict: Verdict, phase: str) -> Verdict:
    """``verdict`` labelled with the ablation phase its conditions ran in: ``phase="decode"`` joins
    its params (Wu24's protocol, a claim row of its own); all positions, the default, adds nothing."""
    if phase == "all":
        return verdict
    if phase != "decode":
        raise ValueError(f"unknown phase={phase!r}: use 'all' (every position) or 'decode' (Wu24's protocol)")
    import dataclasses

    return dataclasses.replace(verdict, params={**verdict.params, "phase": phase})


def evaluate_baseline(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8) -> pd.DataFrame:
    """The unablated outcomes of ``samples``, through the model's runner."""
    return run_one(model, samples, Ablation.baseline(), batch_size=batch_size)


def floor_decides(baseline_correct: np.ndarray, baseline_floor: float | None, stop_early: bool) -> bool:
    """Whether the baseline's accuracy lies below ``baseline_floor``, where the random-set families
    (CA-1, CA-7's accuracy part, CA-9, CA-10) end inconclusive at the floor whatever their
    ablations show (:func:`rh.rules.claims.floor_reason` is their first test), so a mechanism
    that stops early leaves those ablations unread. Never with ``stop_early`` off (``--plain``)."""
    from rh.rules.claims import floor_reason

    base = np.asarray(baseline_correct, float)
    return bool(stop_early and baseline_floor is not None and base.size
                and floor_reason(float(base.mean()), baseline_floor) is not None)


def _plain_token_layers(model: LoadedModel, samples: Sequence[Sample]) -> int:
    """The token-layers of one plain pass over each of ``samples``: its prompt and its answer but the last token."""
    return sum(len(s.input_ids) + len(s.answer_ids) - 1 for s in samples) * model.shape.n_layers


def _floor_saved(model: LoadedModel, samples: Sequence[Sample], units: Sequence[Unit]) -> None:
    """Count the plain passes of ``units`` (left unread below the floor) as saved ("floor")."""
    from rh.budget import note_saved

    by_id = {s.id: s for s in samples}
    note_saved("floor", sum(_plain_token_layers(model, [by_id[i] for i in u.sample_ids]) for u in units))


def _unread_draws(model: LoadedModel, samples: Sequence[Sample], k: int, draws: int,
                  name: str) -> tuple[np.ndarray, np.ndarray]:
    """The random sets left unread below the floor (:func:`floor_decides`): every entry NaN, their
    passes counted as saved ("floor")."""
    from rh.budget import note_saved

    note_saved("floor", _plain_token_layers(model, samples) * draws)
    log.info("%s K=%d: the baseline is below the floor, which decides CA-1; %d random sets left unread", name, k,
             draws)
    nan = np.full((draws, len(samples)), np.nan)
    return nan, nan.copy()


def needed_items(draw: int, draws: int, n: int) -> list[int]:
    """The items CA-1's paired test reads from random draw ``draw`` of ``draws``: item i is paired
    with draw i mod ``draws`` (:func:`rh.rules.claims.necessity`)."""
    from rh.rules.claims import paired_draws

    return [int(i) for i in np.flatnonzero(paired_draws(n, draws) == draw)]


def _chunk_size(done: int, left: int, top_correct: float, batch_size: int) -> int | None:
    """How many more items a stopped random set evaluates next: None once the head-set null's
    indicator is decided (:func:`side_decided`), else the fewest items that could decide it (at
    most ``batch_size``)."""
    if left == 0 or side_decided(done, left, top_correct) is not None:
        return None
    to_false = int(top_correct) + 1 - done  # this many more right items decide "below"
    to_true = done + left - int(top_correct)  # this many more wrong ones decide "at least"
    return max(1, min(to_false, to_true, batch_size))


def _stopped_draws(model: LoadedModel, samples: Sequence[Sample], sets: list[Ablation], *, order: list[int],
                   top_correct: float, batch_size: int, stop_early: bool, what: str,
                   prior: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """Each random K-set's outcomes: the items its paired test reads (:func:`needed_items`) always,
    the others only until the head-set null's indicator is decided, a chunk at a time, each chunk
    as small as the fewest items that could decide it. NaN marks what was left out. With
    ``stop_early=False``, every item.

    The sets advance in waves: each wave submits every undecided set's next chunk as work units
    to one :func:`rh.runner.run` call, which runs rows of different sets side by side in one
    batch. A set's next chunk is the items most likely to decide it soonest, from what every set
    has shown so far (:func:`_next_items`: the items random sets got right most often, when the
    set is nearer to "below the top K", else those they got wrong; ``prior``, the baseline's 0/1
    outcomes, counts as one observation; ties in ``order``). Which items a set reads never
    changes its indicator, which :func:`side_decided` settles exactly on any items, nor the paired
    items the rule also reads: the verdict is the full evaluation's whatever the order."""
    n, draws = len(samples), len(sets)
    correct = np.full((draws, n), np.nan)
    logprob = np.full((draws, n), np.nan)
    frames: list[list[pd.DataFrame]] = [[] for _ in range(draws)]
    todo = {d: needed_items(d, draws, n) if stop_early else list(range(n)) for d in range(draws)}
    paired = {d: set(todo[d]) for d in range(draws)}
    rest = {d: [i for i in order if i not in paired[d]] if stop_early else [] for d in range(draws)}
    rank = np.empty(n, int)
    rank[np.asarray(order, int)] = np.arange(n)
    prior = np.zeros(n) if prior is None else np.asarray(prior, float)
    with contextlib.closing(track(range(draws), what, unit="draw")) as bar:
        next(bar, None)  # progress: draws decided so far
        while todo:
            live = [d for d in sorted(todo) if todo[d]]
            units = [Unit(sets[d], tuple(samples[i].id for i in todo[d])) for d in live]
            for d, df in zip(live, run(model, samples, units, batch_size=batch_size)):
                idx = todo[d]
                correct[d, idx], logprob[d, idx] = _arrays(df)
                frames[d].append(df)
            nxt = {}
            p_right = (np.nansum(correct, axis=0) + prior) / ((~np.isnan(correct)).sum(axis=0) + 1)
            for d in sorted(todo):
                done = int(np.nansum(correct[d]))
                size = _chunk_size(done, len(rest[d]), top_correct, batch_size) if stop_early else None
                if size is None:
                    next(bar, None)
                    continue
                nxt[d], rest[d] = _next_items(rest[d], size, p_right, rank,
                                              right=top_correct + 1 - done <= done + len(rest[d]) - top_correct)
            todo = nxt
    skipped = [samples[i] for d in range(draws) for i in np.flatnonzero(np.isnan(correct[d]))]
    if skipped:  # the passes the plain path would have run: each prompt and its answer but the last token
        from rh.budget import note_saved

        note_saved("early stopping", _plain_token_layers(model, skipped))
    return [(correct[d], logprob[d], pd.concat(frames[d], ignore_index=True) if frames[d] else pd.DataFrame())
            for d in range(draws)]


def _next_items(rest: list[int], size: int, p_right: np.ndarray, rank: np.ndarray, *,
                right: bool) -> tuple[list[int], list[int]]:
    """(the ``size`` items of ``rest`` to read next, the others): those most likely right under a
    random set (``right``) or most likely wrong, by ``p_right``, ties by ``rank``."""
    sign = -1.0 if right else 1.0
    ranked = sorted(rest, key=lambda i: (sign * p_right[i], rank[i]))
    chosen = set(ranked[:size])
    return ranked[:size], [i for i in rest if i not in chosen]


def necessity_outcomes(
    model: LoadedModel,
    samples: Sequence[Sample],
    ranking: Ranking,
    k: int,
    *,
    draws: int,
    seed: int = 0,
    baseline: pd.DataFrame | None = None,
    batch_size: int = 8,
    matched_draws: int = 0,
    stop_early: bool | None = None,
    phase: str = "all",
    baseline_floor: float | None = None,
) -> NecessityOutcomes:
    """Evaluate ``samples`` with no ablation, with the top-``k`` heads ablated, and with ``draws``
    random ``k``-sets from outside the top ``k`` (seeded by ``seed``, ``k`` and the draw index);
    with ``matched_draws``, also that many random sets matched to the top K's layers. Every
    ablation is in ``phase`` (``"decode"``: Wu24's protocol); the baseline is the clean pass.

    ``stop_early`` (default, unless :func:`rh.budget.plain_passes` is on): a random set is evaluated
    on the items CA-1's paired test pairs with it, then only until the head-set null's indicator (is
    its drop at least the top K's?) is decided (:func:`side_decided`); the other entries are NaN.
    CA-1's rule reads nothing else, so its verdict is the one the full evaluation gives
    (``tests/test_early_stop.py``), for a fraction of the passes when the top K's drop is far from
    the random sets'.

    ``baseline_floor`` (with early stopping): when the baseline's accuracy is below it, CA-1's rule
    ends inconclusive at the floor whatever the random sets show (:func:`floor_decides`), so no
    random set is evaluated (every entry NaN); the top K still is, for the report and CA-2.
    """
    from rh.budget import stops_early

    stop_early = stops_early(stop_early)
    ranking.check_shape(model.shape)
    if draws < 1:
        raise ValueError(f"draws={draws}: need at least one random head set as the control")
    top = ranking.top(k)
    rand_sets = [ranking.random_outside_top(k, seed=derive_seed(seed, k, d)) for d in range(draws)]
    if baseline is None:
        baseline = evaluate_baseline(model, samples, batch_size=batch_size)
    baseline = baseline.set_index("id").loc[[s.id for s in samples]].reset_index()
    frames = [baseline]
    frames.append(run_one(model, samples, Ablation(f"top{k}", tuple(top), phase=phase, selection="top"),
                          batch_size=batch_size))
    bc, bl = _arrays(frames[0])
    tc, tl = _arrays(frames[1])
    n = len(samples)
    # ties in the order items are read: those the baseline gets right first (they decide "below the top K" soonest)
    order = sorted(range(n), key=lambda i: (-bc[i], i))

    floor = floor_decides(bc, baseline_floor, stop_early)

    def evaluate(sets: list[list[Head]], name: str) -> tuple[np.ndarray, np.ndarray]:
        if floor:  # the floor decides CA-1 whatever these sets show
            return _unread_draws(model, samples, k, len(sets), name)
        conds = [Ablation(f"{name}{k}#{d}", tuple(heads), phase=phase, selection="random", draw=d)
                 for d, heads in enumerate(sets)]
        what = f"{name} K={k} draws" + (" (decode)" if phase == "decode" else "")
        got = _stopped_draws(model, samples, conds, order=order, prior=bc, top_correct=float(tc.sum()),
                             batch_size=batch_size, stop_early=stop_early, what=what)
        frames.extend(df for _, _, df in got)
        return np.stack([c for c, _, _ in got]), np.stack([lp for _, lp, _ in got])

    rc, rl = evaluate(rand_sets, "random")
    mc = ml = None
    if matched_draws:
        matched = [ranking.random_layer_matched(k, seed=derive_seed(seed, k, d, 7)) for d in range(matched_draws)]
        mc, ml = evaluate(matched, "matched")
    return NecessityOutcomes(k, top, rand_sets, bc, bl, tc, tl, rc, rl, pd.concat(frames, ignore_index=True), mc, ml)


def necessity_verdicts(
    outcomes: Sequence[NecessityOutcomes],
    *,
    alpha: float = 0.05,
    baseline_floor: float = 0.5,
    min_gap: float = 0.2,
    n_boot: int = 10_000,
    seed: int = 0,
    control: str = "outside_top",
    phase: str = "all",
) -> dict[int, Verdict]:
    """One CA-1 verdict per K, Holm-corrected across the K levels: :func:`rh.rules.claims.necessity`
    (``phase``: the one the outcomes' ablations ran in, :func:`in_phase`)."""
    from rh.rules.claims import necessity

    got = necessity(outcomes, alpha=alpha, baseline_floor=baseline_floor, min_gap=min_gap, n_boot=n_boot, seed=seed,
                    control=control)
    return {k: in_phase(v, phase) for k, v in got.items()}


# --------------------------------------------------------------------------- CA-2 ... CA-6


def top_logprobs(model: LoadedModel, samples: Sequence[Sample], ranking: Ranking, levels: Sequence[int],
                 outcomes: Sequence[NecessityOutcomes] = (), *, batch_size: int = 8, phase: str = "all",
                 ) -> dict[int, np.ndarray]:
    """CA-2's dose: the answer log-prob with the top K ablated (in ``phase``), per K (reusing CA-1's
    outcomes of that phase where a K coincides; one pass over the samples per other K)."""
    have = {o.k: o.top_logprob for o in outcomes}
    out = {}
    for k in levels:
        if k in have:
            out[k] = have[k]
            continue
        top = Ablation(f"top{k}", tuple(ranking.top(k)), phase=phase, selection="top")
        out[k] = run_one(model, samples, top, batch_size=batch_size)["logprob"].to_numpy(float)
    return out


def dose_response(base_logprob: np.ndarray, top_logprob: dict[int, np.ndarray], ca1: dict[int, Verdict], *,
                  alpha: float = 0.05, min_growth: float = 1.0, baseline_floor: float = 0.5,
                  baseline_accuracy: float | None = None, phase: str = "all") -> Verdict:
    """CA-2: the top-K drop (answer log-prob) grows with K and the top-vs-random gap holds at every
    K: :func:`rh.rules.claims.dose_response` (``phase``: that of the ablations, :func:`in_phase`)."""
    from rh.rules.claims import dose_response as rule

    return in_phase(rule(base_logprob, top_logprob, ca1, alpha=alpha, min_growth=min_growth,
                         baseline_floor=baseline_floor, baseline_accuracy=baseline_accuracy), phase)


def inverse_ablation(model: LoadedModel, samples: Sequence[Sample], ranking: Ranking, levels: Sequence[int],
                     baseline: pd.DataFrame, *, margin: float = 0.1, alpha: float = 0.05, batch_size: int = 8,
                     baseline_floor: float = 0.5,
                     n_boot: int = 10_000, seed: int = 0, stop_early: bool | None = None) -> dict[int, Verdict]:
    """CA-3: ablating the K lowest-scoring heads keeps accuracy within ``margin`` of the baseline
    (non-inferiority: the lower confidence bound of the mean change is >= -margin), Holm across K.
    The ablations are curtailed (:mod:`rh.curtail`; ``stop_early=False`` reads every item), and
    left unread below the floor (:func:`floor_decides`), which decides every K."""
    from rh.budget import note_saved, stops_early
    from rh.curtail import Arm, curtailed, paired_decider
    from rh.rules.claims import inverse_bounds

    base = baseline.set_index("id").loc[[s.id for s in samples], "correct"].to_numpy(dtype=float)
    ablated = {}
    if floor_decides(base, baseline_floor, stops_early(stop_early)):  # inconclusive whatever the ablation does
        note_saved("floor", _plain_token_layers(model, samples) * len(levels))
    else:
        arms = {k: Arm(samples, base, Ablation(f"bottom{k}", tuple(ranking.bottom(k)), selection="bottom"))
                for k in levels}
        ablated = curtailed(model, arms, paired_decider(bounds=inverse_bounds(margin), alpha=alpha,
                                                        baseline_floor=baseline_floor),
                            seed=derive_seed(seed, "CA-3"), batch_size=batch_size, stop_early=stop_early,
                            what="CA-3 items")
    bottom = {k: [str(h) for h in ranking.bottom(min(k, 20))] for k in levels}
    return inverse_verdicts(base, ablated, levels, margin=margin, alpha=alpha, baseline_floor=baseline_floor,
                            n_boot=n_boot, seed=seed, bottom_heads=bottom)


def inverse_verdicts(base: np.ndarray, ablated: dict[int, np.ndarray], levels: Sequence[int], *, margin: float = 0.1,
                     alpha: float = 0.05, baseline_floor: float = 0.5, n_boot: int = 10_000, seed: int = 0,
                     bottom_heads: dict[int, list[str]] | None = None) -> dict[int, Verdict]:
    """CA-3's decision from per-sample 0/1 outcomes: :func:`rh.rules.claims.inverse` (supported when
    the loss is shown below ``margin``, refuted when shown above it, Holm across K)."""
    from rh.rules.claims import inverse

    return inverse(base, ablated, levels, margin=margin, alpha=alpha, baseline_floor=baseline_floor,
                   bottom_heads=bottom_heads)


def ablation_hurts(claim: str, model: LoadedModel, groups: dict[str, Sequence[Sample]], heads: Sequence[Head],
                   baseline: pd.DataFrame | None, *, param: str, alpha: float = 0.05, baseline_floor: float = 0.5,
                   min_drop: float = 0.2, batch_size: int = 8, n_boot: int = 10_000, seed: int = 0,
                   stop_early: bool | None = None, phase: str = "all") -> dict[str, Verdict]:
    """CA-4 / CA-6: for each group of samples (a task, a depth), ablating ``heads`` (in ``phase``)
    lowers accuracy (:func:`rh.rules.claims.drop_family`: > 0 supports, < ``min_drop`` refutes,
    Holm across groups). Each group's baseline is evaluated in full; the ablation is curtailed
    (:mod:`rh.curtail`; ``stop_early=False`` reads every item)."""
    from rh.curtail import Arm, curtailed, paired_decider
    from rh.prefix import first_layers, hinting
    from rh.rules.claims import drop_bounds, drop_family

    data = {}
    if heads:
        arms = {}
        for g, samples in groups.items():
            ids = [s.id for s in samples]
            if baseline is not None and set(ids) <= set(baseline["id"]):
                base = baseline.set_index("id").loc[ids, "correct"].to_numpy(dtype=float)
            else:
                # the ablated pass starts where the heads do (a decode-phase one from the clean prefill)
                with hinting(model, first_layers([heads]) if phase == "all" else ()):
                    base = evaluate_baseline(model, samples, batch_size=batch_size)["correct"].to_numpy(float)
            arms[g] = Arm(samples, base, Ablation("ablated", tuple(heads), phase=phase))
        after = curtailed(model, arms, paired_decider(bounds=drop_bounds(min_drop), alpha=alpha,
                                                      baseline_floor=baseline_floor),
                          seed=derive_seed(seed, claim), batch_size=batch_size, stop_early=stop_early,
                          what=f"{claim} items")
        data = {g: (arms[g].before, after[g]) for g in arms}
    else:
        data = {g: (np.zeros(0), np.zeros(0)) for g in groups}
    got = drop_family(claim, data, param=param, n_heads=len(heads), min_drop=min_drop, alpha=alpha,
                      baseline_floor=baseline_floor, heads=[str(h) for h in heads])
    return {g: in_phase(v, phase) for g, v in got.items()}


# --------------------------------------------------------------------------- CA-9, CA-10


@dataclass
class CurveOutcomes:
    """CA-9's per-item outcomes over a sweep of K: ``top`` and ``rand`` are ``[n, len(ks)]`` 0/1
    (item i's random set at each K is its own draw), ``base`` ``[n]``."""

    ks: list[int]
    base: np.ndarray
    top: np.ndarray
    rand: np.ndarray
    random_heads: list[list[list[Head]]]  # [K][item]
    phase: str = "all"


def curve_outcomes(model: LoadedModel, samples: Sequence[Sample], ranking: Ranking, ks: Sequence[int], *,
                   baseline: pd.DataFrame | None = None, seed: int = 0, batch_size: int = 8,
                   phase: str = "all", baseline_floor: float | None = None,
                   stop_early: bool | None = None) -> CurveOutcomes:
    """CA-9: every sample with the top K ablated and with its own K random heads from outside the
    top K (seeded by ``seed``, K and the item), at each K of the sweep, in ``phase``: one call to
    the runner (under ``phase="decode"`` every condition of a prompt shares its clean prefill).
    Below ``baseline_floor`` (:func:`floor_decides`) nothing is ablated: ``top`` and ``rand`` are NaN."""
    from rh.budget import stops_early

    ranking.check_shape(model.shape)
    ids = [s.id for s in samples]
    if baseline is None:
        baseline = evaluate_baseline(model, samples, batch_size=batch_size)
    base, _ = _arrays(baseline.set_index("id").loc[ids].reset_index())
    units, sets = [], []
    for k in ks:
        units.append(Unit(Ablation(f"top{k}", tuple(ranking.top(k)), phase=phase, selection="top"), tuple(ids)))
        per_item = [ranking.random_outside_top(k, seed=derive_seed(seed, "CA-9", k, i)) for i in range(len(ids))]
        sets.append(per_item)
        units += [Unit(Ablation(f"random{k}@{i}", tuple(hs), phase=phase, selection="random", draw=i), (ids[i],))
                  for i, hs in enumerate(per_item)]
    if floor_decides(base, baseline_floor, stops_early(stop_early)):
        _floor_saved(model, samples, units)
        nan = np.full((len(ids), len(ks)), np.nan)
        return CurveOutcomes(list(ks), base, nan, nan.copy(), sets, phase)
    frames = run(model, samples, units, batch_size=batch_size)
    top = np.zeros((len(ids), len(ks)))
    rand = np.zeros((len(ids), len(ks)))
    per = 1 + len(ids)
    for j in range(len(ks)):
        top[:, j] = frames[j * per]["correct"].to_numpy(float)
        rand[:, j] = [float(frames[j * per + 1 + i]["correct"].iloc[0]) for i in range(len(ids))]
    return CurveOutcomes(list(ks), base, top, rand, sets, phase)


def minimality_outcomes(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                        batch_size: int = 8, phase: str = "all", baseline_correct: np.ndarray | None = None,
                        baseline_floor: float | None = None, stop_early: bool | None = None,
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CA-10: correctness with ``heads`` ablated, and with each head dropped from the ablated set
    (``{str(head): [n]}``), in ``phase``: one call to the runner. With ``baseline_correct`` below
    ``baseline_floor`` (:func:`floor_decides`) nothing is ablated: every outcome is NaN."""
    from rh.budget import stops_early

    ids = tuple(s.id for s in samples)
    heads = list(heads)
    units = [Unit(Ablation(f"top{len(heads)}", tuple(heads), phase=phase, selection="top"), ids)]
    units += [Unit(Ablation(f"top{len(heads)}-{h}", tuple(x for x in heads if x != h), phase=phase), ids)
              for h in heads]
    if baseline_correct is not None and floor_decides(baseline_correct, baseline_floor, stops_early(stop_early)):
        _floor_saved(model, samples, units)
        return np.full(len(ids), np.nan), {str(h): np.full(len(ids), np.nan) for h in heads}
    frames = run(model, samples, units, batch_size=batch_size)
    return frames[0]["correct"].to_numpy(float), {str(h): df["correct"].to_numpy(float)
                                                  for h, df in zip(heads, frames[1:])}


def head_outputs(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], method: str | None,
                 *, batch_size: int = 8) -> dict[Head, np.ndarray]:
    """The o_proj-input slice of each head (what it writes to the residual stream) at every real
    token of ``samples``, with ``heads`` ablated by ``method`` (None: no ablation), float64."""
    from contextlib import nullcontext

    from rh.batching import make_batches

    d = model.shape.head_dim
    sites = [attn_z(layer) for layer in sorted({h.layer for h in heads})]
    store: dict[Head, list[np.ndarray]] = {h: [] for h in heads}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        mask = batch.attention_mask.bool()
        ctx = ablate(model, heads, method) if method else nullcontext()
        with torch.no_grad(), ctx, recording(model, sites) as seen:
            model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
        for h in heads:
            x = head_slice(seen[attn_z(h.layer)], h.head, d).float().cpu()  # [b, L, d]
            store[h].append(x[mask].double().numpy())
    return {h: np.concatenate(v) for h, v in store.items()}


@dataclass(frozen=True)
class HeadOutputsTask:
    """:func:`head_outputs` as a :class:`rh.runner.Task` (CA-5: three conditions' outputs compared
    with each other, not rows): a value that runs where the model is, a replica on Ray."""

    sample_ids: tuple[str, ...]
    heads: tuple[Head, ...]
    method: str | None
    batch_size: int = 8

    def run(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> dict[Head, np.ndarray]:
        return head_outputs(model, [by_id[i] for i in self.sample_ids], self.heads, self.method,
                            batch_size=self.batch_size)

    def dry(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> tuple[dict[Head, np.ndarray], int]:
        """A dry run's (:mod:`rh.dry`): made-up outputs of the right shape, the forwards' token-layers."""
        from rh.dry import batch_tokens, made_up_array

        samples = [by_id[i] for i in self.sample_ids]
        tokens = sum(batch_tokens(samples, self.batch_size, with_answer=False))
        real = sum(len(s.input_ids) for s in samples)
        out = {h: made_up_array((real, model.shape.head_dim), str(h), self.method) for h in self.heads}
        return out, tokens * model.shape.n_layers


def mechanism_comparison(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head],
                         baseline: pd.DataFrame, *, alpha: float = 0.05, batch_size: int = 8) -> Verdict:
    """CA-5: zeroing a head's query and zeroing its pre-softmax logits are the same intervention
    (uniform attention: the head emits the mean of V over visible keys), and it is not output
    zeroing. Checked exactly on the heads' outputs; accuracy under each mechanism is reported."""
    from rh.stats import mcnemar_exact

    probe = list(samples[: min(4, len(samples))])
    methods = ("query", "logits", "zero")  # tasks of the runner: on Ray, each on a replica
    got = call(model, probe, [HeadOutputsTask(tuple(s.id for s in probe), tuple(heads), m, batch_size)
                              for m in methods])
    out = dict(zip(methods, got))
    scale = max(float(np.abs(v).max()) for v in out["query"].values()) or 1.0
    q_vs_l = max(float(np.abs(out["query"][h] - out["logits"][h]).max()) for h in heads) / scale
    q_vs_z = min(float(np.abs(out["query"][h] - out["zero"][h]).max()) for h in heads) / scale
    eps = float(torch.finfo(next(model.model.parameters()).dtype).eps)
    tol = 8 * eps  # a few roundings of the dtype the model computes in
    acc = {"baseline": float(baseline.set_index("id").loc[[s.id for s in samples], "correct"].mean())}
    correct = {}
    for m in ("zero", "query", "logits"):
        df = run_one(model, samples, Ablation(m, tuple(heads), m), batch_size=batch_size)
        acc[m] = float(df["correct"].mean())
        correct[m] = df["correct"].to_numpy(bool)
    b, c, p_zq = mcnemar_exact(correct["query"], correct["zero"], alternative="two-sided")
    same = q_vs_l <= tol
    differs = q_vs_z > tol
    status = "supported" if same and differs else "refuted"  # an exact identity: no sampling, no power
    why = []
    why.append(f"query vs logits: max |difference| = {q_vs_l:.2e} of the output scale "
               f"({'within' if same else 'beyond'} tolerance {tol:.1e})")
    why.append(f"query vs zero: the least-differing head differs by {q_vs_z:.2e} "
               f"({'so they differ' if differs else 'they do not differ'})")
    return Verdict(
        claim="CA-5", params={"k": len(heads)}, status=status,
        reason="; ".join(why) + "; accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()),
        test="exact comparison of the heads' outputs (o_proj input) under each mechanism", statistic=q_vs_l,
        p_value=None, p_adjusted=None, effect=float(acc["zero"] - acc["query"]), ci=None, n=len(samples), alpha=alpha,
        effect_name="accuracy under query zeroing minus under output zeroing (reported, not tested)",
        details={"accuracy": acc, "query_vs_zero_mcnemar_p": p_zq, "query_vs_logits_rel_diff": q_vs_l,
                 "query_vs_zero_rel_diff_min": q_vs_z, "tolerance": tol, "probe_samples": len(probe)},
        min_effect=tol, power=Power.none("an exact identity checked on the heads' outputs (no sampling, no test "
                                         "with an error rate); the accuracies are reported, not tested"),
    )


def selection_conditions(model: LoadedModel, ranking: Ranking, ks: Sequence[int], *, draws: int = 1, seed: int = 0,
                         bottom: bool = True, baseline: bool = True, method: str = "zero") -> dict[str, Ablation]:
    """Declared conditions for ``rh.evaluate.evaluate_conditions`` (seed 000 §2), by name:
    ``baseline`` (no ablation), then per K ``topK`` (the K best heads), ``randomK#d`` (``draws``
    K-sets drawn from outside the top K, seeded exactly as :func:`necessity_outcomes` draws them)
    and, with ``bottom``, ``bottomK`` (the K lowest-scoring heads: inverse ablation). Each value is
    an :class:`rh.ablation.Ablation` that says its selection, K and draw, which the ablation
    figures read from the results."""
    ranking.check_shape(model.shape)
    if draws < 0:
        raise ValueError(f"draws={draws}: the number of random head sets per K cannot be negative")
    out: dict[str, Ablation] = {"baseline": Ablation.baseline()} if baseline else {}
    for k in ks:
        out[f"top{k}"] = Ablation(f"top{k}", ranking.top(k), method, selection="top")
        for d in range(draws):
            heads = ranking.random_outside_top(k, seed=derive_seed(seed, k, d))
            out[f"random{k}#{d}"] = Ablation(f"random{k}#{d}", heads, method, selection="random", draw=d)
        if bottom:
            out[f"bottom{k}"] = Ablation(f"bottom{k}", ranking.bottom(k), method, selection="bottom")
    return out
