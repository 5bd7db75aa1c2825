"""Prompt construction speed: rh's token-space builder (the haystack tokenized once) against the
naive way (tokenize the haystack text for every prompt, splice the needle in text, re-tokenize
the whole prompt), on the same tokenizer in one process.

    .venv/bin/python benchmarks/bench_prompts.py [--n 1000] [--length 4096] [--naive-n 20]
"""

from __future__ import annotations

import argparse
import random
import time

from rh.models import bundled_tokenizer
from rh.niah import Haystack, Sweep, build_samples, haystack_text
from rh.tasks import get_task


def naive_prompt(tok, text: str, length: int, depth: float, rng: random.Random) -> list[int]:
    """What a script without rh does: tokenize the haystack, cut, decode, splice, re-tokenize."""
    task = get_task("passkey")
    needle, _ = task.make(rng)
    hay = tok(text, add_special_tokens=False).input_ids
    n_ctx = length - 90
    start = rng.randint(0, len(hay) - n_ctx)
    ctx = tok.decode(hay[start : start + n_ctx])
    cut = int(depth * len(ctx))
    ctx = ctx[:cut] + " " + needle + " " + ctx[cut:]
    msg = f"Read the document below.\n\n{ctx}\n\nQuestion: {task.question}"
    prompt = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    return tok(prompt + task.answer_prefix, add_special_tokens=False).input_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--naive-n", type=int, default=20)
    args = ap.parse_args()
    tok = bundled_tokenizer()
    text = haystack_text()

    t0 = time.perf_counter()
    Haystack._cache.clear()
    Haystack.for_tokenizer(tok)
    t_hay = time.perf_counter() - t0
    depths = tuple(round(i / 9, 3) for i in range(10))
    sweep = Sweep((args.length,), depths, args.n // len(depths), ("passkey",), seed=0)
    t0 = time.perf_counter()
    samples = build_samples(tok, sweep)
    t_rh = time.perf_counter() - t0

    rng = random.Random(0)
    t0 = time.perf_counter()
    for i in range(args.naive_n):
        naive_prompt(tok, text, args.length, depths[i % len(depths)], rng)
    t_naive = (time.perf_counter() - t0) / args.naive_n

    per_rh = t_rh / len(samples)
    print(f"tokenizer=SmolLM2 length={args.length} tokens")
    print(f"haystack tokenized once: {t_hay:.2f} s ({len(Haystack.for_tokenizer(tok))} tokens)")
    print(f"rh: {len(samples)} prompts in {t_rh:.2f} s ({per_rh * 1e3:.2f} ms/prompt, spans checked)")
    print(f"naive: {t_naive * 1e3:.1f} ms/prompt over {args.naive_n} prompts "
          f"(projected {t_naive * len(samples):.0f} s for {len(samples)})")
    print(f"speed-up per prompt: {t_naive / per_rh:.0f}x")


if __name__ == "__main__":
    main()
