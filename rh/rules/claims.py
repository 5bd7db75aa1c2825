"""Each claim family's decision from its outcomes: pure functions from arrays to verdicts.

The mechanisms (``rh.causal``, ``rh.interventions``, ``rh.id_claims``) gather the outcomes with
forward passes; everything that turns them into *supported / refuted / inconclusive* lives here,
so one module says how every claim is decided and the calibration (``rh.calibration``) can
run the very same functions on simulated data. Every verdict carries ``min_effect`` (Δ) and
``power``; see ``rh.rules.core`` for the rule itself.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _sps

from rh.rules.core import Bounds, Power, decide_bounds, holm_pairs, t_power, three_way
from rh.rules.paired import FLIP_RATE, paired_ci, paired_family, paired_p, paired_power, rule_power
from rh.seeds import derive_seed
from rh.rules.verdict import Verdict
from rh.stats import (
    bootstrap_ci,
    headset_null_p_of_count,
    mcnemar_exact,
    mcnemar_p,
    min_attainable_p_sign,
    sign_test_greater,
    sign_pvalues,
)

__all__ = [
    "floor_reason", "inconclusive", "necessity", "inverse_bounds", "drop_bounds", "incremental_bounds",
    "override_bounds", "dose_response", "inverse", "drop_family", "incremental",
    "position", "override", "transplant", "difficulty", "ratio_rule", "ratio_power", "general_heads_rule", "agreement",
]


def floor_reason(accuracy: float | None, floor: float, what: str = "retrieval") -> str | None:
    """The named floor: a model that does not retrieve has nothing to lose, keep or share."""
    if accuracy is None or accuracy < floor:
        acc = "unknown" if accuracy is None else f"{accuracy:.2f}"
        return (f"baseline accuracy {acc} is below the floor {floor:.2f}: the model does not do the task, so there "
                f"is no {what} to test (a floor)")
    return None


def inconclusive(claim: str, params: dict, reason: str, test: str, alpha: float = 0.05, n: int = 0,
                 details: dict | None = None, *, min_effect: float | None = None, power: Power | None = None,
                 effect_name: str = "") -> Verdict:
    """A verdict whose preconditions failed, with the reason and whatever was measured."""
    return Verdict(claim=claim, params=params, status="inconclusive", reason=reason, test=test, statistic=None,
                   p_value=None, p_adjusted=None, effect=None, ci=None, n=n, alpha=alpha, effect_name=effect_name,
                   details=details or {}, min_effect=min_effect, power=power)


# ------------------------------------------------------------------------------------------ CA-1

CA1_TEST = ("supported: head-set null (top-K drop ranked among random K-sets) and the exact paired test of a gap > 0 "
            "(item i's top-K outcome against random draw i mod D), the larger p Holm-corrected across K; refuted: "
            "the same paired test shows the gap below Δ, Holm across K")


CA1_EFFECT = "accuracy drop of top-K minus that of random-K (each item paired with one draw)"


def paired_draws(n: int, draws: int) -> np.ndarray:
    """CA-1's pairing: item i's outcome is compared with random draw ``i mod draws``."""
    return np.arange(n) % draws


def _sides(correct, remaining, top_correct) -> tuple[np.ndarray, np.ndarray]:
    """(below, at least): the head-set null's indicator decided either way, elementwise, with
    ``correct`` items right so far and ``remaining`` still to evaluate against ``top_correct``."""
    below = np.asarray(correct) > top_correct
    return below, ~below & (np.asarray(correct) + np.asarray(remaining) <= top_correct)


def side_decided(correct: float, remaining: int, top_correct: float) -> bool | None:
    """Whether a random K-set's drop is at least the top K's (``True``), below it (``False``), or not
    yet known (``None``) with ``correct`` items right so far and ``remaining`` still to evaluate, on
    the same n items as the top K's ``top_correct``: the head-set null's indicator, decided as soon
    as no outcome of the remaining items can change it."""
    below, at_least = _sides(correct, remaining, top_correct)
    return False if below else True if at_least else None


def _at_least_top(random_correct: np.ndarray, top_correct: np.ndarray) -> np.ndarray:
    """Per random draw, whether its accuracy drop is at least the top K's (the head-set null's
    count, ties included) on the same items; decided from the evaluated items where early stopping
    left some out (:func:`side_decided`, every draw at once): a draw whose indicator is still open
    is refused."""
    rc = np.asarray(random_correct, float)
    if rc.ndim == 1:  # one row a draw: a 1-D input is draws of one item each, as before
        rc = rc[:, None]
    below, at_least = _sides(np.nansum(rc, axis=1), np.isnan(rc).sum(axis=1), float(np.sum(top_correct)))
    open_ = np.flatnonzero(~below & ~at_least)
    if open_.size:
        raise ValueError(f"random draw {int(open_[0])} was stopped before its side of the top K's drop was decided")
    return at_least


def necessity(outcomes: Sequence, *, alpha: float = 0.05, baseline_floor: float = 0.5, min_gap: float = 0.2,
              n_boot: int = 10_000, seed: int = 0, control: str = "outside_top") -> dict[int, Verdict]:
    """CA-1 per K from :class:`rh.causal.NecessityOutcomes`. Per item the top-K outcome is paired
    with one random draw (item i with draw i mod D: an unbiased estimate of the mean-over-draws gap
    whose differences are -1, 0, +1, so the exact paired test applies; the sign test on the
    mean-over-draws difference counted every item a random set ever lost as "top better" and had
    power 0.17 where this has 0.63, see rh.calibration). Supported when that test shows a gap
    > 0 and the head-set null rejects (p = the larger); refuted when it shows the gap below Δ. Inconclusive at a floor (baseline below the floor), at a
    ceiling (random K-sets already leave less than Δ to lose), or when neither test rejects.

    What it reads of the random draws, and nothing else, so that early stopping
    (:func:`rh.causal.necessity_outcomes`) gives the verdict of the full evaluation: each item's
    paired draw (the paired test, the effect and its CI, the random accuracy behind the ceiling, all
    estimated from these n pairs), and per draw whether its drop is at least the top K's (the
    head-set null's count), which is decided once the remaining items cannot change it."""
    from dataclasses import replace as _replace

    if not outcomes:
        raise ValueError("no ablation levels given")
    if control not in ("outside_top", "layer_matched"):
        raise ValueError(f"control={control!r}: use 'outside_top' or 'layer_matched'")
    if control == "layer_matched":  # the matched sets decide; the uniform ones are reported beside
        missing = [o.k for o in outcomes if getattr(o, "matched_correct", None) is None]
        if missing:
            raise ValueError(f"control='layer_matched' but K = {missing} have no layer-matched draws: set the "
                             "profile's matched_draws")
        outcomes = [_replace(o, random_correct=o.matched_correct, random_logprob=o.matched_logprob,
                             matched_correct=o.random_correct, matched_logprob=o.random_logprob) for o in outcomes]
    m = len(outcomes)
    rows, reasons, floors = {}, {}, {}
    for o in outcomes:
        n = len(o.top_correct)
        draws = int(o.random_correct.shape[0])
        base_acc = float(o.baseline_correct.mean())
        top_drop = base_acc - float(o.top_correct.mean())
        pair = (paired_draws(n, draws), np.arange(n))
        one_draw = o.random_correct[pair] - o.top_correct
        floor = floor_reason(base_acc, baseline_floor)
        if floor and np.isnan(one_draw).any():  # the random sets left unread: the floor decides whatever they show
            floors[o.k] = (n, floor, {
                "baseline_accuracy": base_acc, "top_accuracy": float(o.top_correct.mean()), "top_drop": top_drop,
                "random_accuracy": None, "draws": draws, "random_draws_evaluated_in_full": 0,
                "random_items_evaluated": int((~np.isnan(o.random_correct)).sum()),
                "random_sets": "not evaluated: the baseline is below the floor, which makes the verdict inconclusive "
                               "whatever they show (rh.causal.floor_decides)",
                "top_heads": [str(h) for h in o.top_heads]})
            continue
        if np.isnan(one_draw).any():
            raise ValueError(f"K={o.k}: the random draw paired with an item was not evaluated on it "
                             "(rh.causal.needed_items lists what the rule reads)")
        n_pos, n_neg, p_sign = sign_test_greater(one_draw)
        at_least = _at_least_top(o.random_correct, o.top_correct)
        p_ref = paired_p(one_draw, min_gap, "less")
        lp_d = o.random_logprob[pair] - o.top_logprob
        full = ~np.isnan(o.random_correct).any(axis=1)
        details = {
            "baseline_accuracy": base_acc, "top_accuracy": float(o.top_correct.mean()),
            "random_accuracy": float(o.random_correct[pair].mean()),
            "random_accuracy_per_draw": [float(r.mean()) if f else None for r, f in zip(o.random_correct, full)],
            "random_draws_evaluated_in_full": int(full.sum()),
            "random_items_evaluated": int((~np.isnan(o.random_correct)).sum()),
            "top_drop": top_drop, "random_drop_mean": base_acc - float(o.random_correct[pair].mean()),
            "samples_top_worse": n_pos, "samples_top_better": n_neg,
            "headset_null_p": headset_null_p_of_count(int(at_least.sum()), draws),
            "random_sets_at_least_top": int(at_least.sum()),
            "sign_test_p": p_sign, "draws": draws,
            "p_refute": p_ref, "logprob_drop_gap_mean": float(lp_d.mean()),
            "logprob_sign_test_p": sign_test_greater(lp_d)[2], "top_heads": [str(h) for h in o.top_heads],
        }
        if getattr(o, "matched_correct", None) is not None:  # the other control, reported beside
            mc = o.matched_correct
            m_pair = (paired_draws(n, mc.shape[0]), np.arange(n))
            m_at_least = _at_least_top(mc, o.top_correct)
            details["control"] = control
            details["outside_top" if control == "layer_matched" else "layer_matched"] = {
                "draws": int(mc.shape[0]), "random_accuracy": float(mc[m_pair].mean()),
                "headset_null_p": headset_null_p_of_count(int(m_at_least.sum()), mc.shape[0]),
                "sign_test_p": sign_test_greater(mc[m_pair] - o.top_correct)[2]}
        p_pair = paired_p(one_draw, 0.0, "greater")  # uses magnitudes, unlike the sign test on mean-over-draws
        details["paired_p"] = p_pair
        p = max(p_pair, details["headset_null_p"])
        effect = float(one_draw.mean())
        ci = bootstrap_ci(one_draw, n_boot=n_boot, level=1 - 2 * alpha, seed=derive_seed(seed, o.k))
        rows[o.k] = (o, n, n_pos, p, p_ref, effect, ci, base_acc, details)
        rand_acc = details["random_accuracy"]
        if floor:
            reasons[o.k] = floor
        elif rand_acc < min_gap:
            reasons[o.k] = (f"random K-sets already leave accuracy {rand_acc:.2f} < Δ = {min_gap:g}: there is no "
                            "room for a gap of Δ (a ceiling)")
        elif min_attainable_p_sign(n) >= alpha / m:
            reasons[o.k] = (f"only {n} validation samples: the smallest reachable p ({min_attainable_p_sign(n):.3g}) "
                            f"cannot pass Holm's threshold alpha/{m} = {alpha / m:.3g}; use more samples")
        elif 1 / (draws + 1) >= alpha / m:
            reasons[o.k] = (f"only {draws} random head sets: the head-set null cannot reach p below "
                            f"{1 / (draws + 1):.3g}, not under Holm's threshold {alpha / m:.3g}; use at least "
                            f"{int(np.ceil(m / alpha))} draws")
    testable = [k for k in rows if k not in reasons]
    adj_s, adj_r = holm_pairs({k: rows[k][3] for k in testable}, {k: rows[k][4] for k in testable})
    bounds = Bounds("greater", 0.0, min_gap)

    def power_at(n: int, draws: int) -> Power:
        pw = rule_power(n, bounds, alpha / m)
        return Power(pw.support, pw.support_at, pw.refute, pw.refute_at, "exact (approximate for the support)",
                     f"support approximated by the exact paired test; the head-set null must also reject (its "
                     f"smallest p is 1/{draws + 1}); {FLIP_RATE:.0%} of items flip each way")

    out = {k: inconclusive("CA-1", {"k": k}, floor, CA1_TEST, alpha, n, details, min_effect=min_gap,
                           power=power_at(n, details["draws"]), effect_name=CA1_EFFECT)
           for k, (n, floor, details) in floors.items()}
    for k, (o, n, n_pos, p, p_ref, effect, ci, base_acc, details) in rows.items():
        power = power_at(n, details["draws"])
        common = dict(claim="CA-1", params={"k": k}, test=CA1_TEST, statistic=float(n_pos), p_value=p, effect=effect,
                      ci=ci, ci_level=1 - 2 * alpha, n=n, alpha=alpha, min_effect=min_gap, power=power,
                      effect_name=CA1_EFFECT)
        if k in reasons:
            out[k] = Verdict(status="inconclusive", reason=reasons[k], p_adjusted=None, details=details, **common)
            continue
        status, why = decide_bounds(adj_s[k], adj_r[k], alpha, bounds, power, what="the gap", n=n)
        reason = (f"top-{k} ablation: accuracy {base_acc:.2f} -> {details['top_accuracy']:.2f}; random-{k} (each item "
                  f"with one of {details['draws']} draws): -> {details['random_accuracy']:.2f}; "
                  f"{details['random_sets_at_least_top']} of {details['draws']} random sets drop as much as the top "
                  f"K; {why}")
        out[k] = Verdict(status=status, reason=reason, p_adjusted=adj_s[k],
                         details={**details, "p_refute_adjusted": adj_r[k]}, **common)
    return {o.k: out[o.k] for o in outcomes}


# ------------------------------------------------------------------------------------------ CA-2

CA2_TEST = ("per prompt, the growth of the answer log-probability drop from the smallest to the largest K; "
            "supported: its median shown above 0 (exact sign test) and CA-1 supported at every K; refuted: its "
            "median shown below Δ (exact sign test) or CA-1 refuted at some K, Bonferroni over the two")


def dose_response(base_logprob: np.ndarray, top_logprob: Mapping[int, np.ndarray], ca1: Mapping[int, Verdict], *,
                  alpha: float = 0.05, min_growth: float = 1.0, baseline_floor: float = 0.5,
                  baseline_accuracy: float | None = None) -> Verdict:
    """CA-2 on the answer log-probability (it has room to move where accuracy is already lost):
    per sample the drop ``base - top_K`` at each K of ``top_logprob`` (at least three levels), and
    its growth from the smallest to the largest K. The claim is about the typical prompt, so exact
    sign tests of the median growth (valid whatever the shape; Page's trend test, used before, tests
    a consistent order within prompts, and supported in 10-18% of simulated runs whose per-prompt
    slopes go both ways with no growth on average)."""
    levels = sorted(top_logprob)
    params = {"levels": levels}
    name = f"median growth of the answer log-prob drop from K={levels[0] if levels else '?'} to the largest K (nats)"
    if len(levels) < 3:
        return inconclusive("CA-2", params, f"a dose-response needs at least three K levels, got {levels}", CA2_TEST,
                            alpha, min_effect=min_growth, effect_name=name)
    floor = floor_reason(baseline_accuracy, baseline_floor)
    drops = np.stack([np.asarray(base_logprob, float) - np.asarray(top_logprob[k], float) for k in levels], axis=1)
    growth = drops[:, -1] - drops[:, 0]
    mean_drop = drops.mean(axis=0)
    details = {"mean_logprob_drop": {str(k): float(v) for k, v in zip(levels, mean_drop)},
               "gaps": {str(k): v.effect for k, v in ca1.items()},
               "ca1_status": {str(k): v.status for k, v in ca1.items()},
               "curve": {str(k): {"top_drop": v.details.get("top_drop"), "random_drop": v.details.get("random_drop_mean")}
                         for k, v in ca1.items()}}
    if floor:
        return inconclusive("CA-2", params, floor, CA2_TEST, alpha, len(growth), details, min_effect=min_growth,
                            effect_name=name)
    (p_grow,) = sign_pvalues([growth], "greater")
    (p_short,) = sign_pvalues([growth - min_growth], "less")
    med = float(np.median(growth))
    ci = bootstrap_ci(growth, np.median, n_boot=2000, level=1 - 2 * alpha, seed=0)
    pw = _sign_rule_power(growth, 0.0, min_growth, alpha)
    ca1_sup = all(v.supported for v in ca1.values()) and bool(ca1)
    ca1_ref = [k for k, v in ca1.items() if v.refuted]
    # refuted by either part (a union): Bonferroni, each at α/2; CA-1's refutation p, Holm-adjusted in its family
    p_ca1_ref = min((float(v.details.get("p_refute_adjusted", 0.0 if v.refuted else 1.0)) for v in ca1.values()),
                    default=1.0)
    p_sup = p_grow if ca1_sup else None
    p_ref = min(1.0, 2 * min(p_short, p_ca1_ref))
    status, why = three_way(
        p_sup, p_ref, alpha,
        supported_why=f"the drop grows with K for the typical prompt (median growth > 0, p = {p_grow:.3g}) and CA-1 "
                      "holds at every K",
        refuted_why=(f"CA-1 is refuted at K = {ca1_ref} (Bonferroni p = {p_ref:.3g})" if ca1_ref and p_ca1_ref <= p_short
                     else f"the median growth is < Δ = {min_growth:g} nats (Bonferroni p = {p_ref:.3g})"),
        neither_why=(f"growth > 0 p = {p_grow:.3g}, growth < Δ p = {p_short:.3g}" +
                     ("" if ca1_sup else "; CA-1 is not supported at every K")))
    return Verdict(claim="CA-2", params=params, status=status,
                   reason="mean answer log-prob drop by K: " + ", ".join(f"{k}: {d:.2f}" for k, d in zip(levels, mean_drop))
                   + f"; median growth {med:.2f} nats; {why}", test=CA2_TEST, statistic=med, p_value=p_grow,
                   p_adjusted=p_grow, effect=med, ci=ci, ci_level=1 - 2 * alpha, n=len(growth), alpha=alpha,
                   effect_name=name, details={**details, "p_refute": p_ref, "p_growth_below_delta": p_short,
                                              "mean_growth": float(growth.mean())},
                   min_effect=min_growth, power=pw)


def _sign_power_at(n: int, distance: float, sd: float, alpha: float) -> float | None:
    """Exact power of a one-sided sign test on ``n`` values whose median lies ``distance`` beyond the
    tested one, the values normal with spread ``sd`` (None without a spread)."""
    from scipy.stats import norm

    from rh.stats import sign_power

    return sign_power(n, float(norm.cdf(distance / sd)), alpha) if sd > 0 else None


def _sign_rule_power(x: np.ndarray, support_bound: float, refute_bound: float, alpha: float) -> Power:
    """Exact power of the two sign tests of a median at ``x``'s size, values normal at its observed
    spread: to support with the median at ``refute_bound`` + (refute - support), to refute at the
    support bound (the refutation at α/2: CA-2's union)."""
    n = int(np.asarray(x).size)
    sd = float(np.std(x, ddof=1)) if n > 1 else math.nan
    if not (sd > 0):
        return Power.none("no spread to plant an effect at")
    gap = refute_bound - support_bound
    sup_at = refute_bound + gap
    return Power(_sign_power_at(n, sup_at - support_bound, sd, alpha), sup_at,
                 _sign_power_at(n, gap, sd, alpha / 2), support_bound,
                 "exact binomial power of the sign tests, values normal at the observed spread")


# ------------------------------------------------------------------------------------------ CA-3, CA-4, CA-6, IV-1


def inverse_bounds(margin: float) -> Bounds:
    """CA-3's bounds: the loss is shown below ``margin`` (supported) or above it (refuted)."""
    return Bounds("less", margin, margin)


def drop_bounds(min_drop: float) -> Bounds:
    """CA-4's and CA-6's bounds: the drop is shown above 0 (supported) or below Δ (refuted)."""
    return Bounds("greater", 0.0, min_drop)


def incremental_bounds(min_drop: float) -> Bounds:
    """IV-1's bounds: the drop is shown above ``min_drop`` (supported) or below it (refuted)."""
    return Bounds("greater", min_drop, min_drop)


def override_bounds(patterns: Sequence[str], base: np.ndarray, *, keep: float, min_drop: float) -> dict[str, Bounds]:
    """IV-3's bounds per pattern: the hub pattern's loss against ``(1 - keep) x`` the baseline
    accuracy, the others' drop against 0 and Δ = ``min_drop``."""
    margin = (1 - keep) * float(np.mean(base))
    return {p: Bounds("less", margin, margin) if p == "hub" else drop_bounds(min_drop) for p in patterns}


def inverse(base: np.ndarray, ablated: Mapping[int, np.ndarray], levels: Sequence[int], *, margin: float = 0.1,
            alpha: float = 0.05, baseline_floor: float = 0.5,
            bottom_heads: Mapping[int, list[str]] | None = None) -> dict[int, Verdict]:
    """CA-3: ablating the K lowest-scoring heads keeps accuracy within ``margin``. Supported: the loss
    is shown below the margin (non-inferiority); refuted: shown above it; Holm across K."""
    base = np.asarray(base, float)
    groups = {k: (base, ablated.get(k, np.zeros(0)) if base.mean() >= baseline_floor else base) for k in levels}
    return paired_family(
        "CA-3", groups, param="k", bounds=inverse_bounds(margin), alpha=alpha, baseline_floor=baseline_floor,
        test=f"exact paired tests of the loss against the margin {margin:g} (non-inferiority / inferiority), Holm across K",
        effect_name="accuracy loss (baseline - ablated)", extra_params={"margin": margin},
        describe=lambda k, b, a: f"bottom-{k} ablation: accuracy {b.mean():.2f} -> {a.mean():.2f}",
        extra_details={k: {"bottom_heads": list((bottom_heads or {}).get(k, []))} for k in levels})


def drop_family(claim: str, groups: Mapping, *, param: str, n_heads: int, min_drop: float = 0.2,
                alpha: float = 0.05, baseline_floor: float = 0.5, heads: Sequence[str] = ()) -> dict:
    """CA-4 / CA-6: ablating the heads lowers accuracy in every group (a task, a depth). Supported:
    drop > 0 shown; refuted: drop < Δ = ``min_drop`` shown; Holm across the groups."""
    if n_heads == 0:
        return {g: inconclusive(claim, {param: g, "heads": 0}, "there are no heads to ablate (the set is empty)",
                                "exact paired tests", alpha, min_effect=min_drop) for g in groups}
    return paired_family(
        claim, groups, param=param, bounds=drop_bounds(min_drop), alpha=alpha,
        baseline_floor=baseline_floor, test=f"exact paired tests of the drop (> 0; < Δ = {min_drop:g}), Holm across {param}",
        effect_name="accuracy drop (baseline - ablated)", extra_params={"heads": n_heads},
        describe=lambda g, b, a: f"{param} {g}: accuracy {b.mean():.2f} -> {a.mean():.2f} with {n_heads} heads ablated",
        extra_details={g: {"heads": list(heads)[:20]} for g in groups})


def incremental(base: np.ndarray, ablated: Mapping[int, np.ndarray], heads: Sequence[str], *, min_drop: float = 0.10,
                alpha: float = 0.05, baseline_floor: float = 0.5) -> dict[int, Verdict]:
    """IV-1: ablating the top n critical heads drops accuracy by more than ``min_drop`` (the claim's
    threshold is also Δ: refuted when the drop is shown below it); Holm across levels."""
    groups = {n: (np.asarray(base, float), np.asarray(a, float)) for n, a in ablated.items()}
    return paired_family(
        "IV-1", groups, param="n_heads", bounds=incremental_bounds(min_drop), alpha=alpha,
        baseline_floor=baseline_floor, test=f"exact paired tests of H0 drop <= {min_drop} and H0 drop >= {min_drop}, "
        "Holm across levels", effect_name="accuracy drop (baseline - ablated)",
        describe=lambda n, b, a: f"top-{n} ablation ({', '.join(heads[:n])}): accuracy {b.mean():.2f} -> {a.mean():.2f}",
        extra_details={n: {"heads": list(heads[:n]), "min_drop": min_drop} for n in groups})


# ------------------------------------------------------------------------------------------ IV-2, IV-3, IV-4

IV2_TEST = ("supported: intersection-union of exact paired tests (hub drop > hub_min, non-hub drop < nonhub_max, "
            "hub-patched worse than non-hub-patched); refuted: hub drop < hub_min or non-hub drop > nonhub_max shown "
            "(Bonferroni over the two)")


def position_ranges(base: np.ndarray, hub: np.ndarray, other: np.ndarray, *, hub_min: float,
                    nonhub_max: float) -> dict[str, tuple[float, float]]:
    """IV-2's five p-values, each as (least, largest) over every completion of the items unread
    (NaN) in ``hub`` or ``other`` (``base`` read in full): the exact paired tables' ranges
    (:class:`rh.rules.paired.Partial`) for the two arms' tests, and McNemar's between the arms,
    whose p falls as b (other right, hub wrong) grows and rises with c, so an item unread in either
    arm moves it at most by one of the two."""
    from rh.rules.paired import Partial

    hub_part, other_part = Partial.of(base, hub), Partial.of(base, other)
    both = ~np.isnan(hub) & ~np.isnan(other)
    b = int(((other == 1) & (hub == 0) & both).sum())
    c = int(((other == 0) & (hub == 1) & both).sum())
    u = int((~both).sum())
    return {"p1": hub_part.p_range(hub_min, "greater"), "r1": hub_part.p_range(hub_min, "less"),
            "p2": other_part.p_range(nonhub_max, "less"), "r2": other_part.p_range(nonhub_max, "greater"),
            "p3": (mcnemar_p(b + u, c), mcnemar_p(b, c + u))}


def position_decided(base: np.ndarray, hub: np.ndarray, other: np.ndarray, *, hub_min: float = 0.10,
                     nonhub_max: float = 0.05, alpha: float = 0.05, baseline_floor: float = 0.5) -> str | None:
    """IV-2's status where no outcome of the items unread in either arm can change it, else None
    (curtailment, :mod:`rh.curtail`). Support is the intersection-union max(p1, p2, p3) < α, so it is
    sure when every largest p is below α and ruled out when some least p is not; refutation is
    2 min(r1, r2) < α, sure when the smaller largest r is below α/2 and ruled out when both least r
    are not. Sound (a status is returned only if every completion gives it; ``tests/test_curtail.py``
    enumerates them), not always tight."""
    base = np.asarray(base, float)
    if floor_reason(float(base.mean()) if base.size else None, baseline_floor):
        return "inconclusive"
    return _position_status(position_ranges(base, np.asarray(hub, float), np.asarray(other, float), hub_min=hub_min,
                                            nonhub_max=nonhub_max), alpha)


def _position_status(rg: Mapping[str, tuple[float, float]], alpha: float) -> str | None:
    """:func:`position_decided` from the ranges (:func:`position_ranges`) of a baseline above the floor."""
    from rh.rules.paired import _status

    sup_hi = max(rg[k][1] for k in ("p1", "p2", "p3"))
    sup_lo = max(rg[k][0] for k in ("p1", "p2", "p3"))
    sup = True if sup_hi < alpha else False if sup_lo >= alpha else None
    ref = True if 2 * min(rg["r1"][1], rg["r2"][1]) < alpha else \
        False if 2 * min(rg["r1"][0], rg["r2"][0]) >= alpha else None
    return None if sup is None or ref is None else _status(sup, ref)


def position(base: np.ndarray, hub: np.ndarray, other: np.ndarray, *, hub_min: float = 0.10, nonhub_max: float = 0.05,
             alpha: float = 0.05, baseline_floor: float = 0.5, params: dict | None = None,
             details: dict | None = None, describe: str = "") -> Verdict:
    """IV-2 from per-item 0/1 outcomes at baseline, with the hub patched and with a non-hub position
    patched. Curtailed arms (NaN where an item was not read, :func:`position_decided`): the status
    is the full evaluation's, the p-values the largest any completion could give, and the
    accuracies, drops and intervals those of the items read in both arms, said so."""
    base, hub, other = (np.asarray(x, float) for x in (base, hub, other))
    params = dict(params or {})
    n = len(base)
    curtailed = bool(np.isnan(hub).any() or np.isnan(other).any())
    if curtailed:
        return _position_curtailed(base, hub, other, hub_min=hub_min, nonhub_max=nonhub_max, alpha=alpha,
                                   baseline_floor=baseline_floor, params=params, details=details, describe=describe)
    power = _position_power(n, hub_min, nonhub_max, alpha)
    hub_drop, hub_ci, p1 = float((base - hub).mean()), paired_ci(base - hub), paired_p(base - hub, hub_min, "greater")
    other_drop, other_ci = float((base - other).mean()), paired_ci(base - other)
    p2 = paired_p(base - other, nonhub_max, "less")
    b, c, p3 = mcnemar_exact(other.astype(bool), hub.astype(bool), alternative="greater")
    r1 = paired_p(base - hub, hub_min, "less")
    r2 = paired_p(base - other, nonhub_max, "greater")
    details = {**(details or {}), "baseline_accuracy": float(base.mean()), "hub_accuracy": float(hub.mean()),
               "non_hub_accuracy": float(other.mean()), "hub_drop_ci": list(hub_ci), "non_hub_drop_ci": list(other_ci),
               "p_hub_drop": p1, "p_non_hub_small": p2, "p_hub_worse": p3, "p_hub_drop_short": r1,
               "p_non_hub_large": r2}
    floor = floor_reason(float(base.mean()), baseline_floor)
    if floor:
        return inconclusive("IV-2", params, floor, IV2_TEST, alpha, n, details, min_effect=hub_min, power=power)
    p_sup = max(p1, p2, p3)
    p_ref = min(1.0, 2 * min(r1, r2))
    refuters = [w for w, pv in ((f"hub drop < {hub_min:g}", r1), (f"non-hub drop > {nonhub_max:g}", r2)) if 2 * pv < alpha]
    status, why = three_way(p_sup, p_ref, alpha, supported_why=f"all three tests reject (max p = {p_sup:.3g})",
                            refuted_why=f"shown: {'; '.join(refuters)} (Bonferroni p = {p_ref:.3g})",
                            neither_why=(f"support p = {p_sup:.3g} (hub > {hub_min:g}: {p1:.3g}, non-hub < "
                                         f"{nonhub_max:g}: {p2:.3g}, hub worse: {p3:.3g}); refute p = {p_ref:.3g}"))
    # Δ is the arm's that decided: the non-hub arm's when it alone refutes (its drop shown above nonhub_max)
    delta = nonhub_max if status == "refuted" and 2 * r1 >= alpha else hub_min
    details["min_effect_by_arm"] = {"hub": hub_min, "non_hub": nonhub_max}
    return Verdict(claim="IV-2", params=params, status=status,
                   reason=f"{describe}accuracy {base.mean():.2f} -> {hub.mean():.2f} with the hub patched, "
                   f"{other.mean():.2f} with a non-hub position patched; {why}", test=IV2_TEST,
                   statistic=float(b - c), p_value=p_sup, p_adjusted=p_sup, effect=hub_drop - other_drop, ci=None,
                   n=n, alpha=alpha, effect_name="hub drop - non-hub drop", details=details, min_effect=delta,
                   power=power)


def _position_power(n: int, hub_min: float, nonhub_max: float, alpha: float) -> Power:
    return Power(min(paired_power(n, 2 * hub_min, hub_min, "greater", alpha),
                     paired_power(n, 0.0, nonhub_max, "less", alpha)), 2 * hub_min,
                 paired_power(n, 0.0, hub_min, "less", alpha / 2), 0.0, "exact",
                 "support: the weaker of the hub and non-hub arms (hub drop 2 x hub_min, non-hub 0); refute: no hub "
                 f"effect; {FLIP_RATE:.0%} of items flip each way")


def _position_curtailed(base, hub, other, *, hub_min, nonhub_max, alpha, baseline_floor, params, details,
                        describe) -> Verdict:
    """:func:`position` on curtailed arms: the full evaluation's status (:func:`position_decided`,
    refused where still open), its reported figures from the items read in both arms."""
    read = ~np.isnan(hub) & ~np.isnan(other)
    k, n = int(read.sum()), len(base)
    floor = floor_reason(float(base.mean()) if n else None, baseline_floor)
    rg = None if floor else position_ranges(base, hub, other, hub_min=hub_min, nonhub_max=nonhub_max)
    status = "inconclusive" if floor else _position_status(rg, alpha)  # position_decided, the ranges read once
    if status is None:
        raise ValueError("IV-2: the patched arms were stopped before the status was decided: evaluate their "
                         "remaining items")
    if floor or k == 0:
        return inconclusive("IV-2", params, floor or "no item was read", IV2_TEST, alpha, n,
                            {**(details or {}), "baseline_accuracy": float(base.mean()) if n else None},
                            min_effect=hub_min, power=_position_power(n, hub_min, nonhub_max, alpha))
    full = position(base[read], hub[read], other[read], hub_min=hub_min, nonhub_max=nonhub_max, alpha=alpha,
                    baseline_floor=0.0, params=params, details=details, describe=describe)
    p_sup = max(rg[k_][1] for k_ in ("p1", "p2", "p3"))
    p_ref = min(1.0, 2 * min(rg["r1"][1], rg["r2"][1]))
    why = {"supported": f"all three tests reject whatever the unread items show (largest p = {p_sup:.3g})",
           "refuted": f"the refutation holds whatever the unread items show (Bonferroni p at most {p_ref:.3g})",
           "inconclusive": "neither side can be shown whatever the unread items show"}[status]
    out = dict(full.details)
    out.update({"baseline_accuracy_all": float(base.mean()), "p_hub_drop": rg["p1"][1], "p_non_hub_small": rg["p2"][1],
                "p_hub_worse": rg["p3"][1], "p_hub_drop_short": rg["r1"][1], "p_non_hub_large": rg["r2"][1],
                "curtailed": {"items_read": k, "items": n, "estimates": "of the items read"}})
    delta = nonhub_max if status == "refuted" and 2 * rg["r1"][1] >= alpha else hub_min
    return replace(full, status=status, n=n, p_value=p_sup, p_adjusted=p_sup, details=out, min_effect=delta,
                   power=_position_power(n, hub_min, nonhub_max, alpha),
                   effect_name=f"{full.effect_name} (the {k} of {n} items read)",
                   reason=(f"{describe}on the {k} of {n} items read (curtailment: the rest cannot change the "
                           f"status): accuracy {base[read].mean():.2f} -> {hub[read].mean():.2f} with the hub "
                           f"patched, {other[read].mean():.2f} with a non-hub position patched; {why}"))


def override(base: np.ndarray, forced: Mapping[str, np.ndarray], *, keep: float = 0.9, min_drop: float = 0.10,
             alpha: float = 0.05, baseline_floor: float = 0.5, details: Mapping | None = None) -> dict[str, Verdict]:
    """IV-3: uniform/sequential attention drops accuracy (> 0 shown; refuted when < Δ = ``min_drop``);
    the hub pattern keeps at least ``keep`` of it (loss < (1 - keep) x baseline shown; refuted when
    shown above). Holm across patterns."""
    base = np.asarray(base, float)
    bounds = override_bounds(list(forced), base, keep=keep, min_drop=min_drop)
    return paired_family(
        "IV-3", {p: (base, np.asarray(f, float)) for p, f in forced.items()}, param="pattern", bounds=bounds,
        alpha=alpha, baseline_floor=baseline_floor,
        test=f"exact paired tests: drop > 0 / < Δ = {min_drop:g} (uniform, sequential), loss against {1 - keep:.0%} of "
             "the baseline (hub), Holm across patterns", effect_name="accuracy drop (baseline - forced)",
        describe=lambda p, b, a: f"{p} attention in the critical heads: accuracy {b.mean():.2f} -> {a.mean():.2f}",
        extra_details=details)


def transplant(base: np.ndarray, ablated: np.ndarray, transplanted: np.ndarray, *, keep: float = 0.8,
               alpha: float = 0.05, baseline_floor: float = 0.5, params: dict | None = None,
               details: dict | None = None) -> Verdict:
    """IV-4: the donor's heads keep at least ``keep`` of the function (baseline - ablated): the loss
    against the baseline is shown below ``(1 - keep) x function`` (supported) or above it (refuted)."""
    base, ablated, tr = (np.asarray(x, float) for x in (base, ablated, transplanted))
    params = dict(params or {})
    test = "exact paired tests of the loss with the donor's heads against (1 - keep) x (baseline - ablated)"
    function = float(base.mean() - ablated.mean())
    _, _, p_fn = mcnemar_exact(base.astype(bool), ablated.astype(bool), alternative="greater")
    details = {**(details or {}), "baseline_accuracy": float(base.mean()), "ablated_accuracy": float(ablated.mean()),
               "transplanted_accuracy": float(tr.mean()), "p_function": p_fn}
    margin = (1 - keep) * function
    # stopped before the transplant's tests: the power they would have at this size and margin
    power = (Power.none(f"ablating the heads does not lower accuracy ({base.mean():.2f} -> {ablated.mean():.2f}): the "
                        "margin (1 - keep) x function is not positive, so no transplant test is defined")
             if function <= 0 else rule_power(len(base), Bounds("less", margin, margin), alpha))
    floor = floor_reason(float(base.mean()), baseline_floor)
    if floor:
        return inconclusive("IV-4", params, floor, test, alpha, len(base), details, min_effect=1 - keep, power=power)
    if p_fn >= alpha or function <= 0:
        return inconclusive("IV-4", params, f"ablating the heads does not measurably hurt (accuracy {base.mean():.2f} "
                            f"-> {ablated.mean():.2f}, p = {p_fn:.3g}): they carry no function to keep", test, alpha,
                            len(base), details, min_effect=1 - keep, power=power)
    v = paired_family("IV-4", {"transplant": (base, tr)}, param="_", bounds=Bounds("less", margin, margin), alpha=alpha,
                      baseline_floor=baseline_floor, test=test, effect_name="accuracy loss with the donor's heads",
                      describe=lambda g, b, a: (f"accuracy {b.mean():.2f} (own heads), {ablated.mean():.2f} (ablated), "
                                                f"{a.mean():.2f} (donor's heads)"),
                      extra_details={"transplant": details})["transplant"]
    from dataclasses import replace

    return replace(v, params=params, min_effect=1 - keep)


# ------------------------------------------------------------------------------------------ IV-7

IV7_TEST = ("Welch t tests on the answer log-odds drop among items correct at baseline, hard half minus easy half "
            "(by baseline log-odds): > 0 supports, < Δ refutes")


def log_odds(logprob: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of the answer's probability from its log-probability (finite for p < 1)."""
    lp = np.minimum(np.asarray(logprob, float), -1e-12)
    return lp - np.log(-np.expm1(lp))


def difficulty(base_correct: np.ndarray, base_logprob: np.ndarray, abl_logprob: np.ndarray, *,
               min_effect: float = 0.5, alpha: float = 0.05, baseline_floor: float = 0.5, min_items: int = 8,
               params: dict | None = None) -> Verdict:
    """IV-7 as an interaction on the log-odds scale: a uniform shift of the answer logit moves every
    item's log-odds by about the same amount (whereas the items near the threshold flip first in
    accuracy), so "hard items are hurt more" must show a larger log-odds drop for the low-confidence
    half of the items correct at baseline. Effect: mean drop (hard) - mean drop (easy), nats."""
    params = dict(params or {"strata": 2})
    bc = np.asarray(base_correct, float).astype(bool)
    name = "log-odds drop on hard items minus on easy items (nats), items correct at baseline"
    floor = floor_reason(float(bc.mean()) if bc.size else None, baseline_floor)
    if floor:
        return inconclusive("IV-7", params, floor, IV7_TEST, alpha, int(bc.size), min_effect=min_effect,
                            effect_name=name)
    lo_b = log_odds(np.asarray(base_logprob, float)[bc])
    drop = lo_b - log_odds(np.asarray(abl_logprob, float)[bc])
    if drop.size < min_items:
        return inconclusive("IV-7", params, f"only {drop.size} items are correct at baseline; at least {min_items} are "
                            "needed for two halves", IV7_TEST, alpha, int(drop.size), min_effect=min_effect,
                            effect_name=name)
    order = np.argsort(lo_b, kind="stable")
    half = drop.size // 2
    hard, easy = drop[order[:half]], drop[order[drop.size - half:]]
    diff = float(hard.mean() - easy.mean())
    se = math.sqrt(hard.var(ddof=1) / hard.size + easy.var(ddof=1) / easy.size)
    details = {"hard": {"n": int(hard.size), "log_odds_drop": float(hard.mean()),
                        "baseline_log_odds": [float(lo_b[order[0]]), float(lo_b[order[half - 1]])]},
               "easy": {"n": int(easy.size), "log_odds_drop": float(easy.mean()),
                        "baseline_log_odds": [float(lo_b[order[drop.size - half]]), float(lo_b[order[-1]])]},
               "items": {"baseline_log_odds": [round(float(x), 3) for x in lo_b],
                         "log_odds_drop": [round(float(x), 3) for x in drop]}}
    if not se > 0:
        return inconclusive("IV-7", params, "the log-odds drops have no spread: nothing to compare", IV7_TEST, alpha,
                            int(drop.size), details, min_effect=min_effect, effect_name=name)
    welch = _sps.ttest_ind(hard, easy, equal_var=False)
    p_sup = float(_sps.ttest_ind(hard, easy, equal_var=False, alternative="greater").pvalue)
    p_ref = float(_sps.ttest_ind(hard - min_effect, easy, equal_var=False, alternative="less").pvalue)
    ci = welch.confidence_interval(1 - 2 * alpha)
    pw = t_power(hard.size + easy.size, se * math.sqrt(hard.size + easy.size), min_effect, alpha)
    power = Power(pw, min_effect, pw, 0.0, "noncentral t at the observed spread", "two halves, Welch")
    status, why = three_way(p_sup, p_ref, alpha, supported_why=f"hard items lose more log-odds (p = {p_sup:.3g})",
                            refuted_why=f"the difference is < Δ = {min_effect:g} nats (p = {p_ref:.3g})",
                            neither_why=f"difference > 0 p = {p_sup:.3g}, < Δ = {min_effect:g} p = {p_ref:.3g}")
    return Verdict(claim="IV-7", params=params, status=status,
                   reason=f"log-odds drop {hard.mean():+.2f} on hard items vs {easy.mean():+.2f} on easy ones "
                   f"({drop.size} items correct at baseline); {why}", test=IV7_TEST, statistic=float(welch.statistic),
                   p_value=p_sup, p_adjusted=p_sup, effect=diff, ci=(float(ci.low), float(ci.high)),
                   ci_level=1 - 2 * alpha, n=int(drop.size), alpha=alpha, effect_name=name,
                   details={**details, "p_refute": p_ref}, min_effect=min_effect, power=power)


# ------------------------------------------------------------------------------------------ ID-1

ID1_TEST = ("per-head betting tests over the counted trials (anytime-valid for any distribution on [0, 1], zero-"
            "inflated included; an all-zero head's p is about (1 - t)^n), then count bounds by intersection-union: at "
            "most u heads are above t when every set of u + 1 heads holds one shown below at α/(u + 1); at least l "
            "when every set of H - l + 1 heads holds one shown above at α/(H - l + 1)")

#: the share of the largest bet a head's capital may stake on one trial (1 would let one trial at the
#: far end of [0, 1] take all of it)
_BET_CAP = 0.95


def betting_p_below(x: np.ndarray, m: float, *, cap: float = _BET_CAP) -> np.ndarray:
    """Per column of ``x`` ``[n, heads]`` (values in [0, 1], rows in their recorded order), a p-value
    of H0 "mean >= m" against "mean < m", valid for any distribution on [0, 1] (Waudby-Smith and
    Ramdas 2023, estimating means of bounded random variables by betting): the capital
    K_i = prod_{j <= i} (1 + λ_j (m - x_j)) is a nonnegative supermartingale under H0 when each bet
    λ_j in [0, cap / (1 - m)] is chosen from the trials before j alone, so by Ville's inequality
    p = 1 / max_i K_i. The bet is the plug-in Kelly fraction (m - μ̂) / (σ̂² + (m - μ̂)²) from the
    trials so far, starting from one pseudo-trial at mean m with the Bernoulli(m) variance.

    For a head whose trials are all 0 the capital grows by 1 + cap·m/(1 - m) a trial after the first,
    so p is about ((1 - m) / (1 - m + cap·m))^(n - 1), near the exact (1 - m)^n; a t test, which the
    rule used before, is not valid for zero-inflated scores (up to 46x too liberal in an independent
    simulation)."""
    x = np.asarray(x, float)
    if x.ndim == 1:
        x = x[:, None]
    if not 0.0 < m < 1.0:
        raise ValueError(f"betting_p_below: the bound m = {m} must lie strictly between 0 and 1")
    n, heads = x.shape
    total = np.full(heads, m)  # pseudo-trial at m
    sq = np.full(heads, m * (1 - m))  # its variance, as a sum of squared deviations
    count = 1.0
    log_k = np.zeros(heads)
    best = np.zeros(heads)
    lam_max = cap / (1.0 - m)
    for i in range(n):
        mu = total / count
        var = sq / count
        gap = m - mu
        lam = np.clip(np.where(gap > 0, gap / np.maximum(var + gap * gap, 1e-12), 0.0), 0.0, lam_max)
        with np.errstate(divide="ignore"):
            log_k = log_k + np.log(np.maximum(1.0 + lam * (m - x[i]), 0.0))
        best = np.maximum(best, log_k)
        new_total = total + x[i]
        sq = sq + (x[i] - mu) * (x[i] - new_total / (count + 1))  # Welford's update
        total, count = new_total, count + 1
    return np.minimum(1.0, np.exp(-best))


def count_bounds(p_below: np.ndarray, p_above: np.ndarray, alpha: float, need: int) -> tuple[int, int]:
    """(l, u): the number N of heads above the threshold is at least l and at most u, each with
    confidence 1 - α, from per-head p-values valid under any dependence between heads; ``need``
    is the fewest heads above that would break the claim (the boundary the verdict turns on).

    Each bound comes from tests of "N >= w + 1" (for u) or "N <= w - 1" (for l), one per w, each an
    intersection-union test: rejected when every set of heads the null could make all-above (or
    all-below) holds evidence against that, judged within the set by Rüger's inequality (the j-th
    smallest of s p-values at or below jα/s has probability at most α under any dependence). The
    hardest set is the one of the largest p-values, so each test reads one order statistic:

    - "N >= w + 1": with r = max(min(w, need - 1), w // 2) and the p_below in descending order q,
      rejected when q_(r+1) <= (w + 1 - r) α / (w + 1). At w = need - 1 that is q_need <= α / need
      (Bonferroni within the set), and it implies every test above it, so u < need exactly when
      q_need <= α / need;
    - "N <= w - 1": rejected when at least w heads have p_above at most α / (H - w + 1).

    u is the smallest value from which every larger w is rejected, l the largest up to which every w
    is (so P(N > u) and P(N < l) are each at most α). Holm over all H heads, which the rule used
    before, asks the first head shown below to beat α/H: an all-zero head (p = 0.9^64 = 0.0012 at 64
    trials) never could, so support was impossible."""
    pb, pa = np.asarray(p_below, float), np.asarray(p_above, float)
    heads = pb.size
    need = int(min(max(need, 1), heads))
    q = np.sort(pb)[::-1]
    w = np.arange(heads)
    # r: how many of the largest p-values each test lets pass: all but one below the boundary (Bonferroni),
    # need - 1 from it, half the set far above it (so the bound reads the data there too); fixed in advance
    r = np.maximum(np.minimum(w, need - 1), w // 2)
    rej_u = q[r] <= (w + 1 - r) * alpha / (w + 1)
    bad = np.nonzero(~rej_u)[0]
    u = int(bad.max() + 1) if bad.size else 0
    asc_a = np.sort(pa)
    ws = np.arange(1, heads + 1)
    rej_l = np.searchsorted(asc_a, alpha / (heads - ws + 1), side="right") >= ws
    fail = np.nonzero(~rej_l)[0]
    lo = int(fail.min()) if fail.size else heads
    return lo, max(u, lo)


def sparsity_rule(scores: np.ndarray, *, threshold: float = 0.1, max_fraction: float = 0.05,
                  alpha: float = 0.05) -> Verdict:
    """ID-1 from per-trial Wu24 scores ``[trials, heads]`` (each in [0, 1]): fewer than
    ``max_fraction`` of the heads have a mean score above ``threshold``. Per head, betting p-values
    in each direction (:func:`betting_p_below`); from them, bounds on the count of heads above
    (:func:`count_bounds`): supported when the upper bound is below ``max_fraction`` of the heads,
    refuted when the lower bound reaches it.

    A percentile bootstrap of the fraction is not calibrated (a threshold functional: heads near t
    flip between resamples; it refuted in 31% of simulated runs where 4.8% of heads were truly above);
    Holm over per-head t tests could never support (see :func:`count_bounds`)."""
    x = np.asarray(scores, float)
    if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
        raise ValueError("sparsity_rule: Wu24 scores lie in [0, 1]; got values outside it")
    n, heads = x.shape
    limit = max_fraction * heads
    need = math.ceil(limit - 1e-9)  # the fewest heads above that break the claim
    p_below, (lo_count, hi_count) = _sparsity_counts(x, threshold, alpha, need)
    frac = float((x.mean(axis=0) > threshold).mean())
    params = {"threshold": threshold, "max_fraction": max_fraction}
    ordered = np.sort(x.mean(axis=0))[::-1]
    status, why = three_way(
        0.0 if hi_count < limit else None, 0.0 if lo_count >= limit else None, alpha,
        supported_why=f"at most {hi_count} heads ({hi_count / heads:.1%}) can be above {threshold}: below {max_fraction:.0%}",
        refuted_why=f"at least {lo_count} heads ({lo_count / heads:.1%}) are above {threshold}: {max_fraction:.0%} or more",
        neither_why=(f"between {lo_count} and {hi_count} heads ({lo_count / heads:.1%}-{hi_count / heads:.1%}) are above "
                     f"{threshold}: the bounds straddle {max_fraction:.0%}; more trials would decide"))
    shown_below = int((p_below <= alpha / max(need, 1)).sum())
    return Verdict(claim="ID-1", params=params, status=status,
                   reason=f"{frac:.1%} of {heads} heads ({round(frac * heads)}) have a mean Wu24 score > {threshold}; {why}",
                   test=ID1_TEST, statistic=frac, p_value=None, p_adjusted=None, effect=frac - max_fraction,
                   ci=(lo_count / heads - max_fraction, hi_count / heads - max_fraction), ci_level=1 - alpha, n=n,
                   alpha=alpha, effect_name=f"fraction of heads with score > {threshold}, minus {max_fraction}",
                   details={"fraction": frac, "n_heads_above": int(round(frac * heads)), "n_heads": heads,
                            "count_bounds": [lo_count, hi_count], "top_scores": ordered[:10].tolist(),
                            "heads_shown_below": shown_below,
                            "all_zero_p": float(betting_p_below(np.zeros((n, 1)), threshold)[0]) if n else None},
                   min_effect=max_fraction, power=sparsity_power(x, threshold=threshold, max_fraction=max_fraction,
                                                                 alpha=alpha))


def _sparsity_counts(x: np.ndarray, threshold: float, alpha: float, need: int) -> tuple[np.ndarray, tuple[int, int]]:
    """ID-1's per-head p-values of "mean below the threshold" and the bounds on the count above it."""
    p_below = betting_p_below(x, threshold)
    p_above = betting_p_below(1.0 - x, 1.0 - threshold)
    return p_below, count_bounds(p_below, p_above, alpha, need)


SPARSITY_POWER_DRAWS = 200  # resampled trial sets behind each ID-1 verdict's power (Monte-Carlo SE <= 0.035)


def _scaled_to(x: np.ndarray, cols: np.ndarray, target: float, *, up: bool,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """``x`` with the columns ``cols`` scaled so that each mean is at most (``up=False``) or at least
    (``up=True``, as far as scores capped at 1 allow) ``target``; other columns unchanged. Scaled up,
    a column that never scored takes the trials of the highest-scoring column, in an order of its
    own (``rng``)."""
    out = x.copy()
    if up:
        donor = out[:, int(np.argmax(out.mean(axis=0)))]
        rng = rng or np.random.default_rng(0)
        for c in cols:
            if not out[:, c].any() and donor.any():
                out[:, c] = rng.permutation(donor)
    mean = out[:, cols].mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(mean > 0, target / mean, 1.0)
    f = np.maximum(f, 1.0) if up else np.minimum(f, 1.0)
    out[:, cols] = np.clip(out[:, cols] * f, 0.0, 1.0)
    return out


def sparsity_power(x: np.ndarray, *, threshold: float, max_fraction: float, alpha: float,
                   draws: int = SPARSITY_POWER_DRAWS, seed: int = 0) -> Power:
    """ID-1's power at these trials and heads, from two worlds built out of the observed scores and
    the rule applied to resampled trials (rows drawn with replacement, every head's score of a trial
    kept together, so the heads stay as correlated as observed):

    - support, at a fifth of ``max_fraction`` of the heads above the threshold (1% at 5%): the
      highest-scoring heads scaled up to twice the threshold where they are below it, every other
      head scaled down to at most half the threshold;
    - refute, at three times ``max_fraction`` above: as many top heads scaled up to twice the threshold
      (a head that never scored takes the trials of the highest-scoring one, reordered).

    Scaling keeps each head's pattern of silent and scoring trials, which is what decides the rule:
    a head that scores on many trials cannot be shown below the threshold in few of them."""
    from rh.rules.paired import _CI

    if not _CI["on"]:
        return Power.none("not computed in a decisions-only run (rh.calibration)")
    x = np.asarray(x, float)
    n, heads = x.shape
    if n < 2 or heads < 2:
        return Power.none("fewer than 2 trials or heads: nothing to resample")
    limit = max_fraction * heads
    need = math.ceil(limit - 1e-9)
    order = np.argsort(-x.mean(axis=0), kind="stable")
    a_sup = max(1, int(round(max_fraction / 5 * heads)))
    a_ref = min(heads, int(math.ceil(3 * max_fraction * heads)))
    quiet = _scaled_to(x, order[a_sup:], threshold / 2, up=False)
    rng = np.random.default_rng(derive_seed(seed, "ID-1 power", n, heads))
    world_sup = _scaled_to(quiet, order[:a_sup], 2 * threshold, up=True, rng=rng)
    world_ref = _scaled_to(quiet, order[:a_ref], 2 * threshold, up=True, rng=rng)
    hits = {"sup": 0, "ref": 0}
    for _ in range(draws):
        rows = rng.integers(0, n, n)
        _, (_, hi) = _sparsity_counts(world_sup[rows], threshold, alpha, need)
        hits["sup"] += hi < limit
        _, (lo, _) = _sparsity_counts(world_ref[rows], threshold, alpha, need)
        hits["ref"] += lo >= limit
    return Power(hits["sup"] / draws, a_sup / heads, hits["ref"] / draws, a_ref / heads,
                 f"simulated ({draws} resamplings of the {n} trials)",
                 f"support at {a_sup} of {heads} heads above {threshold:g} (the others scaled to at most half of it), "
                 f"refute at {a_ref} above (scaled to twice it); each head's silent and scoring trials as observed")


# ------------------------------------------------------------------------------------------ ID-2, IV-6


def ratio_power(ratios: np.ndarray, *, support_ratio: float, refute_ratio: float, alpha: float) -> Power:
    """:func:`ratio_rule`'s power at ``ratios``' size: exact binomial power of each sign test, log
    ratios normal at their observed spread; support with the median at ``refute_ratio`` (at twice
    ``support_ratio`` where the two coincide), refutation at a median ratio of 1. Exactly 0 both
    ways where n prompts cannot reach α (the smallest sign-test p is 0.5^n), whatever the spread."""
    from rh.stats import min_attainable_p_binomial

    r = np.maximum(np.asarray(ratios, float).ravel(), 1e-12)
    n = r.size
    logs = np.log(r)
    sa = math.log(refute_ratio) if refute_ratio > support_ratio else math.log(2 * support_ratio)
    if min_attainable_p_binomial(n) >= alpha:
        return Power(0.0, math.exp(sa), 0.0, 1.0, "exact", f"{n} prompts: no sign test can reach p < {alpha:g}")
    sd = float(logs.std(ddof=1)) if n > 1 else math.nan
    return Power(_sign_power_at(n, sa - math.log(support_ratio), sd, alpha), math.exp(sa),
                 _sign_power_at(n, math.log(refute_ratio), sd, alpha), 1.0,
                 "exact binomial power of the sign test, log ratios normal at the observed spread",
                 "effects as median ratios")


def ratio_rule(claim: str, ratios: np.ndarray, *, support_ratio: float, refute_ratio: float, alpha: float = 0.05,
               params: dict | None = None, test: str, effect_name: str, describe: str,
               details: dict | None = None) -> Verdict:
    """Ratios (attention or attribution mass per needle token over uniform): the claims are about the
    median ratio, so one-sided exact sign tests (:func:`rh.stats.sign_pvalues`, valid for the median
    whatever the skew): median > ``support_ratio`` supports, median < ``refute_ratio`` refutes."""
    from rh.stats import min_attainable_p_binomial, sign_pvalues

    r = np.maximum(np.asarray(ratios, float), 1e-12)
    params = dict(params or {})
    n = r.size
    logs = np.log(r)
    details = {**(details or {}), "ratios": [round(float(x), 3) for x in r]}
    power = ratio_power(r, support_ratio=support_ratio, refute_ratio=refute_ratio, alpha=alpha)
    if min_attainable_p_binomial(n) >= alpha:
        return inconclusive(claim, params, f"{n} prompts cannot reach p < {alpha} with a sign test; use more",
                            test, alpha, n, details, min_effect=refute_ratio, effect_name=effect_name, power=power)
    med = float(np.median(r))
    (p_sup,) = sign_pvalues([logs - math.log(support_ratio)], "greater")
    (p_ref,) = sign_pvalues([logs - math.log(refute_ratio)], "less")
    ci = bootstrap_ci(logs, np.median, n_boot=2000, level=1 - 2 * alpha, seed=0)
    status, why = three_way(p_sup, p_ref, alpha, supported_why=f"the median ratio is > {support_ratio:g} (p = {p_sup:.3g})",
                            refuted_why=f"the median ratio is < Δ = {refute_ratio:g} (p = {p_ref:.3g})",
                            neither_why=(f"neither > {support_ratio:g} (p = {p_sup:.3g}) nor < {refute_ratio:g} "
                                         f"(p = {p_ref:.3g}) is shown"))
    return Verdict(claim=claim, params=params, status=status, reason=f"{describe}: median {med:.2f}x over {n}; {why}",
                   test=test, statistic=med, p_value=p_sup, p_adjusted=p_sup, effect=float(np.log(med)), ci=ci,
                   ci_level=1 - 2 * alpha, n=n, alpha=alpha, effect_name=effect_name,
                   details={**details, "median_ratio": med, "p_refute": p_ref}, min_effect=refute_ratio,
                   power=power)


# ------------------------------------------------------------------------------------------ ID-5

ID5_TEST = ("per-head intersection-union test on fresh validation prompts: a candidate (in every task's top K on the "
            "identification split) is general when one-sided sign tests show its median needle mass per token above "
            "`ratio` x uniform in every task (p = the largest), Holm over candidates; valid whatever the dependence "
            "between tasks that share windows")


def general_heads_rule(ratios: Mapping[str, np.ndarray], candidates: Sequence[str], *, ratio: float = 10.0,
                       alpha: float = 0.05, accuracy: Mapping[str, float] | None = None, baseline_floor: float = 0.5,
                       k: int = 10, extra_details: dict | None = None) -> Verdict:
    """ID-5 from ``ratios[task]`` = ``[n_prompts, n_candidates]`` needle-mass ratios of the candidate
    heads on each task's validation prompts. Supported when at least one candidate is shown above
    ``ratio`` in every task; refuted when every candidate is shown below it in some task (none of
    the heads every task ranks high retrieves in all of them); inconclusive otherwise, or when no
    head is in every top K, or when a task's baseline accuracy is below the floor."""
    from rh.stats import holm

    tasks = sorted(ratios)
    params = {"k": k, "tasks": len(tasks)}
    name = "number of candidates shown general"
    details = {"candidates": list(candidates), "ratio": ratio, **(extra_details or {}),
               "task_accuracy": dict(accuracy or {})}
    if len(tasks) < 2:
        return inconclusive("ID-5", params, f"general heads need at least two tasks, got {tasks}", ID5_TEST, alpha,
                            details=details, min_effect=ratio, effect_name=name)
    low = {t: a for t, a in (accuracy or {}).items() if a < baseline_floor}
    if accuracy is None or low:
        return inconclusive("ID-5", params, "the model does not retrieve on " + (
            ", ".join(f"{t} (accuracy {a:.2f})" for t, a in low.items()) if low else "tasks of unknown accuracy") +
            f" (floor {baseline_floor:.2f}): a model that retrieves nothing has no retrieval heads to share (a floor)",
            ID5_TEST, alpha, details=details, min_effect=ratio, effect_name=name)
    if not candidates:
        return inconclusive("ID-5", params, f"no head is in the top {k} of every task: there is no candidate to test "
                            "(an empty intersection is not a test)", ID5_TEST, alpha, details=details,
                            min_effect=ratio, effect_name=name)
    lr = math.log(ratio)
    # every (candidate, task) sample first, then its sign tests (the claim is about the median ratio:
    # rh.stats.sign_pvalues)
    xs = {}
    for j in range(len(candidates)):
        for t in tasks:
            x = np.log(np.maximum(np.asarray(ratios[t], float)[:, j], 1e-12)) - lr
            xs[j, t] = x[x != 0]
    live = [key for key, x in xs.items() if x.size]
    p_greater = dict(zip(live, sign_pvalues([xs[key] for key in live], "greater")))
    p_less = dict(zip(live, sign_pvalues([xs[key] for key in live], "less")))
    p_sup, p_ref, med = [], [], []
    for j in range(len(candidates)):
        ps, pr, mj = [], [], []
        for t in tasks:
            ps.append(p_greater.get((j, t), 1.0))
            pr.append(p_less.get((j, t), 1.0))
            mj.append(float(np.median(np.asarray(ratios[t], float)[:, j])))
        p_sup.append(max(ps))  # general = above in every task (intersection-union)
        p_ref.append(min(1.0, len(tasks) * min(pr)))  # not general = below in some task (Bonferroni over tasks)
        med.append(mj)
    adj_s = holm(p_sup)
    adj_r = max(p_ref)  # refuted only if every candidate is shown not general (intersection-union over heads)
    general = [c for c, p in zip(candidates, adj_s) if p < alpha]
    details.update({"per_head": {c: {"p_general": ps, "p_general_adjusted": pa, "p_not_general": pr,
                                     "median_ratio_per_task": dict(zip(tasks, m))}
                                 for c, ps, pa, pr, m in zip(candidates, p_sup, adj_s, p_ref, med)},
                    "general_heads": general})
    n = min(np.asarray(ratios[t]).shape[0] for t in tasks)
    status, why = three_way(min(adj_s), adj_r, alpha,
                            supported_why=f"{len(general)} head(s) retrieve in every task: {', '.join(general)}",
                            refuted_why=f"every candidate falls below {ratio:g}x in some task (p = {adj_r:.3g})",
                            neither_why=f"smallest adjusted p for a general head {min(adj_s):.3g}; for none {adj_r:.3g}")
    power = _id5_power(ratios, tasks, len(candidates), ratio=ratio, alpha=alpha)
    return Verdict(claim="ID-5", params=params, status=status,
                   reason=f"{len(candidates)} head(s) are in the top {k} of all {len(tasks)} tasks ({', '.join(tasks)}): "
                   f"{', '.join(candidates)}; {why}", test=ID5_TEST, statistic=float(len(general)),
                   p_value=min(p_sup), p_adjusted=min(adj_s), effect=float(len(general)), ci=None, n=n, alpha=alpha,
                   effect_name=name, details=details, min_effect=ratio, power=power)


def _id5_power(ratios: Mapping[str, np.ndarray], tasks: Sequence[str], m: int, *, ratio: float,
               alpha: float) -> Power:
    """ID-5's power at these sizes, log ratios normal at each task's observed spread (all candidates
    pooled): to support with one candidate at a median of 4 x ``ratio`` in every task (its sign test
    rejecting in each task at Holm's first level α/m), and to refute with every candidate at a
    median ratio of 1 (each shown below in some task at α/T)."""
    sup, miss = 1.0, []
    for t in tasks:
        x = np.log(np.maximum(np.asarray(ratios[t], float), 1e-12))
        sd = float(np.nanstd(x, ddof=1)) if x.size > 1 else math.nan
        n = int(np.asarray(ratios[t]).shape[0])
        if not (sd > 0):
            return Power.none("no spread of the log ratios to plant an effect at")
        sup *= _sign_power_at(n, math.log(4.0), sd, alpha / max(m, 1))
        miss.append(1.0 - _sign_power_at(n, math.log(ratio), sd, alpha / len(tasks)))
    ref = (1.0 - float(np.prod(miss))) ** max(m, 1)
    return Power(sup, 4.0 * ratio, ref, 1.0, "exact binomial power of the sign tests, log ratios normal at each "
                 "task's observed spread", "support: one candidate at 4x the threshold in every task; refute: every "
                 "candidate at ratio 1")


# ------------------------------------------------------------------------------------------ ID-3, ID-4

AGREE_TEST = ("the population top-K sets bounded by inference for ranks: simultaneous bands of each head's mean "
              "score (1 - α/2 per ranking; bootstrap-t of the largest studentized deviation, prompts resampled; each "
              "prompt's mean removed); a head is surely in a ranking's top K when its band clears the bands of all "
              "but K heads, surely out when K bands clear its own; the heads differing between the two top-K sets "
              "are at most K minus those surely in both and at least those surely in one and out of the other; "
              "below Δ supports, above Δ refutes")

#: the quietest heads' standard errors are raised to the median head's in the bands, so that a head
#: scoring (nearly) the same on every prompt does not get a band of zero width
_SE_FLOOR_QUANTILE = 0.5


def rank_bands(scores: np.ndarray, weights: np.ndarray | None, alpha: float, *, n_boot: int = 400,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, mean) per head: simultaneous 1 - ``alpha`` bands for the heads' mean scores over
    the prompts that count (``weights`` > 0), by the bootstrap-t of the largest studentized deviation
    over a bootstrap of the prompts (each resample studentized by its own standard errors: scaling
    by the original ones under-covered skewed scores, 18.5% misses at α = 10% in the unit test's
    simulation). Each prompt's mean over heads is removed first: it shifts every head alike (a prompt
    that draws attention everywhere), so the heads' order is unchanged and their comparisons sharper."""
    m, se, c, _, _ = _band_fit(scores, weights, alpha, n_boot=n_boot, rng=rng)
    return m - c * se, m + c * se, m


def _band_fit(scores: np.ndarray, weights: np.ndarray | None, alpha: float, *, n_boot: int = 400,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, float]:
    """:func:`rank_bands`' parts: (mean, floored standard error) per head, the bootstrap-t critical
    value ``c`` (the bands are mean ± c · se), and for :func:`agreement_power` the standard errors
    before the floor and the weight of the prompts that count."""
    rng = rng or np.random.default_rng(0)
    X = np.asarray(scores, float).reshape(len(scores), -1)
    w = np.ones(len(X)) if weights is None else np.asarray(weights, float)
    X, w = X[w > 0], w[w > 0]
    n = len(X)
    Xc = X - X.mean(axis=1, keepdims=True)

    def stats(wts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total = wts.sum(axis=-1, keepdims=True)
        m = (wts @ Xc) / total
        var = ((wts @ Xc ** 2) / total - m ** 2) * (total / np.maximum(total - 1, 1.0))
        raw = np.sqrt(np.maximum(var, 0.0) / total)
        se = np.maximum(raw, np.quantile(raw, _SE_FLOOR_QUANTILE, axis=-1, keepdims=True))
        return m, np.where(se > 0, se, 1e-12), raw

    m, se, raw = stats(w[None, :])
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) * w[None, :]
    mb, seb, _ = stats(counts)
    c = float(np.quantile(np.abs((mb - m) / seb).max(axis=1), 1 - alpha))
    return m[0], se[0], c, raw[0], float(w.sum())


def top_membership(low: np.ndarray, high: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(surely in, surely out) of the top K, from simultaneous bands: a head is surely in when its
    lower end is above the upper ends of at least H - K other heads, surely out when at least K
    other heads' lower ends are above its upper end."""
    heads = low.size
    below = np.searchsorted(np.sort(high), low, side="left")  # heads whose upper end is below this lower end
    above = heads - np.searchsorted(np.sort(low), high, side="right")  # heads whose lower end is above this upper end
    return below >= heads - k, above >= k


AGREE_POWER_DRAWS = 400  # simulated pairs of rankings behind each agreement verdict's power


def _plant_order(order_a: np.ndarray, k: int, d: int) -> np.ndarray:
    """The heads in the order ranking B's sorted means are given to them so that B's top K shares
    exactly ``k - d`` heads with A's (``order_a``: A's heads, best first): A's first ``k - d``, then
    A's next ``d`` below its top K, then A's last ``d`` of its top K, then the rest in A's order."""
    return np.r_[order_a[: k - d], order_a[k: k + d], order_a[k - d: k], order_a[k + d:]]


def _membership_rows(low: np.ndarray, high: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_membership` of each row of ``[draws, heads]`` bands."""
    ins, outs = np.empty(low.shape, bool), np.empty(low.shape, bool)
    for r in range(len(low)):
        ins[r], outs[r] = top_membership(low[r], high[r], k)
    return ins, outs


def _sim_bands(mu: np.ndarray, se: np.ndarray, c: float, n: float, z: np.ndarray,
               chi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Simulated bands of :func:`rank_bands` per row: means normal at ``se`` around ``mu``, standard
    errors estimated with ``n - 1`` degrees of freedom (``chi``: χ² draws over them) and floored at
    the row's median as the rule floors them, the critical value ``c`` as in the data."""
    m = mu + se * z
    s = se * np.sqrt(chi)
    s = np.maximum(s, np.quantile(s, _SE_FLOOR_QUANTILE, axis=1, keepdims=True))
    s = np.where(s > 0, s, 1e-12)
    return m - c * s, m + c * s


def agreement_power(fit_a: tuple, fit_b: tuple, k: int, min_effect: float, *, draws: int = AGREE_POWER_DRAWS,
                    seed: int = 0) -> Power:
    """Power of :func:`agreement` at these sizes by a seeded simulation of its decision. Data model
    (``fit_* = (mean, floored se, c, se, prompts)`` from :func:`_band_fit`): each ranking's head means
    normal around a planted truth at the data's standard errors, the standard errors re-estimated
    (χ² with prompts - 1 degrees of freedom) and floored at their median as the rule does, the band's
    critical value the data's. The truth is each ranking's observed profile of means: A's as
    observed, B's sorted means given to the heads so that the two true top-K sets differ by exactly
    d heads (:func:`_plant_order`). Support at d = 0 (the same top K), refutation at
    d = max(⌊Δ⌋ + 1, ⌈2Δ⌉) (at most K and the heads outside the top K); the two rankings' noise is
    drawn independently."""
    (ma, _, ca, sa, na), (mb, _, cb, sb, nb) = fit_a, fit_b
    ma, sa, mb, sb = (np.asarray(x, float) for x in (ma, sa, mb, sb))
    heads = ma.size
    d_ref = min(k, heads - k, max(int(math.floor(min_effect)) + 1, int(math.ceil(2 * min_effect))))
    rng = np.random.default_rng(derive_seed(seed, "agreement-power"))

    def chi(n: float) -> np.ndarray:
        df = max(float(n) - 1.0, 1.0)
        return rng.chisquare(df, (draws, heads)) / df

    in_a, out_a = _membership_rows(*_sim_bands(ma, sa, ca, na, rng.standard_normal((draws, heads)), chi(na)), k)
    order_a = np.argsort(-ma, kind="stable")
    by_b = np.argsort(-mb, kind="stable")
    zb, chib = rng.standard_normal((draws, heads)), chi(nb)
    rates = {}
    for d in sorted({0, max(d_ref, 0)}):
        mu_b, sd_b = np.empty(heads), np.empty(heads)
        seq = _plant_order(order_a, k, d)
        mu_b[seq], sd_b[seq] = mb[by_b], sb[by_b]
        in_b, out_b = _membership_rows(*_sim_bands(mu_b, sd_b, cb, nb, zb, chib), k)
        d_up = k - (in_a & in_b).sum(axis=1)
        d_lo = np.maximum((in_a & out_b).sum(axis=1), (in_b & out_a).sum(axis=1))
        sup, ref = d_up < min_effect, d_lo > min_effect
        rates[d] = (float((sup & ~ref).mean()), float((ref & ~sup).mean()))
    method = "simulated (the rule's decision, seeded)"
    note = (f"{draws} simulated pairs of rankings, each head's mean normal at its standard error around the observed "
            f"profile of means; support: the same top K; refute: {d_ref} of the top {k} heads differing")
    if d_ref <= min_effect:
        return Power(rates[0][0], 0.0, 0.0, float(d_ref), method,
                     note + f": no more than {d_ref} can differ here, so Δ = {min_effect:g} cannot be exceeded and the "
                     "rule cannot refute")
    return Power(rates[0][0], 0.0, rates[d_ref][1], float(d_ref), method, note)


def _half_means(scores: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Weighted per-head means over the prompts selected by each row of ``mask`` ``[rounds, n]``."""
    w = mask * weights[None, :]
    return (w @ scores) / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def _topk_sets(means: np.ndarray, k: int) -> np.ndarray:
    """Per row the indices of the ``k`` largest means, largest first, ties by index: the first ``k``
    of a stable argsort of ``-means``, found by a partition and a sort of the selected ``k`` only."""
    neg = -np.asarray(means)
    if neg.ndim != 2 or not 0 < k < neg.shape[1] or np.isnan(neg).any():
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]  # the k-th smallest of each row
    less, tied = neg < kth, neg == kth
    # all values below the k-th, then the lowest-indexed of those equal to it, as many as fit
    take = less | (tied & (np.cumsum(tied, axis=1) <= k - less.sum(axis=1, keepdims=True)))
    idx = np.nonzero(take)[1].reshape(len(neg), k)  # ascending index within each row
    order = np.argsort(np.take_along_axis(neg, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


_OVERLAP_CHUNK = 1 << 22  # elements of the [rows, k, k] comparison held at once


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the number of distinct values of ``a``'s row found in ``b``'s (``np.intersect1d(x, y).size``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or a.dtype.kind not in "iub" or b.dtype.kind not in "iub":
        return np.array([np.intersect1d(x, y).size for x, y in zip(a, b)], dtype=float)
    sa = np.sort(a, axis=1)
    first = np.ones(sa.shape, dtype=bool)  # the first of each run of equal values: each value once
    first[:, 1:] = sa[:, 1:] != sa[:, :-1]
    out = np.empty(len(a), dtype=float)
    step = max(1, _OVERLAP_CHUNK // max(1, a.shape[1] * b.shape[1]))
    for s in range(0, len(a), step):
        found = (sa[s : s + step, :, None] == b[s : s + step, None, :]).any(axis=2)
        out[s : s + step] = (found & first[s : s + step]).sum(axis=1)
    return out


def _halves(rng: np.random.Generator, n: int, rounds: int) -> np.ndarray:
    """``[rounds, n]`` masks of a random half (``n // 2`` prompts) per round; ``rng.permuted`` of
    ``rounds`` rows draws exactly what ``rounds`` calls of ``rng.permutation(n)`` draw."""
    mask = np.zeros((rounds, n))
    perms = rng.permuted(np.tile(np.arange(n), (rounds, 1)), axis=1)
    np.put_along_axis(mask, perms[:, : n // 2], 1.0, axis=1)
    return mask


def agreement(claim: str, scores_a: np.ndarray, scores_b: np.ndarray, *, k: int, min_effect: float,
              same_prompts: bool, weights_a: np.ndarray | None = None, weights_b: np.ndarray | None = None,
              alpha: float = 0.05, n_boot: int = 400, seed: int = 0, params: dict | None = None, what: str = "",
              baseline_accuracy: float | None = None, baseline_floor: float = 0.5, family: int = 1) -> Verdict:
    """ID-3 / ID-4 / ID-7: two rankings "agree" when their top-K sets share all but fewer than Δ
    heads (``min_effect``), in the population the prompts are drawn from.

    ``scores_*`` are per-prompt head scores ``[n, ...]``, ``weights_*`` which prompts count (Wu24's
    ROUGE filter). Each ranking's top K is pinned down by inference for ranks (:func:`rank_bands`,
    :func:`top_membership`: simultaneous bands at α/2 per ranking, divided by ``family`` when the
    claim's parametrized members are decided together): the heads that differ between the two top-K
    sets are at most K minus those surely in both, and at least those surely in one and surely out
    of the other. Supported when the upper bound is below Δ, refuted when the lower bound is above it.

    The split-half overlaps (each ranking with itself and with the other across halves of the prompts)
    are reported, not decided on: the deficit between them, which decided until now, measures the
    difference at half the sample with the noise of half the sample, about half the true difference
    (it supported in 63-83% of an independent simulation's runs where the true top-10 sets differed by
    exactly Δ = 2 heads)."""
    params = dict(params or {})
    name = "heads in one top K and not the other (of K)"
    floor = floor_reason(baseline_accuracy, baseline_floor)
    if floor:  # the power the rule would have on these scores, where they can be bounded at all
        return inconclusive(claim, params, floor, AGREE_TEST, alpha, min_effect=min_effect, effect_name=name,
                            power=_floor_agreement_power(scores_a, scores_b, weights_a, weights_b, k, min_effect,
                                                         alpha / (2 * max(int(family), 1)), n_boot, seed))
    A = np.asarray(scores_a, float).reshape(len(scores_a), -1)
    B = np.asarray(scores_b, float).reshape(len(scores_b), -1)
    wa = np.ones(len(A)) if weights_a is None else np.asarray(weights_a, float)
    wb = np.ones(len(B)) if weights_b is None else np.asarray(weights_b, float)
    if wa.sum() < 8 or wb.sum() < 8:
        return inconclusive(claim, params, f"too few prompts count ({int(wa.sum())} and {int(wb.sum())}; at least 8 "
                            "each) to bound the rankings", AGREE_TEST, alpha, min_effect=min_effect, effect_name=name,
                            power=_no_agreement_power(k, min_effect))
    if same_prompts and len(A) != len(B):
        raise ValueError(f"agreement: same_prompts needs as many rows ({len(A)} vs {len(B)})")
    rng = np.random.default_rng(seed)
    level = alpha / (2 * max(int(family), 1))
    fit_a = _band_fit(A, wa, level, n_boot=n_boot, rng=rng)
    fit_b = _band_fit(B, wb, level, n_boot=n_boot, rng=rng)
    (m_a, se_a, c_a), (m_b, se_b, c_b) = fit_a[:3], fit_b[:3]
    lo_a, hi_a = m_a - c_a * se_a, m_a + c_a * se_a
    lo_b, hi_b = m_b - c_b * se_b, m_b + c_b * se_b
    in_a, out_a = top_membership(lo_a, hi_a, k)
    in_b, out_b = top_membership(lo_b, hi_b, k)
    d_up = int(k - (in_a & in_b).sum())
    d_lo = int(max((in_a & out_b).sum(), (in_b & out_a).sum()))
    top_a = _topk_sets((wa @ A / wa.sum())[None], k)[0]
    top_b = _topk_sets((wb @ B / wb.sum())[None], k)[0]
    observed = int(np.intersect1d(top_a, top_b).size)
    # the split-half overlaps, for the report (each ranking with itself and with the other)
    rounds = min(n_boot, 200)
    ha = _halves(rng, len(A), rounds)
    hb = ha if same_prompts else _halves(rng, len(B), rounds)
    a1, a2 = _topk_sets(_half_means(A, wa, ha), k), _topk_sets(_half_means(A, wa, 1 - ha), k)
    b1, b2 = _topk_sets(_half_means(B, wb, hb), k), _topk_sets(_half_means(B, wb, 1 - hb), k)
    self_a, self_b = _overlaps(a1, a2), _overlaps(b1, b2)
    cross = (_overlaps(a1, b2) + _overlaps(b1, a2)) / 2
    chance = k * k / A.shape[1]
    details = {"overlap": observed, "differ_bounds": [d_lo, d_up], "surely_in": [int(in_a.sum()), int(in_b.sum())],
               "surely_in_both": int((in_a & in_b).sum()), "band_level": 1 - level,
               "self_overlap_a": float(self_a.mean()), "self_overlap_b": float(self_b.mean()),
               "cross_overlap": float(cross.mean()), "chance_overlap": chance, "rounds": rounds,
               "prompts": [int(wa.sum()), int(wb.sum())]}
    status, why = three_way(0.0 if d_up < min_effect else None, 0.0 if d_lo > min_effect else None, alpha,
                            supported_why=f"at most {d_up} of the top {k} heads differ: fewer than Δ = {min_effect:g}",
                            refuted_why=f"at least {d_lo} of the top {k} heads differ: more than Δ = {min_effect:g}",
                            neither_why=(f"between {d_lo} and {d_up} of the top {k} heads differ, which straddles Δ = "
                                         f"{min_effect:g}: the prompts pin down {int(in_a.sum())} and {int(in_b.sum())} "
                                         f"heads of each top {k}"))
    return Verdict(claim=claim, params=params, status=status,
                   reason=(f"{what}: {observed} of the top {k} heads shared (split halves: each ranking shares "
                           f"{self_a.mean():.1f} and {self_b.mean():.1f} with itself, {cross.mean():.1f} with the "
                           f"other); {why}"), test=AGREE_TEST, statistic=float(k - observed), p_value=None,
                   p_adjusted=None, effect=float(k - observed), ci=(float(d_lo), float(d_up)), ci_level=1 - alpha,
                   n=int(min(wa.sum(), wb.sum())), alpha=alpha, effect_name=name, details=details,
                   min_effect=min_effect, power=_agreement_power_of(fit_a, fit_b, k, min_effect, seed))


def _agreement_power_of(fit_a: tuple, fit_b: tuple, k: int, min_effect: float, seed: int) -> Power:
    """:func:`agreement_power`, or why none is stated (inside the calibration's decisions-only
    runs, which read only the statuses; rankings of different heads)."""
    from rh.rules.paired import _CI

    if not _CI["on"]:
        return Power.none("not computed in a decisions-only run (rh.calibration)")
    if np.asarray(fit_a[0]).size != np.asarray(fit_b[0]).size or not 0 < k < np.asarray(fit_a[0]).size:
        return Power.none("the two rankings do not score the same heads, or K leaves no head outside the top K")
    return agreement_power(fit_a, fit_b, k, min_effect, seed=seed)


def _no_agreement_power(k: int, min_effect: float) -> Power:
    """Fewer than 8 prompts: the rule bounds neither ranking, so it decides nothing, whatever the data."""
    d_ref = min(k, max(int(math.floor(min_effect)) + 1, int(math.ceil(2 * min_effect))))
    return Power(0.0, 0.0, 0.0, float(d_ref), "exact", "fewer than 8 prompts count: the rule bounds neither ranking, "
                 "whatever the data")


def _floor_agreement_power(scores_a, scores_b, weights_a, weights_b, k: int, min_effect: float, level: float,
                           n_boot: int, seed: int) -> Power:
    """The power the rule would have on these scores, for a verdict stopped at the floor."""
    try:
        A = np.asarray(scores_a, float).reshape(len(scores_a), -1)
        B = np.asarray(scores_b, float).reshape(len(scores_b), -1)
        wa = np.ones(len(A)) if weights_a is None else np.asarray(weights_a, float)
        wb = np.ones(len(B)) if weights_b is None else np.asarray(weights_b, float)
    except (TypeError, ValueError):
        return Power.none("the scores could not be read")
    if wa.sum() < 8 or wb.sum() < 8:
        return _no_agreement_power(k, min_effect)
    rng = np.random.default_rng(seed)
    fit_a = _band_fit(A, wa, level, n_boot=n_boot, rng=rng)
    fit_b = _band_fit(B, wb, level, n_boot=n_boot, rng=rng)
    return _agreement_power_of(fit_a, fit_b, k, min_effect, seed)
