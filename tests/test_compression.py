"""Compression safety (rh.compression): sink + recent-window restriction of chosen query heads,
checked against an independent eager attention with a hand-built per-head mask, and the KV-cache
arithmetic of the policy under grouped-query attention."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rh.ablation import ablate
from rh.models import attention_modules
from rh.attention import capture_attention, interventions
from rh.compression import _Window, active_restrictions, kv_cache_bytes, restrict_window
from rh.heads import Head, HeadShape
from rh.prefix import first_modified_layer, forward, hinting, reuse_prefixes


HEADS = [Head(0, 1), Head(0, 6), Head(1, 0), Head(1, 1), Head(1, 2), Head(2, 5), Head(3, 3)]
SINK, WINDOW = 3, 6


def _ids(n=2, length=40, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _padded(ids, pads):
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return mask, pos


# ---------------------------------------------------------------- the independent reference

_REF: dict = {}  # what the reference attention restricts: {"heads": set, "sink", "window", "pads"}


def _hand_keep(b_pads, q_len, kv_len, restricted, sink, window):
    """keep[b][h][i][j] built by loops from the definition, no tensor tricks."""
    n_heads = 8
    keep = torch.zeros(len(b_pads), n_heads, q_len, kv_len, dtype=torch.bool)
    for b, pad in enumerate(b_pads):
        for i in range(q_len):
            pos = kv_len - q_len + i
            for j in range(kv_len):
                visible = pad <= j <= pos
                for h in range(n_heads):
                    if h in restricted:
                        keep[b, h, i, j] = visible and (j - pad < sink or j > pos - window)
                    else:
                        keep[b, h, i, j] = visible
    return keep


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that ignores the mask it is given and uses the hand-built per-head one."""
    layer = int(module.layer_idx)
    b, n_heads, q_len, d = query.shape
    groups = n_heads // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    restricted = {h.head for h in _REF["heads"] if h.layer == layer}
    keep = _hand_keep(_REF["pads"], q_len, key.shape[2], restricted, _REF["sink"], _REF["window"])
    scale = scaling if scaling is not None else d ** -0.5
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    w = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    out = (w @ v).transpose(1, 2).to(query.dtype)
    return out, w


@pytest.fixture(scope="module")
def ref():
    """The tiny model's weights (same seed) running the reference attention."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    from rh.models import tiny_llama

    AttentionInterface.register("rh_test_window_ref", _reference_attention)
    AttentionMaskInterface.register("rh_test_window_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model = tiny_llama(seed=0, attn_implementation="eager")
    model.model.set_attn_implementation("rh_test_window_ref")
    return model


@contextlib.contextmanager
def _reference(heads, sink, window, pads):
    _REF.update(heads=set(heads), sink=sink, window=window, pads=list(pads))
    try:
        yield
    finally:
        _REF.clear()


def _logits(model, ids, mask=None, pos=None, **kw):
    return model.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits


def _real(logits, pads):
    return [logits[r, p:] for r, p in enumerate(pads)]


# ---------------------------------------------------------------- restricted attention is right


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny, tiny_eager):
    return tiny if request.param == "sdpa" else tiny_eager


@pytest.mark.parametrize("pads", [(0, 0), (0, 7)])
def test_restricted_logits_equal_eager_attention_with_a_hand_built_per_head_mask(model, ref, pads):
    ids = _ids()
    mask, pos = _padded(ids, pads)
    with _reference(HEADS, SINK, WINDOW, pads):
        expected = _logits(ref, ids, mask, pos)
    with _reference([], SINK, WINDOW, pads):
        unrestricted = _logits(ref, ids, mask, pos)
    with restrict_window(model, HEADS, sink=SINK, window=WINDOW):
        got = _logits(model, ids, mask, pos)
    for g, e, u in zip(_real(got, pads), _real(expected, pads), _real(unrestricted, pads)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
        assert (g - u).abs().max() > 1e-2  # the restriction matters at this size
    base = _logits(model, ids, mask, pos)
    for b, u in zip(_real(base, pads), _real(unrestricted, pads)):
        torch.testing.assert_close(b, u, rtol=0, atol=1e-4)  # the reference's unrestricted path is the model


def test_sdpa_and_eager_give_the_same_restricted_result(tiny, tiny_eager):
    ids = _ids(seed=3)
    mask, pos = _padded(ids, (5, 0))
    with restrict_window(tiny, HEADS, sink=2, window=5):
        a = _logits(tiny, ids, mask, pos)
    with restrict_window(tiny_eager, HEADS, sink=2, window=5):
        out = tiny_eager.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
    for x, y in zip(_real(a, (5, 0)), _real(out.logits, (5, 0))):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
    # eager returns the restricted weights: none outside sink + window for a restricted head
    w = out.attentions[1][1, 0]  # row 1 (unpadded), L1H0, [q, kv]
    i, j = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    outside = (j > i) | ((j >= 2) & (j <= i - 5))
    assert w[outside].abs().max() == 0 and torch.allclose(w.sum(-1), torch.ones(40))
    assert (out.attentions[1][1, 3][(j <= i - 5) & (j >= 2)] > 0).all()  # L1H3 is not restricted


def test_a_head_not_listed_is_unchanged_bit_for_bit(tiny):
    """Layer 1's o_proj input: every head but the restricted L1H2 is exactly the unrestricted one."""
    ids = _ids(seed=1)
    mask, pos = _padded(ids, (0, 3))
    seen = []
    hook = attention_modules(tiny)[1].o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos)
        with restrict_window(tiny, [Head(1, 2)], sink=2, window=4):
            tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        hook.remove()
    base, got = (x.reshape(2, 40, 8, 8) for x in seen)
    others = [h for h in range(8) if h != 2]
    assert torch.equal(base[:, :, others], got[:, :, others])
    # positions that lose no key (within sink + window of the row's first real token) keep the kernel's output
    assert torch.equal(base[0, :6, 2], got[0, :6, 2]) and torch.equal(base[1, :9, 2], got[1, :9, 2])
    assert not torch.allclose(base[0, 6:, 2], got[0, 6:, 2]) and not torch.allclose(base[1, 9:, 2], got[1, 9:, 2])


@pytest.mark.parametrize("pads", [(0, 0), (4, 0)])
def test_sink_plus_window_covering_the_sequence_gives_exactly_the_unrestricted_logits(model, pads):
    ids = _ids(length=24, seed=2)
    mask, pos = _padded(ids, pads)
    base = _logits(model, ids, mask, pos)
    for sink, window in [(0, 24), (4, 20), (20, 4), (30, 30)]:
        with restrict_window(model, HEADS, sink=sink, window=window):
            assert torch.equal(_logits(model, ids, mask, pos), base)
    with restrict_window(model, HEADS, sink=4, window=19):  # one key short at the last position
        short = _logits(model, ids, mask, pos)
    assert torch.equal(short[1, :23], base[1, :23]) and not torch.equal(short[1, 23], base[1, 23])


def test_a_left_padded_row_gives_what_the_row_alone_gives(model):
    ids = _ids(length=40, seed=4)
    short = ids[1:, 9:]  # 31 tokens
    batch = ids.clone()
    batch[1, :9] = 0
    mask, pos = _padded(batch, (0, 9))
    with restrict_window(model, HEADS, sink=SINK, window=WINDOW):
        padded = _logits(model, batch, mask, pos)
        alone = _logits(model, short)
    torch.testing.assert_close(padded[1, 9:], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pads", [(0, 0), (0, 5)])
def test_decoding_with_a_kv_cache_step_by_step_equals_the_teacher_forced_pass(model, pads):
    ids = _ids(length=30, seed=5)
    mask, pos = _padded(ids, pads)
    prompt = 18
    with restrict_window(model, HEADS, sink=2, window=5):
        full = _logits(model, ids, mask, pos)
        out = model.model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt],
                          use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.cache
        for t in range(prompt, 30):
            out = model.model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                              position_ids=pos[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    got = torch.stack(steps, 1)  # positions prompt-1 .. 29
    torch.testing.assert_close(got, full[:, prompt - 1 :], rtol=0, atol=1e-4)


def test_a_capture_records_the_restricted_attention(tiny, ref):
    ids = _ids(seed=6)
    mask, pos = _padded(ids, (0, 3))
    with _reference(HEADS, SINK, WINDOW, (0, 3)):
        expected = ref.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    with restrict_window(tiny, HEADS, sink=SINK, window=WINDOW), capture_attention(tiny) as cap:
        tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos)
    for layer, probs in enumerate(cap.step(0)):
        torch.testing.assert_close(probs, expected[layer][:, :, -1].float(), rtol=0, atol=1e-5)
    row = cap.step(0)[1][1, 0]  # L1H0, padded row: sink = keys 3..5, window = 34..39
    assert set(row.nonzero().flatten().tolist()) == {3, 4, 5, 34, 35, 36, 37, 38, 39}


def test_restriction_under_a_kv_head_map_matches_the_plain_grouping():
    """``rh_kv_heads`` (one KV head per query head, expanded before interventions) with the map
    repeat_kv uses must give the restricted result of the plain model."""
    from rh.attention import install_rh_attention
    from rh.models import tiny_llama

    plain, mapped = tiny_llama(seed=0), tiny_llama(seed=0)
    for m in attention_modules(mapped):
        m.register_buffer("rh_kv_heads", torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), persistent=False)
    install_rh_attention(mapped)
    ids = _ids(seed=7)
    with restrict_window(plain, HEADS, sink=SINK, window=WINDOW):
        a = _logits(plain, ids)
    with restrict_window(mapped, HEADS, sink=SINK, window=WINDOW):
        b = _logits(mapped, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- mask forms, directly


def _dense_reference(query, key, value, pad, sink, window, heads, scaling, extra=None, bias=None):
    """Per head: scores (+ bias), the hand-built keep mask (and ``extra``), softmax, times V."""
    b, n_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    groups = n_heads // key.shape[1]
    keep = _hand_keep(pad, q_len, kv_len, {0}, sink, window)[:, 0]
    if extra is not None:
        keep = keep & extra
    out = []
    for h in heads:
        k, v = key[:, h // groups].float(), value[:, h // groups].float()
        s = query[:, h].float() @ k.transpose(-1, -2) * scaling
        if bias is not None:
            s = s + bias
        out.append(torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ v)
    return torch.stack(out, 2)  # [b, q, n, d]


@pytest.mark.parametrize("form", ["none", "bool", "additive", "flash", "holes", "biased", "static"])
@pytest.mark.parametrize("q_len", [1, 3, 20])
@pytest.mark.parametrize("n_kv", [2, 8])
def test_after_matches_a_dense_reference_for_every_mask_form(form, q_len, n_kv):
    """The intervention alone on random tensors, against a dense per-head computation: no mask,
    4-D boolean and additive masks, flash's 2-D padding mask, a mask that hides a key from some queries, an
    additive mask with finite non-zero values, and a static cache (masked empty slots after the
    real keys); decoding (q_len 1), a chunk after a cache (3) and a prefill (20); GQA groups of 4
    and one KV head per query head (what ``rh_kv_heads`` expands to)."""
    g = torch.Generator().manual_seed(q_len * 10 + n_kv)
    b, n_heads, kv_len, d = 2, 8, 20, 4
    slots = 26 if form == "static" else kv_len  # a static cache's key tensor is longer than the sequence
    query = torch.randn(b, n_heads, q_len, d, generator=g)
    key, value = torch.randn(b, n_kv, slots, d, generator=g), torch.randn(b, n_kv, slots, d, generator=g)
    pad = [0, 0] if form == "none" else [0, 4]
    qpos = torch.arange(q_len) + kv_len - q_len
    j = torch.arange(kv_len)
    visible = torch.stack([(j[None, :] <= qpos[:, None]) & (j[None, :] >= p) for p in pad])[:, None]  # [b, 1, q, kv]
    extra = bias = None
    if form == "holes":
        extra = ~((j[None, :] == 12) & (qpos[:, None] >= 13) & (qpos[:, None] <= 15))  # hidden from 3 queries
        visible = visible & extra
    if form == "biased":
        bias = -0.3 * (qpos[:, None] - j[None, :]).float()  # ALiBi-like, finite where visible
    low = torch.finfo(torch.float32).min
    mask = {"none": None, "bool": visible, "holes": visible,
            "additive": torch.zeros(visible.shape).masked_fill(~visible, low),
            "biased": (bias if bias is not None else torch.zeros(())).expand(visible.shape).masked_fill(~visible, low),
            "flash": (j[None, :] >= torch.tensor(pad)[:, None]).long(),
            "static": torch.nn.functional.pad(visible, (0, slots - kv_len), value=False)}[form]
    heads = [1, 5, 6]
    k_ref, v_ref = key[:, :, :kv_len], value[:, :, :kv_len]
    if form == "none" and q_len > 1:
        # no mask and several queries: sdpa's is_causal aligns top-left, i.e. a prefill into an empty
        # static cache whose first q_len keys are the real ones (rh crops them as sdpa does)
        k_ref, v_ref, qpos = key[:, :, :q_len], value[:, :, :q_len], torch.arange(q_len)
    # the kernel's output: unrestricted
    output = _dense_reference(query, k_ref, v_ref, pad, 99, 99, range(n_heads), 0.5, extra, bias)
    iv = _Window(heads, 3, 4, 0, torch.nn.Linear(1, 1))
    got, _ = iv.after(None, output, None, query, key, value, mask, 0.5)
    expected = _dense_reference(query, k_ref, v_ref, pad, 3, 4, heads, 0.5, extra, bias)
    real = qpos >= max(pad)  # rows every batch row sees something from
    torch.testing.assert_close(got[:, real][:, :, heads], expected[:, real], rtol=0, atol=1e-5)
    if q_len == 20:
        assert (got[:, -1, heads] - output[:, -1, heads]).abs().max() > 1e-2
    others = [h for h in range(n_heads) if h not in heads]
    assert torch.equal(got[:, :, others], output[:, :, others])


# ---------------------------------------------------------------- lifecycle and composition


def _clean(model):
    return (all(not interventions(m) for m in attention_modules(model)) and not active_restrictions(model)
            and model.model.config._attn_implementation == "sdpa")


def test_everything_is_detached_when_the_body_raises(tiny):
    ids = _ids(length=20)
    base = _logits(tiny, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with restrict_window(tiny.model, HEADS, sink=1, window=2):  # a transformers model: shape from its config
            assert not _clean(tiny)
            raise RuntimeError("boom")
    assert _clean(tiny)
    assert torch.equal(_logits(tiny, ids), base)


def test_bad_arguments_are_refused_before_anything_is_attached(tiny):
    with pytest.raises(ValueError, match=r"L9H0.*layers 0\.\.3 and query heads 0\.\.7"):
        with restrict_window(tiny, [Head(0, 1), Head(9, 0)]):
            pass
    with pytest.raises(ValueError, match=r"L0H8"):
        with restrict_window(tiny, ["L0H8"]):
            pass
    for kw, msg in [({"sink": -1}, "sink=-1"), ({"window": 0}, "window=0"), ({"window": 2.5}, "integer"),
                    ({"sink": True}, "integer")]:
        with pytest.raises(ValueError, match=msg):
            with restrict_window(tiny, [Head(0, 1)], **kw):
                pass
    assert _clean(tiny)


def test_one_window_per_head_and_no_logit_ablation_of_a_restricted_head(tiny):
    ids = _ids(length=20)
    with restrict_window(tiny, [Head(1, 2)], sink=1, window=3):
        with pytest.raises(ValueError, match="L1H2 are already window-restricted"):
            with restrict_window(tiny, [Head(1, 2)]):
                pass
        with restrict_window(tiny, [Head(1, 3)], sink=1, window=3):  # another head composes
            assert set(active_restrictions(tiny)) == {Head(1, 2), Head(1, 3)}
        with ablate(tiny, [Head(1, 2)], "logits"):  # opened inside: refused on the forward
            with pytest.raises(ValueError, match="L1H2 is logit-ablated"):
                tiny.model(input_ids=ids)
    with ablate(tiny, [Head(1, 2)], "logits"):
        with pytest.raises(ValueError, match="L1H2 is logit-ablated"):
            with restrict_window(tiny, [Head(1, 2)]):
                pass
        with restrict_window(tiny, [Head(1, 1)], sink=1, window=3):  # another head of the layer is fine
            tiny.model(input_ids=ids)
    assert _clean(tiny)


def test_zero_and_query_ablation_compose_with_the_restriction(tiny):
    ids = _ids(length=30, seed=8)
    h = [Head(2, 3)]
    with ablate(tiny, h, "zero"):
        zero_alone = _logits(tiny, ids)
        with restrict_window(tiny, h, sink=1, window=3):
            zero_restricted = _logits(tiny, ids)
    assert torch.equal(zero_alone, zero_restricted)  # an emptied head has no window to restrict
    with ablate(tiny, h, "query"):
        query_alone = _logits(tiny, ids)
        with restrict_window(tiny, h, sink=1, window=3):
            outer_ablate = _logits(tiny, ids)
    with restrict_window(tiny, h, sink=1, window=3):
        with ablate(tiny, h, "query"):
            outer_restrict = _logits(tiny, ids)
    torch.testing.assert_close(outer_ablate, outer_restrict, rtol=0, atol=1e-6)  # order does not matter
    assert (outer_ablate - query_alone).abs().max() > 1e-3  # mean of V over the window, not over every key
    assert _clean(tiny)


def test_first_modified_layer_is_the_first_restricted_layer_and_prefix_reuse_is_exact(tiny):
    assert first_modified_layer(tiny) == 4
    with restrict_window(tiny, [Head(3, 0), Head(2, 6)], sink=1, window=3):
        assert first_modified_layer(tiny) == 2
        plain = _logits(tiny, _ids(length=24, seed=9))
    with restrict_window(tiny, []):
        assert first_modified_layer(tiny) == 4
    inputs = {"input_ids": _ids(length=24, seed=9)}
    with reuse_prefixes(tiny) as cache:
        with hinting(tiny, [2]):
            forward(tiny, inputs)
        with restrict_window(tiny, [Head(3, 0), Head(2, 6)], sink=1, window=3):
            reused = forward(tiny, inputs).logits
        assert cache.hits == 1
    torch.testing.assert_close(reused, plain, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- KV-cache arithmetic

SHAPE = HeadShape(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=8)


def test_kv_cache_bytes_when_every_head_is_restricted():
    r = kv_cache_bytes(SHAPE, 8, full_heads=[], length=1000, sink=4, window=60)
    full = 2 * 4 * 2 * 1000 * 8 * 2  # K and V x layers x KV heads x tokens x head_dim x bytes
    kept = 2 * 4 * 2 * 64 * 8 * 2
    assert (r["full_bytes"], r["policy_bytes"], r["saved_bytes"]) == (full, kept, full - kept)
    assert r["saved_fraction"] == pytest.approx(0.936)
    assert r["saved_fraction_if_per_query_head"] == pytest.approx(0.936)
    assert (r["kv_heads_compressed"], r["kv_heads_total"], r["query_heads_restricted"]) == (8, 8, 32)


def test_restricting_three_of_four_query_heads_of_a_group_saves_nothing():
    one = kv_cache_bytes(SHAPE, 8, full_heads=[Head(0, 2)], length=1000, sink=4, window=60, bytes_per_value=4)
    per_kv = 2 * 1000 * 8 * 4
    assert one["kv_heads_compressed"] == 7
    assert one["saved_bytes"] == 7 * (per_kv - 2 * 64 * 8 * 4)
    assert one["full_bytes"] == 8 * per_kv
    # one full head in every group: 24 of 32 query heads restricted, no KV head freed
    every = kv_cache_bytes(SHAPE, 8, full_heads=[Head(l, h) for l in range(4) for h in (0, 7)], length=1000,
                           sink=4, window=60)
    assert every["kv_heads_compressed"] == 0 and every["saved_bytes"] == 0 and every["saved_fraction"] == 0
    assert every["query_heads_restricted"] == 24
    assert every["saved_fraction_if_per_query_head"] == pytest.approx(24 / 32 * (1 - 64 / 1000))


def test_kv_cache_bytes_short_sequences_and_bad_arguments():
    r = kv_cache_bytes(SHAPE, 8, full_heads=[], length=50, sink=4, window=60)
    assert r["saved_bytes"] == 0 and r["tokens_kept_per_compressed_head"] == 50
    assert kv_cache_bytes(SHAPE, 8, full_heads=[], length=0, sink=4, window=60)["saved_fraction"] == 0
    with pytest.raises(ValueError, match="L4H0"):
        kv_cache_bytes(SHAPE, 8, full_heads=["L4H0"], length=10, sink=1, window=1)
    with pytest.raises(ValueError, match="window=0"):
        kv_cache_bytes(SHAPE, 8, full_heads=[], length=10, sink=1, window=0)
