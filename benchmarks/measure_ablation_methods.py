"""Passkey accuracy per needle depth on the bundled model: the baseline, and the top-10 heads of the
committed ranking ablated by each method (zero, mean, query, logits; prefill and decoding), plus
decode-only variants (Wu24's protocol) and a random-10 control. Teacher-forced, one pass each.

    .venv/bin/python benchmarks/measure_ablation_methods.py [--k 10] [--per-depth 16] [--out /tmp/rh-ablation]

Mean ablation substitutes each head's mean o_proj input over the identification side of the
split (the samples the ranking was computed on); accuracy is reported on every sample and on the
validation side alone. Writes the per-sample rows (CSV) and the depth chart (PNG) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from rh.ablation import Ablation, ablation_conditions, head_means
from rh.evaluate import accuracy_table, evaluate_conditions
from rh.heads import random_heads
from rh.models import load_model
from rh.niah import Sweep, build_samples, split_samples
from rh.rankings import Ranking
from rh.report import depth_accuracy_chart

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# the ranking committed with the repository: sum-attention, passkey at 512 tokens, 64 identification samples
COMMITTED_RANKING = "fixtures/rankings/smollm2-135m-sum_attention-79fe5d90059b53c5.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranking", default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--per-depth", type=int, default=16)
    ap.add_argument("--random-draws", type=int, default=1, help="random-K control sets (zero method)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-only conditions")
    ap.add_argument("--out", default="/tmp/rh-ablation")
    args = ap.parse_args()

    t_start = time.perf_counter()
    m = load_model(args.model)
    path = args.ranking or COMMITTED_RANKING
    ranking = Ranking.load(path, shape=m.shape)
    top = ranking.top(args.k)
    samples = build_samples(m.tokenizer, Sweep((args.length,), DEPTHS, args.per_depth, ("passkey",)),
                            chat=m.instruct, max_positions=m.max_positions)
    identify, validate = split_samples(samples)
    print(f"model={args.model} samples={len(samples)} (identify {len(identify)}, validate {len(validate)}) "
          f"ranking={os.path.basename(path)} top{args.k}={[str(h) for h in top]}")
    means = head_means(m, identify, top)

    conds = ablation_conditions(m, top, reference=means)
    if not args.no_decode:
        for method in ("zero", "query"):
            conds[f"{method}/decode"] = Ablation(f"{method}/decode", top, method, "decode")
    for d in range(args.random_draws):
        rand = random_heads(m.shape, args.k, exclude=top, seed=d)
        conds[f"random{args.k}#{d}/zero"] = Ablation(f"random{args.k}#{d}/zero", rand, selection="random", draw=d)
    df = evaluate_conditions(m, samples, conds, progress=False)
    val_ids = {s.id for s in validate}
    df["split"] = ["validate" if i in val_ids else "identify" for i in df["id"]]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "ablation_methods.csv", index=False)
    (out / "depth_accuracy.png").write_bytes(
        depth_accuracy_chart(df[df.condition.isin(["baseline", "zero", "mean", "query", "logits"])],
                             title=f"passkey@{args.length}: baseline vs top-{args.k} ablated, by method"))

    order = list(conds)
    by_depth = accuracy_table(df, by=["condition", "depth"])
    wide = by_depth.pivot(index="condition", columns="depth", values="correct").reindex(order)
    overall = accuracy_table(df, by="condition").set_index("condition").reindex(order)
    val = accuracy_table(df[df.split == "validate"], by="condition").set_index("condition").reindex(order)
    lp = df.groupby("condition")["logprob"].mean().reindex(order)
    table = wide.copy()
    table.columns = [f"d={c:g}" for c in table.columns]
    table["all"] = overall["correct"]
    table["all 95% CI"] = [f"[{a:.2f}, {b:.2f}]" for a, b in zip(overall["ci_low"], overall["ci_high"])]
    table["validate"] = val["correct"]
    table["mean logprob"] = lp
    pd.set_option("display.width", 200)
    print(f"\nteacher-forced exact-match accuracy, n={args.per_depth} per depth ({len(samples)} in all, "
          f"{len(validate)} on the validation side):")
    print(table.round(3).to_string())
    print(f"\nwrote {out / 'ablation_methods.csv'} and {out / 'depth_accuracy.png'}; "
          f"{time.perf_counter() - t_start:.0f} s in all")


if __name__ == "__main__":
    main()
