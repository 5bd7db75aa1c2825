"""The ranking's uncertainty as a figure (PNG bytes), drawn from the run metadata
(``meta["ranking_uncertainty"]``, :mod:`rh.uncertainty`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rh.report.plotting import plt, png

__all__ = ["uncertainty_figure"]


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
