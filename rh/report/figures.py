"""The report's figures, as PNG bytes: :func:`report_figures` draws every figure the verdicts
and the run metadata allow (the one entry point the plugin calls): the figures of the registered
claim families (:mod:`rh.claim_families`; rh's own are registered by :mod:`rh.catalogue`), then
the run's own: the attention example, the head grid (drawn here) and the ranking's uncertainty
(:mod:`rh.report.uncertainty`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rh.claim_families import ClaimFamily, draw_figures
from rh.report.plotting import plt, png
from rh.report.uncertainty import uncertainty_figure

__all__ = ["attention_profile", "head_grid", "report_figures"]

log = logging.getLogger(__name__)


def head_grid(ranking_json: Mapping[str, Any], top_k: int = 10) -> bytes:
    """Layer x head grid of scores, the top K outlined: where retrieval heads sit (seed 000)."""
    shape = ranking_json["shape"]
    grid = np.zeros((shape["n_layers"], shape["n_heads"]))
    for row in ranking_json["heads"]:
        grid[row["layer"], row["index"]] = row["score"]
    fig, ax = plt.subplots(figsize=(max(3.5, shape["n_heads"] * 0.35 + 1.5), max(3.0, shape["n_layers"] * 0.16 + 1)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    for row in ranking_json["heads"][:top_k]:
        ax.add_patch(plt.Rectangle((row["index"] - 0.5, row["layer"] - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{ranking_json.get('method', 'score')} per head (top {top_k} outlined)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return png(fig)


def attention_profile(rows: np.ndarray, labels: Sequence[str], needle_span: tuple[int, int],
                      answer_span: tuple[int, int] | None = None, title: str = "") -> bytes:
    """The last token's attention across the context, one row per head, the needle span marked
    (seed 000's attention heatmap): a spike at the needle is what a retrieval head looks like."""
    rows = np.asarray(rows, dtype=float)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 1.2 + 0.35 * len(rows) + 2.2), sharex=True,
                                  gridspec_kw={"height_ratios": [max(1, len(rows)) * 0.35, 2.2]})
    im = ax.imshow(rows, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=max(rows.max(), 1e-9))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for a in (ax, ax2):
        a.axvspan(needle_span[0] - 0.5, needle_span[1] - 0.5, color="tab:cyan", alpha=0.25, lw=0)
        if answer_span is not None:
            a.axvspan(answer_span[0] - 0.5, answer_span[1] - 0.5, color="tab:green", alpha=0.35, lw=0)
    for row, label in zip(rows, labels):
        ax2.plot(row, lw=0.8, label=label)
    ax2.set_xlabel("context position (token)")
    ax2.set_ylabel("attention")
    ax2.legend(fontsize=7, ncol=min(5, len(labels)), frameon=False)
    ax.set_title(title or "last-token attention (needle shaded, answer in green)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    return png(fig)


def report_figures(verdicts: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                   families: Sequence[ClaimFamily] | None = None) -> dict[str, bytes]:
    """Every figure the report can draw from the verdicts and the run metadata, title -> PNG bytes:
    each registered claim family's figures that its verdicts allow (or those of ``families``), then
    the attention example, the head grid and the ranking's uncertainty."""
    figures = draw_figures(verdicts, meta, families)
    ex = meta.get("attention_example")
    if ex:
        figures[f"Last-token attention of the top heads on {ex['sample']}"] = attention_profile(
            ex["rows"], ex["heads"], tuple(ex["needle_span"]), tuple(ex["answer_span"]))
    path = (meta.get("ranking") or {}).get("path")
    if path and Path(path).exists():
        from rh.rankings import load_ranking

        try:
            figures["Head scores by layer and head"] = head_grid(load_ranking(path).to_json())
        except (ValueError, KeyError) as exc:
            log.warning("head grid not drawn: %s", exc)
    unc = meta.get("ranking_uncertainty")
    if unc:
        fig = uncertainty_figure(unc)
        if fig:
            figures["Ranking uncertainty: the stable core and how it narrows with the prompts"] = fig
    return figures
