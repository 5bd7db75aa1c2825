"""Figures of the claims beyond the seeds (ID-7, ID-8, CA-7, CA-8) and of the ranking's
uncertainty, drawn from the verdicts' details and the run metadata, as PNG bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rh.report.plotting import claim_rows, plt, png

__all__ = ["compression_figure", "distractor_figure", "field_figures", "kv_group_figure", "method_agreement_figure",
           "uncertainty_figure"]


def method_agreement_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """ID-7: per method, its top-K overlap with sum attention's beside each one's overlap with
    itself across halves of its inputs (the null that matters), and chance."""
    rows = [v for v in claim_rows(verdicts, "ID-7") if "cross_overlap" in v["details"]]
    if not rows:
        return None
    names = [v["params"]["method"] for v in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.4))
    w = 0.26
    ax.bar(x - w, [v["details"]["self_overlap_a"] for v in rows], w, color="0.6", label="sum attention with itself")
    ax.bar(x, [v["details"]["self_overlap_b"] for v in rows], w, color="tab:blue", label="method with itself")
    ax.bar(x + w, [v["details"]["cross_overlap"] for v in rows], w, color="tab:red", label="method with sum attention")
    ax.axhline(rows[0]["details"]["chance_overlap"], color="k", ls=":", lw=1, label="chance")
    for i, v in enumerate(rows):
        ax.text(i, ax.get_ylim()[1] * 0.02, v["status"], ha="center", va="bottom", fontsize=7, rotation=90, color="w")
    ax.set_xticks(x, names)
    ax.set_ylabel(f"top-{rows[0]['params']['k']} overlap (heads)")
    ax.set_title("ID-7: agreement between identification methods (halves of the inputs)", fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return png(fig)


def kv_group_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """ID-8: where the top-K heads sit, layer by KV group (a cell counts the top heads reading that KV head)."""
    rows = [v for v in claim_rows(verdicts, "ID-8") if v["details"].get("top_heads") and v["details"].get("n_heads")]
    if not rows:
        return None
    d = rows[0]["details"]
    n_heads, group = int(d["n_heads"]), int(d["group_size"])
    n_layers = int(d["n_layers"])
    grid = np.zeros((n_layers, n_heads // group))
    for name in d["top_heads"]:
        layer, head = (int(x) for x in name[1:].split("H"))
        grid[layer, head // group] += 1
    fig, ax = plt.subplots(figsize=(3.2, max(3.0, 0.14 * n_layers + 1)))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="Reds", vmin=0, vmax=group)
    ax.set_xlabel("KV group (KV head)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    share = d.get("same_group_share")
    ax.set_title(f"ID-8: top-{rows[0]['params']['k']} heads per KV group\nsame-group share "
                 f"{share if share is None else round(share, 2)} vs chance {d['chance_share']:.2f}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.08, label="top heads")
    return png(fig)


def distractor_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """CA-7: accuracy with no ablation, the top K and random K ablated; distractor answers with no
    ablation and with the top K ablated."""
    acc = [v for v in claim_rows(verdicts, "CA-7") if v["params"].get("part") == "accuracy"]
    rate = [v for v in claim_rows(verdicts, "CA-7") if v["params"].get("part") == "distractor_rate"]
    if not acc or "top_accuracy" not in acc[0]["details"]:
        return None
    a = acc[0]["details"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7, 3.2))
    ax1.bar(["none", f"top {acc[0]['params']['k']}", "random K"],
            [a["baseline_accuracy"], a["top_accuracy"], a["random_accuracy"]], color=["0.6", "tab:red", "tab:blue"])
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


def uncertainty_figure(unc: Mapping[str, Any], top: int | None = None) -> bytes | None:
    """The ranking's uncertainty: P(in the top K) of its leading heads with the stable core marked,
    and how the core and the top-K agreement narrow with the number of prompts."""
    p_top = unc.get("p_top") or {}
    if not p_top:
        return None
    k = int(unc["k"])
    order = sorted(p_top, key=lambda h: -p_top[h])[: (top or 2 * k)]
    core = set(unc.get("stable_core") or [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    ax1.bar(range(len(order)), [p_top[h] for h in order],
            color=["tab:red" if h in core else "tab:blue" for h in order])
    ax1.axhline(float(unc.get("core_threshold", 0.9)), color="k", ls=":", lw=1)
    ax1.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
    ax1.set_ylabel(f"P(in the top {k})")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"stable core: {len(core)} heads (red) in the top {k} of ≥ {unc.get('core_threshold', 0.9):g} of "
                  f"{unc.get('n_boot')} resamples of {unc.get('n_units')} {unc.get('unit', 'unit')}s", fontsize=8)
    nar = unc.get("narrowing") or []
    if nar:
        n = [r["n_units"] for r in nar]
        ax2.plot(n, [r["core_size"] for r in nar], "o-", color="tab:red", label="stable core (heads)")
        ax2.plot(n, [r["mean_top_k_overlap"] * k for r in nar], "s-", color="tab:blue",
                 label=f"resampled top {k} ∩ full top {k}")
        ax2.set_ylim(0, k + 0.5)
        ax2.set_xlabel(f"{unc.get('unit', 'unit')}s resampled")
        ax2.set_ylabel("heads")
        ax2.legend(frameon=False, fontsize=7)
        ax2.set_title("how it narrows with the prompts", fontsize=8)
    fig.suptitle(f"Ranking uncertainty ({unc.get('method')})", fontsize=9)
    return png(fig)


def field_figures(verdicts: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> dict[str, bytes]:
    """The figures of ID-7, ID-8, CA-7 and CA-8 and of the ranking's uncertainty that the verdicts and
    ``meta["ranking_uncertainty"]`` allow, title -> PNG bytes (part of :func:`rh.report.report_figures`)."""
    out = {}
    for title, fig in (("ID-7: agreement between identification methods", method_agreement_figure(verdicts)),
                       ("ID-8: top heads per KV group", kv_group_figure(verdicts)),
                       ("CA-7: the top heads among distractor needles", distractor_figure(verdicts)),
                       ("CA-8: compression safety", compression_figure(verdicts))):
        if fig:
            out[title] = fig
    unc = meta.get("ranking_uncertainty")
    if unc:
        fig = uncertainty_figure(unc)
        if fig:
            out["Ranking uncertainty: the stable core and how it narrows with the prompts"] = fig
    return out
