"""Figures of two of the library's passes, as PNG bytes: :func:`probe_figure` (``rh.probes``'s
per-layer table of linear probes on the residual stream) and :func:`attribution_figure`
(``rh.attribution``'s per-token attribution). The claims that use them draw them through their
families (``rh.catalogue``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rh.report.plotting import plt, png
from rh.stats import holm

__all__ = ["attribution_figure", "probe_figure"]


def probe_figure(df: pd.DataFrame, critical_layers: Sequence[int], *, alpha: float = 0.05,
                 title: str = "linear decodability of the answer") -> bytes:
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
