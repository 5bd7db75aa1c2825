"""Cost of the Wu24 retrieval score against plain greedy generation of the same tokens, in one
process: the score reads each decoding step's attention through the capture mechanism (top-k
positions per head), so its only extra work is one query row per head and step.

    .venv/bin/python benchmarks/bench_wu24.py [--model smollm2-135m] [--length 1024] [--new 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rh.attention import capture_attention
from rh.models import load_model
from rh.niah import Sweep, build_samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--new", type=int, default=12, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    m = load_model(args.model)
    print(f"model={args.model} dtype={m.provenance['dtype']} threads={torch.get_num_threads()} new_tokens={args.new}")
    print("length  generate_s  wu24_capture_s  ratio")
    for length in args.lengths:
        (s,) = build_samples(m.tokenizer, Sweep((length,), (0.5,), 1), max_positions=m.max_positions)
        ids = torch.tensor([s.input_ids], device=m.device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                  do_sample=False, pad_token_id=m.tokenizer.pad_token_id)

        def plain():
            with torch.no_grad():
                m.model.generate(ids, **kw)

        def scored():
            with torch.no_grad(), capture_attention(m, lambda l, p: p.topk(1, dim=-1).indices.cpu()):
                m.model.generate(ids, **kw)

        plain()  # warm-up
        a, b = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            t0 = time.perf_counter(); plain(); a.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); scored(); b.append(time.perf_counter() - t0)
        ta, tb = statistics.median(a), statistics.median(b)
        print(f"{length:6d}  {ta:10.3f}  {tb:14.3f}  {tb / ta:5.3f}", flush=True)


if __name__ == "__main__":
    main()
