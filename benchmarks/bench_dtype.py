"""float32 against bfloat16 on the machine at hand: the speed of one forward, the agreement of the
cached rankings, and the agreement of per-prompt outcomes, for the dtype choice (rh.models.choose_dtype).

    .venv/bin/python benchmarks/bench_dtype.py [--model smollm2-135m] [--prompts 16] [--k 10]
        [--skip-outcomes] [--cache fixtures/rankings]

1. **Speed**: the same passkey prompts (the quick profile's length, batch 8), teacher-forced, in
   each dtype, interleaved, best of ``--repeats``: seconds per prompt and the bf16/fp32 ratio.
2. **Rankings**: every cached ranking computed in bf16 against the one computed in fp32 on the same
   prompts (the same provenance but the dtype): top-K overlap, Spearman's
   rho over all heads, and the score gap at the top-K boundary (how fragile the boundary is).
3. **Outcomes**: the quick profile's validation prompts under no ablation and under the fp32
   ranking's top-K zero-ablation, in each dtype: same exact match per prompt, and the largest
   difference of the answer's log-probability.
Prints the CPU (its bf16 flags) and the load average beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from rh.models import choose_dtype, cpu_description, load_model

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def ranking_pairs(cache: Path, model_id: str):
    """(bf16 file, fp32 file) pairs of cached rankings that differ only by dtype (and Wu24 options)."""
    def key(prov: dict) -> tuple:
        p = {k: v for k, v in prov.items() if k not in ("dtype", "rh_version", "runtime_s", "created", "n_counted")}
        return json.dumps(p, sort_keys=True, default=str)

    by_dtype: dict[str, dict[str, Path]] = {"bfloat16": {}, "float32": {}}
    for f in sorted(cache.glob(f"{model_id}-*.json")):
        if f.name.endswith(".partial.json"):
            continue
        prov = _load(f).get("provenance", {})
        if prov.get("dtype") in by_dtype:
            by_dtype[prov["dtype"]][key(prov)] = f
    for k, bf in by_dtype["bfloat16"].items():
        if k in by_dtype["float32"]:
            yield bf, by_dtype["float32"][k]


def compare_rankings(bf: Path, fp: Path, k: int) -> dict:
    from rh.rankings import load_ranking

    a, b = load_ranking(bf), load_ranking(fp)
    heads = a.heads
    rho = spearmanr([a.scores[h] for h in heads], [b.scores[h] for h in heads]).statistic
    top_a, top_b = set(a.top(k)), set(b.top(k))

    def gap(r) -> float:
        return float(r.scores[r.heads[k - 1]] - r.scores[r.heads[k]])

    prov = _load(fp)["provenance"]
    return {"method": prov["method"], "tasks": ",".join(prov["tasks"]), "lengths": prov["lengths"],
            "overlap": len(top_a & top_b), "rho": float(rho), "gap_bf16": gap(a), "gap_fp32": gap(b),
            "only_bf16": sorted(map(str, top_a - top_b)), "only_fp32": sorted(map(str, top_b - top_a)),
            "top5_bf16": [(str(h), round(a.scores[h], 3)) for h in a.top(5)],
            "top5_fp32": [(str(h), round(b.scores[h], 3)) for h in b.top(5)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16, help="prompts timed and compared per dtype")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-outcomes", action="store_true")
    ap.add_argument("--cache", default=str(ROOT / "fixtures" / "rankings"))
    args = ap.parse_args()

    import torch

    from rh.ablation import ablate
    from rh.evaluate import teacher_forced
    from rh.niah import build_samples, split_samples
    from rh.profiles import get_profile
    from rh.rankings import load_ranking

    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average before: {os.getloadavg()}")
    print(f"rh's choice here: {choose_dtype('cpu').name} ({choose_dtype('cpu').reason})")

    print("\n## rankings: bf16 vs fp32 (same prompts)")
    print("| method | task | length | top-%d overlap | Spearman | boundary gap bf16 | gap fp32 | only bf16 | only fp32 |"
          % args.k)
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    rows = [compare_rankings(bf, fp, args.k) for bf, fp in ranking_pairs(Path(args.cache), args.model)]
    for r in rows:
        print(f"| {r['method']} | {r['tasks']} | {r['lengths'][0]} | {r['overlap']}/{args.k} | {r['rho']:.4f} | "
              f"{r['gap_bf16']:.4f} | {r['gap_fp32']:.4f} | {' '.join(r['only_bf16']) or '-'} | "
              f"{' '.join(r['only_fp32']) or '-'} |")
    for r in rows:
        print(f"top-5 {r['method']} {r['tasks']} {r['lengths'][0]}: bf16 {r['top5_bf16']}  fp32 {r['top5_fp32']}")

    models = {dt: load_model(args.model, dtype=dt, device="cpu") for dt in ("float32", "bfloat16")}
    m = models["float32"]
    prof = get_profile("quick", m.shape)
    samples = build_samples(m.tokenizer, prof.sweep(), chat=m.instruct, max_positions=m.max_positions)
    validation = [s for s in split_samples(samples, frac=prof.identify_frac, seed=prof.split_seed)[1]
                  if s.task in prof.tasks][: args.prompts]

    print(f"\n## speed: {len(validation)} prompts of {prof.lengths[0]} tokens, teacher-forced, batch {args.batch_size}")
    best = {dt: float("inf") for dt in models}
    for _ in range(args.repeats):
        for dt, model in models.items():
            t0 = time.perf_counter()
            teacher_forced(model, validation, condition="baseline", batch_size=args.batch_size, progress=False)
            best[dt] = min(best[dt], (time.perf_counter() - t0) / len(validation))
    print("| dtype | s/prompt | x float32 |\n|---|---:|---:|")
    for dt in models:
        print(f"| {dt} | {best[dt]:.3f} | {best[dt] / best['float32']:.2f}x |")

    if args.skip_outcomes:
        return
    fp_rank = next((fp for bf, fp in ranking_pairs(Path(args.cache), args.model)
                    if _load(fp)["provenance"]["method"] == "sum_attention"
                    and _load(fp)["provenance"]["tasks"] == list(prof.tasks)
                    and _load(fp)["provenance"]["lengths"] == list(prof.lengths)), None)
    if fp_rank is None:
        print("no fp32 ranking of the CA tasks cached: outcomes not compared")
        return
    heads = load_ranking(fp_rank).top(args.k)
    print(f"\n## outcomes: {len(validation)} validation prompts, baseline and top-{args.k} zero-ablation "
          f"({', '.join(map(str, heads))})")
    print("| condition | acc fp32 | acc bf16 | same exact match | max abs diff of answer log-prob |")
    print("|---|---:|---:|---:|---:|")
    for name in ("baseline", f"top{args.k}"):
        out = {}
        for dt, model in models.items():
            if name == "baseline":
                out[dt] = teacher_forced(model, validation, condition=name, batch_size=args.batch_size, progress=False)
            else:
                with ablate(model, heads, method="zero"):
                    out[dt] = teacher_forced(model, validation, condition=name, batch_size=args.batch_size,
                                             progress=False)
        a, b = (out[d].sort_values("id") for d in ("float32", "bfloat16"))
        same = int((a["correct"].to_numpy() == b["correct"].to_numpy()).sum())
        diff = float(np.max(np.abs(a["logprob"].to_numpy() - b["logprob"].to_numpy())))
        print(f"| {name} | {a['correct'].mean():.3f} | {b['correct'].mean():.3f} | {same}/{len(a)} | {diff:.3f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
