"""Head scores from captured attention. Sum attention (seed 003): for every head, the last prompt
token's attention summed over the needle span, averaged over samples into a ``Ranking``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import rh
from rh.attention import capture_attention
from rh.batching import make_batches
from rh.heads import Head
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking

log = logging.getLogger(__name__)


def sum_attention_scores(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8,
                         progress: bool = True) -> np.ndarray:
    """Per-sample sum attention: array ``[n_samples, n_layers, n_heads]`` (input order).

    One forward per batch with ``logits_to_keep=1``; only the needle-span sums leave the device.
    """
    if not samples:
        raise ValueError("no samples to score: the identification split is empty; use more samples per setting")
    shape = model.shape
    out = np.zeros((len(samples), shape.n_layers, shape.n_heads), dtype=np.float64)
    index = {s.id: i for i, s in enumerate(samples)}
    bar = tqdm(total=len(samples), desc="sum attention", unit="sample", disable=not progress, leave=False)
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        span = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=model.device)
        for row in range(len(batch.samples)):
            s, e = batch.needle_span(row)
            span[row, s:e] = 1.0

        def reduce(layer: int, probs: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bhl,bl->bh", probs, span.to(probs.device)).cpu()

        with torch.no_grad(), capture_attention(model.model, reduce) as cap:
            model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
        per_layer = torch.stack(cap.step(0), dim=1)  # [b, layers, heads]
        for row, s in enumerate(batch.samples):
            out[index[s.id]] = per_layer[row].double().numpy()
        bar.update(len(batch.samples))
    bar.close()
    return out


def sum_attention_ranking(model: LoadedModel, samples: Sequence[Sample], *, provenance: dict[str, Any] | None = None,
                          batch_size: int = 8, progress: bool = True) -> Ranking:
    """Rank every head by its mean sum attention to the needle over ``samples``."""
    t0 = time.perf_counter()
    per_sample = sum_attention_scores(model, samples, batch_size=batch_size, progress=progress)
    shape = model.shape
    mean = per_sample.mean(axis=0)
    scores = {Head(l, h): float(mean[l, h]) for l in range(shape.n_layers) for h in range(shape.n_heads)}
    per_setting: dict[str, dict[Head, float]] = {}
    keys = [f"L{s.length}-d{s.depth:.3f}" for s in samples]
    for key in sorted(set(keys)):
        sel = [i for i, k in enumerate(keys) if k == key]
        m = per_sample[sel].mean(axis=0)
        per_setting[key] = {Head(l, h): float(m[l, h]) for l in range(shape.n_layers) for h in range(shape.n_heads)}
    prov = dict(provenance or {})
    prov.setdefault("method", "sum_attention")
    prov.update({"rh_version": rh.__version__, "n_samples": len(samples),
                 "runtime_s": round(time.perf_counter() - t0, 2)})
    return Ranking("sum_attention", shape, scores, prov, per_setting)
