"""Causal necessity (claim CA-1): ablate the top-K heads of a ranking and, as the control, K heads
drawn at random from outside the top K; compare retrieval on the same validation samples.

Outcomes are gathered once per K (:func:`necessity_outcomes`) and turned into one Holm-corrected
family of verdicts (:func:`necessity_verdicts`), so a parametrized claim reads its own K's verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rh.ablation import ablate
from rh.evaluate import teacher_forced
from rh.heads import Head
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking
from rh.stats import (
    Verdict,
    bootstrap_ci,
    decide,
    headset_null_p,
    holm,
    min_attainable_p_sign,
    sign_test_greater,
)

log = logging.getLogger(__name__)

TEST_NAME = "exact one-sided sign test on paired per-sample accuracy (random-K minus top-K), Holm across K"


@dataclass
class NecessityOutcomes:
    """Per-sample outcomes for one K: ``*_correct`` are 0/1, ``*_logprob`` the answer log-prob.
    ``random_*`` have one row per random draw."""

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


def _arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return df["correct"].to_numpy(dtype=float), df["logprob"].to_numpy(dtype=float)


def evaluate_baseline(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8) -> pd.DataFrame:
    return teacher_forced(model, samples, condition="baseline", batch_size=batch_size)


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
) -> NecessityOutcomes:
    """Evaluate ``samples`` with no ablation, with the top-``k`` heads ablated, and with ``draws``
    random ``k``-sets from outside the top ``k`` (seeded by ``seed``, ``k`` and the draw index)."""
    ranking.check_shape(model.shape)
    if draws < 1:
        raise ValueError(f"draws={draws}: need at least one random head set as the control")
    top = ranking.top(k)
    rand_sets = [ranking.random_outside_top(k, seed=hash_seed(seed, k, d)) for d in range(draws)]
    if baseline is None:
        baseline = evaluate_baseline(model, samples, batch_size=batch_size)
    frames = [baseline]
    with ablate(model, top):
        frames.append(teacher_forced(model, samples, condition=f"top{k}", batch_size=batch_size))
    for d, heads in enumerate(tqdm(rand_sets, desc=f"random K={k}", unit="draw", leave=False)):
        with ablate(model, heads):
            frames.append(teacher_forced(model, samples, condition=f"random{k}#{d}", batch_size=batch_size))
    bc, bl = _arrays(frames[0])
    tc, tl = _arrays(frames[1])
    rc = np.stack([_arrays(f)[0] for f in frames[2:]])
    rl = np.stack([_arrays(f)[1] for f in frames[2:]])
    return NecessityOutcomes(k, top, rand_sets, bc, bl, tc, tl, rc, rl, pd.concat(frames, ignore_index=True))


def hash_seed(*parts: int) -> int:
    """A stable seed from integers (Python's ``hash`` of ints is stable, but spell it out)."""
    out = 0
    for p in parts:
        out = (out * 1_000_003 + int(p)) % (2**63 - 1)
    return out


def necessity_verdicts(
    outcomes: Sequence[NecessityOutcomes],
    *,
    alpha: float = 0.05,
    baseline_floor: float = 0.5,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[int, Verdict]:
    """One CA-1 verdict per K, Holm-corrected across the K levels.

    Per sample, d = (mean correctness over the random draws) - (correctness with the top K
    ablated); the exact one-sided sign test asks whether d > 0 more often than chance. The effect
    is the mean of d — the top-K accuracy drop minus the random-K drop — with a bootstrap CI over
    samples. Preconditions (else inconclusive): baseline accuracy >= ``baseline_floor``, and
    enough samples that the smallest reachable p could pass Holm's strictest threshold. The
    head-set null p (the top-K drop ranked among the random draws' drops) is reported beside it.
    """
    if not outcomes:
        raise ValueError("no ablation levels given")
    m = len(outcomes)
    rows = []
    for o in outcomes:
        n = len(o.top_correct)
        d = o.random_correct.mean(axis=0) - o.top_correct
        n_pos, n_neg, p = sign_test_greater(d)
        effect = float(d.mean())
        ci = bootstrap_ci(d, n_boot=n_boot, seed=hash_seed(seed, o.k))
        base_acc = float(o.baseline_correct.mean())
        top_drop = base_acc - float(o.top_correct.mean())
        rand_drops = base_acc - o.random_correct.mean(axis=1)
        lp_d = o.random_logprob.mean(axis=0) - o.top_logprob
        details = {
            "baseline_accuracy": base_acc,
            "top_accuracy": float(o.top_correct.mean()),
            "random_accuracy": float(o.random_correct.mean()),
            "random_accuracy_per_draw": o.random_correct.mean(axis=1).tolist(),
            "top_drop": top_drop,
            "random_drop_mean": float(rand_drops.mean()),
            "samples_top_worse": n_pos,
            "samples_top_better": n_neg,
            "headset_null_p": headset_null_p(top_drop, rand_drops),
            "draws": int(o.random_correct.shape[0]),
            "logprob_drop_gap_mean": float(lp_d.mean()),
            "logprob_sign_test_p": sign_test_greater(lp_d)[2],
            "top_heads": [str(h) for h in o.top_heads],
        }
        rows.append((o, n, n_pos, p, effect, ci, base_acc, details))

    # Holm over the levels whose preconditions hold; the others are inconclusive.
    reasons: dict[int, str] = {}
    for o, n, _, _, _, _, base_acc, _ in rows:
        if base_acc < baseline_floor:
            reasons[o.k] = (
                f"baseline accuracy {base_acc:.2f} is below the floor {baseline_floor:.2f}: "
                "a drop cannot be shown on a task the model does not do"
            )
        elif min_attainable_p_sign(n) > alpha / m:
            reasons[o.k] = (
                f"only {n} validation samples: the smallest reachable p ({min_attainable_p_sign(n):.3g}) "
                f"cannot pass Holm's threshold alpha/{m} = {alpha / m:.3g}; use more samples"
            )
    testable = [r for r in rows if r[0].k not in reasons]
    adjusted = dict(zip([r[0].k for r in testable], holm([r[3] for r in testable]))) if testable else {}

    verdicts = {}
    for o, n, n_pos, p, effect, ci, base_acc, details in rows:
        if o.k in reasons:
            status, reason, p_adj = "inconclusive", reasons[o.k], None
        else:
            p_adj = adjusted[o.k]
            status, why = decide(p_adj, effect, alpha)
            reason = (
                f"top-{o.k} ablation: accuracy {base_acc:.2f} -> {details['top_accuracy']:.2f}; "
                f"random-{o.k} (mean of {details['draws']} draws): -> {details['random_accuracy']:.2f}; "
                f"{why}"
            )
        verdicts[o.k] = Verdict(
            claim="CA-1", params={"k": o.k}, status=status, reason=reason, test=TEST_NAME,
            statistic=float(n_pos), p_value=p, p_adjusted=p_adj, effect=effect, ci=ci, n=n, alpha=alpha,
            effect_name="accuracy drop of top-K minus that of random-K (mean over draws)", details=details,
        )
    return verdicts
