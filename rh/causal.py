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
import torch
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

TEST_NAME = ("head-set null (top-K drop ranked among random K-sets) and exact one-sided sign test on paired "
             "per-sample accuracy, the larger p Holm-corrected across K")


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
        n_pos, n_neg, p_sign = sign_test_greater(d)
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
            "sign_test_p": p_sign,
            "draws": int(o.random_correct.shape[0]),
            "logprob_drop_gap_mean": float(lp_d.mean()),
            "logprob_sign_test_p": sign_test_greater(lp_d)[2],
            "top_heads": [str(h) for h in o.top_heads],
        }
        # Both must hold: the samples say top-K hurts more than the random sets on average (sign test),
        # and the top-K set is an outlier among random K-sets (head-set null). The sign test alone treats
        # the random sets as fixed and passes for any harmful set, so a shuffled ranking would pass it
        # far more often than alpha (tests/test_calibration.py measures this).
        p = max(p_sign, details["headset_null_p"])
        rows.append((o, n, n_pos, p, effect, ci, base_acc, details))

    # Holm over the levels whose preconditions hold; the others are inconclusive.
    reasons: dict[int, str] = {}
    for o, n, _, _, _, _, base_acc, _ in rows:
        if base_acc < baseline_floor:
            reasons[o.k] = (
                f"baseline accuracy {base_acc:.2f} is below the floor {baseline_floor:.2f}: "
                "a drop cannot be shown on a task the model does not do"
            )
        elif min_attainable_p_sign(n) >= alpha / m:
            reasons[o.k] = (
                f"only {n} validation samples: the smallest reachable p ({min_attainable_p_sign(n):.3g}) "
                f"cannot pass Holm's threshold alpha/{m} = {alpha / m:.3g}; use more samples"
            )
        elif 1 / (details["draws"] + 1) >= alpha / m:
            need = int(np.ceil(m / alpha))
            reasons[o.k] = (
                f"only {details['draws']} random head sets: the head-set null cannot reach p below "
                f"{1 / (details['draws'] + 1):.3g}, not under Holm's threshold {alpha / m:.3g}; use at least "
                f"{need} draws"
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


# --------------------------------------------------------------------------- CA-2 ... CA-6


def dose_response(outcomes: Sequence[NecessityOutcomes], ca1: dict[int, Verdict], *, alpha: float = 0.05) -> Verdict:
    """CA-2: the top-K drop grows with K (Page's L trend test on paired per-sample drops) and the
    top-vs-random gap stays positive at every K (the CA-1 effects)."""
    from rh.stats import trend_test

    levels = [o.k for o in outcomes]
    if len(levels) < 2:
        return Verdict("CA-2", {"levels": levels}, "inconclusive", "a trend needs at least two K levels",
                       "Page's L", None, None, None, None, None, alpha=alpha)
    drops = np.stack([o.baseline_correct - o.top_correct for o in outcomes], axis=1)  # [n, levels]
    from rh.stats import min_attainable_p_page

    blocked = [v for v in ca1.values() if v.inconclusive]
    if blocked:
        return Verdict("CA-2", {"levels": levels}, "inconclusive", f"CA-1 is inconclusive: {blocked[0].reason}",
                       "Page's L", None, None, None, None, None, n=drops.shape[0], alpha=alpha)
    if min_attainable_p_page(drops.shape[0], len(levels)) > alpha:
        return Verdict("CA-2", {"levels": levels}, "inconclusive",
                       f"{drops.shape[0]} samples x {len(levels)} levels cannot reach p < {alpha} with Page's L",
                       "Page's L", None, None, None, None, None, n=drops.shape[0], alpha=alpha)
    stat, p = trend_test(levels, drops)
    gaps = {o.k: ca1[o.k].effect for o in outcomes}
    curve = {o.k: {"top_drop": ca1[o.k].details["top_drop"], "random_drop": ca1[o.k].details["random_drop_mean"]}
             for o in outcomes}
    if p < alpha and all(g is not None and g > 0 for g in gaps.values()):
        status, why = "supported", f"Page's L p = {p:.3g} < {alpha} and the gap is positive at every K"
    else:
        failed = []
        if not p < alpha:
            failed.append(f"no significant trend (p = {p:.3g})")
        bad = [k for k, g in gaps.items() if g is None or g <= 0]
        if bad:
            failed.append(f"the top-vs-random gap is not positive at K = {bad}")
        status, why = "refuted", "; ".join(failed)
    mean_drop = drops.mean(axis=0)
    return Verdict(
        "CA-2", {"levels": levels}, status,
        "top-K accuracy drop by K: " + ", ".join(f"{k}: {d:.2f}" for k, d in zip(levels, mean_drop)) + f"; {why}",
        "Page's L trend test on paired per-sample drops across K", stat, p, p,
        float(mean_drop[-1] - mean_drop[0]), None, n=drops.shape[0], alpha=alpha,
        effect_name="drop at the largest K minus drop at the smallest",
        details={"gaps": {str(k): g for k, g in gaps.items()}, "curve": {str(k): v for k, v in curve.items()}},
    )


def inverse_ablation(model: LoadedModel, samples: Sequence[Sample], ranking: Ranking, levels: Sequence[int],
                     baseline: pd.DataFrame, *, margin: float = 0.1, alpha: float = 0.05, batch_size: int = 8,
                     baseline_floor: float = 0.5,
                     n_boot: int = 10_000, seed: int = 0) -> dict[int, Verdict]:
    """CA-3: ablating the K lowest-scoring heads keeps accuracy within ``margin`` of the baseline
    (non-inferiority: the lower confidence bound of the mean change is >= -margin), Holm across K."""
    base = baseline.set_index("id").loc[[s.id for s in samples], "correct"].to_numpy(dtype=float)
    ablated = {}
    if base.mean() >= baseline_floor:  # below it the verdicts are inconclusive whatever the ablation does
        for k in levels:
            with ablate(model, ranking.bottom(k)):
                df = teacher_forced(model, samples, condition=f"bottom{k}", batch_size=batch_size)
            ablated[k] = df["correct"].to_numpy(dtype=float)
    bottom = {k: [str(h) for h in ranking.bottom(min(k, 20))] for k in levels}
    return inverse_verdicts(base, ablated, levels, margin=margin, alpha=alpha, baseline_floor=baseline_floor,
                            n_boot=n_boot, seed=seed, bottom_heads=bottom)


def inverse_verdicts(base: np.ndarray, ablated: dict[int, np.ndarray], levels: Sequence[int], *, margin: float = 0.1,
                     alpha: float = 0.05, baseline_floor: float = 0.5, n_boot: int = 10_000, seed: int = 0,
                     bottom_heads: dict[int, list[str]] | None = None) -> dict[int, Verdict]:
    """CA-3's decision from per-sample outcomes (0/1): ``base`` and, per K, ``ablated[k]``.

    Inconclusive when the baseline is below the floor (nothing to keep). Refuted when even the
    upper confidence bound of the change is below ``-margin`` (clearly not kept, however few the
    samples). Inconclusive when the samples cannot show non-inferiority even with no change at
    all. Otherwise supported exactly when the Holm-adjusted non-inferiority p is below ``alpha``.
    """
    from rh.stats import non_inferiority

    base = np.asarray(base, dtype=float)
    if base.mean() < baseline_floor:  # "keeps accuracy" is empty when there is none to keep
        return {k: Verdict("CA-3", {"k": k, "margin": margin}, "inconclusive",
                           f"baseline accuracy {base.mean():.2f} is below the floor {baseline_floor:.2f}: there is "
                           "no retrieval to keep", "non-inferiority", None, None, None, None, None, n=len(base),
                           alpha=alpha) for k in levels}
    best_p = non_inferiority(np.zeros(len(base)), margin, level=1 - alpha)[3]  # no sample changes: the best case
    underpowered = best_p >= alpha / len(levels)
    rows = {}
    for k in levels:
        acc = np.asarray(ablated[k], dtype=float)
        mean, ci, holds, p = non_inferiority(acc - base, margin, level=1 - alpha, n_boot=n_boot, seed=hash_seed(seed, k))
        rows[k] = (mean, ci, holds, p, float(acc.mean()))
    adj = dict(zip(rows, holm([r[3] for r in rows.values()])))
    out = {}
    for k, (mean, ci, holds, p, acc) in rows.items():
        ok = adj[k] < alpha
        if ci[1] < -margin:  # even the upper bound loses more than the margin: clearly not kept
            status, why = "refuted", f"the upper bound {ci[1]:+.3f} is below -{margin}: accuracy is not kept"
        elif underpowered:
            status, why = "inconclusive", (f"{len(base)} samples cannot show non-inferiority at margin {margin}: "
                                           f"even with no change p = {best_p:.3g} >= Holm's "
                                           f"{alpha / len(levels):.3g}; use more samples")
        else:
            status = "supported" if ok else "refuted"
            why = (f"adjusted p = {adj[k]:.3g} < {alpha}: the change is no worse than -{margin}" if ok else
                   f"adjusted p = {adj[k]:.3g}: a loss larger than {margin} cannot be ruled out")
        out[k] = Verdict(
            "CA-3", {"k": k, "margin": margin}, status,
            f"bottom-{k} ablation: accuracy {base.mean():.2f} -> {acc:.2f} (change {mean:+.3f}, one-sided "
            f"{1 - alpha:.0%} bounds [{ci[0]:+.3f}, {ci[1]:+.3f}]); {why}",
            f"non-inferiority with margin {margin}, Holm across K", mean, p, adj[k], mean, ci,
            ci_level=1 - alpha, n=len(base), alpha=alpha, effect_name="accuracy change (ablated - baseline)",
            details={"baseline_accuracy": float(base.mean()), "ablated_accuracy": acc,
                     "bottom_heads": (bottom_heads or {}).get(k, [])},
        )
    return out


def _mcnemar_drop(base: np.ndarray, ablated: np.ndarray) -> tuple[int, int, float]:
    """Samples right at baseline and wrong under ablation vs the reverse: exact one-sided McNemar."""
    from rh.stats import mcnemar_exact

    return mcnemar_exact(base.astype(bool), ablated.astype(bool), alternative="greater")


def ablation_hurts(claim: str, model: LoadedModel, groups: dict[str, Sequence[Sample]], heads: Sequence[Head],
                   baseline: pd.DataFrame | None, *, param: str, alpha: float = 0.05, baseline_floor: float = 0.5,
                   batch_size: int = 8, n_boot: int = 10_000, seed: int = 0) -> dict[str, Verdict]:
    """CA-4 / CA-6: for each group of samples (a task, a depth), ablating ``heads`` lowers accuracy
    below the baseline (exact one-sided McNemar per group, Holm across groups)."""
    if not heads:
        return {g: Verdict(claim, {param: g}, "inconclusive", "there are no heads to ablate (the set is empty)",
                           "exact one-sided McNemar", None, None, None, None, None, alpha=alpha) for g in groups}
    rows = {}
    for g, samples in groups.items():
        ids = [s.id for s in samples]
        if baseline is not None and set(ids) <= set(baseline["id"]):
            base = baseline.set_index("id").loc[ids, "correct"].to_numpy(dtype=float)
        else:
            base = teacher_forced(model, samples, condition="baseline", batch_size=batch_size)["correct"].to_numpy(float)
        with ablate(model, heads):
            abl = teacher_forced(model, samples, condition="ablated", batch_size=batch_size)["correct"].to_numpy(float)
        b, c, p = _mcnemar_drop(base, abl)
        rows[g] = (base, abl, b, c, p)
    m = len(rows)
    reasons = {}
    for g, (base, *_rest) in rows.items():
        if base.mean() < baseline_floor:
            reasons[g] = f"baseline accuracy {base.mean():.2f} is below the floor {baseline_floor:.2f}"
        elif min_attainable_p_sign(len(base)) > alpha / m:
            reasons[g] = (f"only {len(base)} samples: the smallest reachable p ({min_attainable_p_sign(len(base)):.3g}) "
                          f"cannot pass Holm's threshold {alpha / m:.3g}")
    testable = [g for g in rows if g not in reasons]
    adj = dict(zip(testable, holm([rows[g][4] for g in testable]))) if testable else {}
    out = {}
    for g, (base, abl, b, c, p) in rows.items():
        drop = float(base.mean() - abl.mean())
        ci = bootstrap_ci(base - abl, n_boot=n_boot, seed=hash_seed(seed, len(out)))
        if g in reasons:
            status, reason, p_adj = "inconclusive", reasons[g], None
        else:
            p_adj = adj[g]
            status, why = decide(p_adj, drop, alpha)
            reason = f"{param} {g}: accuracy {base.mean():.2f} -> {abl.mean():.2f} with {len(heads)} heads ablated; {why}"
        out[g] = Verdict(
            claim, {param: g, "heads": len(heads)}, status, reason, "exact one-sided McNemar, Holm across " + param,
            float(b), p, p_adj, drop, ci, n=len(base), alpha=alpha, effect_name="accuracy drop (baseline - ablated)",
            details={"baseline_accuracy": float(base.mean()), "ablated_accuracy": float(abl.mean()),
                     "right_to_wrong": b, "wrong_to_right": c, "heads": [str(h) for h in heads[:20]]},
        )
    return out


def head_outputs(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], method: str | None,
                 *, batch_size: int = 8) -> dict[Head, np.ndarray]:
    """The o_proj-input slice of each head (what it writes to the residual stream) at every real
    token of ``samples``, with ``heads`` ablated by ``method`` (None: no ablation), float64."""
    from contextlib import nullcontext

    from rh.ablation import attention_modules
    from rh.batching import make_batches

    d = model.shape.head_dim
    mods = attention_modules(model)
    store: dict[Head, list[np.ndarray]] = {h: [] for h in heads}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        mask = batch.attention_mask.bool()
        seen: dict[int, torch.Tensor] = {}
        handles = [mods[l].o_proj.register_forward_hook(
            lambda mod, args, out, _l=l: seen.__setitem__(_l, args[0].detach())) for l in {h.layer for h in heads}]
        try:
            ctx = ablate(model, heads, method) if method else nullcontext()
            with torch.no_grad(), ctx:
                model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
        finally:
            for hd in handles:
                hd.remove()
        for h in heads:
            x = seen[h.layer][..., h.head * d : (h.head + 1) * d].float().cpu()  # [b, L, d]
            store[h].append(x[mask].double().numpy())
    return {h: np.concatenate(v) for h, v in store.items()}


def mechanism_comparison(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head],
                         baseline: pd.DataFrame, *, alpha: float = 0.05, batch_size: int = 8) -> Verdict:
    """CA-5: zeroing a head's query and zeroing its pre-softmax logits are the same intervention
    (uniform attention: the head emits the mean of V over visible keys), and it is not output
    zeroing. Checked exactly on the heads' outputs; accuracy under each mechanism is reported."""
    from rh.stats import mcnemar_exact

    probe = list(samples[: min(4, len(samples))])
    out = {m: head_outputs(model, probe, heads, m, batch_size=batch_size) for m in ("query", "logits", "zero")}
    scale = max(float(np.abs(v).max()) for v in out["query"].values()) or 1.0
    q_vs_l = max(float(np.abs(out["query"][h] - out["logits"][h]).max()) for h in heads) / scale
    q_vs_z = min(float(np.abs(out["query"][h] - out["zero"][h]).max()) for h in heads) / scale
    eps = float(torch.finfo(next(model.model.parameters()).dtype).eps)
    tol = 8 * eps  # a few roundings of the dtype the model computes in
    acc = {"baseline": float(baseline.set_index("id").loc[[s.id for s in samples], "correct"].mean())}
    correct = {}
    for m in ("zero", "query", "logits"):
        with ablate(model, heads, m):
            df = teacher_forced(model, samples, condition=m, batch_size=batch_size)
        acc[m] = float(df["correct"].mean())
        correct[m] = df["correct"].to_numpy(bool)
    b, c, p_zq = mcnemar_exact(correct["query"], correct["zero"], alternative="two-sided")
    same = q_vs_l <= tol
    differs = q_vs_z > tol
    status = "supported" if same and differs else "refuted"
    why = []
    why.append(f"query vs logits: max |difference| = {q_vs_l:.2e} of the output scale "
               f"({'within' if same else 'beyond'} tolerance {tol:.1e})")
    why.append(f"query vs zero: the least-differing head differs by {q_vs_z:.2e} "
               f"({'so they differ' if differs else 'they do not differ'})")
    return Verdict(
        "CA-5", {"k": len(heads)}, status,
        "; ".join(why) + "; accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()),
        "exact comparison of the heads' outputs (o_proj input) under each mechanism", q_vs_l, None, None,
        float(acc["zero"] - acc["query"]), None, n=len(samples), alpha=alpha,
        effect_name="accuracy under query zeroing minus under output zeroing (reported, not tested)",
        details={"accuracy": acc, "query_vs_zero_mcnemar_p": p_zq, "query_vs_logits_rel_diff": q_vs_l,
                 "query_vs_zero_rel_diff_min": q_vs_z, "tolerance": tol, "probe_samples": len(probe)},
    )


def selection_conditions(model: LoadedModel, ranking: Ranking, ks: Sequence[int], *, draws: int = 1, seed: int = 0,
                         bottom: bool = True, baseline: bool = True, method: str = "zero") -> dict:
    """Named conditions for ``rh.evaluate.evaluate_conditions`` (seed 000 §2): ``baseline`` (no
    ablation), then per K ``topK`` (the K best heads), ``randomK#d`` (``draws`` K-sets drawn from
    outside the top K, seeded exactly as :func:`necessity_outcomes` draws them) and, with ``bottom``,
    ``bottomK`` (the K lowest-scoring heads: inverse ablation). The names are the ones
    ``rh.plots_ablation.curve_frame`` parses; each value opens ``ablate(model, heads, method)``."""
    ranking.check_shape(model.shape)
    if draws < 0:
        raise ValueError(f"draws={draws}: the number of random head sets per K cannot be negative")
    out: dict = {"baseline": None} if baseline else {}

    def make(heads: list[Head]):
        return lambda: ablate(model, heads, method)

    for k in ks:
        out[f"top{k}"] = make(ranking.top(k))
        for d in range(draws):
            out[f"random{k}#{d}"] = make(ranking.random_outside_top(k, seed=hash_seed(seed, k, d)))
        if bottom:
            out[f"bottom{k}"] = make(ranking.bottom(k))
    return out
