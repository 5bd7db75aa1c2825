"""The four ablation mechanisms against hand computations on the tiny GQA Llama: ``query`` and
``logits`` make a head emit the mean of V over the keys it can see (not zero), ``mean`` emits the
reference mean, blocks compose, decode-only ablation spares the prefill, nothing is left behind."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from rh.ablation import (
    METHODS,
    ablate,
    ablation_conditions,
    active_ablations,
    head_means,
    uniform_attention,
)
from rh.attention import capture_attention, interventions
from rh.evaluate import teacher_forced
from rh.heads import Head
from rh.models import attention_modules


D = 8  # tiny head_dim
GROUP = 4  # tiny query heads per KV head


def _ids(n=2, length=20, seed=0):
    return torch.randint(0, 49152, (n, length), generator=torch.Generator().manual_seed(seed))


def _padded(n=2, length=20, pad=5, seed=0):
    ids = _ids(n, length, seed)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # row 1 is left-padded
    return ids, mask


class Recorder:
    """Records an attention module's input hidden states and its o_proj input as o_proj receives
    it (after any ablation pre-hook), with hooks of its own that the test removes."""

    def __init__(self, attn):
        self.store = {}
        self.handles = [
            attn.register_forward_pre_hook(
                lambda m, a, kw: self.store.__setitem__("h", kw["hidden_states"].detach().clone()), with_kwargs=True),
            # a forward hook sees the arguments o_proj's forward got, i.e. after every pre-hook
            attn.o_proj.register_forward_hook(lambda m, a, out: self.store.__setitem__("x", a[0].detach().clone())),
        ]

    def __enter__(self):
        return self.store

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _hand_mean_v(attn, hidden, mask, head):
    """Mean over visible keys (causal, not padding) of the head's V, from the module's own v_proj."""
    b, length, _ = hidden.shape
    v = attn.v_proj(hidden).view(b, length, -1, D)[:, :, head // GROUP]  # [b, L, D]
    out = torch.zeros(b, length, D)
    for r in range(b):
        real = mask[r].bool()
        for i in range(length):
            vis = real.clone()
            vis[i + 1 :] = False
            if vis.any():
                out[r, i] = v[r, vis].mean(0)
    return out


def _hooks(model):
    hf = model.model
    return (sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hf.modules()),
            sum(len(interventions(a)) for a in attention_modules(hf)),
            hf.config._attn_implementation)


# ---------------------------------------------------------------------------- query / logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_query_and_logits_emit_the_mean_of_v_over_visible_keys(tiny, tiny_eager, impl):
    model = tiny if impl == "sdpa" else tiny_eager
    layer, heads = 2, [1, 6]  # different KV groups
    attn = attention_modules(model)[layer]
    ids, mask = _padded()
    real = mask.bool()
    got = {}
    for method in (None, "zero", "query", "logits"):
        with Recorder(attn) as rec, torch.no_grad():
            if method is None:
                model.model(input_ids=ids, attention_mask=mask)
            else:
                with ablate(model, [Head(layer, h) for h in heads], method):
                    model.model(input_ids=ids, attention_mask=mask)
        got[method] = dict(rec)
    hidden = got[None]["h"]
    for method in ("query", "logits"):
        torch.testing.assert_close(got[method]["h"], hidden)  # upstream layers untouched
        x = got[method]["x"].view(2, 20, -1, D)
        for h in heads:
            expected = _hand_mean_v(attn, hidden, mask, h)
            torch.testing.assert_close(x[:, :, h][real], expected[real], atol=2e-6, rtol=1e-5)
            assert x[:, :, h][real].abs().max() > 1e-3  # the mean of V, not zero
        others = [h for h in range(8) if h not in heads]
        torch.testing.assert_close(x[:, :, others], got[None]["x"].view(2, 20, -1, D)[:, :, others])
    zero = got["zero"]["x"].view(2, 20, -1, D)
    assert torch.count_nonzero(zero[:, :, heads]) == 0


def test_query_and_logits_agree_on_the_logits_and_differ_from_zero(tiny):
    heads = ["L0H2", "L1H5", "L3H0", "L3H7"]
    ids, mask = _padded(seed=1)
    with torch.no_grad():
        out = {}
        for method in ("zero", "query", "logits"):
            with ablate(tiny, heads, method):
                out[method] = tiny.model(input_ids=ids, attention_mask=mask).logits
        clean = tiny.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out["query"][real], out["logits"][real], atol=1e-5, rtol=1e-5)
    # a random model attends almost uniformly, so query/logits ablation moves its logits little;
    # still 100x the float tolerance above, and zeroing the heads moves them much more
    assert (out["query"][real] - clean[real]).abs().max() > 1e-3
    assert (out["query"][real] - out["zero"][real]).abs().max() > 1e-3


def test_capture_records_uniform_attention_for_query_and_logits_ablated_heads(tiny):
    """Inside both blocks (either order), the capture sees the ablated heads' real attention:
    uniform over the visible keys; other heads as without ablation."""
    ids, mask = _padded(seed=2)
    heads = [Head(1, 3), Head(1, 4)]
    with torch.no_grad(), capture_attention(tiny) as clean:
        tiny.model(input_ids=ids, attention_mask=mask)
    for method in ("query", "logits"):
        with torch.no_grad():
            with ablate(tiny, heads, method), capture_attention(tiny) as a:
                tiny.model(input_ids=ids, attention_mask=mask)
            with capture_attention(tiny) as b, ablate(tiny, heads, method):
                tiny.model(input_ids=ids, attention_mask=mask)
        uniform = mask.float() / mask.sum(-1, keepdim=True)  # the last query sees every real token
        for cap in (a, b):
            row = cap.step(0)[1]
            for h in (3, 4):
                torch.testing.assert_close(row[:, h], uniform, atol=1e-6, rtol=0)
            torch.testing.assert_close(row[:, :3], clean.step(0)[1][:, :3])
            torch.testing.assert_close(cap.step(0)[0], clean.step(0)[0])
    assert tiny.model.config._attn_implementation == "sdpa"


def test_logits_ablation_reports_uniform_weights_under_eager_output_attentions(tiny_eager):
    ids, mask = _padded(seed=3)
    with torch.no_grad(), ablate(tiny_eager, ["L2H2"], "logits"):
        att = tiny_eager.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[2]
    for r in range(2):
        real = mask[r].bool()
        for i in torch.nonzero(real).flatten().tolist():
            vis = real.clone()
            vis[i + 1 :] = False
            torch.testing.assert_close(att[r, 2, i], vis.float() / vis.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["causal", "decode", "padding-2d", "bool-4d", "additive-4d"])
def test_uniform_attention_matches_a_loop_over_visible_keys(kind):
    """Every mask form an attention function receives (none, flash's 2-D, sdpa's bool, eager's
    additive) gives the mean of V over the keys a query may see; fully masked rows emit 0."""
    g = torch.Generator().manual_seed(0)
    b, n_heads, n_kv, kv, d = 2, 6, 2, 9, 4
    q_len = 1 if kind == "decode" else kv
    value = torch.randn(b, n_kv, kv, d, generator=g)
    query = torch.randn(b, n_heads, q_len, d, generator=g)
    pad = torch.ones(b, kv, dtype=torch.bool)
    pad[1, :3] = False
    causal = torch.arange(kv)[None, :] <= (torch.arange(q_len) + kv - q_len)[:, None]  # [q, kv]
    allowed = causal[None].expand(b, -1, -1).clone()
    mask = None
    if kind in ("padding-2d", "bool-4d", "additive-4d"):
        allowed &= pad[:, None, :]
        mask = {"padding-2d": pad.long(),
                "bool-4d": allowed[:, None],
                "additive-4d": torch.where(allowed[:, None], 0.0, torch.finfo(torch.float32).min)}[kind]
    heads = [0, 4, 5]
    out, w = uniform_attention(query, value, mask, heads, with_weights=True)
    for r in range(b):
        for j, h in enumerate(heads):
            for i in range(q_len):
                vis = allowed[r, i]
                want = value[r, h // 3, vis].mean(0) if vis.any() else torch.zeros(d)
                torch.testing.assert_close(out[r, i, j], want, atol=1e-6, rtol=1e-5)
                if vis.any():
                    torch.testing.assert_close(w[r, j, i], vis.float() / vis.sum(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- mean


@pytest.fixture(scope="module")
def ref_prompts():
    """Two reference prompts of different lengths, unpadded, and as one left-padded batch."""
    a, b = _ids(1, 14, seed=10)[0], _ids(1, 9, seed=11)[0]
    ids = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 5:], mask[1, 5:] = b, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return (a, b), {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # eager emits non-zero garbage at padded positions
def test_head_means_average_real_tokens_and_ignore_padding(tiny, tiny_eager, ref_prompts, impl):
    tiny = tiny if impl == "sdpa" else tiny_eager
    (a, b), batch = ref_prompts
    layer = 2
    attn = attention_modules(tiny)[layer]
    xs = []
    for p in (a, b):  # by hand: each prompt alone, every token
        with Recorder(attn) as rec, torch.no_grad():
            tiny.model(input_ids=p[None])
        xs.append(rec["x"][0])
    hand = torch.cat(xs).mean(0).view(-1, D)
    means = head_means(tiny, [batch], [Head(layer, h) for h in range(8)])
    for h in range(8):
        torch.testing.assert_close(means[Head(layer, h)], hand[h], atol=2e-6, rtol=1e-5)


def test_mean_ablation_substitutes_the_reference_mean(tiny, ref_prompts):
    _, batch = ref_prompts
    layer, heads = 3, [0, 5]
    means = head_means(tiny, [batch], [Head(layer, h) for h in heads])
    attn = attention_modules(tiny)[layer]
    ids, mask = _padded(seed=4)
    with torch.no_grad():
        with Recorder(attn) as clean:
            tiny.model(input_ids=ids, attention_mask=mask)
        with Recorder(attn) as rec, ablate(tiny, [Head(layer, h) for h in heads], "mean", reference=means):
            tiny.model(input_ids=ids, attention_mask=mask)
    x = rec["x"].view(2, 20, -1, D)
    for h in heads:
        assert torch.equal(x[:, :, h], means[Head(layer, h)].expand(2, 20, D))
    keep = [h for h in range(8) if h not in heads]
    assert torch.equal(x[:, :, keep], clean["x"].view(2, 20, -1, D)[:, :, keep])


# ---------------------------------------------------------------------------- composition


@pytest.fixture(scope="module")
def all_means(tiny, ref_prompts):
    return head_means(tiny, [ref_prompts[1]])


@pytest.mark.parametrize("method", METHODS)
def test_nested_ablations_equal_one_ablation_of_the_union(tiny, all_means, method):
    ids, mask = _padded(seed=5)
    ref = all_means if method == "mean" else None
    a, b = ["L1H2", "L2H0", "L2H4"], ["L2H7", "L3H1", "L1H2"]  # L1H2 in both: ablated once
    with torch.no_grad():
        with ablate(tiny, a, method, reference=ref), ablate(tiny, b, method, reference=ref):
            nested = tiny.model(input_ids=ids, attention_mask=mask).logits
        with ablate(tiny, sorted(set(a) | set(b)), method, reference=ref):
            union = tiny.model(input_ids=ids, attention_mask=mask).logits
        with ablate(tiny, a, method, reference=ref):
            only_a = tiny.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(nested, union, atol=1e-6, rtol=1e-6)
    assert (nested - only_a).abs().max() > 1e-3


def test_mixed_methods_compose_head_by_head(tiny, all_means):
    """Zero on one head and logits on another of the same layer, nested either way: each head gets
    its own method (checked by hand at the o_proj input) and the order does not matter."""
    layer = 2
    attn = attention_modules(tiny)[layer]
    ids, mask = _padded(seed=6)
    real = mask.bool()
    with torch.no_grad():
        with Recorder(attn) as rec, ablate(tiny, [Head(layer, 0)], "zero"), ablate(tiny, [Head(layer, 5)], "logits"), \
                ablate(tiny, ["L3H3"], "mean", reference=all_means):
            one = tiny.model(input_ids=ids, attention_mask=mask).logits
        with ablate(tiny, ["L3H3"], "mean", reference=all_means), ablate(tiny, [Head(layer, 5)], "logits"), \
                ablate(tiny, [Head(layer, 0)], "zero"):
            other = tiny.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(one, other, atol=1e-6, rtol=1e-6)
    x = rec["x"].view(2, 20, -1, D)
    assert torch.count_nonzero(x[:, :, 0]) == 0
    torch.testing.assert_close(x[:, :, 5][real], _hand_mean_v(attn, rec["h"], mask, 5)[real], atol=2e-6, rtol=1e-5)


def test_one_head_under_two_methods_is_refused(tiny):
    before = _hooks(tiny)
    with ablate(tiny, ["L1H1"], "zero"):
        with pytest.raises(ValueError, match="already ablated with method='zero'"):
            with ablate(tiny, ["L1H1", "L2H2"], "query"):
                pass
        assert active_ablations(tiny) == {Head(1, 1): ("zero", "all")}
    assert _hooks(tiny) == before and active_ablations(tiny) == {}


# ---------------------------------------------------------------------------- decode-only


def _greedy(model, ids, n):
    out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                               pad_token_id=model.tokenizer.pad_token_id)
    return out.sequences[:, ids.shape[1]:], [l.float() for l in out.logits]


@pytest.mark.parametrize("method", METHODS)
def test_decode_only_ablation_spares_the_prefill_and_ablates_decoding(tiny, all_means, method):
    heads = ["L1H0", "L2H5", "L3H2", "L3H6"]
    ref = all_means if method == "mean" else None
    ids = _ids(1, 16, seed=7)
    with torch.no_grad():
        clean_toks, clean = _greedy(tiny, ids, 2)
        with ablate(tiny, heads, method, phase="decode", reference=ref):
            toks, got = _greedy(tiny, ids, 2)
        # by hand: an unablated prefill fills the cache, then one step ablated throughout
        cache = DynamicCache(config=tiny.model.config)
        tiny.model(input_ids=ids, past_key_values=cache, use_cache=True)
        with ablate(tiny, heads, method, reference=ref):
            step = tiny.model(input_ids=toks[:, :1], past_key_values=cache, use_cache=True).logits[:, -1].float()
    assert torch.equal(got[0], clean[0])  # prefill logits untouched, bit for bit
    assert toks[0, 0] == clean_toks[0, 0]
    torch.testing.assert_close(got[1], step, atol=1e-5, rtol=1e-5)
    assert (got[1] - clean[1]).abs().max() > 1e-3


def _wu24_greedy(model, ids, n, heads, method):
    """Wu24's masking loop (needle_in_haystack_with_mask.py), written out: the prompt but its last
    token prefilled with no ablation, then the last prompt token and each greedy token fed one at a
    time with the heads masked."""
    cache = DynamicCache(config=model.model.config)
    model.model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
    inp, toks, logits = ids[:, -1:], [], []
    with ablate(model, heads, method):  # every call in here is a decoding step
        for _ in range(n):
            last = model.model(input_ids=inp, cache=cache, use_cache=True).logits[:, -1].float()
            inp = last.argmax(-1, keepdim=True)
            toks.append(int(inp))
            logits.append(last)
    return toks, logits


@pytest.mark.parametrize("method", ["zero", "logits"])
def test_teacher_forced_decode_only_equals_wu24s_masked_decoding(tiny, tiny_samples, method):
    """phase='decode' is Wu24's protocol: its loop prefills the prompt but its last token, then
    decodes from that token with the heads masked. Teacher forcing (and rh's greedy generation)
    under a decode-phase ablation give the answer that loop decodes, with its log-probability,
    which differs from the clean model's and from ablating the prompt too; the first answer token
    is predicted under the ablation (the last prompt token is a decoding step)."""
    from rh.evaluate import greedy_answers

    heads = [f"L{l}H{h}" for l in range(4) for h in (0, 2, 5, 7)]
    samples = tiny_samples[:4]
    gold, lps = [], []
    with torch.no_grad():
        for s in samples:
            toks, logits = _wu24_greedy(tiny, torch.tensor([s.input_ids]), 4, heads, method)
            gold.append(dataclasses.replace(s, answer_ids=tuple(toks)))
            lps.append(float(sum(torch.log_softmax(l[0], -1)[t] for l, t in zip(logits, toks))))
    with ablate(tiny, heads, method, phase="decode"):
        df = teacher_forced(tiny, gold, batch_size=4, progress=False)
        generated = greedy_answers(tiny, samples, max_new_tokens=4, batch_size=4)
    assert df["correct"].all()
    assert df["logprob"].to_numpy() == pytest.approx(lps, abs=3e-5)
    assert generated == [g.answer_ids for g in gold]  # left-padded generation: each row's own last token
    clean = teacher_forced(tiny, gold, batch_size=4, progress=False)
    with ablate(tiny, heads, method):
        everywhere = teacher_forced(tiny, gold, batch_size=4, progress=False)
    assert (clean["logprob"] - df["logprob"]).abs().max() > 3e-4  # 10x the tolerance above
    assert (everywhere["logprob"] - df["logprob"]).abs().max() > 3e-4
    assert (np.log(clean["first_token_prob"]) - np.log(df["first_token_prob"])).abs().max() > 3e-4


# ---------------------------------------------------------------------------- cleanup, bad input


@pytest.mark.parametrize("method", METHODS)
def test_nothing_is_left_after_the_block_or_an_exception(tiny, all_means, method):
    ref = all_means if method == "mean" else None
    ids = _ids(1, 12, seed=8)
    before = _hooks(tiny)
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits
        with ablate(tiny, ["L0H0", "L2H7"], method, reference=ref):
            assert _hooks(tiny) != before
        with pytest.raises(KeyError):
            with ablate(tiny, ["L1H1"], method, reference=ref), ablate(tiny, ["L3H3"], "zero"):
                raise KeyError("boom")
        after = tiny.model(input_ids=ids).logits
    assert _hooks(tiny) == before == (before[0], 0, "sdpa")
    assert active_ablations(tiny) == {}
    assert torch.equal(clean, after)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "ones"}, "unknown ablation method='ones'"),
    ({"phase": "prefill"}, "unknown phase='prefill'"),
    ({"heads": ["L4H0"]}, "outside the model"),
    ({"heads": ["L0H8"]}, "outside the model"),
    ({"method": "mean"}, "needs reference="),
    ({"method": "mean", "reference": {"L0H0": torch.zeros(D)}}, r"no mean for head\(s\) L1H1"),
    ({"method": "mean", "reference": {"L0H0": torch.zeros(3), "L1H1": torch.zeros(D)}}, "has shape"),
    ({"method": "query", "reference": {"L0H0": torch.zeros(D)}}, "only applies to method='mean'"),
])
def test_bad_input_is_refused_and_nothing_is_hooked(tiny, kwargs, match):
    kwargs = {"heads": ["L0H0", "L1H1"], **kwargs}
    before = _hooks(tiny)
    with pytest.raises(ValueError, match=match):
        with ablate(tiny, **kwargs):
            pass
    assert _hooks(tiny) == before and active_ablations(tiny) == {}


def test_ablation_conditions_name_each_method(tiny, all_means):
    conds = ablation_conditions(tiny, ["L1H1"], reference=all_means)
    assert list(conds) == ["baseline", *METHODS] and conds["baseline"].heads == ()
    assert [c.method for c in conds.values()][1:] == list(METHODS) and conds["mean"].reference is all_means
    with conds["logits"].open(tiny) as heads:
        assert heads == [Head(1, 1)] and active_ablations(tiny) == {Head(1, 1): ("logits", "all")}
    with pytest.raises(ValueError, match="needs reference="):
        ablation_conditions(tiny, ["L1H1"], ["mean"])
    with pytest.raises(ValueError, match="outside the model"):  # checked when declared, not when run
        ablation_conditions(tiny, ["L9H1"], ["zero"])
