"""Prefix reuse (rh.prefix): a pass whose first modified layer is L starts from the stored residual
stream entering L, and gives the plain pass's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rh.ablation import ablate
from rh.models import decoder_layers
from rh.budget import TokenLayerCounter
from rh.evaluate import teacher_forced
from rh.heads import Head
from rh.prefix import first_modified_layer, hinting, reuse_prefixes, transformers_reader



def _hooks(model) -> int:
    """Forward hooks on the model, less transformers' own output recorders (installed for good by
    any earlier test's ``output_hidden_states=True`` forward on the session model)."""
    return sum(len(m._forward_pre_hooks) + sum(not transformers_reader(h) for h in m._forward_hooks.values())
               for m in model.model.modules())


def _same(a, b) -> None:
    assert a["correct"].tolist() == b["correct"].tolist()
    np.testing.assert_allclose(a["logprob"].to_numpy(), b["logprob"].to_numpy(), rtol=0, atol=1e-5)


def _conditions(model, samples):
    from rh.ablation import head_means
    from rh.interventions import override_attention, patch_positions

    means = head_means(model, samples, [Head(1, 0)])
    return {
        "zero L2": lambda: ablate(model, [Head(2, 1), Head(3, 5)]),
        "mean L1": lambda: ablate(model, [Head(1, 0)], "mean", reference=means),
        "query L3": lambda: ablate(model, [Head(3, 2)], "query"),
        "logits L2 decode": lambda: ablate(model, [Head(2, 7)], "logits", phase="decode"),
        "noise at L2": lambda: patch_positions(model, 2, [5, 6], mode="noise", seed=1),
        "uniform attention L3": lambda: override_attention(model, [Head(3, 0)], "uniform"),
    }


@pytest.mark.parametrize("name", ["zero L2", "mean L1", "query L3", "logits L2 decode", "noise at L2",
                                  "uniform attention L3"])
def test_reused_prefixes_give_the_plain_outputs_for_fewer_token_layers(tiny, tiny_samples, name):
    """Against the plain pass: same correctness, log-probs within float noise, and exactly
    first-layer x tokens fewer token-layers counted (the counter sees only executed layers)."""
    make = _conditions(tiny, tiny_samples)[name]
    first = int(name.split("L")[-1].split()[0])
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        with make():
            plain = teacher_forced(tiny, tiny_samples, batch_size=4, progress=False)
        plain_cost = counter.total
        with reuse_prefixes(tiny) as cache:
            with hinting(tiny, [first]):
                teacher_forced(tiny, tiny_samples, batch_size=4, progress=False)
            before = counter.total
            with make():
                assert first_modified_layer(tiny) == first
                reused = teacher_forced(tiny, tiny_samples, batch_size=4, progress=False)
            cost = counter.total - before
            assert cache.hits == 2  # two batches of the six prompts
    finally:
        handle.remove()
    _same(plain, reused)
    tokens = sum(len(s.input_ids) + len(s.answer_ids) - 1 for s in tiny_samples)
    width = {}  # batches pad to their longest row: the counter counts padded tokens
    for b in range(0, len(tiny_samples), 4):
        rows = sorted(tiny_samples, key=lambda s: len(s.input_ids) + len(s.answer_ids))[b:b + 4]
        width[b] = max(len(s.input_ids) + len(s.answer_ids) - 1 for s in rows) * len(rows)
    padded = sum(width.values())
    assert padded >= tokens
    assert plain_cost == padded * tiny.shape.n_layers
    assert cost == padded * (tiny.shape.n_layers - first)
    assert _hooks(tiny) == 0


def test_without_a_hint_the_first_pass_of_a_condition_stores_what_the_next_reuses(tiny, tiny_samples):
    """No hint: the first ablated pass runs in full and keeps its first layer's input; a later
    condition starting at or after that layer reuses it, one starting before runs in full."""
    with ablate(tiny, [Head(3, 1)]):
        plain3 = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
    with ablate(tiny, [Head(1, 1)]):
        plain1 = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
    with reuse_prefixes(tiny) as cache:
        with ablate(tiny, [Head(2, 0)]):
            teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
        assert (cache.hits, cache.misses) == (0, 1)
        with ablate(tiny, [Head(3, 1)]):
            r3 = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
        assert cache.hits == 1
        with ablate(tiny, [Head(1, 1)]):
            r1 = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
        assert (cache.hits, cache.misses) == (1, 2)
    _same(plain3, r3)
    _same(plain1, r1)


def _needle_mass_at_layer_1(model):
    from rh.id_claims import needle_mass_reading

    return needle_mass_reading(model, [Head(1, 0)])


def _residuals_from_layer_0(model):
    from rh.probes import residual_reading

    return residual_reading(model)


@pytest.mark.parametrize("reading, reads_from", [(_needle_mass_at_layer_1, 1), (_residuals_from_layer_0, 0)],
                         ids=["needle mass at layer 1", "residuals from layer 0"])
def test_a_reading_baseline_keeps_the_streams_hinted_above_the_layers_it_reads(tiny, tiny_samples, reading,
                                                                               reads_from):
    """A baseline that reads (ID-5's needle mass at layer 1: rh.attention.reading_rows; IV-5's
    residuals, rh.recording.reading hooks on every layer from layer 0's input on) changes nothing:
    it keeps the stream hinted at layer 3, above what it reads, as the plain baseline does; the
    ablation at layer 3 then runs layers 3.. only and gives the plain pass's outputs. A pass with
    the reading on cannot start above the first layer it reads. Catches a reader counted as a
    change (the hint above it lost: the ablation runs in full, as CA-6's did after its baselines
    read IV-5's residuals) and one ignored when starting (the reader would see no forward)."""
    with ablate(tiny, [Head(3, 4)]):
        plain = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        with reuse_prefixes(tiny) as cache:
            with hinting(tiny, [3]), reading(tiny) as read:
                assert first_modified_layer(tiny) == reads_from
                assert first_modified_layer(tiny, readers=False) == tiny.shape.n_layers
                teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
            assert {layer for _, layer in cache.entries} == {reads_from, 3} - {0}
            assert set(read) == {s.id for s in tiny_samples}
            before = counter.total
            with ablate(tiny, [Head(3, 4)]):
                reused = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
            assert cache.hits == 1
            padded = (counter.total - before) // (tiny.shape.n_layers - 3)
            assert counter.total - before == padded * (tiny.shape.n_layers - 3) > 0
            with reading(tiny) as again:
                start = counter.total
                teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
            assert counter.total - start == padded * (tiny.shape.n_layers - reads_from)  # not from layer 3's stream
            np.testing.assert_allclose(np.array([again[s.id] for s in tiny_samples]),
                                       np.array([read[s.id] for s in tiny_samples]), rtol=1e-6)
    finally:
        handle.remove()
    _same(plain, reused)
    assert _hooks(tiny) == 0


def test_an_edit_below_the_stored_layer_invalidates_it(tiny, tiny_samples):
    """A weight edited in place below the stored layer (its version counter moves) or a module
    replaced there: the stored stream is not used, and the outputs are the edited model's."""
    layer0 = decoder_layers(tiny)[0]
    w = layer0.mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with reuse_prefixes(tiny) as cache:
            with hinting(tiny, [2]):
                teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
            with torch.no_grad():
                w.mul_(1.5)
            with ablate(tiny, [Head(2, 3)]):
                reused = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
            assert cache.hits == 0
        with ablate(tiny, [Head(2, 3)]):
            plain = teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
        _same(plain, reused)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_changes_outside_the_layers_or_a_capture_turn_reuse_off(tiny, tiny_samples):
    from rh.attention import capture_attention

    assert first_modified_layer(tiny) == tiny.shape.n_layers
    emb = tiny.model.model.embed_tokens
    h = emb.register_forward_hook(lambda m, a, o: o * 1.0)
    try:
        with ablate(tiny, [Head(3, 0)]):
            assert first_modified_layer(tiny) == 0
    finally:
        h.remove()
    with capture_attention(tiny):
        assert first_modified_layer(tiny) == 0
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)  # a counting hook changes nothing
    try:
        assert first_modified_layer(tiny) == tiny.shape.n_layers
    finally:
        handle.remove()


def test_transformers_output_capturing_hooks_leave_reuse_on(tiny_samples):
    """transformers installs a recording hook on every layer at the first forward that asks for
    hidden states or attentions, and keeps it: that must not turn prefix reuse off for the session
    (it did: first_modified_layer said 0), while any other hook still counts."""
    from rh.models import tiny_llama

    model = tiny_llama(seed=3, attn_implementation="eager")
    ids = torch.tensor([tiny_samples[0].input_ids])
    before = _hooks(model)
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    n_all = sum(len(m._forward_hooks) for m in model.model.modules())
    assert len(out.hidden_states) == model.shape.n_layers + 1 and n_all > model.shape.n_layers  # the hooks are there
    assert _hooks(model) == before
    assert first_modified_layer(model) == model.shape.n_layers
    with ablate(model, [Head(2, 1)]):
        assert first_modified_layer(model) == 2
    layer1 = decoder_layers(model)[1]
    h = layer1.register_forward_hook(lambda m, a, o: None)  # a hook of someone else's: it may change things
    try:
        assert first_modified_layer(model) == 1
    finally:
        h.remove()
    with reuse_prefixes(model) as cache:
        with hinting(model, [2]):
            base = teacher_forced(model, tiny_samples, batch_size=4, progress=False)
        with ablate(model, [Head(2, 1)]):
            ablated = teacher_forced(model, tiny_samples, batch_size=4, progress=False)
        assert cache.hits == 2  # both batches of the ablated pass started at layer 2
    with ablate(model, [Head(2, 1)]):
        _same(ablated, teacher_forced(model, tiny_samples, batch_size=4, progress=False))
    _same(base, teacher_forced(model, tiny_samples, batch_size=4, progress=False))


def test_the_layer_list_and_hooks_are_restored_when_a_pass_raises(tiny, tiny_samples):
    layers = tiny.model.model.layers
    with reuse_prefixes(tiny):
        with hinting(tiny, [2]):
            teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)

        def boom(module, args, kwargs):
            raise RuntimeError("boom")

        h = decoder_layers(tiny)[3].register_forward_pre_hook(boom, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                teacher_forced(tiny, tiny_samples, batch_size=6, progress=False)
        finally:
            h.remove()
    assert tiny.model.model.layers is layers and len(layers) == tiny.shape.n_layers
    assert _hooks(tiny) == 0


def test_the_byte_budget_evicts_the_least_recently_used(tiny, tiny_samples):
    """A budget of one stored stream keeps one; a budget below one stores nothing; the outputs stay
    the plain ones either way."""
    batch = tiny_samples[:3]
    with ablate(tiny, [Head(2, 2)]):
        plain = teacher_forced(tiny, tiny_samples, batch_size=3, progress=False)
    with reuse_prefixes(tiny) as probe, hinting(tiny, [2]):
        teacher_forced(tiny, batch, batch_size=3, progress=False)
        one = next(iter(probe.entries.values())).nbytes
    for budget, kept in ((one, 1), (one - 1, 0)):
        with reuse_prefixes(tiny, max_bytes=budget) as cache:
            with hinting(tiny, [2]):
                teacher_forced(tiny, batch, batch_size=3, progress=False)
            assert len(cache.entries) == kept and cache.nbytes <= budget
            with ablate(tiny, [Head(2, 2)]):
                got = teacher_forced(tiny, batch, batch_size=3, progress=False)
            assert cache.hits == kept
            with hinting(tiny, [2]):  # two batches through a budget of one: never over it
                teacher_forced(tiny, tiny_samples, batch_size=3, progress=False)
                assert cache.nbytes <= budget and len(cache.entries) <= 1
            assert cache.peak_nbytes == one * kept  # the most it held: one batch's stream, or none
            with ablate(tiny, [Head(2, 2)]):
                both = teacher_forced(tiny, tiny_samples, batch_size=3, progress=False)
        _same(plain.iloc[:3].reset_index(drop=True), got)
        _same(plain, both)


def test_a_capture_through_a_layer_runs_only_that_far_and_records_what_the_full_pass_records(tiny, tiny_samples):
    """Attention of layers 0..L does not depend on later layers: a capture through L equals the
    full capture there, counts (L + 1) x tokens token-layers, notes the rest as saved, and the
    layer list is whole after."""
    from rh.attention import capture_attention
    from rh.scoring import last_token_attention, score_samples

    from rh.budget import saved_token_layers

    full = score_samples(tiny, tiny_samples, "sum_attention", batch_size=6, progress=False).scores
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    before = saved_token_layers().get("shorter captures", 0)
    try:
        short = score_samples(tiny, tiny_samples, "sum_attention", batch_size=6, progress=False,
                              through_layer=1).scores
    finally:
        handle.remove()
    assert short.shape[1] == 2
    np.testing.assert_allclose(short, full[:, :2], rtol=0, atol=1e-6)
    tokens = sum(len(s.input_ids) for s in tiny_samples)  # equal lengths: no padding
    assert counter.total == 2 * tokens
    # the savings ledger: the two layers the plain capture would also have run (4 - 2), per token
    assert saved_token_layers()["shorter captures"] - before == (tiny.shape.n_layers - 2) * tokens
    heads = [Head(0, 1), Head(2, 3)]
    row = last_token_attention(tiny, tiny_samples[0], heads)
    with torch.no_grad(), capture_attention(tiny.model) as cap:
        tiny.model(input_ids=torch.tensor([tiny_samples[0].input_ids]), logits_to_keep=1, use_cache=False)
    ref = np.stack([cap.step(0)[h.layer][0, h.head].double().numpy() for h in heads])
    np.testing.assert_allclose(row, ref, rtol=0, atol=1e-6)
    assert len(tiny.model.model.layers) == tiny.shape.n_layers
    with pytest.raises(ValueError, match="through_layer=4"):
        with capture_attention(tiny.model, through_layer=4):
            pass
