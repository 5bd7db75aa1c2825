"""Seed 004's interventions on the tiny random Llama, each checked against a computation of its own."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from rh.models import attention_modules
from rh.batching import make_batches, running
from rh.heads import Head
from rh.interventions import (
    check_causal_pattern,
    difficulty_strata,
    hub_position,
    non_hub_positions,
    override_attention,
    patch_positions,
    record_activations,
    transplant_function,
    transplant_heads,
)



def _logits(model, samples, batch_size=8):
    """Last-position logits per sample id, the batch running (as teacher_forced runs it)."""
    out = {}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        with torch.no_grad(), running(batch):
            lg = model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False).logits
        for row, s in enumerate(batch.samples):
            out[s.id] = lg[row, -1].float()
    return out


def _o_proj_inputs(model, samples, layer, *, batch_size=8, **forward):
    """The o_proj input of ``layer`` per sample id (prompt positions only): what each head writes."""
    seen = {}
    mod = attention_modules(model)[layer].o_proj
    out = {}
    h = mod.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().float()))
    try:
        for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
            with torch.no_grad(), running(batch):
                model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False, **forward)
            for row, s in enumerate(batch.samples):
                out[s.id] = seen["x"][row, batch.pad[row]:]
    finally:
        h.remove()
    return out


def _values(model, sample, layer):
    """V of every KV head at ``layer`` for one prompt: [kv_heads, L, d] (V carries no RoPE)."""
    seen = {}
    mod = attention_modules(model)[layer].v_proj
    h = mod.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out.detach().float()))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([sample.input_ids]), logits_to_keep=1, use_cache=False)
    finally:
        h.remove()
    d = model.shape.head_dim
    return seen["v"][0].reshape(-1, model.shape.n_kv_heads, d).transpose(0, 1)


@pytest.fixture(scope="module")
def mixed(tiny):
    """Prompts of two lengths, so that batches are left-padded."""
    from rh.niah import build_passkey_samples

    return build_passkey_samples(tiny.tokenizer, lengths=[96, 128], depths=[0.25, 0.75], n_per_setting=1, seed=3,
                                 max_positions=tiny.max_positions)


# ---------------------------------------------------------------------------- position patching


@pytest.mark.parametrize("heads", [None, ["L2H1", "L2H6"]])
def test_patching_with_the_same_prompts_activations_changes_nothing(tiny, mixed, heads):
    clean = _logits(tiny, mixed)
    src = record_activations(tiny, mixed, 2, heads=heads)
    every = lambda s: list(range(s.length))  # noqa: E731
    with patch_positions(tiny, 2, every, mode="source", source=src, heads=heads):
        patched = _logits(tiny, mixed)
    for s in mixed:
        torch.testing.assert_close(patched[s.id], clean[s.id], atol=1e-5, rtol=1e-5)


def test_mean_patching_replaces_only_the_chosen_position_with_the_prompts_mean(tiny, mixed):
    layer, pos = 1, 5
    seen = {}
    block = tiny.model.model.layers[layer]
    grab = lambda m, args: seen.__setitem__("x", args[0].detach().clone())  # noqa: E731
    sample = mixed[0]
    ids = torch.tensor([sample.input_ids])
    h = block.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            tiny.model(input_ids=ids, logits_to_keep=1, use_cache=False)
        clean = seen["x"][0]
        with torch.no_grad(), patch_positions(tiny, layer, [pos], mode="mean"):
            h.remove()
            h = block.register_forward_pre_hook(grab)  # after the patch hook: sees what the layer gets
            tiny.model(input_ids=ids, logits_to_keep=1, use_cache=False)
        got = seen["x"][0]
    finally:
        h.remove()
    others = [i for i in range(sample.length) if i != pos]
    torch.testing.assert_close(got[others], clean[others])
    torch.testing.assert_close(got[pos], clean.mean(0), atol=1e-5, rtol=1e-5)


def test_noise_patching_is_seeded_per_sample_not_per_batch(tiny, mixed):
    with patch_positions(tiny, 1, [3, 7], mode="noise", seed=5):
        a = _logits(tiny, mixed, batch_size=1)
        b = _logits(tiny, mixed, batch_size=4)
    clean = _logits(tiny, mixed)
    for s in mixed:
        torch.testing.assert_close(a[s.id], b[s.id], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(a[s.id], clean[s.id])


def test_patching_rejects_bad_input_and_leaves_no_hook(tiny, mixed):
    layer = tiny.model.model.layers[1]
    with pytest.raises(ValueError, match="outside the prompt"):
        with patch_positions(tiny, 1, {s.id: [s.length] for s in mixed}):
            _logits(tiny, mixed)
    assert not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="negative"):
        with patch_positions(tiny, 1, [-1]):
            pass
    with pytest.raises(ValueError, match="unknown patch mode"):
        with patch_positions(tiny, 1, [0], mode="zero"):
            pass
    with pytest.raises(ValueError, match="needs source="):
        with patch_positions(tiny, 1, [0], mode="source"):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with patch_positions(tiny, 9, [0]):
            pass
    with pytest.raises(ValueError, match="must be in layer 1"):
        with patch_positions(tiny, 1, [0], heads=["L2H0"]):
            pass
    assert not layer._forward_pre_hooks


def test_hub_is_the_argmax_of_the_critical_heads_mean_attention(tiny_eager, tiny_samples):
    heads = [Head(2, 1), Head(3, 5)]
    hub, prof = hub_position(tiny_eager, tiny_samples, heads)
    rows = []
    for s in tiny_samples:  # independent: eager attention weights of the last query
        with torch.no_grad():
            att = tiny_eager.model(input_ids=torch.tensor([s.input_ids]), output_attentions=True).attentions
        row = np.mean([att[h.layer][0, h.head, -1].numpy() for h in heads], axis=0)
        row[s.needle_span[0]:s.needle_span[1]] = np.nan  # the needle is never the hub
        rows.append(row)
    want = np.nanmean(rows, axis=0)
    np.testing.assert_allclose(prof, want, atol=1e-5)
    assert hub == int(np.nanargmax(want))


def test_non_hub_positions_avoid_the_needle_the_hub_and_the_template(tiny_samples):
    pos = non_hub_positions(tiny_samples, 0, seed=1)
    for s in tiny_samples:
        (p,) = pos[s.id]
        c0, c1 = s.meta["context_span"]
        assert c0 <= p < c1 and not s.needle_span[0] <= p < s.needle_span[1] and p > 1
    assert pos == non_hub_positions(tiny_samples, 0, seed=1)


# ---------------------------------------------------------------------------- attention override


def test_uniform_override_emits_the_mean_of_v_over_visible_keys(tiny, tiny_samples):
    s, head, layer = tiny_samples[0], 5, 2
    with override_attention(tiny, [Head(layer, head)], "uniform"):
        got = _o_proj_inputs(tiny, [s], layer)[s.id]
    v = _values(tiny, s, layer)[head // tiny.shape.group_size]  # [L, d]
    want = v.cumsum(0) / torch.arange(1, v.shape[0] + 1)[:, None]
    d = tiny.shape.head_dim
    torch.testing.assert_close(got[:, head * d:(head + 1) * d], want, atol=1e-5, rtol=1e-5)


def test_sequential_override_attends_only_to_the_previous_token(tiny_eager, mixed):
    layer, head = 1, 3
    with override_attention(tiny_eager, [Head(layer, head)], "sequential"):
        att = {}
        for batch in make_batches(mixed, 8, tiny_eager.tokenizer.pad_token_id):
            with torch.no_grad(), running(batch):
                a = tiny_eager.model(**batch.model_inputs("cpu"), output_attentions=True).attentions[layer]
            for row, s in enumerate(batch.samples):
                att[s.id] = a[row, head, batch.pad[row]:, batch.pad[row]:]
        outs = _o_proj_inputs(tiny_eager, mixed, layer)
    d = tiny_eager.shape.head_dim
    for s in mixed:
        L = s.length
        want = torch.zeros(L, L)
        want[0, 0] = 1.0
        want[torch.arange(1, L), torch.arange(0, L - 1)] = 1.0
        torch.testing.assert_close(att[s.id].float(), want)
        v = _values(tiny_eager, s, layer)[head // tiny_eager.shape.group_size]
        prev = torch.cat([v[:1], v[:-1]])
        torch.testing.assert_close(outs[s.id][:, head * d:(head + 1) * d], prev, atol=1e-5, rtol=1e-5)


def test_hub_override_moves_the_fraction_onto_the_hub_and_respects_causality(tiny_eager, tiny_samples):
    s, layer, head, hub = tiny_samples[0], 2, 6, 4
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        clean = tiny_eager.model(input_ids=ids, output_attentions=True).attentions[layer][0, head]
        with override_attention(tiny_eager, [Head(layer, head)], "hub", hub=hub, fraction=0.8):
            forced = tiny_eager.model(input_ids=ids, output_attentions=True).attentions[layer][0, head]
    want = 0.2 * clean
    want[hub:, hub] += 0.8
    want[:hub] = clean[:hub]  # tokens before the hub cannot see it
    torch.testing.assert_close(forced, want, atol=1e-6, rtol=1e-5)


def test_a_hub_outside_the_prompt_is_refused_and_no_intervention_is_left(tiny, mixed):
    from rh.attention import interventions

    with pytest.raises(ValueError, match="hub=96 is outside the prompt"):
        with override_attention(tiny, ["L1H0"], "hub", hub=96):
            _logits(tiny, mixed)  # the shorter prompts have 96 tokens: positions 0..95
    assert not interventions(attention_modules(tiny)[1])
    assert tiny.model.config._attn_implementation == "sdpa"


def test_override_rejects_acausal_and_malformed_patterns(tiny):
    bad = torch.zeros(4, 4)
    bad[:, 0] = 1.0
    bad[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="breaks causality: query 1 puts weight on key 2"):
        check_causal_pattern(bad)
    with pytest.raises(ValueError, match="do not sum to 1"):
        check_causal_pattern(torch.tril(torch.ones(4, 4)))
    with pytest.raises(ValueError, match="unknown pattern"):
        with override_attention(tiny, ["L0H0"], "random"):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with override_attention(tiny, ["L9H0"], "uniform"):
            pass
    ok = torch.tril(torch.ones(4, 4))
    ok = ok / ok.sum(-1, keepdim=True)
    check_causal_pattern(ok)


def test_a_given_causal_pattern_is_applied(tiny, tiny_samples):
    s, layer, head = tiny_samples[0], 1, 2
    L = s.length
    pat = torch.zeros(L, L)
    pat[:, 0] = 1.0  # everyone reads the first token
    with override_attention(tiny, [Head(layer, head)], pat):
        got = _o_proj_inputs(tiny, [s], layer)[s.id]
    v = _values(tiny, s, layer)[head // tiny.shape.group_size]
    d = tiny.shape.head_dim
    torch.testing.assert_close(got[:, head * d:(head + 1) * d], v[:1].expand(L, -1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- transplant


def _head_by_hand(model, sample, layer, q_w, k_w, v_w):
    """One head's attention output computed from its q/k/v weight slices, with the model's own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = {}
    attn = attention_modules(model)[layer]
    h = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([sample.input_ids]), logits_to_keep=1, use_cache=False)
    finally:
        h.remove()
    x = seen["hidden_states"][0].float()
    cos, sin = seen["position_embeddings"]
    q, k, v = x @ q_w.T, x @ k_w.T, x @ v_w.T
    q, k = apply_rotary_pos_emb(q[None, None], k[None, None], cos, sin)
    scores = (q[0, 0] @ k[0, 0].T) / q_w.shape[0] ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones_like(scores, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_transplant_into_an_identical_copy_changes_nothing(tiny, tiny_samples):
    twin = copy.deepcopy(tiny)
    clean = _logits(tiny, tiny_samples)
    with transplant_heads(tiny, twin, ["L1H2", "L3H7"]):
        got = _logits(tiny, tiny_samples)
    for s in tiny_samples:
        torch.testing.assert_close(got[s.id], clean[s.id], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["own", "group"])
def test_transplant_changes_exactly_that_head_and_is_undone(tiny, tiny_samples, kv):
    from rh.models import tiny_llama

    donor = tiny_llama(seed=7)
    layer, head = 1, 2
    d, g = tiny.shape.head_dim, tiny.shape.group_size
    s = tiny_samples[1]
    before = _o_proj_inputs(tiny, [s], layer)[s.id]
    logits_before = _logits(tiny, tiny_samples)
    o_before = attention_modules(tiny)[layer].o_proj.weight.clone()
    with transplant_heads(tiny, donor, [Head(layer, head)], kv=kv):
        after = _o_proj_inputs(tiny, [s], layer)[s.id]
        o_now = attention_modules(tiny)[layer].o_proj.weight.clone()
    dm = attention_modules(donor)[layer]
    kv_rows = slice((head // g) * d, (head // g + 1) * d)
    want = _head_by_hand(tiny, s, layer, dm.q_proj.weight[head * d:(head + 1) * d], dm.k_proj.weight[kv_rows],
                         dm.v_proj.weight[kv_rows])
    torch.testing.assert_close(after[:, head * d:(head + 1) * d], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_now[:, head * d:(head + 1) * d], dm.o_proj.weight[:, head * d:(head + 1) * d])
    others = [h for h in range(tiny.shape.n_heads) if h != head]
    same_group = [h for h in others if h // g == head // g]
    cols = lambda hs: torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])  # noqa: E731
    if kv == "own":  # every other head, its group-mates included, is untouched
        torch.testing.assert_close(after[:, cols(others)], before[:, cols(others)])
    else:  # the group's K/V are the donor's: group-mates change, the other groups do not
        rest = [h for h in others if h not in same_group]
        torch.testing.assert_close(after[:, cols(rest)], before[:, cols(rest)])
        assert not torch.allclose(after[:, cols(same_group)], before[:, cols(same_group)])
    torch.testing.assert_close(attention_modules(tiny)[layer].o_proj.weight, o_before)
    assert getattr(attention_modules(tiny)[layer], "rh_kv_heads", None) is None
    for s2 in tiny_samples:
        torch.testing.assert_close(_logits(tiny, [s2])[s2.id], logits_before[s2.id])


def test_transplant_refuses_a_donor_of_another_shape_and_restores_on_error(tiny):
    from rh.models import tiny_llama

    other = tiny_llama(seed=1, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="differs from the recipient's .* a projection between shapes"):
        with transplant_heads(tiny, other, ["L0H0"]):
            pass
    w = attention_modules(tiny)[0].q_proj.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with transplant_heads(tiny, tiny_llama(seed=2), ["L0H0"]):
            raise RuntimeError("boom")
    torch.testing.assert_close(attention_modules(tiny)[0].q_proj.weight, w)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_iv4_is_inconclusive_without_a_donor(tiny, tiny_samples):
    v = transplant_function(tiny, None, tiny_samples, [Head(0, 0)], pd.DataFrame())
    assert v.inconclusive and "--compare-model" in v.reason
    assert v.power.method == "none" and "no donor" in v.power.note  # nothing tested: the reason, not a number


IV4_HEADS = [Head(1, 2), Head(2, 5), Head(3, 0), Head(3, 7)]  # three layers, both KV groups


@pytest.fixture(scope="module")
def own_answers(tiny):
    """24 passkey prompts (two lengths, three depths) whose gold answer is the first token the tiny
    model's greedy decoding emits there (teacher_forced's ``first_argmax``), and their baseline:
    right on every prompt, so a condition that changes the model's first choice loses the item."""
    import dataclasses

    from rh.evaluate import teacher_forced
    from rh.niah import build_passkey_samples

    samples = build_passkey_samples(tiny.tokenizer, lengths=[96, 128], depths=[0.0, 0.5, 1.0], n_per_setting=4,
                                    seed=1, max_positions=tiny.max_positions)
    first = teacher_forced(tiny, samples, progress=False).set_index("id")["first_argmax"]
    own = [dataclasses.replace(s, id=f"{s.id}-own", answer_ids=(int(first[s.id]),),
                               answer=tiny.tokenizer.decode([int(first[s.id])])) for s in samples]
    baseline = teacher_forced(tiny, own, progress=False)
    assert baseline["correct"].all()
    return own, baseline


def _untouched(model) -> tuple:
    """Every hook table of every module, the attention implementation and the weights: what a claim
    must leave as it found them."""
    hooks = [(name, table, tuple(getattr(m, table, {}))) for name, m in model.model.named_modules()
             for table in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                           "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")]
    buffers = sorted(name for name, _ in model.model.named_buffers() if "rh_" in name)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    return hooks, model.model.config._attn_implementation, buffers, weights


def _same_state(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def test_iv4_with_a_donor_of_the_same_shape_gives_the_accuracies_run_by_hand(tiny, own_answers):
    """IV-4 through the real path (zero ablation and the transplant from a second random Llama of the
    tiny's shape, seed 1) against teacher_forced run by hand under ablate(...) and inside
    transplant_heads(...): the three accuracies, the ablation's exact one-sided McNemar p (a binomial
    tail over the discordant prompts, with scipy), the loss with the donor's heads and its counts.
    Catches a transplant evaluated on stale rows (the recipient's own heads), ablated and transplanted
    outcomes swapped or misaligned by id, and a model left changed."""
    from scipy import stats

    from rh.ablation import ablate
    from rh.evaluate import teacher_forced
    from rh.models import tiny_llama

    samples, baseline = own_answers
    donor = tiny_llama(seed=1)
    before = [_untouched(tiny), _untouched(donor)]
    v = transplant_function(tiny, donor, samples, IV4_HEADS, baseline)
    assert _same_state(_untouched(tiny), before[0]) and _same_state(_untouched(donor), before[1])
    with ablate(tiny, IV4_HEADS, "zero"):
        abl = teacher_forced(tiny, samples, progress=False)["correct"].to_numpy(bool)
    with transplant_heads(tiny, donor, IV4_HEADS):
        tr = teacher_forced(tiny, samples, progress=False)["correct"].to_numpy(bool)
    base = baseline["correct"].to_numpy(bool)
    lost, won = int((base & ~abl).sum()), int((~base & abl).sum())
    p_function = stats.binomtest(lost, lost + won, 0.5, alternative="greater").pvalue if lost + won else 1.0
    d = v.details
    assert v.status in ("supported", "refuted", "inconclusive") and v.n == len(samples)
    assert d["baseline_accuracy"] == 1.0
    assert d["ablated_accuracy"] == pytest.approx(abl.mean()) and d["transplanted_accuracy"] == pytest.approx(tr.mean())
    assert d["p_function"] == pytest.approx(p_function, rel=1e-9)
    assert 0 < tr.mean() < 1 and 0 < abl.mean() < 1  # both conditions change some answers, not all
    if not v.inconclusive:  # decided on the loss with the donor's heads
        assert v.effect == pytest.approx(base.mean() - tr.mean())
        assert (d["right_to_wrong"], d["wrong_to_right"]) == (int((base & ~tr).sum()), int((~base & tr).sum()))


def test_iv4_with_a_donor_of_another_shape_is_inconclusive_before_any_pass(tiny, own_answers):
    """A donor of another shape (5 layers x 4 heads, hidden 32) gives an inconclusive IV-4 naming
    both shapes and what the transplant needs, decided from the configs: no forward pass of either
    model runs, and both are left as they were (no hook, no buffer, same weights and attention
    implementation). Catches a shape check that raises, or that comes after the ablation's passes."""
    from rh.models import tiny_llama

    samples, baseline = own_answers
    donor = tiny_llama(seed=1, n_layers=5, n_heads=4, n_kv_heads=2)
    before = [_untouched(tiny), _untouched(donor)]
    calls = []
    handles = [m.model.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
               for name, m in (("recipient", tiny), ("donor", donor))]
    try:
        v = transplant_function(tiny, donor, samples, IV4_HEADS, baseline)
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert v.inconclusive and v.statistic is None
    assert ("the donor's shape (5 layers x 4 heads, 2 KV heads, head_dim 8, hidden 32) differs from the "
            "recipient's (4 x 8, 2 KV, head_dim 8, hidden 64)") in v.reason
    assert "the transplant needs a donor of the same shape" in v.reason
    assert v.power.method == "none" and "shape differs" in v.power.note
    assert _same_state(_untouched(tiny), before[0]) and _same_state(_untouched(donor), before[1])


# ---------------------------------------------------------------------------- strata (IV-7)


def test_strata_rule_on_planted_outcomes():
    """IV-7 on the log-odds scale among items right at baseline: a drop concentrated on the least
    confident items supports; the same drop everywhere (a uniform shift) does not."""
    from rh.rules.claims import log_odds

    conf = np.linspace(0.3, 0.99, 40)
    base = np.ones(40, dtype=bool)
    lo = log_odds(np.log(conf))
    hard_hit = lo - np.where(np.arange(40) < 20, 3.0, 0.5) - np.linspace(0, 0.1, 40)
    uniform = lo - 1.0 - np.linspace(0, 0.1, 40)

    def frames(new_lo):
        b = pd.DataFrame({"id": [f"s{i}" for i in range(40)], "correct": base, "logprob": np.log(conf)})
        a = pd.DataFrame({"id": b["id"], "correct": new_lo > 0, "logprob": -np.log1p(np.exp(-new_lo))})
        return b, a

    v = difficulty_strata(*frames(hard_hit))
    assert v.supported and v.details["hard"]["log_odds_drop"] == pytest.approx(3.0 + 0.1 * 9.5 / 39, abs=0.1)
    assert difficulty_strata(*frames(uniform)).refuted  # the same log-odds drop for all: below Δ
    assert difficulty_strata(*(f.iloc[:5] for f in frames(hard_hit))).inconclusive  # 5 items cannot split


def test_intervention_figures_render_from_verdict_details():
    """The IV families' figures draw from the details their rules write, through the registry's
    draw_figures (a renamed key or a figure registered under the wrong claim would blank one)."""
    from rh.catalogue.interventions import FAMILIES
    from rh.claim_families import draw_figures

    iv1 = [{"claim": "IV-1", "params": {"n_heads": n}, "n": 80,
            "details": {"baseline_accuracy": 1.0, "ablated_accuracy": a, "min_drop": 0.1}}
           for n, a in ((1, 0.9), (2, 0.5), (3, 0.2))]
    iv2 = [{"claim": "IV-2", "params": {"mode": "noise"}, "n": 80,
            "details": {"layer": 17, "hub": 0, "baseline_accuracy": 1.0, "hub_accuracy": 0.1,
                        "non_hub_accuracy": 1.0}}]
    iv3 = [{"claim": "IV-3", "params": {"pattern": p}, "n": 80,
            "details": {"baseline_accuracy": 1.0, "forced_accuracy": a, "heads": ["L1H1"] * 3}}
           for p, a in (("hub", 0.95), ("uniform", 0.4))]
    items = {"baseline_log_odds": [0.1, 0.5, 2.0, 3.0], "log_odds_drop": [2.0, 1.5, 0.4, 0.2]}
    iv7 = [{"claim": "IV-7", "params": {"strata": 2}, "n": 4, "details": {"items": items}}]
    layers = {"layer": [0, 1, 2], "accuracy": [0.1, 0.2, 1.0], "chance": [0.1] * 3, "p_value": [1, 0.5, 1e-9],
              "n": [40] * 3}
    iv5 = [{"claim": "IV-5", "params": {}, "n": 40, "details": {"layers": layers, "critical_layers": [1]}}]
    iv6 = [{"claim": "IV-6", "params": {}, "n": 1,
            "details": {"example": {"sample": "s0", "needle_span": [3, 5], "token_attr": [0.1, -0.2, 0.0, 1.0, 0.5, 0.1]}}}]
    figs = draw_figures(iv1 + iv2 + iv3 + iv5 + iv6 + iv7 + [{"claim": "IV-4", "params": {}, "details": {}}], {},
                        FAMILIES)
    assert sorted(t.split(":")[0] for t in figs) == ["IV-1", "IV-2", "IV-3", "IV-5", "IV-6", "IV-7"]
    assert all(png.startswith(b"\x89PNG") for png in figs.values())


def test_patches_and_overrides_as_work_units_give_the_context_managers_rows_and_are_plain_data(tiny, mixed, tmp_path):
    """IV-2's patches and IV-3's overrides declared as conditions run through the runner (so on Ray
    replicas too) and give exactly the rows of the context-manager passes they replace; they pickle,
    hash, and key their stored rows apart from the baseline's and from each other's. Catches a
    condition that ignores its per-prompt non-hub positions, a stored patched row served as the
    baseline (a key without the patch's place), and a condition that cannot be shipped."""
    import pickle

    from rh.ablation import Ablation
    from rh.evaluate import teacher_forced
    from rh.interventions import Override, Patch, non_hub_positions, override_attention, patch_positions
    from rh.runner import ResultStore, Runner, row_key, run_one, use_runner
    from rh.units import Unit

    hub, layer = 2, 1
    conds = [Patch("hub patched", layer, "hub", hub, "noise", 3),
             Patch("non-hub patched", layer, "non-hub", hub, "noise", 3), Patch("mean", layer, "hub", hub, "mean"), Override("uniform", ("L1H0", "L2H3"), "uniform"),
             Override("hub", ("L1H0",), "hub", hub=hub, fraction=0.5), Override("seq", ("L2H1",), "sequential")]
    others = non_hub_positions(mixed, hub, seed=3)
    direct = []
    for c in conds:
        if isinstance(c, Patch):
            where = [hub] if c.at == "hub" else others
            cm = patch_positions(tiny, layer, where, mode=c.mode, seed=c.seed)
        else:
            cm = override_attention(tiny, c.heads, c.pattern, hub=c.hub, fraction=c.fraction)
        with cm:
            direct.append(teacher_forced(tiny, mixed, condition=c.name, batch_size=4))
    with use_runner(tiny, Runner(tiny, store=ResultStore(tmp_path / "rows.jsonl"))):
        via = [run_one(tiny, mixed, c, batch_size=4) for c in conds]
    base = teacher_forced(tiny, mixed, condition="baseline", batch_size=4)
    for c, d, v in zip(conds, direct, via):
        assert v["correct"].tolist() == d["correct"].tolist(), c.name
        np.testing.assert_allclose(v["logprob"], d["logprob"], rtol=0, atol=1e-5, err_msg=c.name)
        assert pickle.loads(pickle.dumps(Unit(c, ("a",)))) == Unit(c, ("a",)) and hash(c) == hash(copy.deepcopy(c))
    assert not np.allclose(via[0]["logprob"], base["logprob"])  # the patch does something on this model
    keys = {row_key("L", c, mixed[0]) for c in [*conds, Ablation.baseline()]}
    assert len(keys) == len(conds) + 1 and None not in keys
    with pytest.raises(ValueError, match="'source' patches recorded activations"):
        Patch("p", 1, "hub", 0, "source")
    with pytest.raises(ValueError, match="pattern="):
        Override("o", ("L0H0",), "diagonal")


def test_iv4_on_a_controller_without_weights_runs_where_the_weights_are(tiny, own_answers):
    """A recipient loaded without its weights (a --ray controller) hands IV-4's passes to its
    runner's executor: here one holding the loaded model (as a replica holds it). The ablated rows
    run there as units, and the transplant as a task carrying the donor's heads
    (rh.interventions.TransplantTask, DonorHeads). The verdict and its details equal the loaded
    recipient's, the same forwards ran (token-layers), and the controller loaded no weights.
    Catches the transplant run on meta tensors, weights loaded on the controller, or a pass run
    elsewhere than the executor."""
    import pickle

    from rh.budget import TokenLayerCounter
    from rh.evaluate import teacher_forced
    from rh.interventions import DonorHeads, TransplantTask, take_donor_heads
    from rh.models import load_model, tiny_llama
    from rh.runner import LocalExecutor, Runner, use_runner

    samples, baseline = own_answers
    donor = tiny_llama(seed=1)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        full = transplant_function(tiny, donor, samples, IV4_HEADS, baseline)
        here = counter.total
        bare = load_model("tiny-llama", weights=False)
        with use_runner(bare, Runner(bare, executor=LocalExecutor(tiny))):
            got = transplant_function(bare, donor, samples, IV4_HEADS, baseline)
        there = counter.total - here
    finally:
        handle.remove()
    assert (got.status, got.p_value, got.effect, got.details) == (full.status, full.p_value, full.effect, full.details)
    assert there == here > 0 and not bare.holds_weights and not bare.twins
    # the task is a value that travels: its donor's heads survive pickling and transplant alike
    task = TransplantTask(tuple(s.id for s in samples), tuple(IV4_HEADS), take_donor_heads(donor, IV4_HEADS))
    back = pickle.loads(pickle.dumps(task))
    assert isinstance(back.donor, DonorHeads) and back.donor.parts.keys() == task.donor.parts.keys()
    by_id = {s.id: s for s in samples}
    assert back.run(tiny, by_id).tolist() == task.run(tiny, by_id).tolist()
    with transplant_heads(tiny, donor, IV4_HEADS):
        want = teacher_forced(tiny, samples, progress=False)["correct"].tolist()
    assert task.run(tiny, by_id).tolist() == want
