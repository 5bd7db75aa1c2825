"""Head scores from captured attention, per sample, aggregated into a ``Ranking``.

- **Sum attention** (seed 003): for every head, the last prompt token's attention summed over the
  needle span.
- **Wu24 retrieval score** (seeds 001, 002): greedy decoding; at each step a head scores when its
  top-1 attention falls inside the needle's answer span on a token equal to the token just
  generated, adding 1/|answer span|; only trials whose answer reaches ROUGE-1 recall > 0.5 count,
  and scores are averaged over the counted trials. Flags give the variants users ask about.

- **QRHead query-focused retrieval score** (Zhang et al. 2025, princeton-pli/QRHead; its
  calibration is ICR's, Chen et al. 2024): the question tokens' mean attention to each needle
  token, minus that of the content-free query "N/A" put in the question's place, outlier tokens
  dropped, summed over the needle (:class:`QRHeadOptions`, :func:`question_span`,
  :func:`qrhead_filter_sum`).

All read attention through :func:`rh.attention.capture_attention` (no eager prefill, no N x N
matrices). Content-free scores (RazorAttention's echo and induction) are in
:mod:`rh.content_free`. :func:`identify` runs any of them over samples with a per-batch checkpoint, so a killed
identification resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from rh.models import LoadedModel, cache_kwarg
from rh.niah import Sample
from rh.rankings import Ranking

log = logging.getLogger(__name__)

METHODS = ("sum_attention", "wu24", "qrhead")


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


@dataclass(frozen=True)
class QRHeadOptions:
    """The QRHead score and its variants (defaults follow princeton-pli/QRHead's
    ``src/qrretriever/attn_retriever.py``, ``score_docs_per_head_for_detection``, except ``query``).

    - ``query="question"`` (default): the query rows are the question's own tokens, located in the
      prompt's suffix by decoding (:func:`question_span`). ``"qrhead"``: as QRHead's
      ``query_content``, from the "Question:" label through the end of the prompt (QRHead's runs
      from its late instruction through the chat template's assistant header; rh's prompt has no
      late instruction, and ends with the answer prefix).
    - ``calibrate``: subtract the attention of the same prompt with the question's tokens replaced
      by those of ``null_query`` (QRHead's default ``"N/A"``), per needle token, before the filter.
    - ``filter_outliers``: per head, drop needle tokens whose calibrated score is not above
      mean - 2 std (torch's unbiased std) over the needle, then sum (QRHead's ``tok_mask``). A
      one-token needle is summed unfiltered (QRHead's std of one token is NaN, dropping it).
    - ``reuse_prefix``: the null pass reuses the real pass's KV cache up to the question, as QRHead
      does (one full forward plus one over the prompt's tail); ``False`` runs the null prompt in
      full (no cache kept: two full forwards). Both compute the same scores.

    Other departures from QRHead: the "document" is the needle span (QRHead: each paragraph, its
    index "[i] " included); the null prompt replaces the question's tokens by the null query's
    (tokenized alone, with the question's leading space) instead of re-tokenizing the whole prompt;
    probabilities use the module's own ``scaling`` and mask (QRHead: 1/sqrt(head_dim), a causal
    mask) in float32; a head's score is the mean of its per-sample scores (:func:`aggregate`),
    where QRHead's detection ranks heads by the NDCG@10 of the documents each head's score
    ranks (``exp_scripts/detection/detect_qrhead_beir.py``): with one relevant span per prompt
    and no competing documents, rh keeps the score itself.
    """

    query: str = "question"
    calibrate: bool = True
    null_query: str = "N/A"
    filter_outliers: bool = True
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.query not in ("question", "qrhead"):
            raise ValueError(f"query={self.query!r}: use 'question' (the question's tokens) or 'qrhead' "
                             "(from the 'Question:' label through the end of the prompt, as QRHead's query_content)")
        if self.calibrate and not self.null_query.strip():
            raise ValueError("null_query is empty: the calibration needs a content-free query such as 'N/A'")


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

    def reduce(layer: int, probs: torch.Tensor) -> tuple[torch.Tensor, int]:
        return probs.topk(min(k, probs.shape[-1]), dim=-1).indices.cpu(), probs.shape[-1]  # [b, heads, k], keys

    def positions(t: int) -> torch.Tensor:
        """Call t's top-k as positions of the padded prompt + answer: ``[b, L, H, k]``. A
        sliding-window layer's cache holds only the last keys while decoding (its row covers the
        last ``kv`` of the ``width + t`` positions seen), so its indices are shifted by the keys it
        dropped; a full layer's row starts at position 0."""
        return torch.stack([idx + max(0, width + t - kv) for idx, kv in cap.step(t)], dim=1)

    inputs = batch.model_inputs(model.device)
    inputs.pop("position_ids", None)  # generate derives them from the attention mask
    with torch.no_grad(), capture_attention(model.model, reduce) as cap:
        gen = model.model.generate(**inputs, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[:, width:].cpu()
    steps = len(cap.steps)
    top = torch.stack([positions(t) for t in range(steps)], dim=1)  # [b, steps, L, H, k]
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


# --------------------------------------------------------------------------- QRHead


def _suffix_text_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text of ``ids`` and, per token boundary k, ``len(decode(ids[:k]))``."""
    ids = list(ids)
    text = tokenizer.decode(ids)
    return text, [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]


def _suffix_start(sample: Sample) -> int:
    """Where the prompt's suffix (question, chat tail, answer prefix) starts: the context's end."""
    span = (sample.meta or {}).get("context_span")
    return int(span[1]) if span else int(sample.needle_span[1])


def question_span(tokenizer: Any, sample: Sample) -> tuple[int, int]:
    """The token span ``[start, end)`` of ``sample.question`` in ``sample.input_ids``.

    It is searched in the prompt's suffix (after ``sample.meta["context_span"]``, else after the
    needle): the suffix is decoded, the question's characters located, and the smallest run of
    tokens whose decoding holds the whole question is returned. Raises ValueError when the sample
    has no question, or the question is not found or does not decode back.
    """
    q = (sample.question or "").strip()
    if not q:
        raise ValueError(f"sample {sample.id} has no question text: QRHead scoring needs Sample.question")
    start = _suffix_start(sample)
    suffix = list(sample.input_ids[start:])
    text, offs = _suffix_text_offsets(tokenizer, suffix)
    c0 = text.rfind(q)
    if c0 < 0:
        raise ValueError(f"the question {q!r} of sample {sample.id} is not in its prompt's suffix {text!r}: "
                         "the prompt does not end with the question it records")
    c1 = c0 + len(q)
    t0 = max(k for k in range(len(suffix)) if offs[k] <= c0)
    t1 = min(k for k in range(1, len(suffix) + 1) if offs[k] >= c1)
    got = tokenizer.decode(suffix[t0:t1])
    if q not in got:
        raise ValueError(f"the question span of sample {sample.id} decodes to {got!r}, not {q!r}")
    return start + t0, start + t1


def _qrhead_rows(tokenizer: Any, sample: Sample, opts: QRHeadOptions) -> dict[str, Any]:
    """One sample's layout: its question span, where its query rows start (``first``), the null
    row's tail (replacing ``input_ids[q0:]``), and the query rows of the real and null prompts as
    distances from the end ``(d_start, d_end)``: rows ``[len - d_start, len - d_end)`` (the null
    rows, ``n_null`` tokens, are placed by :func:`_qrhead_batch`, which may pad before them)."""
    ids = list(sample.input_ids)
    n = len(ids)
    q0, q1 = question_span(tokenizer, sample)
    first = q0
    if opts.query == "qrhead":  # from the "Question:" label, as QRHead's query_content from its instruction
        start = _suffix_start(sample)
        text, offs = _suffix_text_offsets(tokenizer, ids[start:q0])
        c = text.rfind("Question:")
        if c >= 0:
            first = start + max(k for k in range(len(offs) - 1) if offs[k] <= c)
    out: dict[str, Any] = {"q_span": (q0, q1), "first": first,
                           "real_d": (n - first, 0) if opts.query == "qrhead" else (n - q0, n - q1)}
    if opts.calibrate:
        piece = tokenizer.decode(ids[q0:q1])
        q = sample.question.strip()
        at = piece.rfind(q)
        null_piece = piece[:at] + opts.null_query + piece[at + len(q):]
        null_ids = list(tokenizer(null_piece, add_special_tokens=False).input_ids)
        if not null_ids:
            raise ValueError(f"the null query {opts.null_query!r} tokenizes to nothing")
        out["null_tail"] = null_ids + ids[q1:]
        out["n_null"] = len(null_ids)
    return out


def _qrhead_null_extent(pads: Sequence[int], lay: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Where :func:`_qrhead_batch`'s null (calibration) pass starts in the padded batch (``cut``:
    the earliest query start, where the real pass's cache is cropped) and its width from there
    (``T``: each row's tokens up to its question, then its null tail, padded to the longest).
    ``lay``: each row's :func:`_qrhead_rows` with the calibration's fields."""
    cut = min(pads[r] + l["first"] for r, l in enumerate(lay))
    return cut, max(pads[r] + l["q_span"][0] - cut + len(l["null_tail"]) for r, l in enumerate(lay))


def _row_weights(dists: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[b, m]`` weights over the last ``m`` query rows: 1/count on each row's query rows."""
    m = max(d0 for d0, _ in dists)
    w = torch.zeros(len(dists), m)
    for r, (d0, d1) in enumerate(dists):
        w[r, m - d0 : m - d1] = 1.0 / (d0 - d1)
    return w


def _qrhead_batch(model: LoadedModel, batch: Batch,
                  options: QRHeadOptions | None) -> tuple[np.ndarray, np.ndarray, list]:
    if options is not None and not isinstance(options, QRHeadOptions):
        raise TypeError(f"qrhead scoring takes QRHeadOptions, not {type(options).__name__}")
    opts = options or QRHeadOptions()
    tok, dev = model.tokenizer, model.device
    b, width = batch.input_ids.shape
    pads = batch.pad
    lay = [_qrhead_rows(tok, s, opts) for s in batch.samples]
    spans = [batch.needle_span(r) for r in range(b)]
    n_span = max(e - s for s, e in spans)
    key_idx = torch.zeros(b, n_span, dtype=torch.long)
    key_ok = torch.zeros(b, n_span, dtype=torch.bool)
    for r, (s, e) in enumerate(spans):
        key_idx[r, : e - s] = torch.arange(s, e)
        key_ok[r, : e - s] = True

    def per_token(rows_w: torch.Tensor):
        """Reducer: mean over the weighted query rows of the attention to each needle token."""
        def reduce(layer: int, probs: torch.Tensor) -> torch.Tensor:  # [b, h, m, kv]
            mean = torch.einsum("bhml,bm->bhl", probs, rows_w.to(probs.device))
            return mean.gather(2, key_idx.to(probs.device)[:, None, :].expand(-1, probs.shape[1], -1)).cpu()
        return reduce

    w = _row_weights([l["real_d"] for l in lay])
    inputs = batch.model_inputs(dev)
    reuse = opts.calibrate and opts.reuse_prefix
    cache = None
    if reuse:
        from transformers import DynamicCache

        cache = DynamicCache()
    if reuse:
        inputs.update(cache_kwarg(model.model, cache))
    with torch.no_grad(), capture_attention(model.model, per_token(w), rows=w.shape[1]) as cap:
        model.model(**inputs, logits_to_keep=1, use_cache=reuse)
    real = torch.stack(cap.step(0), dim=1).double()  # [b, L, H, n_span]
    null = None
    if opts.calibrate:
        # null rows: the row's tokens up to its question (same padded positions as the real pass),
        # padding inserted there so that every row ends together, then the null query and the rest
        cut, T = _qrhead_null_extent(pads, lay)  # the null pass starts at cut, T tokens wide
        tails = []
        for r, l in enumerate(lay):
            q0 = pads[r] + l["q_span"][0]
            tails.append((batch.input_ids[r, cut:q0].tolist(), l["null_tail"]))
        ids = torch.full((b, T), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros(b, T, dtype=torch.long)
        wn = torch.zeros(b, T)  # over the null pass's query positions
        for r, ((a, n), l) in enumerate(zip(tails, lay)):
            gap = T - len(a) - len(n)
            ids[r, : len(a)] = torch.tensor(a, dtype=torch.long)
            mask[r, : len(a)] = 1
            ids[r, len(a) + gap :] = torch.tensor(n, dtype=torch.long)
            mask[r, len(a) + gap :] = 1
            if opts.query == "qrhead":  # the label's tokens (before the padding), the null query and the rest
                sel = list(range(len(a) - (l["q_span"][0] - l["first"]), len(a))) + list(range(len(a) + gap, T))
            else:
                sel = list(range(len(a) + gap, len(a) + gap + l["n_null"]))
            wn[r, sel] = 1.0 / len(sel)
        used = wn.any(dim=0).nonzero()
        wn = wn[:, int(used.min()) :]  # capture only the last rows that carry weight
        full_mask = torch.cat([batch.attention_mask[:, :cut], mask], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        if reuse:
            extra = cache.get_seq_length() - cut
            if extra > 0:
                cache.crop(-extra)  # keep the first ``cut`` positions (QRHead crops at the query's start)
            kwargs = {"input_ids": ids, "attention_mask": full_mask, "position_ids": pos[:, cut:],
                      "use_cache": True, **cache_kwarg(model.model, cache)}
        else:
            kwargs = {"input_ids": torch.cat([batch.input_ids[:, :cut], ids], dim=1), "attention_mask": full_mask,
                      "position_ids": pos, "use_cache": False}
        kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.no_grad(), capture_attention(model.model, per_token(wn), rows=wn.shape[1]) as cap:
            model.model(**kwargs, logits_to_keep=1)
        null = torch.stack(cap.step(0), dim=1).double()
        del cache
    cal = real - null if null is not None else real
    scores = np.zeros((b, cal.shape[1], cal.shape[2]))
    info = []
    for r in range(b):
        n = int(key_ok[r].sum())
        scores[r] = qrhead_filter_sum(cal[r, :, :, :n], opts.filter_outliers).numpy()
        info.append({"question_span": list(lay[r]["q_span"]), "query_start": int(lay[r]["first"]),
                     "mean_uncalibrated_mass": float(real[r, :, :, :n].sum(-1).mean())})
    return scores, np.ones(b, dtype=bool), info


def qrhead_filter_sum(per_token: torch.Tensor, filter_outliers: bool = True) -> torch.Tensor:
    """QRHead's per-document aggregation: over the last axis (the document's tokens), drop tokens
    whose score is not above mean - 2 * std (unbiased), then sum. A one-token document is summed."""
    if not filter_outliers or per_token.shape[-1] < 2:
        return per_token.sum(-1)
    thr = per_token.mean(-1, keepdim=True) - 2 * per_token.std(-1, keepdim=True)
    return per_token.masked_fill(~(per_token > thr), 0.0).sum(-1)


_SCORERS: dict[str, Callable] = {"sum_attention": _sum_attention_batch, "wu24": _wu24_batch,
                                 "qrhead": _qrhead_batch}


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
    options: Wu24Options | QRHeadOptions | None = None,
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
        hint = ""
        if method in ("echo", "induction"):
            hint = " (echo and induction are content-free: rh.content_free.content_free_scores)"
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}{hint}")
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
    from rh import progress as _progress

    what = f"identification ({method}), samples"
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"identify ({method})", unit="sample",
               disable=not progress or _progress.listened(), leave=False)
    finished = len(samples) - len(todo)
    _progress.step(what, finished, len(samples))
    for i, (batch, scores, counted, info) in enumerate(_scored_batches(model, todo, method, options, batch_size, extra)):
        for row, s in enumerate(batch):
            done[s.id] = (scores[row], bool(counted[row]), info[row])
        if checkpoint:
            _save_checkpoint(checkpoint, method, shape, done)
        bar.update(len(batch))
        finished += len(batch)
        _progress.step(what, finished, len(samples))
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


def _scored_batches(model: LoadedModel, todo: Sequence[Sample], method: str, options: Any, batch_size: int,
                    extra: Mapping[str, Any]) -> Iterator[tuple[list[Sample], np.ndarray, np.ndarray, list]]:
    """``(samples, scores, counted, info)`` batch by batch, through the model's runner, as many
    batches at a time as it has replicas: sum attention over every layer read in clean prompt-only
    forwards (:class:`SumAttentionReading`, :func:`rh.runner.read_prompts`; kept in the results
    store), the other methods as one task a batch (:class:`ScoreBatchTask`). The batches are those
    :func:`rh.batching.make_batches` cuts (a stable sort by length), so the forwards are the same
    wherever they run; a model without an installed runner (the float32 twin a bf16 CPU session
    identifies on) runs them here. A shorter capture (``extra``) runs here."""
    if extra:  # a shorter capture for a few heads (rh.id_claims): here
        for batch in make_batches(todo, batch_size, model.tokenizer.pad_token_id):
            with oom_guard(f"identification ({method})", batch_size=len(batch.samples),
                           length=batch.input_ids.shape[1]):
                scores, counted, info = _SCORERS[method](model, batch, options, **extra)
            yield list(batch.samples), scores, counted, info
        return
    from rh.batching import batch_order
    from rh.runner import runner_for

    runner = runner_for(model)
    shape = model.shape
    reading = SumAttentionReading(shape.n_layers, shape.n_heads) if method == "sum_attention" else None
    order = batch_order(todo, batch_size)
    step = max(1, int(runner.layout.replicas or 1))
    for c in range(0, len(order), step):  # a round: as many batches as replicas
        batches = [[todo[i] for i in rows] for rows in order[c:c + step]]
        chunk = [s for b in batches for s in b]
        with oom_guard(f"identification ({method})", batch_size=batch_size, length=max(len(s.input_ids) for s in chunk)):
            if reading is not None:  # the clean forwards' attention mass, read
                got = runner.read_prompts(chunk, reading, batch_size=batch_size)
                results = [(np.stack([got[s.id].reshape(shape.n_layers, shape.n_heads) for s in b]),
                            np.ones(len(b), dtype=bool), [{} for _ in b]) for b in batches]
            else:  # Wu24's generation, QRHead's calibrated passes: one task a batch
                results = runner.call(chunk, [ScoreBatchTask(tuple(s.id for s in b), method, options) for b in batches])
        for b, (scores, counted, info) in zip(batches, results):
            yield b, scores, counted, info


@dataclass(frozen=True)
class ScoreBatchTask:
    """One identification batch as a :class:`rh.runner.Task` (Wu24's greedy generation, QRHead's
    passes: not rows): ``(scores, counted, info)`` of the batch :func:`rh.batching.make_batches`
    cuts from these prompts, run where the model is (a replica on Ray)."""

    sample_ids: tuple[str, ...]
    method: str
    options: Any = None

    def run(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> tuple[np.ndarray, np.ndarray, list]:
        samples = [by_id[i] for i in self.sample_ids]
        (batch,) = make_batches(samples, len(samples), model.tokenizer.pad_token_id)
        scores, counted, info = _SCORERS[self.method](model, batch, self.options)
        back = np.argsort(batch.index)  # the batch's rows back to the order of sample_ids
        return scores[back], np.asarray(counted)[back], [info[j] for j in back]

    def dry(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> tuple[tuple[np.ndarray, np.ndarray, list], int]:
        """A dry run's (:mod:`rh.dry`): made-up scores of every prompt (each counted), and the
        token-layers of the batch's passes: the prompt's, then Wu24's generation to its last
        step (as if no row stopped early: the bound), or QRHead's calibration pass."""
        from rh.dry import made_up_array

        samples = [by_id[i] for i in self.sample_ids]
        (batch,) = make_batches(samples, len(samples), model.tokenizer.pad_token_id)
        b, width = batch.input_ids.shape
        shape = model.shape
        tokens = b * width
        info: list[dict[str, Any]] = [{} for _ in samples]
        if self.method == "wu24":
            opts = self.options or Wu24Options()
            n_new = max(len(s.answer_ids) for s in samples) + opts.extra_tokens
            tokens += b * (n_new - 1)  # one token a row per step after the prompt's
            info = [{"generated": s.answer, "rouge1_recall": 1.0} for s in samples]
        elif self.method == "qrhead":
            opts = self.options or QRHeadOptions()
            if opts.calibrate:  # the null pass: from cut on with the real pass's cache, else the whole row
                cut, width_null = _qrhead_null_extent(batch.pad, [_qrhead_rows(model.tokenizer, s, opts)
                                                                  for s in batch.samples])
                tokens += b * (width_null if opts.reuse_prefix else cut + width_null)
        elif self.method != "sum_attention":
            raise ValueError(f"unknown identification method {self.method!r}")
        scores = made_up_array((b, shape.n_layers, shape.n_heads), self.method, *self.sample_ids)
        return (scores, np.ones(b, dtype=bool), info), tokens * shape.n_layers


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
    options: Wu24Options | QRHeadOptions | None = None,
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
    if method == "qrhead":
        prov.setdefault("qrhead", asdict(options or QRHeadOptions()))
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


@contextlib.contextmanager
def last_token_attention_reading(model: LoadedModel, heads: Sequence[Head], width: int, *,
                                 mean: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Within the block, every batch forward run inside :func:`rh.batching.running` (a clean
    prompt-only packet, :func:`rh.units.run_prompts`) records, per prompt of ``width`` tokens, the
    attention of its last prompt token over its own positions for ``heads``: ``{sample id:
    [len(heads) * width]}`` (head by head, what :func:`last_token_attention` gives, flattened), or
    with ``mean`` their mean over the heads, ``[width]``. The row read is ``pad + width - 1`` of
    the prompt's batch row and the keys its own ``width`` positions (left padding gives every real
    token its own position, ``rh.batching``). Only the heads' layers are read
    (:func:`rh.attention.reading_rows`)."""
    from rh.attention import reading_rows
    from rh.batching import running_batch

    heads = list(heads)
    if not heads:
        raise ValueError("last_token_attention_reading: no heads; pass the heads whose attention is read")
    out: dict[str, np.ndarray] = {}
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for j, h in enumerate(heads):
        by_layer.setdefault(h.layer, []).append((j, h.head))

    def batch_of(q_len: int):
        batch = running_batch(q_len, "last_token_attention_reading")
        wrong = [s.id for s in batch.samples if len(s.input_ids) != width]
        if wrong:
            raise ValueError(f"last_token_attention_reading reads prompts of {width} tokens; {wrong[:3]} are not")
        return batch

    def positions(q_len: int) -> list[int]:
        return [p + width - 1 for p in batch_of(q_len).pad]

    def reduce(layer: int, probs) -> None:
        batch = batch_of(probs.shape[-1])
        for r, s in enumerate(batch.samples):
            a = batch.pad[r]
            row = out.setdefault(s.id, np.full((len(heads), width), np.nan))
            for j, head in by_layer[layer]:
                row[j] = probs[r, head, a:a + width].double().cpu().numpy()

    with reading_rows(model, sorted(by_layer), positions, reduce):
        yield out
    for i, rows in list(out.items()):
        out[i] = rows.mean(0) if mean else rows.reshape(-1)


@dataclass(frozen=True)
class LastTokenAttentionReading:
    """:func:`last_token_attention_reading` as a :class:`rh.runner.Reading` (a value that travels
    to a replica with the prompt-only packets): the hub's profile (``mean``), the report's
    attention example (head by head)."""

    heads: tuple[Head, ...]
    length: int  # the prompts' tokens
    mean: bool = False
    #: bump when what a row's values mean changes
    version: int = 1

    @property
    def width(self) -> int:
        return self.length if self.mean else len(self.heads) * self.length

    @property
    def through(self) -> int:
        """The deepest layer read: the prompt-only forwards run through it only."""
        return max(h.layer for h in self.heads)

    def key(self) -> str:
        return (f"last_token_attention{'_mean' if self.mean else ''}/v{self.version}:{self.length}:"
                + ",".join(str(h) for h in self.heads))

    def open(self, model: LoadedModel) -> contextlib.AbstractContextManager[dict[str, np.ndarray]]:
        return last_token_attention_reading(model, self.heads, self.length, mean=self.mean)

    def made_up(self, sample_id: str) -> list[float]:
        """A dry run's values (:mod:`rh.dry`): each head's attention mostly on the first position,
        the attention sink, as in the Llama family: outside every needle, so no prompt is left out
        of IV-2 for holding the hub (the longest way)."""
        row = [0.4 / max(1, self.length - 1)] * self.length
        row[0] = 0.6 if self.length > 1 else 1.0
        return row * (1 if self.mean else len(self.heads))


def read_last_token_attention(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], *,
                              mean: bool = False, batch_size: int = 8) -> np.ndarray:
    """:func:`last_token_attention` of every one of ``samples`` (which must share one length),
    ``[n, len(heads), length]`` (with ``mean``: ``[n, length]``), read in clean prompt-only forwards
    through the deepest head's layer, run as work units by the model's runner
    (:func:`rh.runner.read_prompts`: on Ray replicas they run there; the values are kept in the
    results store)."""
    from rh.runner import read_prompts

    samples = list(samples)
    lengths = sorted({len(s.input_ids) for s in samples})
    if len(lengths) != 1:
        raise ValueError(f"read_last_token_attention reads prompts of one length (positions are compared across "
                         f"them); got {lengths or 'no prompt'}")
    reading = LastTokenAttentionReading(tuple(heads), lengths[0], mean=mean)
    if not reading.heads:
        raise ValueError("read_last_token_attention: no heads; pass the heads whose attention is read")
    got = read_prompts(model, samples, reading, batch_size=batch_size, through=reading.through)
    shape = (lengths[0],) if mean else (len(reading.heads), lengths[0])
    return np.stack([np.asarray(got[s.id], dtype=float).reshape(shape) for s in samples])


@contextlib.contextmanager
def sum_attention_reading(model: LoadedModel) -> Iterator[dict[str, np.ndarray]]:
    """Within the block, every batch forward run inside :func:`rh.batching.running` (a clean
    prompt-only packet, :func:`rh.units.run_prompts`) records, per prompt, every head's attention
    mass on the needle from the last prompt token: ``{sample id: [n_layers * n_heads]}``, layer by
    layer, what :func:`_sum_attention_batch` (sum-attention identification) scores, flattened. The
    row read is ``pad + len(input_ids) - 1`` of the prompt's batch row and the needle span is
    shifted by that row's padding (:func:`rh.attention.reading_rows` on every layer)."""
    from functools import partial

    from rh.attention import reading_rows
    from rh.batching import last_prompt_positions, running_batch

    shape = model.shape
    n_layers, n_heads = shape.n_layers, shape.n_heads
    out: dict[str, np.ndarray] = {}
    positions = partial(last_prompt_positions, who="sum_attention_reading")

    def reduce(layer: int, probs) -> None:
        batch = running_batch(probs.shape[-1], "sum_attention_reading")
        mass = torch.stack([probs[r, :, slice(*batch.needle_span(r))].sum(-1) for r in range(len(batch.samples))])
        mass = mass.double().cpu().numpy()
        for r, s in enumerate(batch.samples):
            row = out.setdefault(s.id, np.full(n_layers * n_heads, np.nan))
            row[layer * n_heads:(layer + 1) * n_heads] = mass[r]

    with reading_rows(model, range(n_layers), positions, reduce):
        yield out


@dataclass(frozen=True)
class SumAttentionReading:
    """Sum-attention identification as a :class:`rh.runner.Reading`: the value that travels to a
    replica with the identification prompts' clean forwards (:func:`rh.runner.read_prompts`) and
    opens :func:`sum_attention_reading` there; kept in the results store beside the prompt."""

    n_layers: int
    n_heads: int
    #: bump when what a row's values mean changes
    version: int = 1

    @property
    def width(self) -> int:
        return self.n_layers * self.n_heads

    def key(self) -> str:
        return f"sum_attention/v{self.version}:{self.n_layers}x{self.n_heads}"

    def open(self, model: LoadedModel) -> contextlib.AbstractContextManager[dict[str, np.ndarray]]:
        if (model.shape.n_layers, model.shape.n_heads) != (self.n_layers, self.n_heads):
            raise ValueError(f"a sum-attention reading of {self.n_layers} layers x {self.n_heads} heads opened on a "
                             f"model of {model.shape.n_layers} x {model.shape.n_heads}")
        return sum_attention_reading(model)
