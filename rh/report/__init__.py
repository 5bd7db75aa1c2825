"""The report wing: everything rh shows people, on top of the library it reports on.

- :mod:`rh.report.html`: a run's JSON report and self-contained HTML page, the terminal claim matrix;
- :mod:`rh.report.compare`: the JSON reports of several runs side by side (``python -m rh report``);
- :mod:`rh.report.format`: the formatting both pages share (escaping, badges, numbers, CSS);
- :mod:`rh.report.figures`: :func:`report_figures`, every figure of a run (the one entry point:
  the registered claim families' figures, :mod:`rh.claim_families`, then the run's own), the head
  grid and the attention profile;
- :mod:`rh.report.ablation`: figures of per-sample ablation results (accuracy by depth, by K);
- :mod:`rh.report.passes`: the probe and attribution figures of the library's passes;
- :mod:`rh.report.uncertainty`: the ranking's uncertainty;
- :mod:`rh.report.plotting`: matplotlib on the Agg backend and ``png(fig)``.

The wing names no claim: each claim's figures belong to its family (rh's own in :mod:`rh.catalogue`,
a layer above this one), which the report draws through the registry.

The wing imports the library below it (``rh.stats``, ``rh.io``, ``rh.evaluate``, ...); nothing
below imports the wing, only the layers above it: the claim families (``rh.catalogue``) and the
entry points (``rh.run``, ``rh.pytest_plugin``, ``rh.audit``, ``rh.__main__``).
The figure functions are loaded on first use, so ``from rh.report import write_report`` neither
loads matplotlib (nor switches its backend) nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from rh.report.compare import compare_reports, default_output, load_report, main_report, write_comparison
from rh.report.html import (
    STATUSES,
    format_matrix,
    provenance,
    redact,
    render_html,
    report_stem,
    summarize,
    write_report,
)

#: Figure functions, by the module of the wing they live in (imported when first asked for).
_FIGURES: dict[str, str] = {
    **dict.fromkeys(("report_figures", "head_grid", "attention_profile"), "figures"),
    **dict.fromkeys(("depth_accuracy_chart", "accuracy_vs_k_curve"), "ablation"),
    **dict.fromkeys(("probe_figure", "attribution_figure"), "passes"),
    "uncertainty_figure": "uncertainty",
}

__all__ = [
    "STATUSES",
    "compare_reports",
    "default_output",
    "format_matrix",
    "load_report",
    "main_report",
    "provenance",
    "redact",
    "render_html",
    "report_stem",
    "summarize",
    "write_comparison",
    "write_report",
    *_FIGURES,
]


def __getattr__(name: str) -> Any:
    module = _FIGURES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FIGURES})
