"""Head scores from captured attention, per sample, aggregated into a ``Ranking``.

- **Sum attention** (seed 003): for every head, the last prompt token's attention summed over the
  needle span.
- **Wu24 retrieval score** (seeds 001, 002): greedy decoding; at each step a head scores when its
  top-1 attention falls inside the needle's answer span on a token equal to the token just
  generated, adding 1/|answer span|; only trials whose answer reaches ROUGE-1 recall > 0.5 count,
  and scores are averaged over the counted trials. Flags give the variants users ask about.

Both read attention through :func:`rh.attention.capture_attention` (no eager prefill, no N x N
matrices). :func:`identify` runs either over samples with a per-batch checkpoint, so a killed
identification resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import rh
from rh.attention import capture_attention
from rh.batching import Batch, make_batches
from rh.heads import Head, HeadShape
from rh.io import atomic_write_json
from rh.memory import oom_guard
from rh.models import LoadedModel
from rh.niah import Sample
from rh.rankings import Ranking

log = logging.getLogger(__name__)

METHODS = ("sum_attention", "wu24")


@dataclass(frozen=True)
class Wu24Options:
    """The Wu24 retrieval score and its variants. Defaults are the original's."""

    topk: int = 1  # a head's top-k attended positions are checked (the original: 1)
    rouge_filter: bool = True  # count only trials whose answer reaches ROUGE-1 recall > threshold
    rouge_threshold: float = 0.5
    once_per_position: bool = False  # credit each needle position at most once per head and trial
    # The forward that emits the first answer token is scored, as in the original: it prefills
    # ``input_ids[:, :-1]`` and its first decoding step runs the last prompt token's query, which
    # produces the first answer token. In rh that forward is the prefill (its last query row).
    # ``False`` leaves it out: a departure, which drops ~20% of the score mass on SmolLM2 and most
    # of it on one-token answers.
    score_prefill: bool = True
    # Which prompt tokens count as the answer: "exact" (default), the answer's own tokens in the
    # needle, known from prompt construction; "wu24", the original's ``find_needle_idx``: the first
    # window of the answer's length whose *set* of tokens covers over 90% of the answer's distinct
    # ids, which lands one token early on answers that repeat a token ("5088": [x, 5, 0, 8] covers
    # {5, 0, 8}) and so loses the last one.
    span: str = "exact"
    extra_tokens: int = 8  # decode the answer's length plus this many tokens

    def __post_init__(self) -> None:
        if self.span not in ("exact", "wu24"):
            raise ValueError(f"span={self.span!r}: use 'exact' (the answer's tokens in the needle) or 'wu24' "
                             "(the original's set-coverage search)")
        if self.topk < 1:
            raise ValueError(f"topk={self.topk}: check at least the top-1 position")
        if not 0.0 <= self.rouge_threshold <= 1.0:
            raise ValueError(f"rouge_threshold={self.rouge_threshold}: a ROUGE recall lies in [0, 1]")


# --------------------------------------------------------------------------- per-batch scorers


def _sum_attention_batch(model: LoadedModel, batch: Batch, options: None, *,
                         through_layer: int | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    span = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=model.device)
    for row in range(len(batch.samples)):
        s, e = batch.needle_span(row)
        span[row, s:e] = 1.0

    def reduce(layer: int, probs: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhl,bl->bh", probs, span.to(probs.device)).cpu()

    with torch.no_grad(), capture_attention(model.model, reduce, through_layer=through_layer) as cap:
        model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
    scores = torch.stack(cap.step(0), dim=1).double().numpy()  # [b, layers (through through_layer), heads]
    n = len(batch.samples)
    return scores, np.ones(n, dtype=bool), [{} for _ in range(n)]


def _wu24_batch(model: LoadedModel, batch: Batch, options: Wu24Options) -> tuple[np.ndarray, np.ndarray, list]:
    from rouge_score import rouge_scorer

    opts = options or Wu24Options()
    tok = model.tokenizer
    width = batch.input_ids.shape[1]
    n_new = max(len(s.answer_ids) for s in batch.samples) + opts.extra_tokens
    k = opts.topk

    def reduce(layer: int, probs: torch.Tensor) -> torch.Tensor:
        return probs.topk(min(k, probs.shape[-1]), dim=-1).indices.cpu()  # [b, heads, k]

    inputs = batch.model_inputs(model.device)
    inputs.pop("position_ids", None)  # generate derives them from the attention mask
    with torch.no_grad(), capture_attention(model.model, reduce) as cap:
        gen = model.model.generate(**inputs, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[:, width:].cpu()
    steps = len(cap.steps)
    top = torch.stack([torch.stack(cap.step(t), dim=1) for t in range(steps)], dim=1)  # [b, steps, L, H, k]
    shape = model.shape
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    eos = set(_eos_ids(model))
    scores = np.zeros((len(batch.samples), shape.n_layers, shape.n_heads))
    counted = np.zeros(len(batch.samples), dtype=bool)
    info = []
    for row, s in enumerate(batch.samples):
        a, b = batch.answer_span(row)
        prompt = batch.input_ids[row]
        if opts.span == "wu24":
            pad = batch.pad[row]
            a, b = (pad + x for x in wu24_span(prompt[pad:], prompt[a:b]))
        tokens = new[row].tolist()
        n_steps = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        text = tok.decode(tokens[:n_steps], skip_special_tokens=True)
        recall = scorer.score(s.answer, text)["rouge1"].recall
        counted[row] = recall > opts.rouge_threshold or not opts.rouge_filter
        scores[row] = wu24_trial_scores(top[row, : min(n_steps, steps)], prompt, tokens[:n_steps], (a, b), opts)
        info.append({"generated": text, "rouge1_recall": recall})
    return scores, counted, info


def wu24_span(prompt_ids: Sequence[int] | torch.Tensor, answer_ids: Sequence[int] | torch.Tensor,
              coverage: float = 0.9) -> tuple[int, int]:
    """The original Wu24 ``find_needle_idx``: the first window of ``len(answer_ids)`` prompt tokens
    whose set of ids covers more than ``coverage`` of the answer's distinct ids."""
    prompt = [int(t) for t in prompt_ids]
    want = {int(t) for t in answer_ids}
    n = len(answer_ids)
    if not want:
        raise ValueError("answer_ids is empty: there is no span to search for")
    for i in range(len(prompt) - n + 1):
        if len(set(prompt[i : i + n]) & want) / len(want) > coverage:
            return i, i + n
    raise ValueError(f"no window of {n} prompt tokens covers {coverage:.0%} of the answer's ids {sorted(want)}")


def wu24_trial_scores(
    top_idx: torch.Tensor, prompt_ids: torch.Tensor, generated: Sequence[int], answer_span: tuple[int, int],
    options: Wu24Options,
) -> np.ndarray:
    """Retrieval scores ``[n_layers, n_heads]`` of one trial (one prompt, one greedy answer).

    ``top_idx[t]`` holds every head's top-k attended positions ``[L, H, k]`` at forward call t,
    which produced ``generated[t]`` (call 0 is the prefill). A head earns 1/|answer span| at a step
    when one of its top-k positions lies in the answer span on a prompt token equal to the token
    that step produced.
    """
    a, b = answer_span
    if b <= a:
        raise ValueError(f"answer span {answer_span} is empty")
    width = prompt_ids.shape[0]
    n_layers, n_heads = top_idx.shape[1], top_idx.shape[2]
    scores = np.zeros((n_layers, n_heads))
    credited: set[tuple[int, int, int]] = set()
    for t in range(0 if options.score_prefill else 1, min(len(generated), top_idx.shape[0])):
        idx = top_idx[t]
        inside = (idx >= a) & (idx < b)
        if not inside.any():
            continue
        match = inside & (prompt_ids[idx.clamp(max=width - 1)] == int(generated[t]))
        for layer, head in match.any(dim=-1).nonzero().tolist():
            if options.once_per_position:
                pos = int(idx[layer, head][match[layer, head]][0])
                if (layer, head, pos) in credited:
                    continue
                credited.add((layer, head, pos))
            scores[layer, head] += 1.0 / (b - a)
    return scores


def _eos_ids(model: LoadedModel) -> list[int]:
    eos = model.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return [e for e in eos + [model.tokenizer.eos_token_id] if e is not None]


_SCORERS: dict[str, Callable] = {"sum_attention": _sum_attention_batch, "wu24": _wu24_batch}


# --------------------------------------------------------------------------- identification


@dataclass
class SampleScores:
    """Per-sample head scores of one method: ``scores[i]`` is ``[n_layers, n_heads]``; ``counted[i]``
    says whether sample i enters the average (Wu24's ROUGE filter; always True for sum attention)."""

    method: str
    ids: list[str]
    scores: np.ndarray
    counted: np.ndarray
    info: list[dict]


def score_samples(
    model: LoadedModel,
    samples: Sequence[Sample],
    method: str = "sum_attention",
    *,
    options: Wu24Options | None = None,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    through_layer: int | None = None,
) -> SampleScores:
    """Score every sample with ``method``, batch by batch, in input order.

    ``through_layer=L`` (sum attention only): score the heads of layers 0..L, running only those
    layers (``scores`` then has L + 1 layers): for callers that read a few heads, not a ranking.

    With ``checkpoint``, each finished batch is written there (atomically) and samples already in
    it are skipped, so a killed run resumes where it stopped; the file is removed on success.
    """
    if method not in _SCORERS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not samples:
        raise ValueError("no samples to score: the identification split is empty; use more samples per setting")
    shape = model.shape
    extra = {}
    if through_layer is not None:
        if method != "sum_attention" or checkpoint:
            raise ValueError("through_layer applies to sum-attention scoring without a checkpoint")
        extra = {"through_layer": int(through_layer)}
    done = _load_checkpoint(checkpoint, method, shape) if checkpoint else {}
    todo = [s for s in samples if s.id not in done]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"identify ({method})", unit="sample",
               disable=not progress, leave=False)
    for i, batch in enumerate(make_batches(todo, batch_size, model.tokenizer.pad_token_id)):
        with oom_guard(f"identification ({method})", batch_size=len(batch.samples), length=batch.input_ids.shape[1]):
            scores, counted, info = _SCORERS[method](model, batch, options, **extra)
        for row, s in enumerate(batch.samples):
            done[s.id] = (scores[row], bool(counted[row]), info[row])
        if checkpoint:
            _save_checkpoint(checkpoint, method, shape, done)
        bar.update(len(batch.samples))
        if on_batch is not None:
            on_batch(i)
    bar.close()
    out = SampleScores(method, [s.id for s in samples],
                       np.stack([done[s.id][0] for s in samples]),
                       np.array([done[s.id][1] for s in samples]),
                       [done[s.id][2] for s in samples])
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    return out


def _save_checkpoint(path, method: str, shape: HeadShape, done: dict) -> None:
    atomic_write_json(path, {
        "method": method, "shape": shape.as_dict(),
        "samples": {sid: {"scores": sc.tolist(), "counted": c, "info": inf} for sid, (sc, c, inf) in done.items()},
    })


def _load_checkpoint(path, method: str, shape: HeadShape) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data["method"] != method or HeadShape(**data["shape"]) != shape:
            log.warning("checkpoint %s is for another method or model; starting afresh", path)
            return {}
        return {sid: (np.asarray(v["scores"], dtype=float), bool(v["counted"]), v.get("info", {}))
                for sid, v in data["samples"].items()}
    except (ValueError, KeyError, TypeError) as exc:  # a damaged checkpoint costs a recompute, not a crash
        log.warning("checkpoint %s is unreadable (%s); starting afresh", path, exc)
        return {}


def aggregate(
    model_shape: HeadShape,
    samples: Sequence[Sample],
    scored: SampleScores,
    *,
    provenance: dict[str, Any] | None = None,
) -> Ranking:
    """Mean score per head over the counted samples, with per-setting (length, depth, task) means."""
    counted = scored.counted
    if not counted.any():
        raise ValueError(
            f"no sample passed the {scored.method} filter (ROUGE-1 recall of the answer): the model does not "
            "retrieve these needles; use shorter contexts, another task, or turn the ROUGE filter off"
        )
    mean = scored.scores[counted].mean(axis=0)
    heads = [Head(l, h) for l in range(model_shape.n_layers) for h in range(model_shape.n_heads)]
    scores = {h: float(mean[h.layer, h.head]) for h in heads}
    per_setting: dict[str, dict[Head, float]] = {}
    keys = [f"{s.task}-L{s.length}-d{s.depth:.3f}" for s in samples]
    for key in sorted(set(keys)):
        sel = [i for i, k in enumerate(keys) if k == key and counted[i]]
        if sel:
            m = scored.scores[sel].mean(axis=0)
            per_setting[key] = {h: float(m[h.layer, h.head]) for h in heads}
    prov = dict(provenance or {})
    prov.setdefault("method", scored.method)
    prov.update({"rh_version": rh.__version__, "n_samples": len(samples), "n_counted": int(counted.sum())})
    return Ranking(scored.method, model_shape, scores, prov, per_setting)


def identify(
    model: LoadedModel,
    samples: Sequence[Sample],
    method: str = "sum_attention",
    *,
    options: Wu24Options | None = None,
    provenance: dict[str, Any] | None = None,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> Ranking:
    """Rank every head by ``method`` over ``samples`` (all tasks pooled)."""
    t0 = time.perf_counter()
    scored = score_samples(model, samples, method, options=options, batch_size=batch_size,
                           checkpoint=checkpoint, progress=progress)
    prov = dict(provenance or {})
    if method == "wu24":
        prov.setdefault("wu24", asdict(options or Wu24Options()))
    ranking = aggregate(model.shape, samples, scored, provenance=prov)
    ranking.provenance["runtime_s"] = round(time.perf_counter() - t0, 2)
    return ranking


def per_task_rankings(model: LoadedModel, samples: Sequence[Sample], method: str = "sum_attention",
                      **kwargs: Any) -> dict[str, Ranking]:
    """One ranking per task (seed 000 §1.5, step 1)."""
    tasks = sorted({s.task for s in samples})
    base = dict(kwargs.pop("provenance", None) or {})
    return {t: identify(model, [s for s in samples if s.task == t], method,
                        provenance={**base, "tasks": [t]}, **kwargs) for t in tasks}


def general_heads(rankings: dict[str, Ranking], k: int) -> list[Head]:
    """Heads in every task's top-k (seed 000 §1.5, step 2), ordered by their mean rank."""
    if not rankings:
        raise ValueError("general heads need at least one task's ranking")
    tops = {t: r.top(k) for t, r in rankings.items()}
    common = set.intersection(*(set(v) for v in tops.values()))
    return sorted(common, key=lambda h: (np.mean([tops[t].index(h) for t in tops]), h))


# --------------------------------------------------------------------------- kept for callers


def sum_attention_scores(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8,
                         progress: bool = True) -> np.ndarray:
    """Per-sample sum attention: array ``[n_samples, n_layers, n_heads]`` (input order)."""
    return score_samples(model, samples, "sum_attention", batch_size=batch_size, progress=progress).scores


def last_token_attention(model: LoadedModel, sample: Sample, heads: Sequence[Head]) -> np.ndarray:
    """The last prompt token's attention over the whole context for ``heads``: ``[len(heads), length]``
    (seed 000's attention heatmap), from the capture mechanism."""
    from rh.attention import keep_rows

    ids = torch.tensor([sample.input_ids], device=model.device)
    last = max(h.layer for h in heads) if heads else None
    with torch.no_grad(), capture_attention(model.model, keep_rows, through_layer=last) as cap:
        model.model(input_ids=ids, logits_to_keep=1, use_cache=False)
    rows = cap.step(0)
    return np.stack([rows[h.layer][0, h.head].double().numpy() for h in heads])
