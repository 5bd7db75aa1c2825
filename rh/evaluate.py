"""Retrieval accuracy under an intervention. Teacher-forced (design decision 3): one forward over
prompt + answer gives exact match (greedy decoding reproduces the gold answer exactly when the
argmax at every gold position is the gold token) and the answer's log-probability."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from rh.batching import equal_length_batches
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
    for batch in equal_length_batches(samples, batch_size):
        n_ans = len(batch[0].answer_ids)
        ids = torch.tensor([s.input_ids + s.answer_ids[:-1] for s in batch], device=model.device)
        gold = torch.tensor([s.answer_ids for s in batch])
        with torch.no_grad():
            logits = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 logits_to_keep=n_ans, use_cache=False).logits
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)  # [b, n_ans, vocab]
        pred = logp.argmax(dim=-1)
        gold_lp = logp.gather(-1, gold[..., None])[..., 0]
        for row, s in enumerate(batch):
            rows[s.id] = {
                "id": s.id, "task": s.task, "length": s.length, "depth": s.depth, "condition": condition,
                "correct": bool((pred[row] == gold[row]).all()),
                "logprob": float(gold_lp[row].sum()),
                "first_token_prob": float(gold_lp[row, 0].exp()),
            }
        bar.update(len(batch))
    bar.close()
    return pd.DataFrame([rows[s.id] for s in samples])


def greedy_answers(model: LoadedModel, samples: Sequence[Sample], *, max_new_tokens: int | None = None,
                   batch_size: int = 8) -> list[tuple[int, ...]]:
    """Greedy continuations (token ids) of each prompt, ``max_new_tokens`` defaulting to the gold length."""
    out: dict[str, tuple[int, ...]] = {}
    for batch in equal_length_batches(samples, batch_size):
        n = max_new_tokens or len(batch[0].answer_ids)
        ids = torch.tensor([s.input_ids for s in batch], device=model.device)
        with torch.no_grad():
            gen = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        for row, s in enumerate(batch):
            out[s.id] = tuple(int(t) for t in gen[row, ids.shape[1]:].tolist())
    return [out[s.id] for s in samples]
