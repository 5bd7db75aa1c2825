"""Real head pruning against zero-ablation of the same heads, GQA groups included: a whole KV group
removed in one layer, part of a group (uneven groups) in another, one head per group (even
groups) in a third; parameter counts by hand; the original left intact; bad input refused."""

from __future__ import annotations

import pytest
import torch

from rh.ablation import ablate
from rh.models import attention_modules
from rh.attention import capture_attention
from rh.heads import Head
from rh.pruning import efficiency_report, model_costs, plan_pruning, prune_heads


HIDDEN, D, GROUP = 64, 8, 4  # tiny: 8 query heads of 8 dims, 2 KV heads
HEADS = [
    "L1H0", "L1H1", "L1H2", "L1H3",  # layer 1: the whole first KV group goes
    "L2H1", "L2H2", "L2H6",  # layer 2: groups of 2 and 3 remain (uneven)
    "L0H3", "L0H4",  # layer 0: groups of 3 and 3 remain (even)
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def pair(request, tiny, tiny_eager):
    model = tiny if request.param == "sdpa" else tiny_eager
    return model, prune_heads(model, HEADS)


def _padded(seed=0, n=2, length=24, pad=6):
    ids = torch.randint(0, 49152, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def test_pruned_logits_equal_zero_ablation(pair):
    model, pruned = pair
    ids, mask = _padded()
    real = mask.bool()
    with torch.no_grad():
        got = pruned.model(input_ids=ids, attention_mask=mask).logits
        with ablate(model, HEADS, "zero"):
            want = model.model(input_ids=ids, attention_mask=mask).logits
        clean = model.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    assert (got[real] - clean[real]).abs().max() > 1e-2


def test_pruned_decoding_equals_zero_ablated_decoding(pair):
    """Through the KV cache (which holds only the remaining KV heads): same tokens, same logits."""
    model, pruned = pair
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        got = pruned.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        with ablate(model, HEADS, "zero"):
            want = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_layer_shapes_and_group_maps(tiny):
    pruned = prune_heads(tiny, HEADS)
    mods = attention_modules(pruned)
    # layer 0: heads 0,1,2 | 5,6,7 on KV 0 | 1 -> even groups of 3, the model's own repeat_kv
    assert mods[0].q_proj.out_features == 6 * D and mods[0].k_proj.out_features == 2 * D
    assert mods[0].num_key_value_groups == 3 and getattr(mods[0], "rh_kv_heads", None) is None
    # layer 1: heads 4..7 on KV 1 only
    assert mods[1].q_proj.out_features == 4 * D and mods[1].v_proj.out_features == 1 * D
    assert mods[1].num_key_value_groups == 4
    torch.testing.assert_close(mods[1].k_proj.weight, attention_modules(tiny)[1].k_proj.weight[D:])
    # layer 2: heads 0,3 on KV 0 and 4,5,7 on KV 1 -> uneven: an explicit map
    assert mods[2].rh_kv_heads.tolist() == [0, 0, 1, 1, 1]
    assert mods[3].q_proj.out_features == 8 * D and mods[3].num_key_value_groups == GROUP
    o_full = attention_modules(tiny)[2].o_proj.weight
    kept = [0, 3, 4, 5, 7]
    torch.testing.assert_close(mods[2].o_proj.weight, torch.cat([o_full[:, h * D:(h + 1) * D] for h in kept], 1))
    assert set(pruned.provenance["pruned_heads"]) == set(HEADS)


def test_parameter_count_drops_by_exactly_the_removed_rows_and_columns(tiny):
    pruned = prune_heads(tiny, HEADS)
    n_params = lambda m: sum(p.numel() for p in m.model.parameters())  # noqa: E731
    q_heads_removed = len(HEADS)
    kv_groups_removed = 1  # layer 1's first group
    by_hand = q_heads_removed * (HIDDEN * D + D * HIDDEN) + kv_groups_removed * 2 * (HIDDEN * D)
    assert n_params(tiny) - n_params(pruned) == by_hand
    before, after = model_costs(tiny, context_length=100), model_costs(pruned, context_length=100)
    assert before["parameters"] - after["parameters"] == by_hand
    assert before["query_heads"] - after["query_heads"] == q_heads_removed
    assert before["kv_cache_bytes_per_token"] - after["kv_cache_bytes_per_token"] == 2 * D * 4  # one KV head, fp32
    # FLOPs: 2 per weight of the removed rows/columns, plus QK^T and AV of each removed head over 100 keys
    assert before["flops_per_token"] - after["flops_per_token"] == 2 * by_hand + q_heads_removed * 4 * D * 100


def test_the_original_model_is_left_intact(tiny):
    ids, mask = _padded(seed=2)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.no_grad():
        before = tiny.model(input_ids=ids, attention_mask=mask).logits
        prune_heads(tiny, HEADS)
        after = tiny.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert tiny.model.config._attn_implementation == "sdpa"
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(getattr(a, "rh_kv_heads", None) is None for a in attention_modules(tiny))


def test_capture_on_a_pruned_model_sees_each_head_with_its_own_kv_head(tiny):
    """Rows of the remaining heads equal those of the zero-ablated model (layer 2 has uneven groups)."""
    pruned = prune_heads(tiny, HEADS)
    ids, mask = _padded(seed=3)
    with torch.no_grad():
        with capture_attention(pruned) as got:
            pruned.model(input_ids=ids, attention_mask=mask)
        with ablate(tiny, HEADS, "zero"), capture_attention(tiny) as want:
            tiny.model(input_ids=ids, attention_mask=mask)
    for layer, kept in [(0, [0, 1, 2, 5, 6, 7]), (1, [4, 5, 6, 7]), (2, [0, 3, 4, 5, 7]), (3, list(range(8)))]:
        torch.testing.assert_close(got.step(0)[layer], want.step(0)[layer][:, kept], atol=2e-6, rtol=1e-5)
    assert pruned.model.config._attn_implementation == "rh_capture__sdpa"  # needed for the uneven layer


def test_efficiency_report_measures_the_cache_it_counts(tiny):
    pruned = prune_heads(tiny, ["L1H0", "L1H1", "L1H2", "L1H3"])
    df = efficiency_report(tiny, pruned, context_length=32, repeats=1, decode_steps=2).set_index("metric")
    assert df.loc["kv_cache_bytes_per_token_measured", "before"] == df.loc["kv_cache_bytes_per_token", "before"]
    assert df.loc["kv_cache_bytes_per_token_measured", "after"] == df.loc["kv_cache_bytes_per_token", "after"]
    assert df.loc["kv_cache_bytes_per_token", "ratio"] == pytest.approx(7 / 8)
    assert (df.loc[["prefill_s", "decode_s_per_token"], ["before", "after"]] > 0).all().all()


def test_bad_input_is_refused(tiny):
    with pytest.raises(ValueError, match="every query head of layer 3"):
        prune_heads(tiny, [Head(3, h) for h in range(8)])
    with pytest.raises(ValueError, match="outside the model"):
        prune_heads(tiny, ["L9H0"])
    with pytest.raises(ValueError, match="inside an ablate block"):
        with ablate(tiny, ["L0H0"]):
            prune_heads(tiny, ["L1H1"])
    pruned = prune_heads(tiny, ["L1H1"])
    with pytest.raises(ValueError, match="already pruned"):
        prune_heads(pruned, ["L2H2"])
    with pytest.raises(ValueError, match="was pruned"):
        with ablate(pruned, ["L1H2"]):
            pass
    assert plan_pruning(tiny.shape, ["L2H1"])[2].uniform_groups is None
