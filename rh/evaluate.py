"""Retrieval accuracy under an intervention. Teacher-forced (design decision 3): one forward over
prompt + answer gives exact match (greedy decoding reproduces the gold answer exactly when the
argmax at every gold position is the gold token) and the answer's log-probability."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from rh.batching import make_batches
from rh.models import LoadedModel
from rh.niah import Sample


def teacher_forced(model: LoadedModel, samples: Sequence[Sample], *, condition: str = "baseline",
                   batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """One row per sample: ``correct`` (greedy would emit the gold answer) and ``logprob`` (sum of
    the gold tokens' log-probabilities), plus id, task, length, depth and ``condition``.

    Runs whatever interventions are active around the call (e.g. inside ``ablate``).
    """
    rows = {}
    bar = tqdm(total=len(samples), desc=f"evaluate {condition}", unit="sample", disable=not progress, leave=False)
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id, with_answer=True):
        # rows end together (left padding): row i's answer is predicted by its last len(answer) positions
        n_keep = max(len(s.answer_ids) for s in batch.samples)
        with torch.no_grad():
            logits = model.model(**batch.model_inputs(model.device), logits_to_keep=n_keep, use_cache=False).logits
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)  # [b, n_keep, vocab]
        for row, s in enumerate(batch.samples):
            gold = torch.tensor(s.answer_ids)
            lp = logp[row, n_keep - len(gold) :]
            gold_lp = lp.gather(-1, gold[:, None])[:, 0]
            rows[s.id] = {
                "id": s.id, "task": s.task, "length": s.length, "depth": s.depth, "condition": condition,
                "correct": bool((lp.argmax(-1) == gold).all()),
                "logprob": float(gold_lp.sum()),
                "first_token_prob": float(gold_lp[0].exp()),
            }
        bar.update(len(batch.samples))
    bar.close()
    return pd.DataFrame([rows[s.id] for s in samples])


def greedy_answers(model: LoadedModel, samples: Sequence[Sample], *, max_new_tokens: int | None = None,
                   batch_size: int = 8) -> list[tuple[int, ...]]:
    """Greedy continuations (token ids) of each prompt, ``max_new_tokens`` defaulting to the gold length."""
    out: dict[str, tuple[int, ...]] = {}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        n = max_new_tokens or max(len(s.answer_ids) for s in batch.samples)
        inputs = batch.model_inputs(model.device)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        with torch.no_grad():
            gen = model.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=model.tokenizer.pad_token_id)
        width = batch.input_ids.shape[1]
        for row, s in enumerate(batch.samples):
            out[s.id] = tuple(int(t) for t in gen[row, width:].tolist())
    return [out[s.id] for s in samples]


def generated(model: LoadedModel, samples: Sequence[Sample], *, max_new_tokens: int = 32, condition: str = "baseline",
              batch_size: int = 8) -> pd.DataFrame:
    """Greedy generation scored as Wu24 and gkamradt score it: one row per sample with the text,
    ``exact`` (the reply starts with the answer), ``contains`` (the answer appears in the first
    line), and ROUGE-1 / ROUGE-L recall of the answer's words (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    texts = {}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        inputs = batch.model_inputs(model.device)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        with torch.no_grad():
            gen = model.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=model.tokenizer.pad_token_id)
        width = batch.input_ids.shape[1]
        for row, s in enumerate(batch.samples):
            texts[s.id] = model.tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True)
    rows = []
    for s in samples:
        text = texts[s.id]
        first = text.strip().splitlines()[0] if text.strip() else ""
        score = scorer.score(s.answer, first)
        rows.append({
            "id": s.id, "task": s.task, "length": s.length, "depth": s.depth, "condition": condition,
            "text": text, "exact": first.strip().startswith(s.answer.strip()),
            "contains": s.answer.strip().lower() in first.lower(),
            "rouge1_recall": score["rouge1"].recall, "rougeL_recall": score["rougeL"].recall,
        })
    return pd.DataFrame(rows)
