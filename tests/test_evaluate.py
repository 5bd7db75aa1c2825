"""Teacher-forced exact match and log-probability against greedy generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rh.ablation import ablate
from rh.evaluate import greedy_answers, teacher_forced



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


# ---------------------------------------------------------------------------- conditions, tables, figures

import pandas as pd  # noqa: E402

from rh.evaluate import accuracy_table, evaluate_conditions, generated, score_reply  # noqa: E402


@pytest.mark.parametrize("answer, text, exact, contains, r1", [
    ("4821", "4821. That is the key.", True, True, 1.0),
    ("4821", "The key is 4821\n7777", False, True, 1.0),
    ("4821", "\n\n4821", True, True, 1.0),
    ("Hello world", "hello there, world", False, False, 1.0),  # ROUGE ignores case and punctuation
    ("red blue green yellow", "red green", False, False, 0.5),
    ("4821", "", False, False, 0.0),
    ("4821", "1\n4821", False, False, 0.0),  # only the first line counts
])
def test_score_reply(answer, text, exact, contains, r1):
    got = score_reply(answer, text)
    assert (got["exact"], got["contains"]) == (exact, contains)
    assert got["rouge1_recall"] == pytest.approx(r1)


def test_generated_text_is_the_greedy_continuation(tiny, tiny_samples):
    samples = tiny_samples[:3]
    df = generated(tiny, samples, max_new_tokens=5, batch_size=2, progress=False)
    toks = greedy_answers(tiny, samples, max_new_tokens=5)
    assert df["text"].tolist() == [tiny.tokenizer.decode(t, skip_special_tokens=True) for t in toks]
    assert df["id"].tolist() == [s.id for s in samples]
    assert {"exact", "contains", "rouge1_recall", "rougeL_recall", "condition"} <= set(df.columns)


def test_evaluate_conditions_runs_each_condition_on_the_same_samples(tiny, tiny_samples):
    heads = ["L1H2", "L3H6"]
    df = evaluate_conditions(tiny, tiny_samples, {"baseline": None, "zero": lambda: ablate(tiny, heads)},
                             progress=False)
    assert df.groupby("condition").size().to_dict() == {"baseline": 6, "zero": 6}
    with ablate(tiny, heads):
        direct = teacher_forced(tiny, tiny_samples, progress=False)
    assert df[df.condition == "zero"]["logprob"].to_numpy() == pytest.approx(direct["logprob"].to_numpy(), abs=1e-5)
    assert df[df.condition == "baseline"]["logprob"].to_numpy() == pytest.approx(
        teacher_forced(tiny, tiny_samples, progress=False)["logprob"].to_numpy(), abs=1e-5)
    with pytest.raises(ValueError, match="how='beam'"):
        evaluate_conditions(tiny, tiny_samples, {"baseline": None}, how="beam")


def test_declared_conditions_run_their_ablation_and_say_what_they_are(tiny, tiny_samples):
    """An Ablation runs exactly ablate(heads, method, phase) (the same log-probs as the block written
    out), and its rows carry selection / k / draw / method / phase; the baseline none."""
    from rh.ablation import Ablation

    heads = ["L1H2", "L3H6"]
    conds = [Ablation.baseline(), Ablation("q", heads, "query", "decode"),
             Ablation("r#1", ["L0H0"], selection="random", draw=1)]
    df = evaluate_conditions(tiny, tiny_samples, conds, progress=False)
    with ablate(tiny, heads, "query", phase="decode"):
        direct = teacher_forced(tiny, tiny_samples, progress=False)
    assert df[df.condition == "q"]["logprob"].to_numpy() == pytest.approx(direct["logprob"].to_numpy(), abs=1e-5)
    first = df.groupby("condition", sort=False).first()
    assert first.loc["q", ["selection", "k", "method", "phase"]].tolist() == ["heads", 2, "query", "decode"]
    assert first.loc["r#1", ["selection", "k", "draw", "method"]].tolist() == ["random", 1, 1, "zero"]
    assert first.loc["baseline", "selection"] == "baseline" and first.loc["baseline", "k"] == 0
    assert pd.isna(first.loc["baseline", "method"]) and pd.isna(first.loc["q", "draw"])
    with pytest.raises(ValueError, match="named twice"):
        evaluate_conditions(tiny, tiny_samples, [Ablation.baseline(), Ablation.baseline()], progress=False)
    with pytest.raises(ValueError, match="holds the Ablation named 'q'"):
        evaluate_conditions(tiny, tiny_samples, {"query": conds[1]}, progress=False)
    with pytest.raises(TypeError, match="Ablation values"):
        evaluate_conditions(tiny, tiny_samples, [None], progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": ""}, "non-empty name"),
    ({"name": "x", "heads": ["L0H0"], "method": "noise"}, "unknown ablation method='noise'"),
    ({"name": "x", "heads": ["L0H0"], "phase": "prefill"}, "unknown phase='prefill'"),
    ({"name": "x", "heads": ["L0H0"], "selection": "best"}, "unknown selection='best'"),
    ({"name": "x"}, "without heads"),
    ({"name": "x", "heads": ["L0H0"], "selection": "baseline"}, "without heads"),
    ({"name": "x", "heads": ["L0H0"], "selection": "random"}, "draw= numbers random draws"),
    ({"name": "x", "heads": ["L0H0"], "draw": 2}, "draw= numbers random draws"),
    ({"name": "x", "heads": ["L0H0"], "method": "mean"}, "needs reference="),
    ({"name": "x", "heads": ["L0H0"], "reference": {}}, "only applies to method='mean'"),
    ({"name": "x", "heads": "L0H0"}, "is one string"),
])
def test_an_ablation_refuses_what_it_cannot_mean(kwargs, match):
    from rh.ablation import Ablation

    with pytest.raises(ValueError, match=match):
        Ablation(**kwargs)


def test_accuracy_table_groups_with_wilson_intervals():
    df = pd.DataFrame({"condition": ["a"] * 4 + ["b"] * 4, "depth": [0.0, 0.0, 1.0, 1.0] * 2,
                       "correct": [True, True, True, False, False, False, False, False],
                       "logprob": [-1.0, -2.0, -3.0, -4.0, -1.0, -1.0, -1.0, -1.0]})
    t = accuracy_table(df, by="condition")
    assert t["n"].tolist() == [4, 4] and t["correct"].tolist() == [0.75, 0.0]
    # published Wilson 95% intervals: 3/4 -> (0.3006, 0.9544), 0/4 -> (0, 0.4899)
    assert (t.loc[0, "ci_low"], t.loc[0, "ci_high"]) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert (t.loc[1, "ci_low"], t.loc[1, "ci_high"]) == pytest.approx((0.0, 0.4899), abs=1e-4)
    by_depth = accuracy_table(df, by=["condition", "depth"])
    assert by_depth[["condition", "depth", "correct"]].values.tolist() == [
        ["a", 0.0, 1.0], ["a", 1.0, 0.5], ["b", 0.0, 0.0], ["b", 1.0, 0.0]]
    lp = accuracy_table(df, by="condition", metric="logprob").iloc[0]  # continuous: normal interval
    se = pd.Series([-1.0, -2.0, -3.0, -4.0]).std() / 2
    assert (lp["ci_low"], lp["ci_high"]) == pytest.approx((-2.5 - 1.959964 * se, -2.5 + 1.959964 * se), abs=1e-5)
    with pytest.raises(ValueError, match="not in the results"):
        accuracy_table(df, by="length")


def test_ablation_figures_are_pngs():
    from rh.report import accuracy_vs_k_curve, depth_accuracy_chart

    rows = []
    conds = [("baseline", "baseline", 0, None), ("top5", "top", 5, None), ("top10", "top", 10, None)]
    conds += [(f"random{k}#{d}", "random", k, d) for k in (5, 10) for d in (0, 1)]
    for cond, sel, k, draw in conds:
        for i, depth in enumerate([0.0, 0.5, 1.0] * 3):
            rows.append({"condition": cond, "selection": sel, "k": k, "draw": draw, "depth": depth,
                         "correct": (i + len(cond)) % 3 != 0})
    df = pd.DataFrame(rows)
    png = depth_accuracy_chart(df[df.condition.isin(["baseline", "top5"])])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert accuracy_vs_k_curve(df)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="column 'selection' is missing"):
        accuracy_vs_k_curve(df.drop(columns="selection"))
    with pytest.raises(ValueError, match="conditions \\['query'\\]"):
        depth_accuracy_chart(df, conditions=["baseline", "query"])
