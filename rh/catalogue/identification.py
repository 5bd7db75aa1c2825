"""rh's identification families (ID-1 ... ID-8): each one's rule, smallest effect Δ, calibration,
figures and parameters, registered as a team's own family would be (:mod:`rh.claim_families`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rh import calibration as cal
from rh.claim_families import Calibration, ClaimFamily, Figure, Parameter, claim_rows, register_family
from rh.rules import claims as rules
from rh.rules import field as field_rules

__all__ = ["method_agreement_figure", "planted_recovery_figure", "kv_group_figure", "FAMILIES"]


def method_agreement_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """ID-7: per method, its top-K overlap with sum attention's beside each one's overlap with
    itself across halves of its inputs (the null that matters), and chance."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

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


def planted_recovery_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """ID-7 on a model with retrieval heads known by construction (rh.planted): where each
    identification method ranks each planted head (1 = first), and its recall of them in its top
    |planted|."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

    rec: dict[str, Mapping[str, Any]] = {}
    for v in claim_rows(verdicts, "ID-7"):
        rec.update(v["details"].get("planted_recovery") or {})
    if not rec:
        return None
    names = list(rec)
    heads = list(next(iter(rec.values()))["ranks"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.1 * len(names), 3.4))
    for j, head in enumerate(heads):
        ranks = [rec[m]["ranks"].get(head) for m in names]
        ax.plot(np.arange(len(names)) + (j - (len(heads) - 1) / 2) * 0.08, ranks, "o", label=head)
    k = next(iter(rec.values()))["k"]
    ax.axhline(k + 0.5, color="0.4", ls="--", lw=1, label=f"top {k}")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set_xticks(np.arange(len(names)), [f"{m}\nrecall {rec[m]['recall']:.2f}" for m in names], fontsize=7)
    ax.set_ylabel("rank of the planted head (1 = first)")
    ax.set_title("ID-7: the planted retrieval heads, as each method ranks them", fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return png(fig)


def kv_group_figure(verdicts: Sequence[Mapping[str, Any]]) -> bytes | None:
    """ID-8: where the top-K heads sit, layer by KV group (a cell counts the top heads reading that KV head)."""
    from rh.report.plotting import plt, png  # matplotlib loads when a figure is drawn

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



def _sparsity(p, s) -> Calibration:
    # 270 heads: 14 (5.2%) is the fewest at or above 5%, 13 (4.8%) the most below it
    fewest = math.ceil(p.sparsity_max_fraction * 270)
    return Calibration(cal.shapes(cal.sim_id1_with, ("smooth", "zero-inflated")), fewest / 270, (fewest - 1) / 270,
                       p.sparsity_max_fraction / 5, 3 * p.sparsity_max_fraction, seed=9)


def _agreement(sim, seed: int):
    # agreement is decided on both sides of one boundary: at Δ heads differing, neither may be shown
    return lambda p, s: Calibration(cal.shapes(sim, cal.AGREE_TABLE), p.agree_min_effect * p.id_k,
                                    p.agree_min_effect * p.id_k, 0.0, float(p.id_k), seed=seed)


def _spike(p, s) -> Calibration:
    return Calibration(cal.shapes(lambda sh: cal.sim_ratio("n_val", lambda q: q.spike_ratio,
                                                           lambda q: q.spike_ratio, sh)),
                       p.spike_ratio, p.spike_ratio, 4 * p.spike_ratio, 1.0, seed=10)


FAMILIES = (
    ClaimFamily("ID-1", "retrieval heads are sparse", rule=rules.sparsity_rule, delta=lambda p: p.sparsity_max_fraction,
                calibration=_sparsity),
    ClaimFamily("ID-2", "the top heads' last-token attention spikes on the needle", rule=rules.ratio_rule,
                delta=lambda p: p.spike_ratio, calibration=_spike),
    ClaimFamily("ID-3/ID-4", "rankings are stable across settings, and sum attention and Wu24 find the same heads",
                rule=rules.agreement, delta=lambda p: p.agree_min_effect * p.id_k,
                calibration=_agreement(cal.sim_agree_with, 13)),
    ClaimFamily("ID-5", "general retrieval heads exist", rule=rules.general_heads_rule, delta=lambda p: p.spike_ratio,
                calibration=lambda p, s: Calibration(cal.shapes(cal.sim_id5_with), p.spike_ratio, p.spike_ratio,
                                                     4 * p.spike_ratio, 1.0, seed=12)),
    ClaimFamily("ID-6", "base and instruct variants share retrieval heads"),
    ClaimFamily("ID-7", "identification methods agree", rule=field_rules.methods_agreement,
                delta=lambda p: p.agree_min_effect * p.id_k, calibration=_agreement(cal.sim_id7_with, 14),
                figures=(Figure("ID-7: agreement between identification methods",
                                lambda rows, meta: method_agreement_figure(rows)),
                         Figure("ID-7: the planted heads each method recovers",
                                lambda rows, meta: planted_recovery_figure(rows))),
                parameters=(Parameter("id_method", "id_methods", str, "method"),)),
    ClaimFamily("ID-8", "retrieval heads gather in some KV groups", rule=field_rules.kv_clustering,
                delta=lambda p: p.group_min_effect,
                calibration=lambda p, s: Calibration(cal.shapes(cal.sim_id8_with, ("fixed", "propensity", "group-noise")),
                                                     0.0, p.group_min_effect, p.group_min_effect + 0.25, 0.0, seed=15),
                figures=(Figure("ID-8: top heads per KV group", lambda rows, meta: kv_group_figure(rows)),)),
)

for _fam in FAMILIES:
    register_family(_fam)
