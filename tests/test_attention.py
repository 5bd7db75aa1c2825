"""The attention capture against eager ``output_attentions`` (design decision 1)."""

from __future__ import annotations

import pytest
import torch

from rh.attention import capture_attention
from rh.models import tiny_llama



def _ids(n=2, length=37, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _eager_last_rows(model, ids, mask=None):
    out = model.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return [a[:, :, -1, :].float() for a in out.attentions]


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_captured_last_row_equals_eager_output_attentions(tiny, tiny_eager, base):
    ids = _ids()
    model = tiny if base == "sdpa" else tiny_eager
    with torch.no_grad():
        expected = _eager_last_rows(tiny_eager, ids)
        with capture_attention(model.model) as cap:
            model.model(input_ids=ids)
    rows = cap.step(0)
    assert len(rows) == tiny.shape.n_layers
    for layer, (got, want) in enumerate(zip(rows, expected)):
        assert got.shape == (2, tiny.shape.n_heads, ids.shape[1])
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"layer {layer}")
        # each row is a distribution over the keys
        torch.testing.assert_close(got.sum(-1), torch.ones(2, tiny.shape.n_heads))


def test_gqa_heads_of_one_group_differ(tiny):
    """Heads sharing a KV head still attend differently: the capture keeps query heads apart."""
    with torch.no_grad(), capture_attention(tiny.model) as cap:
        tiny.model(input_ids=_ids(1))
    row = cap.step(0)[1][0]  # layer 1, sample 0: [heads, kv]
    group = tiny.shape.group_size
    assert group == 4
    assert not torch.allclose(row[0], row[1])


def test_left_padding_mask_is_honoured(tiny, tiny_eager):
    ids = _ids(2, 30, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 is left-padded by 7 tokens
    with torch.no_grad():
        expected = _eager_last_rows(tiny_eager, ids, mask)
        with capture_attention(tiny.model) as cap:
            tiny.model(input_ids=ids, attention_mask=mask)
    for got, want in zip(cap.step(0), expected):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        assert torch.all(got[1, :, :7] == 0)  # no attention on padding


def test_decoding_steps_match_eager_rows_of_the_growing_sequence(tiny, tiny_eager):
    ids = _ids(1, 20, seed=5)
    with torch.no_grad(), capture_attention(tiny.model) as cap:
        gen = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                  min_new_tokens=3, do_sample=False)
    assert len(cap.steps) == 3  # prefill + two decoding steps
    for t in range(3):
        prefix = gen[:, : ids.shape[1] + t]
        with torch.no_grad():
            expected = _eager_last_rows(tiny_eager, prefix)
        for got, want in zip(cap.step(t), expected):
            assert got.shape[-1] == prefix.shape[1]
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_bf16_capture_is_within_bf16_tolerance_of_fp32_eager(tiny_eager):
    bf16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    ids = _ids(1, 33, seed=7)
    with torch.no_grad():
        expected = _eager_last_rows(tiny_eager, ids)
        with capture_attention(bf16.model) as cap:
            bf16.model(input_ids=ids)
    for got, want in zip(cap.step(0), expected):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=0)


def test_capture_leaves_outputs_unchanged_and_restores_the_implementation(tiny):
    ids = _ids(1, 25, seed=9)
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
        with capture_attention(tiny.model):
            during = tiny.model(input_ids=ids).logits
        after = tiny.model(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_capture_restores_after_an_exception_and_records_nothing_outside(tiny):
    with pytest.raises(ZeroDivisionError):
        with capture_attention(tiny.model) as cap:
            1 / 0
    assert tiny.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        tiny.model(input_ids=_ids(1, 10))
    assert cap.steps == []


def test_capture_blocks_cannot_nest_on_one_model(tiny):
    with capture_attention(tiny.model):
        with pytest.raises(RuntimeError, match="nested"):
            with capture_attention(tiny.model):
                pass
    assert tiny.model.config._attn_implementation == "sdpa"


def test_reducer_sees_each_layer_once_per_forward(tiny):
    seen = []
    with torch.no_grad(), capture_attention(tiny.model, reduce=lambda l, p: seen.append(l) or p.shape) as cap:
        tiny.model(input_ids=_ids(1, 12))
        tiny.model(input_ids=_ids(1, 14))
    assert seen == list(range(4)) * 2
    assert cap.step(1)[0] == (1, 8, 14)
