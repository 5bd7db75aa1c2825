"""rh's critical-head intervention families (IV-1 ... IV-7, seed 004): each one's rule, smallest
effect Δ, calibration, figures and parameters, registered as a team's own family would be
(:mod:`rh.claim_families`). Accuracy bars carry 95% Wilson intervals from the counts (accuracy x n)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rh import calibration as cal
from rh.claim_families import Calibration, ClaimFamily, Figure, Parameter, claim_rows, register_family
from rh.probes import decodable_after_heads
from rh.rules import claims as rules
from rh.stats import proportion_ci

__all__ = ["incremental_curve", "patching_bars", "override_bars", "strata_bars", "FAMILIES"]


def _bars(ax, labels: Sequence[str], accs: Sequence[float], n: int, colors: Sequence[str]) -> None:
    lo_hi = [proportion_ci(int(round(a * n)), n) for a in accs]
    err = np.array([[a - lo, hi - a] for a, (lo, hi) in zip(accs, lo_hi)]).T
    ax.bar(range(len(accs)), accs, yerr=err, color=colors, capsize=3)
    ax.set_xticks(range(len(accs)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")


def incremental_curve(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """IV-1: accuracy as the 1, 2, 3 most critical heads are ablated (seed 004's deliverable)."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

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
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rows = [v for v in claim_rows(verdicts, "IV-2") if "hub_accuracy" in v["details"]]
    if not rows:
        return None
    d, n = rows[0]["details"], rows[0]["n"]
    read = d.get("curtailed", {}).get("items_read", n)  # a curtailed verdict's accuracies are its items read
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    _bars(ax, ["baseline", f"hub (pos {d['hub']})", "non-hub"],
          [d["baseline_accuracy"], d["hub_accuracy"], d["non_hub_accuracy"]], read, ["0.6", "tab:red", "tab:blue"])
    ax.set_title(f"IV-2: {rows[0]['params'].get('mode', '')} patching at layer {d['layer']}"
                 + (f" ({read} of {n} items read)" if read != n else ""), fontsize=9)
    return png(fig)


def override_bars(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

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
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

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



def _probe(rows, meta) -> bytes | None:
    from rh.report.passes import probe_figure

    for v in rows:
        if "layers" in v["details"]:
            return probe_figure(pd.DataFrame(v["details"]["layers"]), v["details"]["critical_layers"],
                                title="IV-5: linear decodability of the answer")
    return None


def _attribution(rows, meta) -> bytes | None:
    from rh.report.passes import attribution_figure

    for v in rows:
        ex = v["details"].get("example")
        if ex:
            return attribution_figure(np.asarray(ex["token_attr"]), tuple(ex["needle_span"]),
                                      f"IV-6: attribution on {ex['sample']}")
    return None


FAMILIES = (
    ClaimFamily("IV-1", "incremental ablation of the most critical heads drops accuracy", rule=rules.incremental,
                delta=lambda p: p.iv_min_drop,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_iv1_with), p.iv_min_drop, p.iv_min_drop,
                                                     2 * p.iv_min_drop + 0.1, 0.0, seed=5),
                figures=(Figure("IV-1: accuracy vs critical heads ablated", lambda rows, meta: incremental_curve(rows)),),
                parameters=(Parameter("iv_level", "incremental_levels", lambda n: f"top{n}", "n_heads"),)),
    ClaimFamily("IV-2", "noising the hub position hurts more than a non-hub position", rule=rules.position,
                delta=lambda p: p.iv_min_drop,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_iv2_with), p.iv_min_drop, p.iv_min_drop,
                                                     2 * p.iv_min_drop + 0.1, 0.0, seed=6),
                figures=(Figure("IV-2: hub vs non-hub patching", lambda rows, meta: patching_bars(rows)),)),
    ClaimFamily("IV-3", "forced uniform or sequential attention drops accuracy, the hub pattern keeps it",
                rule=rules.override, delta=lambda p: 1 - p.hub_keep,
                calibration=lambda p, s: Calibration(cal.paired_shapes(cal.sim_iv3_hub_with), (1 - p.hub_keep) * cal.BASE_ACC,
                                                     (1 - p.hub_keep) * cal.BASE_ACC, 0.0,
                                                     3 * (1 - p.hub_keep) * cal.BASE_ACC, seed=7),
                figures=(Figure("IV-3: accuracy under forced attention patterns",
                                lambda rows, meta: override_bars(rows)),),
                parameters=(Parameter("iv_pattern", "override_patterns", str, "pattern"),)),
    ClaimFamily("IV-4", "a transplanted critical head keeps its function", rule=rules.transplant),
    ClaimFamily("IV-5", "the answer becomes decodable after the critical heads, not before",
                rule=decodable_after_heads, delta=lambda p: p.probe_margin,
                calibration=lambda p, s: Calibration(
                    cal.shapes(cal.sim_iv5_with, ("flat", "last-early", "correlated")), p.probe_margin,
                    p.probe_margin, 0.0, 2 * p.probe_margin),
                figures=(Figure("IV-5: probe accuracy by layer", _probe),)),
    ClaimFamily("IV-6", "attribution of the critical heads concentrates on the needle", rule=rules.ratio_rule,
                delta=lambda p: p.ig_min_ratio,
                calibration=lambda p, s: Calibration(
                    cal.shapes(lambda sh: cal.sim_ratio("ig_n", lambda q: 1.0, lambda q: q.ig_min_ratio, sh)), 1.0,
                    p.ig_min_ratio, 3 * p.ig_min_ratio, 0.5, seed=11),
                figures=(Figure("IV-6: integrated-gradients attribution on one prompt", _attribution),)),
    ClaimFamily("IV-7", "ablation hurts hard items more than easy ones", rule=rules.difficulty,
                delta=lambda p: p.iv7_min_effect,
                calibration=lambda p, s: Calibration(cal.sim_iv7, 0.0, p.iv7_min_effect, 3 * p.iv7_min_effect, 0.0,
                                                     seed=8),
                figures=(Figure("IV-7: log-odds drop by difficulty", lambda rows, meta: strata_bars(rows)),)),
)

for _fam in FAMILIES:
    register_family(_fam)
