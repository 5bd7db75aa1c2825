"""Teacher-forced exact match and log-probability against greedy generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rh.ablation import ablate
from rh.evaluate import greedy_answers, teacher_forced

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def greedy(tiny, tiny_samples):
    """The tiny model's own greedy 4-token continuations, and their log-probs from generate's logits."""
    answers, logprobs = [], []
    for s in tiny_samples:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                      min_new_tokens=4, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
        toks = out.sequences[0, ids.shape[1]:]
        lp = sum(torch.log_softmax(l[0].float(), -1)[t] for l, t in zip(out.logits, toks))
        answers.append(tuple(toks.tolist()))
        logprobs.append(float(lp))
    return answers, logprobs


def test_teacher_forced_agrees_with_generate(tiny, tiny_samples, greedy):
    """Half the samples get the greedy answer as gold, half a gold answer differing in one token:
    teacher-forced exact match must say which is which, and the log-prob must equal generate's."""
    answers, logprobs = greedy
    assert greedy_answers(tiny, tiny_samples, max_new_tokens=4) == answers
    gold, expect = [], []
    for i, (s, a) in enumerate(zip(tiny_samples, answers)):
        if i % 2:
            pos = i % len(a)
            a = a[:pos] + ((a[pos] + 1) % len(tiny.tokenizer),) + a[pos + 1 :]
        gold.append(dataclasses.replace(s, answer_ids=a))
        expect.append(i % 2 == 0)
    df = teacher_forced(tiny, gold, batch_size=4, progress=False)
    assert df["correct"].tolist() == expect
    generated_match = [g == s.answer_ids for g, s in zip(answers, gold)]
    assert df["correct"].tolist() == generated_match
    for i in range(0, len(gold), 2):
        assert df["logprob"][i] == pytest.approx(logprobs[i], abs=1e-4)


def test_agreement_holds_under_ablation(tiny, tiny_samples):
    heads = ["L0H1", "L2H5", "L3H3"]
    with ablate(tiny, heads):
        answers = greedy_answers(tiny, tiny_samples, max_new_tokens=3)
        gold = [dataclasses.replace(s, answer_ids=a) for s, a in zip(tiny_samples, answers)]
        assert teacher_forced(tiny, gold, progress=False)["correct"].all()
    # outside the block the model is itself again: its own greedy answers are teacher-forced exactly
    clean = greedy_answers(tiny, tiny_samples, max_new_tokens=3)
    gold_clean = [dataclasses.replace(s, answer_ids=a) for s, a in zip(tiny_samples, clean)]
    assert teacher_forced(tiny, gold_clean, progress=False)["correct"].all()


def test_batch_size_does_not_change_outcomes(tiny, tiny_samples):
    a = teacher_forced(tiny, tiny_samples, batch_size=1, progress=False)
    b = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
    assert a["correct"].tolist() == b["correct"].tolist()
    assert a["logprob"].to_numpy() == pytest.approx(b["logprob"].to_numpy(), abs=1e-4)
    assert a["id"].tolist() == [s.id for s in tiny_samples]
    assert set(a.columns) >= {"id", "task", "length", "depth", "condition", "correct", "logprob"}
