"""rh.recording: the named sites hold what the model computes (checked against transformers' own
hidden states and the layer's own modules), reads see rewrites, and no hook outlives a block."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rh.ablation import ablate
from rh.models import attention_modules, decoder_layers, final_norm
from rh.recording import Site, attn_z, head_slice, reading, recording, resid_post, resid_pre, rewriting, site



@pytest.fixture(scope="module")
def ids(tiny):
    g = torch.Generator().manual_seed(3)
    return torch.randint(5, tiny.model.config.vocab_size, (2, 12), generator=g)


def _hooks(model) -> list[tuple[str, tuple]]:
    """Every hook table of every module, by module name: what must be the same after a block."""
    out = []
    for name, m in model.model.named_modules():
        for table in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            out.append((f"{name}.{table}", tuple(getattr(m, table, {}))))
    return out


def _logits(tiny, ids):
    with torch.no_grad():
        return tiny.model(input_ids=ids, use_cache=False).logits


def test_site_names_round_trip_and_bad_names_are_refused():
    for s in (resid_pre(0), resid_post(3), attn_z(2)):
        assert site(str(s)) == s
    assert str(attn_z(2)) == "blocks.2.attn.hook_z"  # TransformerLens' name
    for bad in ("blocks.2.hook_z", "blocks.x.hook_resid_pre", "resid_pre.2", "blocks.2.attn.hook_z.extra"):
        with pytest.raises(ValueError, match="unknown site"):
            site(bad)
    with pytest.raises(ValueError, match="site kind"):
        site(Site(1, "hook_mlp_out"))


def test_residual_sites_are_transformers_hidden_states(ids):
    # a model of its own: output_hidden_states leaves transformers' capturing hooks on every layer
    # for good, and rh.prefix reuses no prefix of a model with hooks it does not know
    from rh.models import tiny_llama

    tiny = tiny_llama(seed=0)
    n = tiny.shape.n_layers
    with torch.no_grad():
        hs = tiny.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    names = [resid_pre(layer) for layer in range(n)] + [resid_post(layer) for layer in range(n)]
    with torch.no_grad(), recording(tiny, names) as cache:
        tiny.model(input_ids=ids, use_cache=False)
    for layer in range(n):
        torch.testing.assert_close(cache[resid_pre(layer)], hs[layer])
    for layer in range(n - 1):
        torch.testing.assert_close(cache[resid_post(layer)], hs[layer + 1])
    # transformers' last hidden state is after the final norm; the site is what the norm reads
    torch.testing.assert_close(final_norm(tiny)(cache[resid_post(n - 1)]), hs[n])


def test_attn_z_is_what_o_proj_turns_into_the_layer_s_attention_output(tiny, ids):
    """Rebuild each layer from its own modules: resid_pre + o_proj(z) + MLP(norm(.)) = resid_post."""
    n = tiny.shape.n_layers
    names = [s for layer in range(n) for s in (resid_pre(layer), attn_z(layer), resid_post(layer))]
    with torch.no_grad(), recording(tiny, names) as cache:
        tiny.model(input_ids=ids, use_cache=False)
        for layer, block in enumerate(decoder_layers(tiny)):
            z = cache[attn_z(layer)]
            assert z.shape == (*ids.shape, tiny.shape.n_heads * tiny.shape.head_dim)
            mid = cache[resid_pre(layer)] + block.self_attn.o_proj(z)
            out = mid + block.mlp(block.post_attention_layernorm(mid))
            torch.testing.assert_close(out, cache[resid_post(layer)])


def test_a_read_sees_the_ablation_whichever_block_came_first(tiny, ids):
    d = tiny.shape.head_dim
    for ablate_first in (True, False):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if ablate_first:
                stack.enter_context(ablate(tiny, ["L1H2"]))
            cache = stack.enter_context(recording(tiny, [attn_z(1)]))
            if not ablate_first:
                stack.enter_context(ablate(tiny, ["L1H2"]))
            tiny.model(input_ids=ids, use_cache=False)
        z = cache[attn_z(1)]
        assert torch.count_nonzero(head_slice(z, 2, d)) == 0, ablate_first
        assert torch.count_nonzero(head_slice(z, 3, d)) > 0


def test_rewriting_a_layer_s_output_equals_rewriting_the_next_layer_s_input(tiny, ids):
    plain = _logits(tiny, ids)
    with rewriting(tiny, {resid_post(1): lambda x: None}):
        torch.testing.assert_close(_logits(tiny, ids), plain)  # None: left as it is
    shift = torch.randn(tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with rewriting(tiny, {resid_post(1): lambda x: x + shift}):
        a = _logits(tiny, ids)
    with rewriting(tiny, {"blocks.2.hook_resid_pre": lambda x: x + shift}):
        b = _logits(tiny, ids)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)


def test_rewriting_attn_z_is_an_o_proj_input_patch(tiny, ids):
    """Zeroing one head's slice of attn_z is exactly ablate(method='zero') of that head."""
    d = tiny.shape.head_dim

    def zero_head(x):
        x = x.clone()
        x[..., 5 * d:6 * d] = 0
        return x

    with rewriting(tiny, {attn_z(2): zero_head}):
        a = _logits(tiny, ids)
    with ablate(tiny, ["L2H5"]):
        b = _logits(tiny, ids)
    torch.testing.assert_close(a, b)


def test_stop_after_runs_no_layer_past_the_last_site(tiny, ids):
    calls = []
    last = decoder_layers(tiny)[-1]
    h = last.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad(), recording(tiny, [attn_z(1)], stop_after=True) as cache:
            tiny.model(input_ids=ids, use_cache=False)
            pytest.fail("the forward should have been cut short")  # the block ends at the stop
        assert calls == []
        with torch.no_grad(), recording(tiny, [attn_z(1)]) as full:
            tiny.model(input_ids=ids, use_cache=False)
        assert calls == [1]
    finally:
        h.remove()
    torch.testing.assert_close(cache[attn_z(1)], full[attn_z(1)])
    # o_proj runs inside layer 1, before the layer's input is read: the stop waits for every site
    with torch.no_grad(), recording(tiny, [resid_pre(1), attn_z(1)], stop_after=True) as both:
        tiny.model(input_ids=ids, use_cache=False)
    assert set(both) == {resid_pre(1), attn_z(1)}


def test_detach_false_keeps_the_graph(tiny, ids):
    emb = tiny.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with recording(tiny, [attn_z(0)], keep=lambda x: x[:, -1], detach=False, stop_after=True) as cache:
        tiny.model(inputs_embeds=emb, use_cache=False)
    cache[attn_z(0)].sum().backward()
    assert emb.grad is not None and torch.count_nonzero(emb.grad[:, -1]) > 0
    with torch.no_grad(), recording(tiny, [attn_z(0)]) as cache:
        tiny.model(input_ids=ids, use_cache=False)
    assert not cache[attn_z(0)].requires_grad


def test_no_hook_outlives_a_block_however_it_ends(tiny, ids):
    before = _hooks(tiny)
    sites = [resid_pre(0), attn_z(1), resid_post(3)]

    def body(exc):
        tiny.model(input_ids=ids, use_cache=False)
        if exc is not None:
            raise exc

    # a normal exit, an error in the body, a KeyboardInterrupt, and stop_after
    for exc in (None, RuntimeError("body"), KeyboardInterrupt()):
        for block in (lambda: recording(tiny, sites), lambda: reading(tiny, {s: lambda x: None for s in sites}),
                      lambda: rewriting(tiny, {s: lambda x: None for s in sites})):
            try:
                with torch.no_grad(), block():
                    assert _hooks(tiny) != before  # the hooks are on inside
                    body(exc)
            except (RuntimeError, KeyboardInterrupt) as e:
                assert e is exc
            assert _hooks(tiny) == before
    with torch.no_grad(), recording(tiny, sites, stop_after=True):
        body(None)
    assert _hooks(tiny) == before

    # an error raised inside a hook, in the middle of a forward
    def boom(x):
        raise ValueError("inside the hook")

    for block in (reading, rewriting):
        with pytest.raises(ValueError, match="inside the hook"), torch.no_grad(), \
                block(tiny, {resid_pre(0): lambda x: None, attn_z(2): boom}):
            body(None)
        assert _hooks(tiny) == before

    # nested blocks unwind to where they started
    with recording(tiny, [attn_z(0)]), rewriting(tiny, {resid_pre(1): lambda x: None}):
        with pytest.raises(RuntimeError):
            with recording(tiny, [attn_z(0)]):
                raise RuntimeError("inner")
        inner_gone = _hooks(tiny)
    assert _hooks(tiny) == before
    assert inner_gone != before  # the outer blocks' hooks were still on


def test_bad_sites_are_refused_before_any_hook_goes_on(tiny):
    before = _hooks(tiny)
    n = tiny.shape.n_layers
    with pytest.raises(ValueError, match=rf"layers \[{n}\]: the model has layers 0..{n - 1}"):
        with recording(tiny, [attn_z(0), attn_z(n)]):
            pytest.fail("the block must not start")
    with pytest.raises(ValueError, match="unknown site"):
        with rewriting(tiny, {resid_pre(0): lambda x: None, "blocks.0.mlp": lambda x: None}):
            pytest.fail("the block must not start")
    with pytest.raises(ValueError, match="given twice"):
        with reading(tiny, {attn_z(1): lambda x: None, "blocks.1.attn.hook_z": lambda x: None}):
            pytest.fail("the block must not start")
    assert _hooks(tiny) == before
    assert all(len(m._forward_pre_hooks) == 0 for m in attention_modules(tiny))
