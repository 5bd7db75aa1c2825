"""Identification claims (CLAIMS.md ID-1 ... ID-6): plain functions from rankings, per-sample
scores and captured attention to a :class:`~rh.stats.Verdict`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rh.heads import Head
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking
from rh.scoring import SampleScores, general_heads, score_samples
from rh.stats import (
    Verdict,
    bootstrap_fraction_ci,
    decide,
    holm,
    intersection_null_p,
    ratio_test_greater,
    spearman_ci,
    spearman_test,
    topk_overlap_test,
)


def inconclusive(claim: str, params: dict, reason: str, test: str, alpha: float = 0.05, n: int = 0,
                 details: dict | None = None) -> Verdict:
    """A verdict whose preconditions failed, with the reason (and the sample size and numbers seen so far)."""
    return Verdict(claim, params, "inconclusive", reason, test, None, None, None, None, None, n=n, alpha=alpha,
                   details=details or {})


def sparsity(scored: SampleScores, *, threshold: float = 0.1, max_fraction: float = 0.05, alpha: float = 0.05,
             n_boot: int = 10_000, seed: int = 0) -> Verdict:
    """ID-1: fewer than ``max_fraction`` of heads have a mean Wu24 score above ``threshold``.

    The fraction of heads whose mean over the counted trials exceeds the threshold, with a
    bootstrap CI over trials: supported when the CI's upper bound is below ``max_fraction``,
    refuted when its lower bound is at or above it, inconclusive when the CI straddles it.
    """
    scores = scored.scores[scored.counted].reshape(int(scored.counted.sum()), -1)
    if len(scores) < 5:
        return Verdict("ID-1", {"threshold": threshold}, "inconclusive",
                       f"only {len(scores)} Wu24 trials passed the ROUGE filter; at least 5 are needed for a CI",
                       "bootstrap CI of a fraction", None, None, None, None, None, n=len(scores), alpha=alpha)
    frac = float((scores.mean(axis=0) > threshold).mean())
    lo, hi, p_boot = bootstrap_fraction_ci(scores, threshold, max_fraction, level=1 - 2 * alpha, n_boot=n_boot,
                                           seed=seed)
    if hi < max_fraction:
        status, why = "supported", f"the CI's upper bound {hi:.3f} is below {max_fraction}"
    elif lo >= max_fraction:
        status, why = "refuted", f"the CI's lower bound {lo:.3f} is at or above {max_fraction}"
    else:
        status, why = "inconclusive", f"the CI [{lo:.3f}, {hi:.3f}] straddles {max_fraction}; more trials would decide"
    n_heads = scores.shape[1]
    return Verdict(
        "ID-1", {"threshold": threshold, "max_fraction": max_fraction}, status,
        f"{frac:.1%} of {n_heads} heads ({round(frac * n_heads)}) have a mean Wu24 score > {threshold}; {why}",
        f"bootstrap over {len(scores)} counted trials (one-sided {1 - alpha:.0%} bound)", frac, p_boot, p_boot,
        frac - max_fraction, (lo, hi), ci_level=1 - 2 * alpha, n=len(scores), alpha=alpha,
        effect_name=f"fraction of heads with score > {threshold}, minus {max_fraction}",
        details={"fraction": frac, "n_heads_above": int(round(frac * n_heads)), "n_heads": n_heads,
                 "top_scores": sorted(scores.mean(axis=0).tolist(), reverse=True)[:10]},
    )


def needle_mass_ratios(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                       batch_size: int = 8) -> np.ndarray:
    """Per sample, the top heads' mean attention per needle token over the uniform share 1/L
    (the last prompt token's row; L = visible keys): ``[n_samples]``, mean over ``heads``."""
    mass = score_samples(model, samples, "sum_attention", batch_size=batch_size, progress=False).scores
    layers = [h.layer for h in heads]
    idx = [h.head for h in heads]
    per_token = np.array([(s.needle_span[1] - s.needle_span[0]) / len(s.input_ids) for s in samples])
    return mass[:, layers, idx].mean(axis=1) / per_token


def needle_spike(ratios: np.ndarray, *, k: int, min_ratio: float = 10.0, alpha: float = 0.05) -> Verdict:
    """ID-2: the top-K heads put at least ``min_ratio`` times the uniform mass per token on the needle."""
    from rh.stats import min_attainable_p_wilcoxon

    if min_attainable_p_wilcoxon(len(ratios)) >= alpha:
        return inconclusive("ID-2", {"k": k, "min_ratio": min_ratio},
                            f"{len(ratios)} prompts cannot reach p < {alpha} with a signed-rank test; use more",
                            "one-sided Wilcoxon signed-rank", alpha)
    med, p = ratio_test_greater(ratios, min_ratio)
    status, why = decide(p, float(np.log(med / min_ratio)), alpha)
    return Verdict(
        "ID-2", {"k": k, "min_ratio": min_ratio}, status,
        f"median over {len(ratios)} validation prompts: the top-{k} heads put {med:.1f}x the uniform mass per "
        f"token on the needle (need >= {min_ratio:g}x); {why}",
        "one-sided Wilcoxon signed-rank on log(ratio) - log(threshold)", med, p, p,
        float(np.log(med / min_ratio)), None, n=len(ratios), alpha=alpha,
        effect_name=f"log(median ratio / {min_ratio:g})",
        details={"ratios": [round(float(r), 2) for r in ratios], "median_ratio": med},
    )


def _overlap_verdict(claim: str, params: dict, a: Ranking, b: Ranking, k: int, alpha: float, what: str,
                     p_adjusted: float | None = None) -> Verdict:
    """Top-K overlap against the hypergeometric null, with Spearman's rho of all heads' scores."""
    heads = a.shape.all_heads()
    overlap, expected, p = topk_overlap_test(a.top(k), b.top(k), a.shape.n_total)
    x = [a.scores[h] for h in heads]
    y = [b.scores[h] for h in heads]
    rho, p_rho = spearman_test(x, y)
    ci = spearman_ci(x, y, level=0.95, n_boot=2000, seed=0)
    p_adj = p if p_adjusted is None else p_adjusted
    status, why = decide(p_adj, overlap - expected, alpha)
    return Verdict(
        claim, params, status,
        f"{what}: {overlap} of the top {k} heads are shared (chance: {expected:.2f}); Spearman rho over all "
        f"{len(heads)} heads = {rho:.2f}; {why}",
        "one-sided hypergeometric test of the top-K overlap", float(overlap), p, p_adj, float(overlap - expected),
        None, n=len(heads), alpha=alpha, effect_name="top-K overlap minus its chance expectation",
        details={"overlap": overlap, "expected": expected, "spearman_rho": rho, "spearman_p": p_rho,
                 "spearman_ci": list(ci), "shared": [str(h) for h in a.top(k) if h in set(b.top(k))],
                 "top_a": [str(h) for h in a.top(k)], "top_b": [str(h) for h in b.top(k)]},
    )


def stability(pairs: Mapping[str, tuple[Ranking, Ranking, str, str]], *, k: int,
              alpha: float = 0.05) -> dict[str, Verdict]:
    """ID-3: rankings from two settings of one axis share their top heads (a verdict per axis,
    Holm across axes). ``pairs[axis] = (ranking_a, ranking_b, label_a, label_b)``."""
    ps = {axis: topk_overlap_test(a.top(k), b.top(k), a.shape.n_total)[2] for axis, (a, b, _, _) in pairs.items()}
    adj = dict(zip(ps, holm(list(ps.values()))))
    return {axis: _overlap_verdict("ID-3", {"axis": axis, "k": k}, a, b, k, alpha, f"{la} vs {lb}",
                                   p_adjusted=adj[axis])
            for axis, (a, b, la, lb) in pairs.items()}


def methods_agree(sum_rank: Ranking, wu24_rank: Ranking, *, k: int, alpha: float = 0.05) -> Verdict:
    """ID-4: sum attention and the Wu24 score find the same top heads (beyond chance)."""
    return _overlap_verdict("ID-4", {"k": k}, sum_rank, wu24_rank, k, alpha, "sum attention vs Wu24")


def general_heads_exist(rankings: Mapping[str, Ranking], *, k: int, alpha: float = 0.05) -> Verdict:
    """ID-5: the intersection of the per-task top-K sets is larger than for independent random sets."""
    tasks = sorted(rankings)
    n_total = next(iter(rankings.values())).shape.n_total
    if len(tasks) < 2:
        return Verdict("ID-5", {"k": k}, "inconclusive", f"general heads need at least two tasks, got {tasks}",
                       "intersection null", None, None, None, None, None, alpha=alpha)
    gen = general_heads(dict(rankings), k)
    observed, expected, p = intersection_null_p([set(rankings[t].top(k)) for t in tasks], n_total, seed=0)
    status, why = decide(p, observed - expected, alpha)
    return Verdict(
        "ID-5", {"k": k, "tasks": len(tasks)}, status,
        f"{observed} heads are in the top {k} of all {len(tasks)} tasks ({', '.join(tasks)}): "
        f"{', '.join(map(str, gen)) or 'none'}; chance expects {expected:.3g}; {why}",
        "intersection size against independent uniformly random top-K sets", float(observed), p, p,
        float(observed - expected), None, n=len(tasks), alpha=alpha,
        effect_name="intersection size minus its chance expectation",
        details={"general_heads": [str(h) for h in gen], "expected": expected,
                 "per_task_top": {t: [str(h) for h in rankings[t].top(k)] for t in tasks}},
    )


def variants_share_heads(a: Ranking | None, b: Ranking | None, *, k: int, alpha: float = 0.05,
                         names: tuple[str, str] = ("base", "instruct")) -> Verdict:
    """ID-6: base and instruct variants share retrieval heads; inconclusive with one variant."""
    if a is None or b is None:
        return Verdict("ID-6", {"k": k}, "inconclusive",
                       "only one variant was run: pass --compare-model with the other variant (e.g. llama8b-base "
                       "with llama8b) to decide this claim", "hypergeometric top-K overlap",
                       None, None, None, None, None, alpha=alpha)
    if (a.shape.n_layers, a.shape.n_heads) != (b.shape.n_layers, b.shape.n_heads):
        return Verdict("ID-6", {"k": k}, "inconclusive",
                       f"the two models differ in shape ({a.shape.n_layers}x{a.shape.n_heads} vs "
                       f"{b.shape.n_layers}x{b.shape.n_heads}): they are not variants of one model",
                       "hypergeometric top-K overlap", None, None, None, None, None, alpha=alpha)
    return _overlap_verdict("ID-6", {"k": k}, a, b, k, alpha, f"{names[0]} vs {names[1]}")
