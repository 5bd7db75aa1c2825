"""Figures of the intervention claims (IV-*), drawn from their verdicts' details for the report,
and the two figures of the library's IV passes: :func:`probe_figure` (IV-5, ``rh.probes``'s
per-layer table) and :func:`attribution_figure` (IV-6, ``rh.attribution``'s per-token attribution).
Accuracy bars carry 95% Wilson intervals from the counts (accuracy x n)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rh.report.plotting import claim_rows, plt, png
from rh.stats import holm, proportion_ci

__all__ = ["attribution_figure", "incremental_curve", "intervention_figures", "override_bars", "patching_bars",
           "probe_figure", "strata_bars"]

log = logging.getLogger(__name__)


def _bars(ax, labels: Sequence[str], accs: Sequence[float], n: int, colors: Sequence[str]) -> None:
    lo_hi = [proportion_ci(int(round(a * n)), n) for a in accs]
    err = np.array([[a - lo, hi - a] for a, (lo, hi) in zip(accs, lo_hi)]).T
    ax.bar(range(len(accs)), accs, yerr=err, color=colors, capsize=3)
    ax.set_xticks(range(len(accs)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")


def incremental_curve(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """IV-1: accuracy as the 1, 2, 3 most critical heads are ablated (seed 004's deliverable)."""
    rows = sorted(claim_rows(verdicts, "IV-1"), key=lambda v: v["params"]["n_heads"])
    if not rows:
        return None
    n = rows[0]["n"]
    xs = [0] + [v["params"]["n_heads"] for v in rows]
    accs = [rows[0]["details"]["baseline_accuracy"]] + [v["details"]["ablated_accuracy"] for v in rows]
    ci = np.array([proportion_ci(int(round(a * n)), n) for a in accs])
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.fill_between(xs, ci[:, 0], ci[:, 1], color="tab:red", alpha=0.15, lw=0, label="95% Wilson interval")
    ax.plot(xs, accs, "o-", color="tab:red", label="top-n critical heads ablated")
    thr = accs[0] - rows[0]["details"].get("min_drop", 0.1)
    ax.axhline(thr, color="0.5", ls=":", lw=1, label="baseline - 10 points")
    ax.set_xticks(xs, ["none"] + [str(x) for x in xs[1:]])
    ax.set_xlabel("critical heads ablated")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(frameon=False, fontsize=7)
    ax.set_title(f"IV-1: incremental ablation ({n} prompts)", fontsize=9)
    return png(fig)


def patching_bars(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    rows = [v for v in claim_rows(verdicts, "IV-2") if "hub_accuracy" in v["details"]]
    if not rows:
        return None
    d, n = rows[0]["details"], rows[0]["n"]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    _bars(ax, ["baseline", f"hub (pos {d['hub']})", "non-hub"],
          [d["baseline_accuracy"], d["hub_accuracy"], d["non_hub_accuracy"]], n, ["0.6", "tab:red", "tab:blue"])
    ax.set_title(f"IV-2: {rows[0]['params'].get('mode', '')} patching at layer {d['layer']}", fontsize=9)
    return png(fig)


def override_bars(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    rows = claim_rows(verdicts, "IV-3")
    if not rows:
        return None
    n = rows[0]["n"]
    labels = ["baseline"] + [v["params"]["pattern"] for v in rows]
    accs = [rows[0]["details"]["baseline_accuracy"]] + [v["details"]["forced_accuracy"] for v in rows]
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    _bars(ax, labels, accs, n, ["0.6"] + ["tab:purple"] * len(rows))
    ax.set_title(f"IV-3: forced attention in {len(rows[0]['details']['heads'])} critical heads", fontsize=9)
    return png(fig)


def strata_bars(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """IV-7: per item right at baseline, the log-odds drop under ablation against the baseline
    log-odds; the hard half (left of the median) and the easy half in two colours, their means as lines."""
    rows = [v for v in claim_rows(verdicts, "IV-7") if "items" in v["details"]]
    if not rows:
        return None
    items = rows[0]["details"]["items"]
    x = np.asarray(items["baseline_log_odds"], float)
    y = np.asarray(items["log_odds_drop"], float)
    if x.size == 0:
        return None
    med = np.sort(x)[x.size // 2] if x.size else 0.0
    hard = x < med
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for mask, colour, name in ((hard, "tab:red", "hard half"), (~hard, "tab:blue", "easy half")):
        if mask.any():
            ax.scatter(x[mask], y[mask], s=12, color=colour, label=f"{name} (mean drop {y[mask].mean():.2f})")
            ax.hlines(y[mask].mean(), x[mask].min(), x[mask].max(), color=colour, lw=1)
    ax.set_xlabel("baseline log-odds of the answer", fontsize=8)
    ax.set_ylabel("log-odds drop when ablated", fontsize=8)
    ax.legend(frameon=False, fontsize=7)
    ax.set_title("IV-7: harm by difficulty (items right at baseline)", fontsize=9)
    return png(fig)


def intervention_figures(verdicts: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """Every IV figure the verdicts allow, titled ``"IV-n: ..."`` so the report files it under its claim."""
    out: dict[str, bytes] = {}
    for title, fn in (("IV-1: accuracy vs critical heads ablated", incremental_curve),
                      ("IV-2: hub vs non-hub patching", patching_bars),
                      ("IV-3: accuracy under forced attention patterns", override_bars),
                      ("IV-7: log-odds drop by difficulty", strata_bars)):
        try:
            data = fn(verdicts)
        except (KeyError, TypeError, ValueError) as exc:  # a figure must never cost the report
            log.warning("%s not drawn: %s", title, exc)
            continue
        if data:
            out[title] = data
    for v in claim_rows(verdicts, "IV-5"):
        try:
            out["IV-5: probe accuracy by layer"] = probe_figure(pd.DataFrame(v["details"]["layers"]),
                                                                v["details"]["critical_layers"])
        except (KeyError, TypeError, ValueError, ImportError) as exc:
            log.warning("IV-5 figure not drawn: %s", exc)
    for v in claim_rows(verdicts, "IV-6"):
        ex = v["details"].get("example")
        if ex:
            try:
                out["IV-6: integrated-gradients attribution on one prompt"] = attribution_figure(
                    np.asarray(ex["token_attr"]), tuple(ex["needle_span"]), f"IV-6: attribution on {ex['sample']}")
            except (KeyError, TypeError, ValueError, ImportError) as exc:
                log.warning("IV-6 figure not drawn: %s", exc)
    return out


# ---------------------------------------------------------------------------- IV-5, IV-6 figures


def probe_figure(df: pd.DataFrame, critical_layers: Sequence[int], *, alpha: float = 0.05,
                 title: str = "IV-5: linear decodability of the answer") -> bytes:
    """Probe accuracy per residual index with the chance line, a dotted line at index L + 1 for every
    critical head's layer L, and the onset (first Holm-significant index) marked. PNG bytes."""
    from rh.probes import layer_indices  # rh.probes loads torch: only when drawing

    df = df.sort_values("layer")
    crit = sorted(set(layer_indices(critical_layers)))
    x = df["layer"].to_numpy(int)
    acc = df["accuracy"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot(x, acc, "o-", color="tab:blue", ms=4, label="probe accuracy (cross-validated)")
    ax.axhline(float(df["chance"].iloc[0]), color="0.5", ls="--", lw=1, label="chance (majority class)")
    for i, c in enumerate(crit):
        ax.axvline(c + 1, color="tab:red", ls=":", lw=1.2, label="critical head writes (L+1)" if i == 0 else None)
    p = df["p_value"].to_numpy(float)
    if np.isfinite(acc).any():
        p_adj = np.array(holm(p.tolist()))
        sig = np.flatnonzero(p_adj < alpha)
        if len(sig):
            o = int(x[sig[0]])
            ax.plot([o], [acc[sig[0]]], "*", color="tab:green", ms=14, label=f"onset (index {o})")
    ax.set_xlabel("residual index (0 = embeddings, l+1 = after layer l)")
    ax.set_ylabel("accuracy on the first answer token")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    ax.set_title(title)
    return png(fig)


def attribution_figure(token_attr: Any, needle_span: tuple[int, int], title: str = "IG attribution") -> bytes:
    """Per-token attribution along the prompt with the needle span shaded. PNG bytes."""
    a = np.asarray(token_attr, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"attribution_figure: token_attr must be a non-empty 1-D array, got shape {a.shape}")
    s, e = (int(x) for x in needle_span)
    if not (0 <= s < e <= a.size):
        raise ValueError(f"attribution_figure: needle_span {(s, e)} is outside the sequence of {a.size} tokens")
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    x = np.arange(a.size)
    ax.axvspan(s - 0.5, e - 0.5, color="gold", alpha=0.35, lw=0, label="needle")
    ax.bar(x, a, width=1.0, color=np.where(a >= 0, "tab:blue", "tab:red"), lw=0)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xlim(-0.5, a.size - 0.5)
    ax.set_xlabel("token position")
    ax.set_ylabel("attribution (sum over embedding dims)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return png(fig)
