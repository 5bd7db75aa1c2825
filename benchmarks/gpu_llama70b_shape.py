"""Identification and evaluation throughput at Llama-3.3-70B's layer shape: a randomly initialised
Llama with its hidden size, heads, KV heads, head_dim, MLP and vocabulary, and as many layers as
fit, at 8K and 32K tokens. In one process, runs interleaved, median of repeats:

- plain: the forward a teacher-forced evaluation runs (``logits_to_keep`` = 8 answer positions);
- capture: the same forward under ``capture_attention`` with the sum-attention reducer (what
  identification runs), and its ratio to plain;
- ablated: the same forward under ``ablate(..., "zero")`` of 64 heads (evaluation under ablation);

with tokens per second, the peak memory of each (``torch.cuda.max_memory_allocated``; on CPU the
process's peak RSS), and the projection to all 80 layers on N GPUs (``device_map="auto"``
places layers one after another, so a forward's latency is that of 80 layers on one GPU; more GPUs
add memory, and throughput grows by running replicas side by side).

    # GPU (H100/H200 80-141 GB): as many 70B-shaped layers as fit in 80% of free memory
    .venv/bin/python benchmarks/gpu_llama70b_shape.py --lengths 8192 32768 --repeats 3
    # CPU proof that the script runs: one narrow layer
    .venv/bin/python benchmarks/gpu_llama70b_shape.py --device cpu --layers 1 --lengths 512 1024 --hidden-size 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from datetime import date

import torch

from rh.ablation import ablate
from rh.attention import capture_attention
from rh.heads import Head, HeadShape

# Llama-3.3-70B-Instruct (config.json of meta-llama/Llama-3.3-70B-Instruct)
L70 = dict(hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256, layers=80,
           rope_theta=500000.0)
GiB = 1024**3


def shape_from_args(args) -> dict:
    """The 70B shape, or a narrower one with the same head_dim, GQA ratio and MLP ratio (CPU proofs)."""
    hidden = args.hidden_size
    heads = hidden // L70["head_dim"]
    if heads < 1 or hidden % L70["head_dim"]:
        raise SystemExit(f"--hidden-size {hidden}: use a multiple of head_dim {L70['head_dim']}")
    kv = max(1, heads * L70["kv_heads"] // L70["heads"])
    inter = round(L70["intermediate"] * hidden / L70["hidden"])
    return dict(hidden=hidden, heads=heads, kv_heads=kv, head_dim=L70["head_dim"], intermediate=inter,
                vocab=L70["vocab"])


def layer_params(s: dict) -> int:
    attn = s["hidden"] * (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] + s["heads"] * s["head_dim"] * s["hidden"]
    return attn + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"]


def fixed_params(s: dict) -> int:
    return 2 * s["vocab"] * s["hidden"] + s["hidden"]  # embeddings, lm_head (untied), final norm


def activation_bytes(s: dict, length: int, dtype_bytes: int = 2) -> int:
    """One layer's transient activations at batch 1 (as rh.memory counts them), plus the fp32 row."""
    per_token = dtype_bytes * (4 * s["hidden"] + 2 * s["heads"] * s["head_dim"] + 3 * s["intermediate"]) + 8 * s["hidden"]
    return per_token * length


def layers_that_fit(s: dict, device: str, longest: int, fraction: float = 0.8) -> int:
    free = torch.cuda.mem_get_info(torch.device(device))[0]
    budget = fraction * free - 2 * fixed_params(s) - activation_bytes(s, longest)
    n = int(budget // (2 * layer_params(s)))
    if n < 1:
        raise SystemExit(f"not even one layer fits in {fraction:.0%} of {free / GiB:.1f} GiB free at {longest} tokens")
    return n


def build(s: dict, n_layers: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=n_layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      head_dim=s["head_dim"], max_position_embeddings=131072, rope_theta=L70["rope_theta"],
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 100 GB detour through host memory
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; monotone over the process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default on CUDA: as many as fit in 80%% of free memory in bf16)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--hidden-size", type=int, default=L70["hidden"],
                    help="narrower than 8192 for a CPU proof (heads, KV heads and MLP scale with it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts for the 80-layer projection")
    ap.add_argument("--gpu-memory", type=float, default=None,
                    help="GiB per GPU for the projection (default: this GPU's total, else 80)")
    ap.add_argument("--best", action="store_true",
                    help="report the fastest repeat instead of the median (for a CPU shared with other load)")
    ap.add_argument("--ablate-heads", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    device = "cuda:0" if args.device == "cuda" else args.device
    dtype = torch.bfloat16
    s = shape_from_args(args)
    n_layers = args.layers or (layers_that_fit(s, device, max(args.lengths)) if device.startswith("cuda") else 1)
    model = build(s, n_layers, device, dtype)
    if device == "cpu":  # torch's CPU bf16 linear takes a path ~60x slower for the strided [:, -k:, :] view
        # transformers hands lm_head; a contiguous copy of those k rows costs nothing and keeps the
        # one-layer proof from measuring that instead of the layer (CUDA has no such path)
        model.lm_head.register_forward_pre_hook(lambda mod, a: (a[0].clone(memory_format=torch.contiguous_format),))
    shape = HeadShape(n_layers, s["heads"], s["kv_heads"], s["head_dim"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    hw = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{platform.processor() or 'CPU'}"
    print(f"{hw}; torch {torch.__version__}; {date.today()}; threads={torch.get_num_threads()}; "
          f"{'best' if args.best else 'median'} of {args.repeats} interleaved repeats")
    print(f"shape: hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} KV heads x {s['head_dim']}, "
          f"MLP {s['intermediate']}, vocab {s['vocab']}; {n_layers} layers; weights {weights / GiB:.2f} GiB bf16")

    heads = [Head(l, h) for l in range(n_layers) for h in range(s["heads"])]
    abl = heads[:: max(1, len(heads) // args.ablate_heads)][: args.ablate_heads]
    rows, all_times = [], []
    print("length  plain_s  capture_s  capture/plain  ablated_s  ablated/plain  tok/s(plain)  tok/s(capture)  "
          "peak_plain_GiB  peak_capture_GiB")
    for length in args.lengths:
        ids = torch.randint(0, s["vocab"], (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        span = torch.zeros(1, length, device=device)
        span[0, length // 2 : length // 2 + 16] = 1.0

        def plain():
            with torch.no_grad():
                model(input_ids=ids, logits_to_keep=8, use_cache=False)

        def captured():
            with torch.no_grad(), capture_attention(model, lambda l, p: torch.einsum("bhl,bl->bh", p, span).cpu()):
                model(input_ids=ids, logits_to_keep=8, use_cache=False)

        def ablated():
            with torch.no_grad(), ablate(model, abl, "zero", shape=shape):
                model(input_ids=ids, logits_to_keep=8, use_cache=False)

        runs = {"plain": plain, "capture": captured, "ablated": ablated}
        times = {k: [] for k in runs}
        peaks = {}
        for name, fn in runs.items():  # warm-up, and the peak memory of each way
            peak_reset(device)
            fn()
            sync(device)
            peaks[name] = peak_bytes(device)
        for _ in range(args.repeats):  # interleaved, so drift and load hit every way alike
            for name, fn in runs.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        med = {k: (min(v) if args.best else statistics.median(v)) for k, v in times.items()}
        row = {"length": length, **{f"{k}_s": round(v, 4) for k, v in med.items()},
               "capture_over_plain": round(med["capture"] / med["plain"], 3),
               "ablated_over_plain": round(med["ablated"] / med["plain"], 3),
               "tokens_per_s_plain": round(length / med["plain"], 1),
               "tokens_per_s_capture": round(length / med["capture"], 1),
               **{f"peak_{k}_gib": round(v / GiB, 2) for k, v in peaks.items()}}
        rows.append(row)
        all_times.append({k: [round(x, 4) for x in v] for k, v in times.items()})
        print(f"{length:6d}  {med['plain']:7.3f}  {med['capture']:9.3f}  {row['capture_over_plain']:13.3f}  "
              f"{med['ablated']:9.3f}  {row['ablated_over_plain']:13.3f}  {row['tokens_per_s_plain']:12.1f}  "
              f"{row['tokens_per_s_capture']:14.1f}  {row['peak_plain_gib']:14.2f}  {row['peak_capture_gib']:16.2f}",
              flush=True)

    # ---- projection to the 80 layers of Llama-3.3-70B
    gpu_mem = args.gpu_memory or (torch.cuda.get_device_properties(device).total_memory / GiB
                                  if device.startswith("cuda") else 80.0)
    w80 = (80 * layer_params(L70) + fixed_params(L70)) * 2 / GiB
    scale = (layer_params(L70) / layer_params(s)) if s["hidden"] != L70["hidden"] else 1.0
    print(f"\nprojection to 80 layers (bf16 weights {w80:.1f} GiB; {gpu_mem:.0f} GiB per GPU"
          + (f"; per-layer time scaled by the parameter ratio {scale:.0f}x from this narrower shape)" if scale != 1 else ")"))
    print("length  s/forward(80 layers)  tok/s per replica  GPUs  GiB/GPU(weights+act)  fits  replicas  tok/s total")
    proj = []
    for row in rows:
        length = row["length"]
        per_layer = row["capture_s"] / n_layers * scale  # the fixed part (embeddings, one logits row) is small
        t80 = per_layer * 80
        act = activation_bytes(L70, length) / GiB
        for n in args.gpus:
            per_gpu = w80 / n + act
            fits = per_gpu <= 0.95 * gpu_mem
            need = next((g for g in range(1, 65) if w80 / g + act <= 0.95 * gpu_mem), None)
            replicas = n // need if need else 0
            p = {"length": length, "gpus": n, "s_per_forward": round(t80, 3), "tokens_per_s_replica": round(length / t80, 1),
                 "gib_per_gpu": round(per_gpu, 1), "fits": fits, "replicas": replicas,
                 "tokens_per_s_total": round(replicas * length / t80, 1)}
            proj.append(p)
            print(f"{length:6d}  {t80:20.2f}  {p['tokens_per_s_replica']:17.1f}  {n:4d}  {per_gpu:20.1f}  "
                  f"{'yes' if fits else 'no':>4}  {replicas:8d}  {p['tokens_per_s_total']:11.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hardware": hw, "torch": torch.__version__, "date": str(date.today()), "shape": s,
                       "layers": n_layers, "statistic": "best" if args.best else "median", "repeats": args.repeats,
                       "times": {str(r["length"]): t for r, t in zip(rows, all_times)}, "rows": rows,
                       "projection": proj}, fh, indent=2)


if __name__ == "__main__":
    main()
