"""Ablation figures as PNG bytes (matplotlib Agg, no display): seed 000's baseline-vs-ablated
accuracy across needle depths, and seed 001's Figure 8, accuracy against the number of heads
ablated, top-K against random-K, with confidence bands. Inputs are plain per-sample DataFrames
as ``rh.evaluate`` returns them; the conditions' selection, K and draw are columns there (an
``rh.ablation.Ablation`` declares them), never parsed back from the conditions' names."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rh.evaluate import accuracy_table
from rh.report.plotting import plt, png
from rh.stats import proportion_ci

__all__ = ["accuracy_vs_k_curve", "depth_accuracy_chart"]


def depth_accuracy_chart(df: pd.DataFrame, *, by: str = "depth", metric: str = "correct",
                         conditions: Sequence[str] | None = None, level: float = 0.95,
                         title: str | None = None) -> bytes:
    """Grouped bars: accuracy per ``by`` value (needle depth by default) for each condition
    (``baseline`` first), with Wilson intervals; seed 000's ablation impact chart.

    ``df`` has one row per sample and condition (columns ``condition``, ``by``, ``metric``).
    """
    if df.empty:
        raise ValueError("no results to plot: the DataFrame is empty")
    table = accuracy_table(df, by=["condition", by], metric=metric, level=level)
    seen = list(dict.fromkeys(df["condition"]))  # order of first appearance, baseline first
    conds = list(conditions) if conditions is not None else sorted(seen, key=lambda c: (c != "baseline", seen.index(c)))
    missing = [c for c in conds if c not in set(table["condition"])]
    if missing:
        raise ValueError(f"conditions {missing} are not in the results (have {sorted(table['condition'].unique())})")
    xs = sorted(table[by].unique())
    width = 0.8 / len(conds)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(xs) + 2), 3.6))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for i, cond in enumerate(conds):
        t = table[table["condition"] == cond].set_index(by).reindex(xs)
        pos = np.arange(len(xs)) + (i - (len(conds) - 1) / 2) * width
        y = t[metric].to_numpy(dtype=float)
        err = np.clip(np.vstack([y - t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float) - y]), 0, None)
        color = "0.55" if cond == "baseline" else next(colors)
        ax.bar(pos, y, width * 0.95, yerr=err, capsize=2, color=color, label=str(cond), error_kw={"lw": 0.8})
    ax.set_xticks(np.arange(len(xs)))
    ax.set_xticklabels([f"{x:.0%}" if by == "depth" and isinstance(x, float) else str(x) for x in xs])
    ax.set_xlabel("needle depth" if by == "depth" else by)
    ax.set_ylabel(f"accuracy ({metric}), {level:.0%} CI")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, fontsize=8, ncols=min(len(conds), 5), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title or f"accuracy by {by}: baseline vs ablated", fontsize=10)
    return png(fig)


def accuracy_vs_k_curve(df: pd.DataFrame, *, metric: str = "correct", level: float = 0.95,
                        title: str | None = None) -> bytes:
    """Seed 001's Figure 8 from per-sample results: ``metric`` against the number of heads
    ablated, top-K and random-K (:func:`rh.catalogue.causal.ca1_ablation_curve` draws the same from verdicts).

    ``df`` has one row per sample and condition with columns ``selection`` (``top``, ``random``,
    optionally ``bottom`` and ``baseline``), ``k``, ``draw`` (random draws) and ``metric``: what
    ``rh.evaluate.evaluate_conditions`` returns for declared conditions
    (``rh.causal.selection_conditions``). Bands: for top/bottom, the
    Wilson interval over samples; for random, the central ``level`` range of the per-draw
    accuracies when there are at least two draws (how much the choice of random heads matters),
    else the Wilson interval. A dashed line marks the baseline.
    """
    for col in ("selection", "k", metric):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing: evaluate rh.ablation.Ablation conditions (e.g. "
                             f"rh.causal.selection_conditions) with evaluate_conditions, or add selection/k/{metric}")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    base = df[df["selection"] == "baseline"]
    if len(base):
        ax.axhline(float(base[metric].mean()), color="0.5", ls="--", lw=1, label="no ablation")
    style = {"top": ("s-", "tab:red", "top K by score (band: Wilson CI)"),
             "random": ("o-", "tab:blue", "random K, mean of draws (band: spread of draws)"),
             "bottom": ("^-", "tab:green", "bottom K by score (band: Wilson CI)")}
    ks_all: set[int] = set()
    for sel, (marker, color, label) in style.items():
        part = df[df["selection"] == sel]
        if part.empty:
            continue
        ks, ys, lo, hi = [], [], [], []
        for k, g in part.groupby("k", sort=True):
            vals = g[metric].astype(float)
            draws = g.groupby("draw")[metric].mean() if sel == "random" and "draw" in g else None
            if draws is not None and len(draws) >= 2:
                y = float(draws.mean())
                a, b = np.quantile(draws.to_numpy(dtype=float), [(1 - level) / 2, (1 + level) / 2])
                ax.scatter([k] * len(draws), draws, color=color, alpha=0.25, s=10)
            else:
                y = float(vals.mean())
                a, b = proportion_ci(int(vals.sum()), len(vals), level=level) if vals.isin((0.0, 1.0)).all() else (y, y)
            ks.append(int(k)), ys.append(y), lo.append(a), hi.append(b)
        ks_all.update(ks)
        ax.plot(ks, ys, marker, color=color, label=label, ms=4)
        ax.fill_between(ks, lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("heads ablated (K)")
    ax.set_ylabel(f"accuracy ({metric}), {level:.0%} band")
    ax.set_ylim(-0.05, 1.05)
    if ks_all:
        ax.set_xticks(sorted(ks_all))
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or "accuracy vs heads ablated (top vs random)", fontsize=10)
    return png(fig)
