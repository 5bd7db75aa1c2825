"""Identification: sum attention against eager attention, the Wu24 score against hand-built
cases, resumable scoring, general heads, and the external ranking formats."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from reference import eager_needle_attention
from rh.heads import Head, HeadShape
from rh.niah import Sweep, build_samples
from rh.rankings import Ranking, load_ranking
from rh.scoring import (
    Wu24Options,
    general_heads,
    identify,
    per_task_rankings,
    score_samples,
    wu24_trial_scores,
)



def test_sum_attention_equals_eager_output_attentions(tiny, tiny_eager, tiny_samples):
    got = score_samples(tiny, tiny_samples, "sum_attention", batch_size=4, progress=False).scores
    for i, s in enumerate(tiny_samples):
        np.testing.assert_allclose(got[i], eager_needle_attention(tiny_eager, s), atol=1e-5, rtol=1e-5)



def test_sum_attention_of_left_padded_prompts_equals_eager_output_attentions(tiny, tiny_eager):
    """Sum attention is read in the runner's prompt-only forwards (rh.scoring.SumAttentionReading):
    prompts of two lengths share a left-padded batch, and each one's scores are still its own eager
    attention on its needle. Catches a needle span or a query row not shifted by the row's padding."""
    from rh.niah import build_passkey_samples

    mixed = build_passkey_samples(tiny.tokenizer, lengths=[96, 128], depths=[0.0, 1.0], n_per_setting=1, seed=4,
                                  max_positions=tiny.max_positions)
    got = score_samples(tiny, mixed, "sum_attention", batch_size=4, progress=False).scores
    for i, s in enumerate(mixed):
        np.testing.assert_allclose(got[i], eager_needle_attention(tiny_eager, s), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ Wu24, hand-built

PROMPT = torch.tensor([5, 5, 7, 8, 9, 5, 5])  # the answer span [2, 5) spells 7 8 9
GEN = [7, 8, 9, 2]  # the model copies the answer, then EOS


def _top(per_step: list[list[list[list[int]]]]) -> torch.Tensor:
    """[steps][layer][head][k] positions."""
    return torch.tensor(per_step)


def _case():
    # layer 0: head 0 always looks at the token it copies; head 1 looks at position 0 (outside)
    # layer 1: head 0 looks inside the span at the wrong token; head 1's top-1 is wrong, its top-2 right
    steps = []
    for t, tok in enumerate(GEN):
        right = 2 + t if t < 3 else 0
        wrong = 2 + (t + 1) % 3
        steps.append([[[right, 0], [0, 1]], [[wrong, 6], [wrong, right]]])
    return _top(steps)


def test_wu24_a_head_that_always_attends_the_copied_token_scores_one_and_others_zero():
    top = _case()
    s = wu24_trial_scores(top[..., :1], PROMPT, GEN, (2, 5), Wu24Options(score_prefill=True))
    np.testing.assert_allclose(s, [[1.0, 0.0], [0.0, 0.0]])


def test_wu24_scores_the_step_that_emits_the_first_answer_token_by_default():
    top = _case()
    np.testing.assert_allclose(wu24_trial_scores(top[..., :1], PROMPT, GEN, (2, 5), Wu24Options()),
                               [[1.0, 0.0], [0.0, 0.0]])
    s = wu24_trial_scores(top[..., :1], PROMPT, GEN, (2, 5), Wu24Options(score_prefill=False))
    np.testing.assert_allclose(s, [[2 / 3, 0.0], [0.0, 0.0]])  # the departure: steps 1 and 2 of 3 answer tokens


def test_wu24_span_search_is_the_originals_set_coverage():
    from rh.scoring import wu24_span

    prompt = [1, 2, 5, 0, 8, 8, 3]  # "5088" at [2, 6)
    assert wu24_span(prompt, [5, 0, 8, 8]) == (1, 5)  # [2, 5, 0, 8] covers {5, 0, 8}: one token early
    assert wu24_span([1, 7, 8, 9, 2], [7, 8, 9]) == (1, 4)  # distinct tokens: the exact span
    with pytest.raises(ValueError, match="covers"):
        wu24_span([1, 2, 3], [7, 8])
    with pytest.raises(ValueError, match="span="):
        Wu24Options(span="fuzzy")


def _copying_tiny(attn: str, sample, g: int, h_last: torch.Tensor):
    """The tiny Llama whose LM head has one non-zero row, token ``g`` = the last prompt position's
    final hidden state: its first greedy token is ``g`` whatever the attention does."""
    from rh.models import tiny_llama

    m = tiny_llama(seed=0, attn_implementation=attn)
    w = torch.zeros_like(m.model.lm_head.weight)
    w[g] = h_last
    m.model.lm_head.weight.data.copy_(w)
    return m


@pytest.fixture(scope="module")
def copy_case(tiny_eager, tiny_samples):
    """A prompt, a head whose prefill top-1 (the last prompt token's query) lands on position p, an
    answer span around p, and models that answer with the token at p first."""
    s = tiny_samples[0]
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        out = tiny_eager.model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    tops = torch.stack([a[0, :, -1, :].argmax(-1) for a in out.attentions])  # [L, H] top-1 at prefill
    p = int(tops[1, 0])  # layer 1, head 0
    a, b = max(p - 1, 0), min(p + 2, len(s.input_ids) - 1)
    g = s.input_ids[p]
    sample = dataclasses.replace(s, answer_span=(a, b))
    h = out.hidden_states[-1][0, -1]
    return sample, g, tops, (a, b), _copying_tiny("sdpa", sample, g, h), _copying_tiny("eager", sample, g, h)


def test_wu24_on_the_tiny_model_credits_a_head_that_copies_the_first_answer_token(copy_case):
    sample, g, tops, (a, b), sdpa, _ = copy_case
    ids = torch.tensor(sample.input_ids)
    opts = Wu24Options(rouge_filter=False, extra_tokens=2)
    on = score_samples(sdpa, [sample], "wu24", options=opts, progress=False).scores[0]
    off = score_samples(sdpa, [sample], "wu24", options=dataclasses.replace(opts, score_prefill=False),
                        progress=False).scores[0]
    # the step-0 credit computed from eager attention: top-1 inside the span, on a token equal to g
    first = ((tops >= a) & (tops < b) & (ids[tops] == g)).double().numpy() / (b - a)
    assert first[1, 0] > 0  # the head of the case
    np.testing.assert_allclose(on - off, first, atol=1e-12)
    assert on[1, 0] > off[1, 0]


def test_wu24_default_follows_the_original_loop_step_by_step(copy_case):
    """The original's loop: prefill all but the last prompt token, then decode from the last
    prompt token, scoring every step (eager attention, top-1 per head, 1/|span| per matching copy)."""
    sample, _, _, (a, b), sdpa, eager = copy_case
    opts = Wu24Options(rouge_filter=False, extra_tokens=3)
    got = score_samples(sdpa, [sample], "wu24", options=opts, progress=False).scores[0]

    ids = torch.tensor([sample.input_ids])
    eos = {eager.tokenizer.eos_token_id, *([eager.model.generation_config.eos_token_id] if isinstance(
        eager.model.generation_config.eos_token_id, int) else eager.model.generation_config.eos_token_id or [])}
    want = np.zeros((4, 8))
    with torch.no_grad():
        out = eager.model(input_ids=ids[:, :-1], use_cache=True)
        past, inp = out.past_key_values, ids[:, -1:]
        for _ in range(len(sample.answer_ids) + opts.extra_tokens):
            out = eager.model(input_ids=inp, past_key_values=past, use_cache=True, output_attentions=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            for layer, att in enumerate(out.attentions):
                for head in range(att.shape[1]):
                    pos = int(att[0, head, -1].argmax())
                    if a <= pos < b and int(ids[0, pos]) == tok:
                        want[layer, head] += 1 / (b - a)
            if tok in eos:
                break
            inp = torch.tensor([[tok]])
    assert want.sum() > 0  # the case makes heads score
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_wu24_topk_two_credits_the_second_choice():
    s = wu24_trial_scores(_case(), PROMPT, GEN, (2, 5), Wu24Options(topk=2, score_prefill=True))
    np.testing.assert_allclose(s, [[1.0, 0.0], [0.0, 1.0]])


def test_wu24_once_per_position_credits_a_repeated_copy_once():
    prompt = torch.tensor([5, 4, 4, 5])  # answer "4 4" at [1, 3)
    gen = [4, 4, 4]
    top = torch.tensor([[[[1]]], [[[1]]], [[[1]]]])  # one layer, one head, always position 1
    many = wu24_trial_scores(top, prompt, gen, (1, 3), Wu24Options(score_prefill=True))
    once = wu24_trial_scores(top, prompt, gen, (1, 3), Wu24Options(score_prefill=True, once_per_position=True))
    assert many[0, 0] == pytest.approx(3 / 2) and once[0, 0] == pytest.approx(1 / 2)


def test_wu24_on_the_tiny_model_filters_by_rouge(tiny, tiny_samples):
    scored = score_samples(tiny, tiny_samples, "wu24", batch_size=6, progress=False,
                           options=Wu24Options(extra_tokens=2))
    recalls = np.array([i["rouge1_recall"] for i in scored.info])
    np.testing.assert_array_equal(scored.counted, recalls > 0.5)
    assert scored.scores.shape == (len(tiny_samples), 4, 8) and (scored.scores >= 0).all()
    if not scored.counted.any():  # a random model retrieves nothing: the filtered ranking is refused
        with pytest.raises(ValueError, match="no sample passed"):
            identify(tiny, tiny_samples, "wu24", progress=False, options=Wu24Options(extra_tokens=2))
    r = identify(tiny, tiny_samples, "wu24", progress=False, options=Wu24Options(extra_tokens=2, rouge_filter=False))
    np.testing.assert_allclose(r.scores[Head(0, 0)], scored.scores[:, 0, 0].mean())
    assert r.provenance["wu24"]["rouge_filter"] is False


# ------------------------------------------------------------------ resume


def test_a_killed_identification_resumes_to_the_same_ranking(tiny, tiny_samples, tmp_path):
    ckpt = tmp_path / "ident.partial.json"
    full = identify(tiny, tiny_samples, progress=False, batch_size=2)

    def die(i):
        if i == 1:
            raise KeyboardInterrupt  # the run is killed after its second batch

    with pytest.raises(KeyboardInterrupt):
        score_samples(tiny, tiny_samples, batch_size=2, checkpoint=ckpt, progress=False, on_batch=die)
    assert len(json.loads(ckpt.read_text())["samples"]) == 4
    calls = []
    resumed = identify(tiny, tiny_samples, progress=False, batch_size=2, checkpoint=ckpt)
    assert not ckpt.exists()
    assert resumed.heads == full.heads
    for h in full.heads:
        assert resumed.scores[h] == pytest.approx(full.scores[h], abs=1e-9)
    # and the resumed run scored only what was missing
    score_samples(tiny, tiny_samples, batch_size=2, checkpoint=ckpt, progress=False,
                  on_batch=lambda i: calls.append(i))
    assert len(calls) == 3


def test_unknown_method_and_empty_split_are_refused(tiny, tiny_samples):
    with pytest.raises(ValueError, match="unknown method 'attn'"):
        score_samples(tiny, tiny_samples, "attn")
    with pytest.raises(ValueError, match="split is empty"):
        score_samples(tiny, [], "sum_attention")


# ------------------------------------------------------------------ aggregation


def _ranking(shape, order):
    n = shape.n_total
    scores = {h: float(n - i) for i, h in enumerate(order + [h for h in shape.all_heads() if h not in order])}
    return Ranking("hand", shape, scores)


def test_general_heads_are_the_intersection_of_top_k_ordered_by_mean_rank():
    shape = HeadShape(3, 4, 2, 8)
    a = _ranking(shape, [Head(0, 1), Head(2, 3), Head(1, 0), Head(0, 0)])
    b = _ranking(shape, [Head(1, 0), Head(0, 1), Head(2, 2), Head(2, 3)])
    c = _ranking(shape, [Head(2, 3), Head(1, 0), Head(0, 1), Head(1, 1)])
    assert general_heads({"a": a, "b": b, "c": c}, 3) == [Head(0, 1), Head(1, 0)]  # mean ranks 1, 1.33
    assert general_heads({"a": a, "b": b, "c": c}, 4) == [Head(0, 1), Head(1, 0), Head(2, 3)]
    assert general_heads({"a": a}, 2) == [Head(0, 1), Head(2, 3)]


def test_per_task_rankings_score_each_task_on_its_own_samples(tiny):
    sweep = Sweep((128,), (0.5,), 2, ("passkey", "inc_year"), seed=4)
    samples = build_samples(tiny.tokenizer, sweep)
    per = per_task_rankings(tiny, samples, progress=False)
    assert set(per) == {"passkey", "inc_year"}
    only = identify(tiny, [s for s in samples if s.task == "inc_year"], progress=False)
    assert per["inc_year"].scores == only.scores
    assert per["inc_year"].provenance["tasks"] == ["inc_year"]


# ------------------------------------------------------------------ external formats


def test_a_wu24_file_loads_with_heads_ordered_by_mean_score(tmp_path):
    shape = HeadShape(2, 3, 3, 4)
    scores = {f"{l}-{h}": [0.0, 0.0] for l in range(2) for h in range(3)}
    scores["1-2"] = [0.9, 0.7]  # mean 0.8
    scores["0-1"] = [0.5, 0.5]
    scores["1-0"] = [0.1, 0.0, 0.2]  # Wu24 lists one score per counted trial; lengths may differ
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(scores))
    r = load_ranking(path, shape=shape)
    assert r.top(3) == [Head(1, 2), Head(0, 1), Head(1, 0)]
    assert r.scores[Head(1, 2)] == pytest.approx(0.8) and r.provenance["source_format"] == "wu24"


def test_a_seed003_file_loads_in_its_rank_order_and_a_shape_mismatch_is_refused(tmp_path):
    rows = [{"head": f"L{l}H{h}", "score": float(10 * l + h), "rank": 0} for l in range(2) for h in range(2)]
    rows.sort(key=lambda r: -r["score"])
    path = tmp_path / "tokens_2048.json"
    path.write_text(json.dumps({"method": "summed_attention", "model_name": "m", "question": "inc_state",
                                "total_tokens": 2048, "head_rankings": rows, "top_50_heads": []}))
    r = load_ranking(path)
    assert r.heads == [Head(1, 1), Head(1, 0), Head(0, 1), Head(0, 0)]
    assert r.provenance["question"] == "inc_state"
    with pytest.raises(ValueError, match="4 heads but a 30 x 9 model has 270.*another model"):
        load_ranking(path, shape=HeadShape(30, 9, 3, 64))
    rows.pop()
    path.write_text(json.dumps({"head_rankings": rows}))
    with pytest.raises(ValueError, match="truncated"):
        load_ranking(path)


def test_unknown_format_and_csv_round_trip(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="no known format"):
        load_ranking(bad)
    with pytest.raises(ValueError, match="unknown ranking format"):
        load_ranking(bad, fmt="yaml")
    shape = HeadShape(2, 2, 1, 4)
    r = _ranking(shape, [Head(1, 1)])
    r.per_setting = {"passkey-L512-d0.500": {h: 0.5 * v for h, v in r.scores.items()}}
    r.provenance = {"model_id": "m", "lengths": [512]}
    path = r.save(tmp_path / "r.csv")
    back = load_ranking(path, shape=shape)
    assert back.scores == r.scores and back.per_setting == r.per_setting and back.provenance == r.provenance
    header = path.read_text().splitlines()[1]
    assert header == "layer,head,score,rank,passkey-L512-d0.500"


def test_identification_reports_its_progress_to_the_listeners(tiny, tiny_samples):
    """A host listening (the pytest plugin's progress lines) hears identification's position
    after every batch, ending at every sample scored, so a long identification is not silent."""
    from rh import progress
    from rh.scoring import score_samples

    heard = []
    token = progress.listen(lambda what, done, total: heard.append((what, done, total)))
    try:
        score_samples(tiny, tiny_samples, "sum_attention", batch_size=3)
    finally:
        progress.unlisten(token)
    n = len(tiny_samples)
    assert heard[0] == ("identification (sum_attention), samples", 0, n) and heard[-1][1:] == (n, n)
    assert [d for _, d, _ in heard] == sorted(d for _, d, _ in heard) and len(heard) == 1 + -(-n // 3)
