"""Retrieval accuracy under an intervention. Teacher-forced (design decision 3): one forward over
prompt + answer gives exact match (greedy decoding reproduces the gold answer exactly when the
argmax at every gold position is the gold token) and the answer's log-probability. Generation
(:func:`generated`) gives free-form replies scored by exact, contains and ROUGE recall.

Every function returns one row per sample (and condition), with id, task, length and depth, so
accuracy by depth, length or task is a ``groupby`` (:func:`accuracy_table`);
:func:`evaluate_conditions` runs the same samples under several named interventions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rh.ablation import Ablation
from rh.progress import listened, track
from rh.batching import Batch, make_batches, running
from rh.memory import oom_guard
from rh.models import LoadedModel
from rh.niah import Sample
from rh.prefix import forward
from rh.stats import proportion_ci

Condition = Callable[[], contextlib.AbstractContextManager] | None


def teacher_forced(model: LoadedModel, samples: Sequence[Sample], *, condition: str = "baseline",
                   batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """One row per sample: ``correct`` (greedy would emit the gold answer) and ``logprob`` (sum of
    the gold tokens' log-probabilities), ``first_token_prob`` and ``first_argmax`` (the token greedy
    decoding would start its answer with: CA-7 reads distractor answers from it), plus id, task,
    length, depth and ``condition``.

    Runs whatever interventions are active around the call (e.g. inside ``ablate``). Decode-only
    ablations (``phase="decode"``) apply from the prompt's last token on, the positions Wu24's
    masking loop feeds as decoding steps (it prefills the prompt but its last token, then decodes
    from that token with the heads masked), so the outcome is that of Wu24's ablated decoding.
    """
    rows = {}
    bar = tqdm(total=len(samples), desc=f"evaluate {condition}", unit="sample", disable=not progress or listened(),
               leave=False)
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id, with_answer=True):
        for s, res in zip(batch.samples, score_batch(model, batch)):
            rows[s.id] = res
        bar.update(len(batch.samples))
    bar.close()
    return rows_frame(samples, [rows[s.id] for s in samples], condition)


#: what :func:`score_batch` gives per row, in this order
SCORES = ("correct", "logprob", "first_token_prob", "first_argmax")


def score_batch(model: LoadedModel, batch: Batch) -> list[tuple[bool, float, float, int]]:
    """One teacher-forced forward over ``batch`` (built ``with_answer=True``), under whatever
    interventions are active: per row, :data:`SCORES`."""
    # rows end together (left padding): row i's answer is predicted by its last len(answer) positions
    n_keep = max(len(s.answer_ids) for s in batch.samples)
    with torch.no_grad(), running(batch, decode_from=decode_positions(batch)), \
            oom_guard("teacher-forced evaluation", batch_size=len(batch.samples), length=batch.input_ids.shape[1]):
        logits = forward(model, batch.model_inputs(model.device), logits_to_keep=n_keep, use_cache=False).logits
    return score_logits(logits, batch.samples)


def decode_positions(batch: Batch) -> list[int]:
    """Each row's prompt's last token in ``batch`` (left-padded): the first position Wu24's masking
    loop runs as a decoding step (it prefills ``input_ids[:, :-1]`` and decodes from the last
    prompt token with the heads masked), where ``phase="decode"`` ablations start."""
    return [p + len(s.input_ids) - 1 for p, s in zip(batch.pad, batch.samples)]


def score_logits(logits: torch.Tensor, samples: Sequence[Sample]) -> list[tuple[bool, float, float, int]]:
    """:data:`SCORES` per row from a teacher-forced forward's last logits (``[rows, n_keep, vocab]``,
    ``n_keep`` at least each row's answer length; the rows' answers end at the last position)."""
    n_keep = logits.shape[1]
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)  # [b, n_keep, vocab]
    out = []
    for row, s in enumerate(samples):
        gold = torch.tensor(s.answer_ids)
        lp = logp[row, n_keep - len(gold) :]
        gold_lp = lp.gather(-1, gold[:, None])[:, 0]
        out.append((
            bool((lp.argmax(-1) == gold).all()),  # greedy decoding would emit the gold answer
            float(gold_lp.sum()),
            float(gold_lp[0].exp()),
            int(lp[0].argmax()),  # the token greedy decoding would start the answer with
        ))
    return out


def rows_frame(samples: Sequence[Sample], scores: Sequence[tuple], condition: str) -> pd.DataFrame:
    """:func:`teacher_forced`'s frame: one row per sample, its scores (:data:`SCORES`) beside id,
    task, length, depth and ``condition``."""
    return pd.DataFrame([{"id": s.id, "task": s.task, "length": s.length, "depth": s.depth, "condition": condition,
                          **dict(zip(SCORES, sc))} for s, sc in zip(samples, scores)],
                        columns=["id", "task", "length", "depth", "condition", *SCORES])


def greedy_answers(model: LoadedModel, samples: Sequence[Sample], *, max_new_tokens: int | None = None,
                   batch_size: int = 8) -> list[tuple[int, ...]]:
    """Greedy continuations (token ids) of each prompt, ``max_new_tokens`` defaulting to the gold length."""
    out: dict[str, tuple[int, ...]] = {}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        n = max_new_tokens or max(len(s.answer_ids) for s in batch.samples)
        inputs = batch.model_inputs(model.device)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        with torch.no_grad(), running(batch, decode_from=decode_positions(batch)):
            gen = model.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=model.tokenizer.pad_token_id)
        width = batch.input_ids.shape[1]
        for row, s in enumerate(batch.samples):
            out[s.id] = tuple(int(t) for t in gen[row, width:].tolist())
    return [out[s.id] for s in samples]


def generated(model: LoadedModel, samples: Sequence[Sample], *, max_new_tokens: int = 32, condition: str = "baseline",
              batch_size: int = 8, progress: bool = True, min_new_tokens: int = 0) -> pd.DataFrame:
    """Greedy generation scored as Wu24 and gkamradt score it: one row per sample with the text,
    ``exact`` (the reply starts with the answer), ``contains`` (the answer appears in the first
    line), and ROUGE-1 / ROUGE-L recall of the answer's words (rouge-score, stemmed). Wu24 decodes
    up to 50 new tokens; generation stops once every row of a batch has ended (end-of-sequence
    token), unless ``min_new_tokens`` forces more."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    texts = {}
    bar = tqdm(total=len(samples), desc=f"generate {condition}", unit="sample", disable=not progress or listened(),
               leave=False)
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        inputs = batch.model_inputs(model.device)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        with torch.no_grad(), running(batch, decode_from=decode_positions(batch)):
            gen = model.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        width = batch.input_ids.shape[1]
        for row, s in enumerate(batch.samples):
            texts[s.id] = model.tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True)
        bar.update(len(batch.samples))
    bar.close()
    rows = []
    for s in samples:
        text = texts[s.id]
        rows.append({"id": s.id, "task": s.task, "length": s.length, "depth": s.depth, "condition": condition,
                     "text": text, **score_reply(s.answer, text, scorer=scorer)})
    return pd.DataFrame(rows)


def score_reply(answer: str, text: str, *, scorer: Any = None) -> dict[str, Any]:
    """Score one generated reply against the gold ``answer``, on the reply's first line: ``exact``
    (it starts with the answer), ``contains`` (the answer occurs in it, case-insensitive) and
    ROUGE-1 / ROUGE-L recall of the answer's words (rouge-score, stemmed)."""
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    first = text.strip().splitlines()[0] if text.strip() else ""
    score = scorer.score(answer, first)
    return {
        "exact": first.strip().startswith(answer.strip()),
        "contains": answer.strip().lower() in first.lower(),
        "rouge1_recall": score["rouge1"].recall,
        "rougeL_recall": score["rougeL"].recall,
    }


def evaluate_conditions(model: LoadedModel, samples: Sequence[Sample],
                        conditions: Mapping[str, Ablation | Condition] | Sequence[Ablation], *,
                        how: str = "teacher_forced", batch_size: int = 8, max_new_tokens: int = 50,
                        progress: bool = True) -> pd.DataFrame:
    """Evaluate the same ``samples`` under each condition; one row per sample and condition.

    ``conditions`` is a list of :class:`rh.ablation.Ablation` values (``rh.causal.selection_conditions``
    and ``rh.ablation.ablation_conditions`` build them), or a mapping from a name to an Ablation, to
    a zero-argument callable returning a context manager (any other intervention, e.g.
    ``lambda: restrict_window(model, heads, 64)``), or to ``None`` (no intervention). An Ablation's
    rows also get its :meth:`~rh.ablation.Ablation.columns` (``selection``, ``k``, ``draw``,
    ``method``, ``phase``), which the ablation figures read. ``how`` is ``"teacher_forced"`` (exact
    match and answer log-prob, one pass) or ``"generate"`` (greedy replies of up to
    ``max_new_tokens`` tokens, exact / contains / ROUGE recall).
    """
    if how not in ("teacher_forced", "generate"):
        raise ValueError(f"how={how!r}: use 'teacher_forced' (one forward pass) or 'generate' (greedy decoding)")
    if not conditions:
        raise ValueError("no conditions given: pass e.g. rh.causal.selection_conditions(model, ranking, [10]) "
                         "or {'baseline': None, 'top10': lambda: ablate(model, top10)}")
    if not isinstance(conditions, Mapping):
        conditions = list(conditions)
        bad = [c for c in conditions if not isinstance(c, Ablation)]
        if bad:
            raise TypeError(f"a list of conditions holds rh.ablation.Ablation values, not {type(bad[0]).__name__}: "
                            "name other interventions in a mapping {name: callable}")
        named = [c.name for c in conditions]
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise ValueError(f"conditions {twice} are named twice: give each condition its own name")
        conditions = {c.name: c for c in conditions}
    for name, cond in conditions.items():
        if isinstance(cond, Ablation) and cond.name != name:
            raise ValueError(f"condition {name!r} holds the Ablation named {cond.name!r}: use its name as the key")
        if cond is not None and not isinstance(cond, Ablation) and not callable(cond):
            raise TypeError(f"condition {name!r} is a {type(cond).__name__}: give an Ablation, a zero-argument "
                            "callable returning a context manager, or None")
    frames = []
    for name, cond in (track(conditions.items(), "conditions", unit="condition") if progress else conditions.items()):
        if isinstance(cond, Ablation):
            ctx = cond.open(model)
        else:
            ctx = cond() if cond is not None else contextlib.nullcontext()
        with ctx:
            if how == "teacher_forced":
                df = teacher_forced(model, samples, condition=name, batch_size=batch_size, progress=progress)
            else:
                df = generated(model, samples, max_new_tokens=max_new_tokens, condition=name,
                               batch_size=batch_size, progress=progress)
        if isinstance(cond, Ablation):
            df = df.assign(**{col: [value] * len(df) for col, value in cond.columns().items()})
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def accuracy_table(df: pd.DataFrame, by: Sequence[str] | str = ("condition",), metric: str = "correct", *,
                   level: float = 0.95) -> pd.DataFrame:
    """Mean of ``metric`` per group of ``by`` with n and a ``level`` confidence interval: Wilson for
    0/1 outcomes (``correct``, ``exact``, ``contains``), normal for continuous ones (log-prob, ROUGE)."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, metric] if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the results (have {list(df.columns)})")
    rows = []
    for key, g in df.groupby(by, sort=True):
        vals = g[metric].astype(float).to_numpy()
        n = len(vals)
        mean = float(vals.mean()) if n else float("nan")
        if np.isin(vals, (0.0, 1.0)).all():
            lo, hi = proportion_ci(int(vals.sum()), n, level=level)
        else:
            from scipy.stats import norm

            se = float(vals.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            z = float(norm.ppf(0.5 + level / 2))
            lo, hi = mean - z * se, mean + z * se
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "n": n, metric: mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)
