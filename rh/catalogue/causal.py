"""rh's causal-validation families (CA-1 ... CA-8): each one's rule, smallest effect Δ, calibration,
figures and parameters, registered as a team's own family would be (:mod:`rh.claim_families`).

The figures are drawn from the verdicts' details (PNG bytes); the simulators are
:mod:`rh.calibration`'s, at the sizes :func:`rh.calibration.sizes` reads from the profile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rh import calibration as cal
from rh.claim_families import Calibration, ClaimFamily, Figure, Parameter, claim_rows, register_family
from rh.rules import claims as rules
from rh.rules import field as field_rules
from rh.rules import sweep

__all__ = ["ca1_ablation_curve", "distractor_figure", "compression_figure", "curve_figure", "minimality_figure",
           "FAMILIES"]


def _num(x: Any) -> float:
    """A detail as a number to plot: NaN (nothing drawn) where it was not measured (None)."""
    return float("nan") if x is None else float(x)


def ca1_ablation_curve(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-1's verdicts as a curve: accuracy vs number of heads ablated, top-K against random-K,
    each random draw's own accuracy as a dot (seed 001's Figure 8); the rows under Wu24's protocol
    (``phase="decode"``) dashed beside them; None without CA-1 verdicts.
    (:func:`rh.report.ablation.accuracy_vs_k_curve` draws the same from per-sample results.)"""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rows = sorted(
        (v for v in verdicts if v.get("claim") == "CA-1" and v.get("details", {}).get("top_accuracy") is not None),
        key=lambda v: v["params"]["k"],
    )
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.axhline(rows[0]["details"]["baseline_accuracy"], color="0.5", ls="--", lw=1, label="no ablation")
    ks: list = []
    for phase, style, what in (("all", "-", ""), ("decode", ":", ", decoding only (Wu24)")):
        mine = [v for v in rows if v["params"].get("phase", "all") == phase]
        if not mine:
            continue
        ks = sorted({*ks, *(v["params"]["k"] for v in mine)})
        at = [v["params"]["k"] for v in mine]
        ax.plot(at, [_num(v["details"].get("random_accuracy")) for v in mine], "o" + style, color="tab:blue",
                label=f"random K{what}" + ("" if what else " (each item with one draw)"))
        for k, v in zip(at, mine):
            # draws stopped early have no accuracy of their own
            draws = [a for a in v["details"].get("random_accuracy_per_draw", []) if a is not None]
            if draws and phase == "all":
                ax.scatter([k] * len(draws), draws, color="tab:blue", alpha=0.25, s=12)
        ax.plot(at, [v["details"]["top_accuracy"] for v in mine], "s" + style, color="tab:red",
                label=f"top K by ranking{what}")
    ax.set_xlabel("heads ablated (K)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(ks)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("CA-1: top-K vs random-K ablation")
    return png(fig)


def distractor_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-7: accuracy with no ablation, the top K and random K ablated; distractor answers with no
    ablation and with the top K ablated."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    acc = [v for v in claim_rows(verdicts, "CA-7") if v["params"].get("part") == "accuracy"]
    rate = [v for v in claim_rows(verdicts, "CA-7") if v["params"].get("part") == "distractor_rate"]
    if not acc or "top_accuracy" not in acc[0]["details"]:
        return None
    a = acc[0]["details"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7, 3.2))
    ax1.bar(["none", f"top {acc[0]['params']['k']}", "random K"],
            [a["baseline_accuracy"], a["top_accuracy"], _num(a.get("random_accuracy"))],
            color=["0.6", "tab:red", "tab:blue"])  # random K: NaN (no bar) where the floor left the sets unread
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("exact-match accuracy")
    ax1.set_title(f"accuracy among distractors ({acc[0]['status']})", fontsize=8)
    if rate and rate[0]["details"].get("baseline_distractor_rate") is not None:
        r = rate[0]["details"]
        ax2.bar(["none", f"top {rate[0]['params']['k']}"], [r["baseline_distractor_rate"], r["top_distractor_rate"]],
                color=["0.6", "tab:red"])
        ax2.set_title(f"answers with a distractor's value ({rate[0]['status']})", fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("rate")
    fig.suptitle("CA-7: the top heads among distractor needles", fontsize=9)
    return png(fig)


def compression_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-8: accuracy with every head outside the top K on a sink + recent window, and with the top K
    on it, per K; the KV-cache share the policy saves (a KV head only when all its query heads are restricted)."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rows = sorted(claim_rows(verdicts, "CA-8"), key=lambda v: (v["params"]["k"], v["params"]["arm"]))
    if not rows:
        return None
    ks = sorted({v["params"]["k"] for v in rows})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    base = rows[0]["details"].get("baseline_accuracy")
    if base is not None:
        ax.axhline(base, color="0.5", ls="--", lw=1, label="full attention everywhere")
    for arm, color, label in (("others", "tab:green", "heads outside the top K restricted"),
                              ("top", "tab:red", "top K restricted")):
        pts = [(v["params"]["k"], v["details"].get("after_accuracy")) for v in rows if v["params"]["arm"] == arm]
        pts = [(k, a) for k, a in pts if a is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=label)
    for v in rows:
        kv = v["details"].get("kv_cache") or {}
        if v["params"]["arm"] == "others" and kv.get("saved_fraction") is not None:
            ax.annotate(f"KV saved {kv['saved_fraction']:.0%}", (v["params"]["k"], v["details"].get("after_accuracy") or 0),
                        textcoords="offset points", xytext=(4, -12), fontsize=7, color="tab:green")
    d = rows[0]["params"]
    ax.set_xticks(ks)
    ax.set_xlabel("heads kept whole (K)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"CA-8: a {d['sink']}-token sink + {d['window']}-token window", fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return png(fig)



def curve_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-9: accuracy over the sweep of K, top K against random K, and the gap between them with its
    band, simultaneous over K."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rows = [v for v in claim_rows(verdicts, "CA-9") if v["details"].get("gap") is not None]
    if not rows:
        return None
    d = rows[0]["details"]
    ks = d["ks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
    ax1.axhline(d["baseline_accuracy"], color="0.5", ls="--", lw=1, label="no ablation")
    ax1.plot(ks, d["random_accuracy"], "o-", color="tab:blue", label="random K (one draw per item)")
    ax1.plot(ks, d["top_accuracy"], "s-", color="tab:red", label="top K by ranking")
    ax1.set_xscale("log")
    ax1.set_xlabel("heads ablated (K)")
    ax1.set_ylabel("exact-match accuracy")
    ax1.set_ylim(-0.05, 1.05)
    ax1.legend(frameon=False, fontsize=7)
    ax2.fill_between(ks, d["band_lo"], d["band_hi"], color="tab:purple", alpha=0.2, label="simultaneous 95% band")
    ax2.plot(ks, d["gap"], "o-", color="tab:purple", label="random minus top accuracy")
    ax2.axhline(0, color="0.3", lw=0.8)
    ax2.axhline(rows[0].get("min_effect") or 0, color="0.5", ls=":", lw=1, label="Δ (for the mean over K)")
    ax2.set_xscale("log")
    ax2.set_xlabel("heads ablated (K)")
    ax2.legend(frameon=False, fontsize=7)
    phase = rows[0]["params"].get("phase", "all")
    fig.suptitle(f"CA-9: the ablation curve ({'decoding only, Wu24' if phase == 'decode' else 'every position'}; "
                 f"{rows[0]['status']})", fontsize=9)
    return png(fig)


def minimality_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-10: each top head's recovery when dropped from the ablated set, with its interval and δ."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rows = [v for v in claim_rows(verdicts, "CA-10") if v["details"].get("recovery")]
    if not rows:
        return None
    d = rows[0]["details"]
    heads = d["heads"]
    rec = [d["recovery"][h] for h in heads]
    lo = [d["recovery_ci"][h][0] for h in heads]
    hi = [d["recovery_ci"][h][1] for h in heads]
    colors = ["tab:green" if h in d["needed"] else "tab:red" if h in d["not_needed"] else "0.6" for h in heads]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(heads))
    ax.bar(x, rec, color=colors)
    ax.errorbar(x, rec, yerr=[[max(r - a, 0) for r, a in zip(rec, lo)], [max(b - r, 0) for r, b in zip(rec, hi)]],
                fmt="none", ecolor="0.2", lw=1)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axhline(rows[0].get("min_effect") or 0, color="0.5", ls=":", lw=1)
    ax.set_xticks(list(x))
    ax.set_xticklabels(heads, rotation=45, fontsize=7)
    ax.set_ylabel("accuracy recovered")
    ax.set_title("CA-10: each top head dropped from the ablated set (green: needed, red: not, grey: undecided)",
                 fontsize=8)
    return png(fig)


def _k(k) -> str:
    return f"K={k}"


def _depth(d) -> str:
    return f"depth={d:g}"


FAMILIES = (
    ClaimFamily("CA-1", "ablating the top-K heads drops accuracy more than K random heads", rule=rules.necessity,
                delta=lambda p: p.ca1_min_gap,
                calibration=lambda p, s: Calibration(cal.sim_ca1, 0.0, p.ca1_min_gap, p.ca1_min_gap + 0.1, 0.0, seed=0),
                figures=(Figure("CA-1: accuracy vs heads ablated", lambda rows, meta: ca1_ablation_curve(rows)),),
                parameters=(Parameter("ablation_k", "ablation_levels", _k, "k"),)),
    ClaimFamily("CA-2", "the top-K drop grows with K", rule=rules.dose_response, delta=lambda p: p.dose_min_growth,
                calibration=lambda p, s: Calibration(cal.shapes(cal.sim_ca2_with, (*cal.LOG_NOISE, "both-ways")), 0.0,
                                                     p.dose_min_growth, 2 * p.dose_min_growth, 0.0, seed=1)),
    ClaimFamily("CA-3", "ablating the lowest-scoring heads keeps accuracy", rule=rules.inverse,
                delta=lambda p: p.ni_margin,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_ca3_with), p.ni_margin, p.ni_margin, 0.0, 2 * p.ni_margin,
                                                     seed=2),
                parameters=(Parameter("inverse_k", "inverse_levels", _k, "k"),)),
    ClaimFamily("CA-4", "ablating the general heads hurts every task", rule=rules.drop_family,
                delta=lambda p: p.min_drop,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_drop_with(s["tasks"], s["task"])), 0.0, p.min_drop,
                                                     p.min_drop + 0.1, 0.0, seed=3),
                parameters=(Parameter("id_task", "id_tasks", str, "task"),)),
    ClaimFamily("CA-5", "query zeroing equals logit zeroing and differs from output zeroing"),
    ClaimFamily("CA-6", "the drop appears at every needle depth", rule=rules.drop_family, delta=lambda p: p.min_drop,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_drop_with(s["depths"], s["depth_n"])),
                                                     0.0, p.min_drop,
                                                     p.min_drop + 0.1, 0.0, seed=4),
                parameters=(Parameter("claim_depth", "depths", _depth, "depth"),)),
    ClaimFamily("CA-7", "among distractor needles the top heads matter and distractor answers rise",
                rule=field_rules.distractor_necessity,
                calibration=lambda p, s: Calibration(cal.sim_ca7, 0.0, 1.0, 1.5, 0.0, seed=16),
                figures=(Figure("CA-7: the top heads among distractor needles",
                                lambda rows, meta: distractor_figure(rows)),)),
    ClaimFamily("CA-8", "compression is safe outside the top K only", rule=field_rules.compression_safety,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_ca8_with), 0.0, 1.0, 2.0, 3.0, seed=17),
                figures=(Figure("CA-8: compression safety", lambda rows, meta: compression_figure(rows)),),
                parameters=(Parameter("compress_k", "compress_levels", _k, "k"),)),
    ClaimFamily("CA-9", "the top-K drop exceeds the random-K drop over the whole sweep of K", rule=sweep.ablation_curve,
                delta=lambda p: p.curve_min_area,
                calibration=lambda p, s: Calibration(cal.shapes(cal.sim_ca9_with, ("flat", "peaked", "crossing")), 0.0,
                                                     p.curve_min_area, 0.25, 0.0),
                figures=(Figure("CA-9: the ablation curve over K", lambda rows, meta: curve_figure(rows)),)),
    ClaimFamily("CA-10", "every head of the top-K set is needed", rule=sweep.minimality,
                delta=lambda p: p.minimal_min_recovery,
                calibration=lambda p, s: Calibration(cal.shapes(cal.sim_ca10_with, ("one-weak", "all-equal")), 0.0,
                                                     p.minimal_min_recovery, 0.3, 0.0),
                figures=(Figure("CA-10: minimality of the top-K set", lambda rows, meta: minimality_figure(rows)),)),
)

for _fam in FAMILIES:
    register_family(_fam)
