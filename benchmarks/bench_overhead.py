"""Per-pass overhead of rh's evaluation on a small model (issue #32): what one teacher-forced pass
costs beyond the model's own forward.

CA-1's and CA-7's random head sets run one small forward after another (early stopping evaluates a
few items per pass), so on a model whose layers take microseconds the Python around each pass, not
the arithmetic, is the bill. In one process, on the same prompts, this times

- ``bare``: ``hf(input_ids, attention_mask, position_ids, logits_to_keep, use_cache=False)`` under
  ``no_grad`` with the random set's o_proj pre-hooks registered by hand (the floor: what any
  hook-based ablation must pay);
- ``rh``: ``with ablate(model, heads): teacher_forced(model, [sample])``, the way
  ``rh.causal._stopped_draw`` runs a random set, with the session's machinery on (the token-layer
  counter attached, prefix reuse active, progress listened to), as under ``pytest claims/``;

and prints microseconds per pass of each and their difference (rh's overhead per pass), with the
load average. ``--profile`` adds cProfile's top entries of the rh path.

``--ca1`` times CA-1's random sets instead (``rh.causal.necessity_outcomes`` with early stopping,
the tiny model's quick-profile K levels and draws, its own greedy answers as gold so that the
baseline is 1.0): in waves, rows of different random sets side by side in one batch
(``rh.units.run_units``, the default), against one set after another (the same units run one at a
time, the way ``_stopped_draw`` ran them before), checking that both evaluate the same entries
with the same outcomes, and counting forward passes and token-layers.

    .venv/bin/python benchmarks/bench_overhead.py [--passes 400] [--profile]
    .venv/bin/python benchmarks/bench_overhead.py --ca1 [--shuffles 3]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import time

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=400)
    ap.add_argument("--items", type=int, default=1, help="prompts per pass (early stopping's chunks are 1-8)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--no-reuse", action="store_true", help="rh's path without prefix reuse (the same layers as bare)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ca1", action="store_true", help="CA-1's random sets: waves against one set at a time")
    ap.add_argument("--shuffles", type=int, default=3, help="with --ca1: rankings with random scores")
    ap.add_argument("--model", default="tiny-llama", help="with --ca1: a registry key (tiny-llama, smollm2-135m)")
    ap.add_argument("--draws", type=int, default=None, help="with --ca1: random draws per K (default: the profile's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ca1:
        return ca1(args)

    from rh import progress
    from rh.ablation import _head_mask, ablate
    from rh.batching import make_batches
    from rh.budget import TokenLayerCounter
    from rh.evaluate import teacher_forced
    from rh.models import attention_modules, tiny_llama
    from rh.niah import Sweep, build_samples
    from rh.prefix import reuse_prefixes

    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    samples = build_samples(model.tokenizer, Sweep((128,), (0.0, 0.5, 1.0), 4, ("passkey",)),
                            max_positions=model.max_positions)
    heads = model.shape.all_heads()
    rng = np.random.default_rng(0)
    sets = [[heads[i] for i in rng.choice(len(heads), 4, replace=False)] for _ in range(args.passes)]
    chunks = [[samples[(p * args.items + j) % len(samples)] for j in range(args.items)] for p in range(args.passes)]
    hf = model.model
    attn = attention_modules(model)
    shape = model.shape

    def bare() -> float:
        t0 = time.perf_counter()
        for heads_, chunk in zip(sets, chunks):
            handles = []
            for h in heads_:
                mask = _head_mask(shape.n_heads, shape.head_dim, [h.head], torch.device("cpu"))
                handles.append(attn[h.layer].o_proj.register_forward_pre_hook(
                    lambda m, a, mask=mask: (a[0].masked_fill(mask, 0.0),)))
            try:
                for batch in make_batches(chunk, 8, model.tokenizer.pad_token_id, with_answer=True):
                    n_keep = max(len(s.answer_ids) for s in batch.samples)
                    with torch.no_grad():
                        hf(**batch.model_inputs("cpu"), logits_to_keep=n_keep, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        return time.perf_counter() - t0

    def with_rh() -> float:
        t0 = time.perf_counter()
        for i, (heads_, chunk) in enumerate(zip(sets, chunks)):
            with counter.charged_to("bench"), ablate(model, heads_):
                teacher_forced(model, chunk, condition=f"random#{i}", progress=False)
        return time.perf_counter() - t0

    counter = TokenLayerCounter()
    token = progress.listen(lambda *a: None)
    handles = counter.attach(model)
    try:
        with (contextlib.nullcontext() if args.no_reuse else reuse_prefixes(model)):
            bare(), with_rh()  # warm up both paths
            load = os.getloadavg()
            t_bare = min(bare() for _ in range(2))
            t_rh = min(with_rh() for _ in range(2))
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                with_rh()
                prof.disable()
    finally:
        handles.remove()
        progress.unlisten(token)
    n = args.passes
    print(f"tiny-llama, {n} passes of {args.items} prompt(s) of about {len(samples[0].input_ids)} tokens, "
          f"torch threads {torch.get_num_threads()}, prefix reuse {'off' if args.no_reuse else 'on'}, load average {load[0]:.2f} {load[1]:.2f}")
    print(f"bare forward with hand-made hooks: {t_bare / n * 1e6:8.0f} us per pass")
    print(f"rh (ablate + teacher_forced):      {t_rh / n * 1e6:8.0f} us per pass")
    print(f"rh's overhead:                     {(t_rh - t_bare) / n * 1e6:8.0f} us per pass "
          f"({t_rh / t_bare:.2f}x the bare pass)")
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


def ca1(args) -> int:
    import dataclasses

    import rh.causal as causal
    from rh import progress
    from rh.budget import TokenLayerCounter
    from rh.evaluate import greedy_answers
    from rh.models import tiny_llama
    from rh.niah import Sweep, build_samples
    from rh.profiles import get_profile
    from rh.rankings import Ranking
    from rh.units import run_units

    from rh.models import load_model

    model = tiny_llama(seed=0) if args.model == "tiny-llama" else load_model(args.model)
    prof = get_profile("quick", model.shape)
    length = 128 if args.model == "tiny-llama" else prof.lengths[0]
    samples = build_samples(model.tokenizer, Sweep((length,), (0.0, 0.5, 1.0), 4, ("passkey",)),
                            max_positions=model.max_positions, chat=model.instruct)
    gold = greedy_answers(model, samples, batch_size=16)
    samples = [dataclasses.replace(s, answer_ids=g) for s, g in zip(samples, gold)]
    batch = 16 if args.model == "tiny-llama" else prof.batch_size
    draws = args.draws or prof.random_draws
    baseline = causal.evaluate_baseline(model, samples, batch_size=batch)
    heads = model.shape.all_heads()
    passes = {"n": 0}

    def one_at_a_time(m, smp, units, *, batch_size=8):
        return [run_units(m, smp, [u], batch_size=batch_size)[0] for u in units]

    def run(waves: bool):
        causal.run_units = run_units if waves else one_at_a_time
        counter = TokenLayerCounter()
        handles = counter.attach(model)
        first = model.model.model.layers[0].register_forward_pre_hook(lambda *a: passes.__setitem__("n", passes["n"] + 1))
        passes["n"] = 0
        t0 = time.perf_counter()
        try:
            with counter.charged_to("ca1"):
                outs = [causal.necessity_outcomes(model, samples, Ranking("shuffled", model.shape, dict(zip(
                    heads, np.random.default_rng(100 + s).random(len(heads)).tolist()))), k, draws=draws,
                    seed=s, baseline=baseline, batch_size=batch) for s in range(args.shuffles) for k in prof.ablation_levels]
        finally:
            handles.remove()
            first.remove()
            causal.run_units = run_units
        return outs, time.perf_counter() - t0, passes["n"], counter.total

    token = progress.listen(lambda *a: None)
    try:
        load = os.getloadavg()
        seq, t_seq, p_seq, tl_seq = run(False)
        wav, t_wav, p_wav, tl_wav = run(True)
    finally:
        progress.unlisten(token)
    for a, b in zip(seq, wav):
        seen = ~np.isnan(a.random_correct)
        assert np.array_equal(seen, ~np.isnan(b.random_correct)), "the two evaluated different entries"
        assert np.array_equal(a.random_correct[seen], b.random_correct[seen]), "an outcome differs"
    print(f"CA-1 on {args.model} ({model.provenance.get('dtype', 'float32')}): {args.shuffles} shuffled rankings x "
          f"K={prof.ablation_levels} x {draws} random draws, {len(samples)} prompts of {length} tokens, batch {batch}, "
          f"torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.2f} {load[1]:.2f}")
    print(f"one set at a time: {t_seq:6.1f} s, {p_seq:5d} forward passes, {tl_seq:,} token-layers")
    print(f"waves (side by side): {t_wav:6.1f} s, {p_wav:5d} forward passes, {tl_wav:,} token-layers "
          f"({t_seq / t_wav:.2f}x faster; the same entries evaluated, every outcome equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
