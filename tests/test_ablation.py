"""``ablate`` zeroes exactly the chosen heads at the o_proj input and leaves no trace."""

from __future__ import annotations

import pytest
import torch

from rh.ablation import ablate
from rh.models import attention_modules
from rh.heads import Head



def _ids(length=24, seed=0):
    return torch.randint(0, 49152, (2, length), generator=torch.Generator().manual_seed(seed))


def _record_o_proj(module):
    """Register a pre-hook and a hook recording the o_proj input and output; return (store, handles)."""
    store = {}
    h1 = module.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach().clone()))
    h2 = module.register_forward_hook(lambda m, args, out: store.__setitem__("y", out.detach().clone()))
    return store, (h1, h2)


def test_ablation_output_equals_hand_computed_o_proj_with_zeroed_slices(tiny):
    layer, heads = 2, [1, 6]  # heads 1 and 6 sit in different KV groups
    o_proj = attention_modules(tiny)[layer].o_proj
    store, handles = _record_o_proj(o_proj)  # registered first: sees the input before ablate's hook
    try:
        with torch.no_grad(), ablate(tiny, [Head(layer, h) for h in heads]):
            tiny.model(input_ids=_ids())
    finally:
        for h in handles:
            h.remove()
    x, y = store["x"], store["y"]
    d = tiny.shape.head_dim
    x_zeroed = x.clone()
    for h in heads:
        x_zeroed[..., h * d : (h + 1) * d] = 0.0
    expected = x_zeroed @ o_proj.weight.T
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    # the change is exactly the removed heads' contribution W[:, slice] @ x[slice]
    removed = sum(x[..., h * d : (h + 1) * d] @ o_proj.weight[:, h * d : (h + 1) * d].T for h in heads)
    torch.testing.assert_close(x @ o_proj.weight.T - y, removed, atol=1e-5, rtol=1e-5)


def test_heads_in_later_layers_do_not_touch_earlier_layers(tiny):
    ids = _ids(seed=1)
    mods = attention_modules(tiny)
    store0, h0 = _record_o_proj(mods[1].o_proj)
    with torch.no_grad():
        tiny.model(input_ids=ids)
    clean = store0["y"]
    with torch.no_grad(), ablate(tiny, ["L3H0", "L3H5"]):
        out = tiny.model(input_ids=ids).logits
    for h in h0:
        h.remove()
    assert torch.equal(store0["y"], clean)  # layer 1 is upstream of layer 3: untouched
    with torch.no_grad():
        assert not torch.allclose(out, tiny.model(input_ids=ids).logits)  # but the logits moved


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_model_is_bit_identical_after_the_block_and_after_an_exception(tiny):
    ids = _ids(seed=2)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    hooks = _hook_count(tiny.model)
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
        with ablate(tiny, ["L0H0", "L1H3", "L3H7"]):
            during = tiny.model(input_ids=ids).logits
        after = tiny.model(input_ids=ids).logits
        with pytest.raises(KeyError):
            with ablate(tiny, ["L2H2"]):
                raise KeyError("boom")
        after_raise = tiny.model(input_ids=ids).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after) and torch.equal(before, after_raise)
    assert _hook_count(tiny.model) == hooks
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_nested_ablations_equal_one_ablation_of_the_union(tiny):
    ids = _ids(seed=3)
    with torch.no_grad():
        with ablate(tiny, ["L1H2", "L2H0"]), ablate(tiny, ["L2H7", "L3H1"]):
            nested = tiny.model(input_ids=ids).logits
        with ablate(tiny, ["L1H2", "L2H0", "L2H7", "L3H1"]):
            union = tiny.model(input_ids=ids).logits
    assert torch.equal(nested, union)


def test_ablating_every_head_of_a_layer_removes_its_attention_output(tiny):
    """With all heads of layer 0 zeroed, its o_proj emits exactly zero."""
    store, handles = _record_o_proj(attention_modules(tiny)[0].o_proj)
    with torch.no_grad(), ablate(tiny, [Head(0, h) for h in range(tiny.shape.n_heads)]):
        tiny.model(input_ids=_ids(seed=4))
    for h in handles:
        h.remove()
    assert torch.count_nonzero(store["y"]) == 0


@pytest.mark.parametrize("bad", ["L4H0", "L0H8", (-1, 0), "L1H1,L1H1"])
def test_heads_outside_the_model_are_refused_and_nothing_is_hooked(tiny, bad):
    heads = bad.split(",") if isinstance(bad, str) else [bad]
    hooks = _hook_count(tiny.model)
    with pytest.raises(ValueError, match="outside the model|twice|cannot parse"):
        with ablate(tiny, heads):
            pass
    assert _hook_count(tiny.model) == hooks
