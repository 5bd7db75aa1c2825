"""Teacher-forced evaluation (design decision 3) against generate-based evaluation (Wu24 decodes
up to 50 new tokens) on the same passkey samples, in one process: the verdict per sample (teacher-
forced exact match vs the generated reply starting with the answer) and the time each takes.

    .venv/bin/python benchmarks/bench_eval.py [--model smollm2-135m] [--length 512] [--per-depth 8]
        [--max-new-tokens 50] [--batch-size 8]

Generation runs batched like the teacher-forced pass (the stronger baseline) and one prompt at a
time as the Wu24 script did, stopping at the end-of-sequence token; and once forced to decode all
50 tokens (a model that does not stop), on the first ``--forced-samples``. Prints one line per way: best time, accuracy, and on how
many samples its verdict equals the teacher-forced one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rh.evaluate import generated, teacher_forced
from rh.models import load_model
from rh.niah import Sweep, build_samples

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--per-depth", type=int, default=8, help="samples per needle depth (5 depths)")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--forced-samples", type=int, default=16, help="samples for the forced full-length decoding")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of the batched ways (best is kept)")
    ap.add_argument("--skip-unbatched", action="store_true", help="skip the one-prompt-at-a-time generation")
    args = ap.parse_args()

    t0 = time.perf_counter()
    m = load_model(args.model)
    load_s = time.perf_counter() - t0
    samples = build_samples(m.tokenizer, Sweep((args.length,), DEPTHS, args.per_depth, ("passkey",)),
                            chat=m.instruct, max_positions=m.max_positions)
    print(f"model={args.model} dtype={m.provenance['dtype']} device={m.device} threads={torch.get_num_threads()} "
          f"load={load_s:.1f}s samples={len(samples)} length={args.length} max_new_tokens={args.max_new_tokens}")

    load0 = os.getloadavg()[0]
    # warm-up (first-call allocations), not timed
    teacher_forced(m, samples[:2], batch_size=2, progress=False)
    n = len(samples)
    bs, mnt = args.batch_size, args.max_new_tokens
    ways = {
        f"teacher-forced, batch {bs}": (lambda: teacher_forced(m, samples, batch_size=bs, progress=False), args.repeats),
        f"generate <= {mnt} tokens (EOS stops), batch {bs}": (
            lambda: generated(m, samples, max_new_tokens=mnt, batch_size=bs, progress=False), args.repeats),
        f"generate <= {mnt} tokens (EOS stops), batch 1 (Wu24)": (
            lambda: generated(m, samples, max_new_tokens=mnt, batch_size=1, progress=False), 1),
    }
    forced = samples[: args.forced_samples]
    if forced:
        ways[f"generate exactly {mnt} tokens, batch {bs} ({len(forced)} samples)"] = (
            lambda: generated(m, forced, max_new_tokens=mnt, min_new_tokens=mnt, batch_size=bs, progress=False), 1)
    if args.skip_unbatched:
        ways = {k: v for k, v in ways.items() if "batch 1" not in k}
    times: dict[str, list[float]] = {k: [] for k in ways}
    frames = {}
    for r in range(max(reps for _, reps in ways.values())):  # interleaved, so drift hits every way alike
        for name, (fn, reps) in ways.items():
            if r < reps:
                t0 = time.perf_counter()
                frames[name] = fn()
                times[name].append(time.perf_counter() - t0)

    tf_name = next(iter(ways))
    tf = frames[tf_name]
    per_tf = min(times[tf_name]) / n
    print(f"{'way':62s} {'runs':>4s} {'best s':>7s} {'s/sample':>8s} {'accuracy':>8s} {'verdicts = TF':>13s} "
          f"{'x TF time/sample':>16s}")
    for name in ways:
        df, t = frames[name], min(times[name])
        k = len(df)
        acc = df["correct"].mean() if name == tf_name else df["exact"].mean()
        same = k if name == tf_name else int((tf["correct"].to_numpy()[:k] == df["exact"].to_numpy()).sum())
        print(f"{name:62s} {len(times[name]):4d} {t:7.1f} {t / k:8.3f} {acc:8.3f} {f'{same}/{k}':>13s} "
              f"{t / k / per_tf:15.2f}x")
    print(f"load average (1 min) before {load0:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    gen = frames[list(ways)[1]]
    bad = tf[tf["correct"].to_numpy() != gen["exact"].to_numpy()]
    for i in bad.index:
        print(f"  disagree {tf.loc[i, 'id']}: teacher-forced={tf.loc[i, 'correct']} reply={gen.loc[i, 'text'][:60]!r} "
              f"gold={samples[i].answer!r}")
    tokens = gen["text"].map(lambda t: len(m.tokenizer(t, add_special_tokens=False).input_ids))
    print(f"replies when EOS stops them: mean {tokens.mean():.1f} tokens, max {tokens.max()}; "
          f"contains-match {gen['contains'].mean():.3f}, ROUGE-1 recall {gen['rouge1_recall'].mean():.3f}")


if __name__ == "__main__":
    main()
