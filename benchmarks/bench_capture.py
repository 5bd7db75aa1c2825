"""Cost of the attention capture (design decision 1) against a plain forward and against the
``output_attentions=True`` eager baseline, on the same prompts, in one process.

    .venv/bin/python benchmarks/bench_capture.py [--model smollm2-135m] [--lengths 1024 4096] [--repeats 3]

Prints one line per length: seconds per forward (median of repeats) for plain sdpa, sdpa with
the sum-attention capture, and eager with output_attentions, with the ratios to plain sdpa, and
the bytes of attention the eager baseline materialises.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rh.attention import capture_attention
from rh.models import load_model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-eager", action="store_true", help="skip the output_attentions baseline")
    args = ap.parse_args()

    m = load_model(args.model)
    eager = load_model(args.model, attn_implementation="eager") if not args.no_eager else None
    print(f"model={args.model} device={m.device} dtype={m.provenance['dtype']} threads={torch.get_num_threads()}")
    print("length  sdpa_s  capture_s  capture/sdpa  eager_attn_s  eager/sdpa  eager_attn_GB")
    for length in args.lengths:
        ids = torch.randint(0, len(m.tokenizer), (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(m.device)
        span = torch.zeros(1, length, device=m.device)
        span[0, length // 2 : length // 2 + 16] = 1.0

        def plain():
            with torch.no_grad():
                m.model(input_ids=ids, logits_to_keep=1, use_cache=False)

        def captured():
            with torch.no_grad(), capture_attention(m, lambda l, p: torch.einsum("bhl,bl->bh", p, span)):
                m.model(input_ids=ids, logits_to_keep=1, use_cache=False)

        t_plain = timed(plain, args.repeats)
        t_cap = timed(captured, args.repeats)
        line = f"{length:6d}  {t_plain:6.3f}  {t_cap:9.3f}  {t_cap / t_plain:12.3f}"
        if eager is not None:
            def full():
                with torch.no_grad():
                    out = eager.model(input_ids=ids, logits_to_keep=1, use_cache=False, output_attentions=True)
                return out

            t_eager = timed(full, max(1, args.repeats - 1))
            shape = m.shape
            gb = shape.n_layers * shape.n_heads * length * length * m.model.dtype.itemsize / 1e9
            line += f"  {t_eager:12.3f}  {t_eager / t_plain:10.2f}  {gb:13.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
