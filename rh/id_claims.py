"""Identification claims (CLAIMS.md ID-1 ... ID-6): plain functions from rankings, per-sample
scores and captured attention to a :class:`~rh.rules.verdict.Verdict`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rh.heads import Head, HeadShape
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking
from rh.scoring import SampleScores, general_heads, score_samples
from rh.rules.verdict import Power, Verdict
from rh.stats import spearman_ci, spearman_test, topk_overlap_test

if TYPE_CHECKING:
    import pandas as pd


def inconclusive(claim: str, params: dict, reason: str, test: str, alpha: float = 0.05, n: int = 0,
                 details: dict | None = None, **kw) -> Verdict:
    """A verdict whose preconditions failed, with the reason: :func:`rh.rules.claims.inconclusive`."""
    from rh.rules.claims import inconclusive as make

    return make(claim, params, reason, test, alpha, n, details, **kw)


def sparsity(scored: SampleScores, *, threshold: float = 0.1, max_fraction: float = 0.05, alpha: float = 0.05,
             n_boot: int = 10_000, seed: int = 0) -> Verdict:
    """ID-1: fewer than ``max_fraction`` of heads have a mean Wu24 score above ``threshold``
    (:func:`rh.rules.claims.sparsity_rule`: simultaneous per-head bounds on the count; ``n_boot`` and
    ``seed`` are kept for callers and unused)."""
    scores = scored.scores[scored.counted].reshape(int(scored.counted.sum()), -1)
    if len(scores) < 5:
        return inconclusive("ID-1", {"threshold": threshold},
                            f"only {len(scores)} Wu24 trials passed the ROUGE filter; at least 5 are needed for a CI",
                            "bootstrap CI of a fraction", alpha, len(scores), min_effect=max_fraction)
    from rh.rules.claims import sparsity_rule

    return sparsity_rule(scores, threshold=threshold, max_fraction=max_fraction, alpha=alpha)


def needle_mass_ratios(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                       batch_size: int = 8) -> np.ndarray:
    """Per sample, the top heads' mean attention per needle token over the uniform share 1/L
    (the last prompt token's row; L = visible keys): ``[n_samples]``, mean over ``heads``."""
    mass = score_samples(model, samples, "sum_attention", batch_size=batch_size, progress=False,
                         through_layer=max(h.layer for h in heads) if heads else None).scores
    layers = [h.layer for h in heads]
    idx = [h.head for h in heads]
    per_token = np.array([(s.needle_span[1] - s.needle_span[0]) / len(s.input_ids) for s in samples])
    return mass[:, layers, idx].mean(axis=1) / per_token


def needle_mass_per_head(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                         batch_size: int = 8) -> np.ndarray:
    """Per sample and head, the head's attention per needle token over the uniform share:
    ``[n_samples, len(heads)]`` (the columns :func:`needle_mass_ratios` averages)."""
    mass = score_samples(model, samples, "sum_attention", batch_size=batch_size, progress=False,
                         through_layer=max(h.layer for h in heads) if heads else None).scores
    per_token = np.array([(s.needle_span[1] - s.needle_span[0]) / len(s.input_ids) for s in samples])
    return mass[:, [h.layer for h in heads], [h.head for h in heads]] / per_token[:, None]


@contextlib.contextmanager
def needle_mass_reading(model: LoadedModel, heads: Sequence[Head]) -> Iterator[dict[str, np.ndarray]]:
    """Within the block, every teacher-forced forward (:func:`rh.evaluate.score_batch`: prompt +
    answer but its last token, rows left-padded to end together) records, per prompt, each head's
    needle-mass ratio: what :func:`needle_mass_per_head` computes, ``{sample id: [len(heads)]}``.

    The row read is the prompt's last token (position ``pad + len(input_ids) - 1`` of its batch
    row), the query row :func:`needle_mass_per_head` reads at the end of a prompt-only pass: under
    causal attention the answer tokens after it change nothing in it or in anything it attends to,
    and left padding gives every real token its own position (``rh.batching``). The needle span
    is shifted by the row's padding in this batch, and the uniform share is 1 / the prompt's
    length (the keys that row sees). Only the heads' layers are read
    (:func:`rh.attention.reading_rows`)."""
    from functools import partial

    from rh.attention import reading_rows
    from rh.batching import last_prompt_positions, running_batch

    out: dict[str, np.ndarray] = {}
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for j, h in enumerate(heads):
        by_layer.setdefault(h.layer, []).append((j, h.head))
    positions = partial(last_prompt_positions, who="needle_mass_reading")

    def reduce(layer: int, probs) -> None:
        batch = running_batch(probs.shape[-1], "needle_mass_reading")
        for r, s in enumerate(batch.samples):
            a, b = batch.needle_span(r)
            per_token = (s.needle_span[1] - s.needle_span[0]) / len(s.input_ids)
            row = out.setdefault(s.id, np.full(len(heads), np.nan))
            for j, head in by_layer[layer]:
                row[j] = float(probs[r, head, a:b].sum()) / per_token

    if not heads:
        yield out
        return
    with reading_rows(model, sorted(by_layer), positions, reduce):
        yield out


@dataclass(frozen=True)
class NeedleMass:
    """ID-5's capture: per task, each candidate head's needle-mass ratio on each validation
    prompt (``ratios[task]``: ``[n_prompts, len(heads)]``, rows in the order of ``ids[task]``),
    as :func:`needle_mass_per_head` computes it."""

    heads: tuple[Head, ...]
    ratios: Mapping[str, np.ndarray]
    ids: Mapping[str, tuple[str, ...]]

    def check(self, heads: Sequence[Head], validation: Mapping[str, Sequence[Sample]]) -> None:
        """Refuse a capture of other heads or other prompts than ID-5 tests."""
        if tuple(heads) != self.heads:
            raise ValueError(f"the needle mass was read for heads {[str(h) for h in self.heads]}, not for ID-5's "
                             f"candidates {[str(h) for h in heads]}")
        for t, samples in validation.items():
            if tuple(s.id for s in samples) != tuple(self.ids.get(t, ())):
                raise ValueError(f"the needle mass of task {t!r} was read on other prompts than its validation set")


class TaskBaselines(dict):
    """Each task's unablated outcome frame (a dict ``{task: DataFrame}``), plus ``needle_mass``:
    ID-5's capture read from the same forwards (:func:`task_baselines`), or None where ID-5 has no
    candidate heads."""

    needle_mass: NeedleMass | None = None


def id5_candidates(rankings: Mapping[str, Ranking], k: int) -> list[Head]:
    """The heads ID-5 tests: those in every task's top ``k`` (none with fewer than two tasks)."""
    return general_heads(dict(rankings), k) if len(rankings) >= 2 else []


@dataclass(frozen=True)
class NeedleMassReading:
    """The needle mass of ``heads`` as a :class:`rh.runner.Reading` (ID-2's and ID-5's): the value
    that travels to a replica with a baseline's packets and opens :func:`needle_mass_reading` there."""

    heads: tuple[Head, ...]
    #: bump when what a row's values mean changes (stored values of another version are not served)
    version: int = 1

    @property
    def width(self) -> int:
        return len(self.heads)

    def key(self) -> str:
        return f"needle_mass/v{self.version}:" + ",".join(str(h) for h in self.heads)

    def open(self, model: LoadedModel) -> contextlib.AbstractContextManager[dict[str, np.ndarray]]:
        return needle_mass_reading(model, self.heads)


def read_needle_mass(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                     batch_size: int = 8) -> tuple[pd.DataFrame, np.ndarray]:
    """The unablated outcomes of ``samples`` (the baseline unit: the forwards
    :func:`rh.causal.evaluate_baseline` runs) and, read in those very forwards
    (:class:`NeedleMassReading`, :meth:`rh.runner.Runner.read`), each head's needle mass ratio per
    sample, ``[len(samples), len(heads)]``: what :func:`needle_mass_per_head` computes, with no pass
    of its own. Where the rows and the reading are in the runner's store (a baseline that read them,
    a resumed run) nothing runs; on Ray replicas they are read there."""
    from rh.ablation import Ablation
    from rh.runner import read_one

    if not heads:
        raise ValueError("read_needle_mass: no heads to read; pass the heads whose needle mass is wanted")
    frame, got = read_one(model, samples, Ablation.baseline(), NeedleMassReading(tuple(heads)), batch_size=batch_size)
    ratios = np.array([got[s.id] for s in samples], dtype=float).reshape(len(samples), len(heads))
    missed = [s.id for s, row in zip(samples, ratios) if np.isnan(row).any()]
    if missed:
        raise RuntimeError(f"the baselines' forwards did not show the needle mass of prompts {missed[:5]}")
    return frame, ratios


def task_baselines(model: LoadedModel, validation: Mapping[str, Sequence[Sample]], rankings: Mapping[str, Ranking],
                   *, k: int, batch_size: int = 8) -> TaskBaselines:
    """Each task's unablated outcomes on its validation prompts (one runner call a task) and, read
    in those very forwards (:func:`read_needle_mass`), the needle mass of ID-5's candidates, so
    that ID-5 runs no pass of its own: in this process, on Ray replicas, or from the store of a
    resumed run (the values are stored beside the rows)."""
    from rh.causal import evaluate_baseline

    heads = id5_candidates(rankings, k)
    out = TaskBaselines()
    if not heads:
        out.update({t: evaluate_baseline(model, samples, batch_size=batch_size) for t, samples in validation.items()})
        return out
    ratios = {}
    for t, samples in validation.items():
        out[t], ratios[t] = read_needle_mass(model, samples, heads, batch_size=batch_size)
    ids = {t: tuple(s.id for s in samples) for t, samples in validation.items()}
    out.needle_mass = NeedleMass(tuple(heads), ratios, ids)
    return out


def needle_spike(ratios: np.ndarray, *, k: int, min_ratio: float = 10.0, alpha: float = 0.05,
                 baseline_accuracy: float | None = None, baseline_floor: float = 0.0) -> Verdict:
    """ID-2: the top-K heads put at least ``min_ratio`` times the uniform mass per token on the
    needle (supported: shown above; refuted: shown below; :func:`rh.rules.claims.ratio_rule`)."""
    from rh.rules.claims import floor_reason, ratio_power, ratio_rule

    params = {"k": k, "min_ratio": min_ratio}
    test = "one-sided exact sign tests of the median ratio against min_ratio, both directions"
    floor = floor_reason(baseline_accuracy, baseline_floor) if baseline_floor > 0 else None
    if floor:
        return inconclusive("ID-2", params, floor, test, alpha, len(ratios), min_effect=min_ratio,
                            power=ratio_power(ratios, support_ratio=min_ratio, refute_ratio=min_ratio, alpha=alpha))
    return ratio_rule("ID-2", ratios, support_ratio=min_ratio, refute_ratio=min_ratio, alpha=alpha, params=params,
                      test=test, effect_name=f"log(median ratio), against log({min_ratio:g})",
                      describe=f"the top-{k} heads' mass per needle token over the uniform share")


def _overlap_verdict(claim: str, params: dict, a: Ranking, b: Ranking, k: int, alpha: float, what: str,
                     p_adjusted: float | None = None, population: str | None = None,
                     details: dict | None = None) -> Verdict:
    """Top-K overlap against the hypergeometric null, with Spearman's rho of all heads' scores.
    Supported when the overlap beats chance; never refuted (a uniform null cannot show that two
    rankings disagree), so otherwise inconclusive. ``population`` names the heads both rankings
    score when they are not all of a model's (default: "all N heads"); ``details`` are added."""
    heads = a.shape.all_heads()
    population = population or f"all {len(heads)} heads"
    overlap, expected, p = topk_overlap_test(a.top(k), b.top(k), a.shape.n_total)
    x = [a.scores[h] for h in heads]
    y = [b.scores[h] for h in heads]
    rho, p_rho = spearman_test(x, y)
    ci = spearman_ci(x, y, level=0.95, n_boot=2000, seed=0)
    p_adj = p if p_adjusted is None else p_adjusted
    status = "supported" if p_adj < alpha and overlap > expected else "inconclusive"
    why = (f"adjusted p = {p_adj:.3g} < {alpha}" if status == "supported" else
           f"adjusted p = {p_adj:.3g}: not shown, and a uniform null cannot show disagreement")
    return Verdict(
        claim=claim, params=params, status=status,
        reason=f"{what}: {overlap} of the top {k} heads are shared (chance: {expected:.2f}); Spearman rho over "
        f"{population} = {rho:.2f}; {why}",
        test="one-sided hypergeometric test of the top-K overlap", statistic=float(overlap), p_value=p,
        p_adjusted=p_adj, effect=float(overlap - expected), ci=None, n=len(heads), alpha=alpha,
        effect_name="top-K overlap minus its chance expectation",
        details={"overlap": overlap, "expected": expected, "spearman_rho": rho, "spearman_p": p_rho,
                 "spearman_ci": list(ci), "shared": [str(h) for h in a.top(k) if h in set(b.top(k))],
                 "top_a": [str(h) for h in a.top(k)], "top_b": [str(h) for h in b.top(k)], **(details or {})},
        min_effect=None, power=_overlap_power(len(a.top(k)), len(b.top(k)), a.shape.n_total, alpha,
                                              p_adj / p if p > 0 else 1.0),
    )


def _overlap_power(ka: int, kb: int, n_total: int, alpha: float, factor: float = 1.0) -> Power:
    """:func:`_overlap_verdict`'s power. The rule reads the two rankings as they are (no per-prompt
    scores, no resampling), so its decision is a function of the overlap: it supports exactly when
    at least o* of the top K are shared (o* the smallest overlap above chance whose hypergeometric
    p, times the family's adjustment ``factor``, is below α): power 1 from an effect of o* minus
    chance on, 0 below it. It never refutes (a uniform null cannot show disagreement): power 0."""
    from scipy.stats import hypergeom

    expected = ka * kb / n_total
    crit = next((o for o in range(int(math.floor(expected)) + 1, min(ka, kb) + 1)
                 if o > expected and factor * float(hypergeom.sf(o - 1, n_total, ka, kb)) < alpha), None)
    never = "never refuted: a uniform null cannot show that two rankings disagree"
    if crit is None:
        return Power(0.0, min(ka, kb) - expected, 0.0, 0.0, "exact (hypergeometric)",
                     f"even all {min(ka, kb)} shared cannot reach p < {alpha:g}: never supported; {never}")
    return Power(1.0, crit - expected, 0.0, 0.0, "exact (hypergeometric; the rankings taken as fixed)",
                 f"supported exactly when {crit} or more of the top {min(ka, kb)} are shared; {never}")


def stability(pairs: Mapping[str, tuple], *, k: int, min_effect: float, alpha: float = 0.05,
              baseline_accuracy: float | None = None, baseline_floor: float = 0.5, n_boot: int = 400,
              seed: int = 0) -> dict[str, Verdict]:
    """ID-3: rankings from two settings of one axis share their top K within Δ heads
    (:func:`rh.rules.claims.agreement`, its bands Bonferroni-corrected across the axes).
    ``pairs[axis] = (scores_a, scores_b, label_a, label_b)`` with per-prompt scores ``[n, L, H]``."""
    from rh.rules.claims import agreement

    return {axis: agreement("ID-3", a, b, k=k, min_effect=min_effect, same_prompts=False, alpha=alpha, n_boot=n_boot,
                            seed=seed, params={"axis": axis, "k": k}, what=f"{la} vs {lb}",
                            baseline_accuracy=baseline_accuracy, baseline_floor=baseline_floor, family=len(pairs))
            for axis, (a, b, la, lb) in pairs.items()}


def methods_agree(sum_scores: np.ndarray, wu24_scores: np.ndarray, wu24_counted: np.ndarray, *, k: int,
                  min_effect: float, alpha: float = 0.05, baseline_accuracy: float | None = None,
                  baseline_floor: float = 0.5, n_boot: int = 400, seed: int = 0) -> Verdict:
    """ID-4: sum attention and the Wu24 score find the same top heads as well as each finds its own
    on other prompts (same prompts for both; Wu24's trials that fail the ROUGE filter do not count)."""
    from rh.rules.claims import agreement

    w = np.asarray(wu24_counted, float).reshape(len(wu24_scores), -1).mean(axis=1) > 0
    return agreement("ID-4", sum_scores, wu24_scores, k=k, min_effect=min_effect, same_prompts=True,
                     weights_b=w.astype(float), alpha=alpha, n_boot=n_boot, seed=seed, params={"k": k},
                     what="sum attention vs Wu24", baseline_accuracy=baseline_accuracy, baseline_floor=baseline_floor)


def general_heads_exist(model: LoadedModel, rankings: Mapping[str, Ranking], validation: Mapping[str, Sequence[Sample]],
                        *, k: int, ratio: float = 10.0, alpha: float = 0.05,
                        accuracy: Mapping[str, float] | None = None, baseline_floor: float = 0.5,
                        batch_size: int = 8, needle_mass: NeedleMass | None = None) -> Verdict:
    """ID-5: heads in every task's top K (on the identification split) that retrieve in every task,
    tested per head on each task's fresh validation prompts (:func:`rh.rules.claims.general_heads_rule`).

    ``needle_mass``: the candidates' needle mass already read on those prompts (by
    :func:`task_baselines`, beside the baseline's forwards); without it, a pass over each task's
    prompts captures it (:func:`needle_mass_per_head`)."""
    from rh.rules.claims import general_heads_rule

    cands = id5_candidates(rankings, k)
    low = accuracy is None or any(a < baseline_floor for a in accuracy.values())
    if needle_mass is not None and cands:
        needle_mass.check(cands, {t: validation[t] for t in sorted(rankings)})
        ratios = {t: np.asarray(needle_mass.ratios[t]) for t in sorted(rankings)}
    else:
        ratios = {t: (needle_mass_per_head(model, validation[t], cands, batch_size=batch_size) if cands and not low
                      else np.zeros((len(validation[t]), len(cands)))) for t in sorted(rankings)}
    return general_heads_rule(ratios, [str(h) for h in cands], ratio=ratio, alpha=alpha, accuracy=accuracy,
                              baseline_floor=baseline_floor, k=k,
                              extra_details={"per_task_top": {t: [str(h) for h in rankings[t].top(k)] for t in rankings}})


def variants_share_heads(a: Ranking | None, b: Ranking | None, *, k: int, alpha: float = 0.05,
                         names: tuple[str, str] = ("base", "instruct")) -> Verdict:
    """ID-6: base and instruct variants share retrieval heads; inconclusive with one variant.

    Two models of different shapes are compared on the heads both have (layers below the smaller
    layer count, heads below the smaller head count): each ranking's order restricted to those
    heads (:meth:`~rh.rankings.Ranking.restricted`), the same top-K overlap test over that
    population. Fewer than 2K shared heads leave it inconclusive: two top-K sets of them would have
    to overlap, whatever the models do."""
    test = "hypergeometric top-K overlap"
    if a is None or b is None:
        return inconclusive("ID-6", {"k": k}, "only one variant was run: pass --compare-model with the other variant "
                            "(e.g. llama8b-base with llama8b) to decide this claim", test, alpha,
                            power=Power.none("one variant only: there is no second ranking to compare"))
    sa, sb = a.shape, b.shape
    what = f"{names[0]} vs {names[1]}"
    if (sa.n_layers, sa.n_heads) == (sb.n_layers, sb.n_heads):
        return _overlap_verdict("ID-6", {"k": k}, a, b, k, alpha, what)
    shared = HeadShape(min(sa.n_layers, sb.n_layers), min(sa.n_heads, sb.n_heads),
                       min(sa.n_heads, sb.n_heads), 0)  # a grid of heads only: KV heads and head_dim do not apply
    shapes = f"{names[0]} {sa.n_layers} layers x {sa.n_heads} heads, {names[1]} {sb.n_layers} x {sb.n_heads}"
    span = lambda n, what: f"{what} 0" if n == 1 else f"{what}s 0-{n - 1}"  # noqa: E731
    grid = f"{span(shared.n_layers, 'layer')} x {span(shared.n_heads, 'head')}"
    info = {"heads_compared": {"scope": "shared heads", "n": shared.n_total, "n_layers": shared.n_layers,
                               "n_heads": shared.n_heads, "models": list(names),
                               "shapes": [[sa.n_layers, sa.n_heads], [sb.n_layers, sb.n_heads]]}}
    if shared.n_total < 2 * k:
        return inconclusive("ID-6", {"k": k}, f"the two models differ in shape ({shapes}) and share only "
                            f"{shared.n_total} heads ({grid}): fewer than 2K = {2 * k}, so any two top-{k} sets of "
                            "them overlap; compare with a smaller K or models of closer shapes", test, alpha,
                            shared.n_total, info, power=Power(0.0, None, 0.0, None, "exact", "fewer than 2K shared "
                                                              "heads: the rule decides nothing, whatever the rankings"))
    return _overlap_verdict("ID-6", {"k": k}, a.restricted(shared), b.restricted(shared), k, alpha,
                            f"{what}, on the {shared.n_total} heads both models have ({grid}; the shapes differ: "
                            f"{shapes})", population=f"the {shared.n_total} shared heads", details=info)
