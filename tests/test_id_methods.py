"""Further identification methods against eager attention: the multi-row capture, QRHead's
calibrated query-focused score, RazorAttention's echo and induction scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rh.ablation import _ZeroLogits
from rh.attention import AttentionIntervention, add_intervention, capture_attention
from rh.content_free import (
    content_free_scores,
    echo_induction_targets,
    identify_content_free,
    random_repeated_sequences,
)
from rh.niah import Sweep, build_samples
from rh.rankings import Ranking
from rh.scoring import QRHeadOptions, identify, qrhead_filter_sum, question_span, score_samples



def _eager(model, ids, mask=None):
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions


# ------------------------------------------------------------------ multi-row capture


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_multi_row_capture_equals_eager_rows_with_left_padding(tiny, tiny_eager, base):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 49152, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 is left-padded by 7
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    att = _eager(tiny_eager, ids, mask)
    model = tiny if base == "sdpa" else tiny_eager
    rows = (-23, -20, -9, -2, -1)  # positions 7, 10, 21, 28, 29: real tokens of both rows
    with torch.no_grad(), capture_attention(model.model, rows=rows) as cap:
        model.model(input_ids=ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad(), capture_attention(model.model, rows=4) as cap4:
        model.model(input_ids=ids, attention_mask=mask, position_ids=pos)
    for layer in range(tiny.shape.n_layers):
        got = cap.step(0)[layer]
        assert got.shape == (2, 8, len(rows), 30)
        torch.testing.assert_close(got, att[layer][:, :, [30 + r for r in rows]].float(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(cap4.step(0)[layer], att[layer][:, :, -4:].float(), atol=2e-6, rtol=1e-5)
        assert torch.all(got[:, :, 0, 8:] == 0)  # causal: position 7 sees keys 0..7 only
        assert torch.all(got[1, :, :, :7] == 0)  # no attention on padding


def test_multi_row_capture_refuses_short_forwards_and_last_row_rewrites(tiny):
    ids = torch.randint(0, 1000, (1, 12))
    with pytest.raises(RuntimeError, match="query positions"):
        with torch.no_grad(), capture_attention(tiny.model, rows=3):
            tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                min_new_tokens=2, do_sample=False)
    attn = tiny.model.model.layers[1].self_attn
    remove = add_intervention(attn, _ZeroLogits([0, 3], "all"))
    try:
        with torch.no_grad(), capture_attention(tiny.model) as last:  # the last-row path still applies it
            tiny.model(input_ids=ids)
        row = last.step(0)[1][0, 0]
        torch.testing.assert_close(row, torch.full_like(row, 1 / 12))
        with pytest.raises(RuntimeError, match="rewrites only the last row"):
            with torch.no_grad(), capture_attention(tiny.model, rows=2):
                tiny.model(input_ids=ids)
    finally:
        remove()

    class ZeroQuery(AttentionIntervention):  # changes the query, not the capture: rows reflect it
        def before(self, module, query, key, value, attention_mask):
            return torch.zeros_like(query), key, value

    remove = add_intervention(attn, ZeroQuery())
    try:
        with torch.no_grad(), capture_attention(tiny.model, rows=(-3,)) as cap:
            tiny.model(input_ids=ids)
    finally:
        remove()
    torch.testing.assert_close(cap.step(0)[1][0, :, 0, :10], torch.full((8, 10), 0.1))
    with pytest.raises(ValueError, match="negative"):
        with capture_attention(tiny.model, rows=(0,)):
            pass


# ------------------------------------------------------------------ QRHead


def _direct_qrhead(eager, tok, s, *, calibrate=True, filter_outliers=True, first=None):
    """QRHead's score from eager attention matrices, on the prompt and its "N/A" twin. The query
    rows are the question's tokens, or with ``first`` every row from ``first`` to the end."""
    q0, q1 = question_span(tok, s)
    a, b = s.needle_span
    ids = list(s.input_ids)
    real = _eager(eager, torch.tensor([ids]))
    null_ids = tok(" N/A", add_special_tokens=False).input_ids
    null = _eager(eager, torch.tensor([ids[:q0] + null_ids + ids[q1:]]))
    rows = slice(q0, q1) if first is None else slice(first, None)
    null_rows = slice(q0, q0 + len(null_ids)) if first is None else slice(first, None)
    out = np.zeros((len(real), real[0].shape[1]))
    for layer in range(len(real)):
        per_tok = real[layer][0, :, rows, a:b].double().mean(1)  # [heads, needle]
        if calibrate:
            per_tok = per_tok - null[layer][0, :, null_rows, a:b].double().mean(1)
        for h in range(per_tok.shape[0]):
            v = per_tok[h]
            if filter_outliers:
                v = torch.where(v > v.mean() - 2 * v.std(), v, torch.zeros_like(v))
            out[layer, h] = float(v.sum())
    return out


@pytest.fixture(scope="module")
def mixed_samples(tiny):
    """Two lengths and two tasks (questions and suffixes of different lengths) in one batch: left
    padding, and null prompts whose tails differ in length."""
    sweep = Sweep((96, 128), (1.0,), 1, ("passkey", "hq_state", "employee_count", "inc_year"), seed=2)
    samples = build_samples(tiny.tokenizer, sweep, max_positions=tiny.max_positions)
    # a "document" just before the question: past where the batch's null pass starts (the earliest
    # question from the end, hq_state's), so it is re-run there and must keep its positions, in a
    # row whose null tail is padded (its question is longer than inc_year's)
    p = next(x for x in samples if x.task == "employee_count")
    q0, _ = question_span(tiny.tokenizer, p)
    return samples + [dataclasses.replace(p, id="late-doc", needle_span=(q0 - 4, q0))]


def test_question_span_decodes_to_the_question_and_refuses_a_missing_one(tiny, tiny_samples):
    tok = tiny.tokenizer
    for s in tiny_samples:
        q0, q1 = question_span(tok, s)
        assert tok.decode(list(s.input_ids[q0:q1])).strip() == s.question.strip()
        assert q0 >= s.meta["context_span"][1] and q1 <= len(s.input_ids)
    with pytest.raises(ValueError, match="not in its prompt"):
        question_span(tok, dataclasses.replace(tiny_samples[0], question="Where is the moon parked?"))
    with pytest.raises(ValueError, match="no question"):
        question_span(tok, dataclasses.replace(tiny_samples[0], question=""))


@pytest.fixture(scope="module")
def mixed_direct(tiny, tiny_eager, mixed_samples):
    return [_direct_qrhead(tiny_eager, tiny.tokenizer, s) for s in mixed_samples]


@pytest.mark.parametrize("reuse", [True, False])
def test_qrhead_equals_eager_attention_with_calibration_on_a_padded_batch(tiny, tiny_eager, mixed_samples,
                                                                          mixed_direct, reuse):
    got = score_samples(tiny, mixed_samples, "qrhead", options=QRHeadOptions(reuse_prefix=reuse),
                        batch_size=len(mixed_samples), progress=False)
    assert len({s.length for s in mixed_samples}) == 2 and len({s.question for s in mixed_samples}) == 4
    assert got.info[-1]["question_span"][0] - 4 > min(i["question_span"][0] for i in got.info)
    for i, s in enumerate(mixed_samples):
        np.testing.assert_allclose(got.scores[i], mixed_direct[i], atol=2e-6, rtol=1e-5, err_msg=s.id)
    s = mixed_samples[0]
    assert not np.allclose(mixed_direct[0], _direct_qrhead(tiny_eager, tiny.tokenizer, s, calibrate=False), atol=1e-4)


def test_qrhead_variants_equal_eager_attention(tiny, tiny_eager, tiny_samples):
    s = tiny_samples[:2]
    raw = score_samples(tiny, s, "qrhead", options=QRHeadOptions(calibrate=False, filter_outliers=False),
                        progress=False)
    for i, x in enumerate(s):  # uncalibrated, unfiltered: the question's mean attention mass on the needle
        np.testing.assert_allclose(raw.scores[i], _direct_qrhead(tiny_eager, tiny.tokenizer, x, calibrate=False,
                                                                 filter_outliers=False), atol=2e-6, rtol=1e-5)


def test_qrhead_wide_query_equals_eager_attention_on_a_padded_batch(tiny, tiny_eager, mixed_samples):
    """query="qrhead": from the "Question:" label to the end, the null pass padding inside it."""
    got = score_samples(tiny, mixed_samples, "qrhead", options=QRHeadOptions(query="qrhead"),
                        batch_size=len(mixed_samples), progress=False)
    for i, x in enumerate(mixed_samples):
        q0, _ = question_span(tiny.tokenizer, x)
        first = got.info[i]["query_start"]
        assert tiny.tokenizer.decode(list(x.input_ids[first:q0])).strip() == "Question:"
        want = _direct_qrhead(tiny_eager, tiny.tokenizer, x, first=first)
        np.testing.assert_allclose(got.scores[i], want, atol=2e-6, rtol=1e-5, err_msg=x.id)


def test_qrhead_filter_drops_low_outliers_as_qrhead_does():
    v = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, -5.0]])
    assert float(qrhead_filter_sum(v)) == pytest.approx(0.9)  # -5 is below mean - 2 std
    assert float(qrhead_filter_sum(v, filter_outliers=False)) == pytest.approx(-4.1)
    assert float(qrhead_filter_sum(torch.tensor([[0.3]]))) == pytest.approx(0.3)  # one token: summed


def test_identify_qrhead_is_a_ranking_of_every_head(tiny, tiny_samples):
    r = identify(tiny, tiny_samples, "qrhead", progress=False)
    assert isinstance(r, Ranking) and r.method == "qrhead"
    assert set(r.scores) == set(tiny.shape.all_heads())
    assert r.provenance["qrhead"]["null_query"] == "N/A" and r.provenance["n_samples"] == len(tiny_samples)
    with pytest.raises(TypeError, match="QRHeadOptions"):
        from rh.scoring import Wu24Options

        score_samples(tiny, tiny_samples[:1], "qrhead", options=Wu24Options(), progress=False)
    with pytest.raises(ValueError, match="content-free"):
        score_samples(tiny, tiny_samples[:1], "echo", progress=False)


# ------------------------------------------------------------------ echo and induction


def test_echo_induction_targets_by_hand():
    echo, ind = echo_induction_targets(offset=1, seq_len=3, repeats=3)  # BOS a b c a b c a b c
    assert echo.shape == (6, 10)
    # query position 4 (the second "a"): echo at 1, induction at 2
    assert echo[0].nonzero().flatten().tolist() == [1] and ind[0].nonzero().flatten().tolist() == [2]
    # query position 9 (the third "c"): echo at 6 and 3, induction at 7 and 4
    assert echo[5].nonzero().flatten().tolist() == [3, 6] and ind[5].nonzero().flatten().tolist() == [4, 7]


def test_echo_and_induction_equal_eager_attention_on_a_repeated_sequence(tiny, tiny_eager):
    n, R = 12, 3
    ids, off = random_repeated_sequences(tiny, n_sequences=2, seq_len=n, repeats=R, seed=5)
    assert off == 1 and ids.shape == (2, 1 + n * R)
    block = ids[:, 1 : 1 + n]
    assert torch.equal(ids[:, 1:], block.repeat(1, R))  # x1..xn repeated
    assert all(len(set(b.tolist())) == n for b in block)  # distinct within a block
    special = set(tiny.tokenizer.all_special_ids)
    assert not special & set(block.flatten().tolist())
    echo = content_free_scores(tiny, "echo", n_sequences=2, seq_len=n, repeats=R, seed=5, batch_size=1)
    ind = content_free_scores(tiny, "induction", n_sequences=2, seq_len=n, repeats=R, seed=5)
    assert echo.ids == ["random-000", "random-001"]
    att = _eager(tiny_eager, ids)
    for i in range(2):
        for layer in range(4):
            a = att[layer][i].double()  # [heads, L, L]
            e_sum = torch.zeros(a.shape[0], dtype=torch.float64)
            i_sum = torch.zeros(a.shape[0], dtype=torch.float64)
            queries = range(1 + n, 1 + n * R)
            for q in queries:
                for j in range(q - n, 0, -n):  # every earlier occurrence of the same token
                    assert ids[i, j] == ids[i, q]
                    e_sum += a[:, q, j]
                    i_sum += a[:, q, j + 1]
            np.testing.assert_allclose(echo.scores[i][layer], (e_sum / len(queries)).numpy(), atol=1e-6, rtol=1e-5)
            np.testing.assert_allclose(ind.scores[i][layer], (i_sum / len(queries)).numpy(), atol=1e-6, rtol=1e-5)


def test_identify_content_free_is_a_seeded_ranking_of_every_head(tiny):
    r = identify_content_free(tiny, "induction", n_sequences=2, seq_len=16, repeats=2, seed=3)
    assert isinstance(r, Ranking) and set(r.scores) == set(tiny.shape.all_heads())
    for k, v in {"method": "induction", "seed": 3, "n_sequences": 2, "seq_len": 16}.items():
        assert r.provenance[k] == v
    again = identify_content_free(tiny, "induction", n_sequences=2, seq_len=16, repeats=2, seed=3)
    assert again.scores == r.scores
    other = identify_content_free(tiny, "induction", n_sequences=2, seq_len=16, repeats=2, seed=4)
    assert other.scores != r.scores
    a, _ = random_repeated_sequences(tiny, n_sequences=2, seq_len=16, seed=3)
    b, _ = random_repeated_sequences(tiny, n_sequences=2, seq_len=16, seed=3)
    c, _ = random_repeated_sequences(tiny, n_sequences=2, seq_len=16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert identify_content_free(tiny, "echo", n_sequences=1, seq_len=16, seed=3).method == "echo"
    with pytest.raises(ValueError, match="content-free method"):
        identify_content_free(tiny, "qrhead", n_sequences=1, seq_len=8)


def test_content_free_scores_through_the_cache_are_the_computed_ones_and_a_hit_runs_no_pass(tiny, tmp_path):
    """The cached path stores what content_free_scores computes (one entry per method, with its
    per-sequence scores), a second call reads them back without a forward pass, and --recompute runs
    the pass again. Would catch: a hit that recomputes, scores saved under the wrong method or
    shuffled, an entry keyed without the seed."""
    from rh.budget import TokenLayerCounter
    from rh.content_free import cached_content_free_scores, content_free_provenance
    from rh.rankings import cache_path, check_entry

    kw = dict(n_sequences=2, seq_len=16, seed=3, batch_size=2)
    direct = content_free_scores(tiny, ("echo", "induction"), **kw)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        first = cached_content_free_scores(tiny, ("echo", "induction"), cache_dir=tmp_path, **kw)
        after_first = counter.total
        again = cached_content_free_scores(tiny, ("induction",), cache_dir=tmp_path, **kw)
        after_hit = counter.total
        cached_content_free_scores(tiny, ("echo",), cache_dir=tmp_path, recompute=True, **kw)
        after_recompute = counter.total
    finally:
        handle.remove()
    assert after_first == 2 * (1 + 4 * 16) * tiny.shape.n_layers  # one pass gives both: 2 sequences, BOS + 4 copies
    assert after_hit == after_first and after_recompute == 2 * after_first
    for m in ("echo", "induction"):
        np.testing.assert_array_equal(first[m].scores, direct[m].scores)
        assert first[m].ids == direct[m].ids and first[m].method == m
        path = cache_path(tmp_path, content_free_provenance(tiny, m, n_sequences=2, seq_len=16, seed=3))
        check_entry(path)  # checksummed as the rankings are
        r = Ranking.load(path, shape=tiny.shape)
        assert r.method == m and r.provenance["seed"] == 3 and r.provenance["dtype"] == "float32"
        np.testing.assert_allclose([r.scores[h] for h in tiny.shape.all_heads()],
                                   direct[m].scores.mean(axis=0).ravel(), rtol=1e-12)
    np.testing.assert_array_equal(again["induction"].scores, direct["induction"].scores)
    other = content_free_provenance(tiny, "echo", n_sequences=2, seq_len=16, seed=4)
    assert cache_path(tmp_path, other) != cache_path(tmp_path, content_free_provenance(
        tiny, "echo", n_sequences=2, seq_len=16, seed=3))
    with pytest.raises(ValueError, match="content-free method"):
        cached_content_free_scores(tiny, ("qrhead",), cache_dir=tmp_path, **kw)
