"""Content-free head scores: RazorAttention's echo and induction heads (Tang et al. 2024).

RazorAttention finds the heads whose KV cache it keeps whole by running the model once on random
tokens repeated, ``x_1..x_n x_1..x_n ...``, and scoring every head on the queries of the later
copies: the **echo** score is the attention a query gives to the earlier occurrences of its own
token, the **induction** score the attention it gives to the tokens that followed those earlier
occurrences. The reference read here is Huawei's MindSpore Golden Stick implementation
(``mindspore_gs/.../razor_attention/razor_attention.py``: ``DUMMY_INPUT_LENGTH = 2500``,
``REPET_TIMES = 4``, ``_get_score_mask``, ``_calc_score``, ``_max_every_group``).

Where rh follows it:

- one block of ``seq_len`` random tokens (default 2500) repeated ``repeats`` times (default 4),
  the model's BOS prepended where it has one (the reference inserts ``config.bos_token_id``);
- for a query at position ``i`` in copies 2..R, its echo targets are *every* earlier position
  holding the same block index (``j = i - n, i - 2n, ...``) and its induction targets the
  positions just after them (``j + 1``), as the reference's masks, whose masked attention is
  summed per query;
- one forward over the whole sequence, attention from the model's own query/key tensors.

Where it departs (the defaults here make ``n_sequences=1`` the reference's single sequence):

- positions are shifted by the BOS: the reference builds its masks on unshifted indices
  (``i // n``, ``i % n``) after inserting BOS, so its first scored row is the last token of the
  first copy and its echo target there is the BOS; rh scores exactly the queries of copies 2..R;
- the reference reduces by ``mean`` over the whole ``L x L`` masked matrix (``sum / L**2``); rh
  averages the per-query sums over the scored queries (and over sequences): the same order of
  heads for a fixed geometry, but a score in [0, 1] that reads as attention mass;
- tokens are drawn, seeded, uniformly from the whole vocabulary without special tokens and
  without replacement within a block (so "the earlier occurrence of the same token" is exactly
  the positional one); the reference draws ids 10000..12500 with replacement;
- the reference keeps one score per KV group (``_max_every_group``, the max over the query heads
  sharing a KV head), since it compresses KV heads; rh scores each query head (a ``Ranking`` is
  per query head) and leaves grouping to the caller;
- the reference then takes the top 1 % echo / top x % induction heads and unions them; rh returns
  one ``Ranking`` per score.

Cost: one forward per batch of sequences; the capture records the ``(R - 1) * n`` rows of copies
2..R (``rows=``), ``[batch, heads, (R - 1) n, L]`` float32 per layer, transiently; the reducer
keeps two numbers per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import time
from typing import Any

import numpy as np
import torch

import rh
from rh.attention import capture_attention
from rh.heads import Head
from rh.models import LoadedModel
from rh.rankings import Ranking
from rh.scoring import SampleScores

METHODS = ("echo", "induction")
REPEATS = 4  # copies of the random block (RazorAttention's REPET_TIMES)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        idx, added = tok
        if getattr(added, "special", False):
            ids.add(int(idx))
    return {int(i) for i in ids if i is not None}


def _bos_id(model: LoadedModel) -> int | None:
    bos = getattr(model.model.config, "bos_token_id", None)
    if bos is None:
        bos = getattr(model.tokenizer, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    return None if bos is None else int(bos)


def random_repeated_sequences(model: LoadedModel, *, n_sequences: int, seq_len: int, repeats: int = REPEATS,
                              seed: int = 0, bos: bool = True) -> tuple[torch.Tensor, int]:
    """``[n_sequences, offset + repeats * seq_len]`` token ids and ``offset`` (1 with BOS, else 0).

    Each sequence is one block of ``seq_len`` distinct tokens, drawn with ``numpy``'s
    ``default_rng(seed)`` from the vocabulary without special tokens, repeated ``repeats`` times.
    """
    if n_sequences < 1 or seq_len < 2 or repeats < 2:
        raise ValueError(f"n_sequences={n_sequences}, seq_len={seq_len}, repeats={repeats}: need at least one "
                         "sequence, two tokens per block and two copies")
    vocab = int(model.model.get_input_embeddings().weight.shape[0])
    vocab = min(vocab, len(model.tokenizer)) if model.tokenizer is not None else vocab
    special = _special_ids(model.tokenizer)
    allowed = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    if len(allowed) < seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the {len(allowed)} non-special tokens of the vocabulary")
    rng = np.random.default_rng(seed)
    bos_id = _bos_id(model) if bos else None
    rows = []
    for _ in range(n_sequences):
        block = rng.choice(allowed, size=seq_len, replace=False)
        seq = np.tile(block, repeats)
        rows.append(np.concatenate([[bos_id], seq]) if bos_id is not None else seq)
    return torch.tensor(np.stack(rows), dtype=torch.long), int(bos_id is not None)


def echo_induction_targets(offset: int, seq_len: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``[(repeats - 1) * seq_len, L]`` over the scored query rows (copies 2..R, in order) and
    all keys: echo = earlier positions with the same token, induction = the position after each."""
    n, L = seq_len, offset + repeats * seq_len
    q = torch.arange(offset + n, L)
    echo = torch.zeros(len(q), L, dtype=torch.bool)
    ind = torch.zeros(len(q), L, dtype=torch.bool)
    for k in range(1, repeats):
        j = q - k * n
        ok = j >= offset
        echo[ok.nonzero().squeeze(-1), j[ok]] = True
        ind[ok.nonzero().squeeze(-1), j[ok] + 1] = True
    return echo, ind


def content_free_scores(model: LoadedModel, method: str | Sequence[str], *, n_sequences: int = 1,
                        seq_len: int = 2500, repeats: int = REPEATS, seed: int = 0, batch_size: int = 8,
                        bos: bool = True) -> SampleScores | dict[str, SampleScores]:
    """Per-sequence echo or induction scores (ids ``random-000``, ...): ``scores[i]`` is
    ``[n_layers, n_heads]``, the mean over the queries of copies 2..R of their attention to the
    earlier occurrences of their token (echo) or to the tokens after them (induction).

    ``method`` a tuple such as ``("echo", "induction")``: a dict of both from the same passes (one
    capture gives both scores)."""
    methods = (method,) if isinstance(method, str) else tuple(method)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown content-free method {bad or method!r}: use one of {', '.join(METHODS)}")
    both = _echo_induction(model, n_sequences=n_sequences, seq_len=seq_len, repeats=repeats, seed=seed,
                           batch_size=batch_size, bos=bos)
    ids = [f"random-{i:03d}" for i in range(n_sequences)]
    info = [{"seed": seed, "seq_len": seq_len, "repeats": repeats, "index": i} for i in range(n_sequences)]
    out = {m: SampleScores(m, ids, both[m], np.ones(n_sequences, dtype=bool), info) for m in methods}
    return out[method] if isinstance(method, str) else out


@dataclass(frozen=True)
class EchoInductionTask:
    """The echo and induction scores of random sequences ``start..stop-1`` (of ``n_sequences``
    drawn by ``seed``) as a :class:`rh.runner.Task`: the sequences are drawn again where it runs (a
    replica on Ray), from the seed and the model's tokenizer, and the scores sent back."""

    n_sequences: int
    seq_len: int
    repeats: int
    seed: int
    bos: bool
    start: int
    stop: int
    sample_ids: tuple[str, ...] = ()  # no prompt: the sequences are drawn from the seed

    def run(self, model: LoadedModel, by_id: Any) -> dict[str, np.ndarray]:
        return _echo_induction_rows(model, n_sequences=self.n_sequences, seq_len=self.seq_len, repeats=self.repeats,
                                    seed=self.seed, bos=self.bos, start=self.start, stop=self.stop)

    def dry(self, model: LoadedModel, by_id: Any) -> tuple[dict[str, np.ndarray], int]:
        """A dry run's (:mod:`rh.dry`): made-up scores, and one forward of the sequences' token-layers."""
        from rh.dry import made_up_array

        shape = model.shape
        width = int(self.bos and _bos_id(model) is not None) + self.repeats * self.seq_len
        rows = self.stop - self.start
        out = {k: made_up_array((rows, shape.n_layers, shape.n_heads), k, self.seed, self.start) for k in
               ("echo", "induction")}
        return out, rows * width * shape.n_layers


def _echo_induction(model: LoadedModel, *, n_sequences: int, seq_len: int, repeats: int, seed: int,
                    batch_size: int, bos: bool) -> dict[str, np.ndarray]:
    """The scores of every sequence, a batch a task of the model's runner (on Ray, on the replicas)."""
    from rh.runner import call

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    tasks = [EchoInductionTask(n_sequences, seq_len, repeats, seed, bos, c, min(c + batch_size, n_sequences))
             for c in range(0, n_sequences, batch_size)]
    parts = call(model, [], tasks)
    return {k: np.concatenate([p[k] for p in parts]) for k in ("echo", "induction")}


def _echo_induction_rows(model: LoadedModel, *, n_sequences: int, seq_len: int, repeats: int, seed: int,
                         bos: bool, start: int, stop: int) -> dict[str, np.ndarray]:
    """The scores of sequences ``start..stop-1``, in one forward."""
    ids, offset = random_repeated_sequences(model, n_sequences=n_sequences, seq_len=seq_len, repeats=repeats,
                                            seed=seed, bos=bos)
    echo_m, ind_m = echo_induction_targets(offset, seq_len, repeats)
    n_rows = echo_m.shape[0]
    dev = model.device
    masks = {"echo": echo_m.float().to(dev), "induction": ind_m.float().to(dev)}

    def reduce(layer: int, probs: torch.Tensor) -> dict[str, torch.Tensor]:  # [b, h, rows, L]
        return {k: torch.einsum("bhrl,rl->bh", probs, m.to(probs.device)).div_(n_rows).double().cpu()
                for k, m in masks.items()}

    chunk = ids[start:stop].to(dev)
    with torch.no_grad(), capture_attention(model.model, reduce, rows=n_rows) as cap:
        model.model(input_ids=chunk, logits_to_keep=1, use_cache=False)
    per_layer = cap.step(0)
    return {k: torch.stack([d[k] for d in per_layer], dim=1).numpy() for k in masks}  # [b, L, H]


def identify_content_free(model: LoadedModel, method: str, *, n_sequences: int = 1, seq_len: int = 2500,
                          repeats: int = REPEATS, seed: int = 0, batch_size: int = 8, bos: bool = True,
                          provenance: dict[str, Any] | None = None) -> Ranking:
    """Rank every head by its mean echo or induction score over ``n_sequences`` random sequences."""
    t0 = time.perf_counter()
    scored = content_free_scores(model, method, n_sequences=n_sequences, seq_len=seq_len, repeats=repeats,
                                 seed=seed, batch_size=batch_size, bos=bos)
    prov = dict(provenance or {})
    prov.update({"method": method, "seed": seed, "n_sequences": n_sequences, "seq_len": seq_len,
                 "repeats": repeats, "bos": bool(bos), "content_free": True,
                 "runtime_s": round(time.perf_counter() - t0, 2)})
    for key in ("model_id", "revision", "dtype"):
        if key in getattr(model, "provenance", {}):
            prov.setdefault(key, model.provenance[key])
    return _mean_ranking(scored, model.shape, prov)


def _mean_ranking(scored: SampleScores, shape: Any, provenance: dict[str, Any]) -> Ranking:
    """Every head ranked by its mean score over the sequences of ``scored``."""
    mean = scored.scores.mean(axis=0)
    scores = {Head(l, h): float(mean[l, h]) for l in range(shape.n_layers) for h in range(shape.n_heads)}
    return Ranking(scored.method, shape, scores, {**provenance, "rh_version": rh.__version__})


CONTENT_FREE_VERSION = 1  # bump when the sequences or the scores change: it re-keys the cache


def content_free_provenance(model: LoadedModel, method: str, *, n_sequences: int, seq_len: int,
                            repeats: int = REPEATS, seed: int = 0, bos: bool = True) -> dict[str, Any]:
    """Everything that determines ``method``'s content-free scores of ``model``: the cache key is
    derived from it. The dtype is the one rankings are identified in (float32 on the CPU, whatever
    the session's dtype: :func:`rh.pipeline.identification_dtype`)."""
    from rh.pipeline import identification_dtype

    if method not in METHODS:
        raise ValueError(f"unknown content-free method {method!r}: use one of {', '.join(METHODS)}")
    prov = model.provenance
    return {"model_id": prov["model_id"], "revision": prov["revision"], "dtype": identification_dtype(model),
            "quant": prov["quant"], "shape": model.shape.as_dict(), "method": method, "content_free": True,
            "content_free_version": CONTENT_FREE_VERSION, "n_sequences": n_sequences, "seq_len": seq_len,
            "repeats": repeats, "seed": seed, "bos": bool(bos)}


def cached_content_free_scores(model: LoadedModel, methods: Sequence[str], *, n_sequences: int, seq_len: int,
                               cache_dir: Any, repeats: int = REPEATS, seed: int = 0, batch_size: int = 8,
                               bos: bool = True, recompute: bool = False) -> dict[str, SampleScores]:
    """Per-sequence scores of each of ``methods`` through the ranking cache, as the identification
    rankings are (:func:`rh.pipeline.cached_identification`): each method's ranking (the mean score)
    and its per-sequence scores (``.samples.npz``) are one cache entry, keyed by
    :func:`content_free_provenance`. A miss runs one pass that scores every method asked for (one
    capture gives both), in the identification dtype (float32 on the CPU), and stores them; ``recompute``
    computes them again."""
    from rh.pipeline import identification_model, samples_path, save_sample_scores, with_sample_scores
    from rh.rankings import cache_path, cached_ranking

    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown content-free method {bad or methods!r}: use one of {', '.join(METHODS)}")
    provs = {m: content_free_provenance(model, m, n_sequences=n_sequences, seq_len=seq_len, repeats=repeats,
                                        seed=seed, bos=bos) for m in methods}
    computed: dict[str, Any] = {}

    def compute(m: str) -> Ranking:
        if not computed:
            t0 = time.perf_counter()
            scorer = identification_model(model, provs[m]["dtype"])
            computed.update(content_free_scores(scorer, methods, n_sequences=n_sequences,
                                                seq_len=seq_len, repeats=repeats, seed=seed,
                                                batch_size=batch_size, bos=bos))
            computed["runtime_s"] = round(time.perf_counter() - t0, 2)
        save_sample_scores(samples_path(cache_path(cache_dir, provs[m])), computed[m])
        return _mean_ranking(computed[m], model.shape, {**provs[m], "runtime_s": computed["runtime_s"]})

    return {m: with_sample_scores(lambda again, m=m: cached_ranking(cache_dir, provs[m], lambda: compute(m),
                                                                    shape=model.shape, recompute=again),
                                  recompute)[3]
            for m in methods}
