"""Real pruning of the K lowest-scoring heads (seed 000 §2.5) against the full model, in one
process: parameters, FLOPs and KV-cache bytes per token (counted), prefill and per-token decoding
latency and the KV cache (measured), and teacher-forced passkey accuracy of the full, the pruned
and the zero-ablated model (pruning must equal zero-ablation).

    .venv/bin/python benchmarks/bench_pruning.py [--model smollm2-135m] [--k 27 54 90]
        [--contexts 512 2048] [--repeats 3] [--samples-per-depth 8]

The ranking is the committed one in fixtures/rankings/ (sum-attention, passkey at 512 tokens).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rh.ablation import ablate
from rh.evaluate import teacher_forced
from rh.models import load_model
from rh.niah import Sweep, build_samples
from rh.pruning import efficiency_report, plan_pruning, prune_heads
from rh.rankings import Ranking

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# the ranking committed with the repository: sum-attention, passkey at 512 tokens, 64 identification samples
COMMITTED_RANKING = "fixtures/rankings/smollm2-135m-sum_attention-79fe5d90059b53c5.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranking", default=None, help="ranking file (default: the committed smollm2 one)")
    ap.add_argument("--k", type=int, nargs="+", default=[27, 54, 90])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--samples-per-depth", type=int, default=8, help="passkey samples per depth for accuracy; 0 skips")
    ap.add_argument("--skip-timing", action="store_true", help="counts and accuracy only")
    args = ap.parse_args()

    path = args.ranking or COMMITTED_RANKING
    m = load_model(args.model)
    ranking = Ranking.load(path, shape=m.shape)
    load0 = os.getloadavg()[0]
    print(f"model={args.model} dtype={m.provenance['dtype']} device={m.device} threads={torch.get_num_threads()} "
          f"ranking={os.path.basename(path)} ({ranking.method})")

    samples = []
    if args.samples_per_depth:
        samples = build_samples(m.tokenizer, Sweep((512,), DEPTHS, args.samples_per_depth, ("passkey",)),
                                chat=m.instruct, max_positions=m.max_positions)
        t0 = time.perf_counter()
        base = teacher_forced(m, samples, progress=False)
        t_base = time.perf_counter() - t0
        print(f"full model: passkey@512 accuracy {base['correct'].mean():.3f} over {len(samples)} samples "
              f"(teacher-forced in {t_base:.1f} s)")

    print("\nK  heads_left  params(M)  param_ratio  flops_ratio@ctx  kv_bytes/token  kv_ratio  uneven_layers")
    pruned_models = {}
    for k in args.k:
        heads = ranking.bottom(k)
        try:
            plans = plan_pruning(m.shape, heads)
        except ValueError as exc:
            print(f"{k}: skipped: {exc}")
            continue
        pruned = prune_heads(m, heads)
        pruned_models[k] = (pruned, heads)
        rep = efficiency_report(m, pruned, context_length=args.contexts[0], measure=False).set_index("metric")
        uneven = sum(p.uniform_groups is None for p in plans.values())
        print(f"{k:<3d}{int(rep.loc['query_heads', 'after']):>10d}  {rep.loc['parameters', 'after'] / 1e6:9.2f}  "
              f"{rep.loc['parameters', 'ratio']:11.4f}  {rep.loc['flops_per_token', 'ratio']:11.4f}@{args.contexts[0]}  "
              f"{int(rep.loc['kv_cache_bytes_per_token', 'after']):>14d}  {rep.loc['kv_cache_bytes_per_token', 'ratio']:8.4f}"
              f"  {uneven:>13d}")
    print(f"full: params {rep.loc['parameters', 'before'] / 1e6:.2f} M, "
          f"KV cache {int(rep.loc['kv_cache_bytes_per_token', 'before'])} bytes/token")

    if not args.skip_timing:
        print(f"\nmeasured, batch 1, best of {args.repeats} (interleaved with the full model):")
        print("K   ctx   prefill_full_s  prefill_pruned_s  ratio  decode_full_ms  decode_pruned_ms  ratio  "
              "kv_measured_ratio  flops_ratio")
    timed = {} if args.skip_timing else pruned_models
    for k, (pruned, _) in timed.items():
        for ctx in args.contexts:
            rep = efficiency_report(m, pruned, context_length=ctx, repeats=args.repeats,
                                    decode_steps=args.decode_steps).set_index("metric")
            print(f"{k:<3d} {ctx:<5d} {rep.loc['prefill_s', 'before']:14.3f}  {rep.loc['prefill_s', 'after']:16.3f}  "
                  f"{rep.loc['prefill_s', 'ratio']:5.3f}  {rep.loc['decode_s_per_token', 'before'] * 1e3:14.1f}  "
                  f"{rep.loc['decode_s_per_token', 'after'] * 1e3:16.1f}  {rep.loc['decode_s_per_token', 'ratio']:5.3f}  "
                  f"{rep.loc['kv_cache_bytes_per_token_measured', 'ratio']:17.4f}  {rep.loc['flops_per_token', 'ratio']:11.4f}")

    if samples:
        print("\nteacher-forced passkey@512 accuracy (pruned must equal zero-ablation of the same heads):")
        print("K   full   pruned  zero-ablated  same_verdicts  max|dlogprob|  pruned_s  full_s")
        for k, (pruned, heads) in pruned_models.items():
            t0 = time.perf_counter()
            pr = teacher_forced(pruned, samples, progress=False)
            t_pr = time.perf_counter() - t0
            with ablate(m, heads, "zero"):
                za = teacher_forced(m, samples, progress=False)
            same = int((pr["correct"].to_numpy() == za["correct"].to_numpy()).sum())
            dlp = float(np.abs(pr["logprob"].to_numpy() - za["logprob"].to_numpy()).max())
            print(f"{k:<3d} {base['correct'].mean():5.3f}  {pr['correct'].mean():6.3f}  {za['correct'].mean():12.3f}  "
                  f"{same:>6d}/{len(samples):<6d}  {dlp:12.4f}  {t_pr:8.1f}  {t_base:6.1f}")
    print(f"\nload average (1 min) before {load0:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
