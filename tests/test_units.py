"""Work units (rh.units): declared forward passes, and the runner that puts rows of different
conditions side by side in one batch. Each check is against the separate passes
(``with ablate(...): teacher_forced(...)``) or a hand computation of the o_proj input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rh.ablation import Ablation, ablate, head_means
from rh.compression import Restriction
from rh.evaluate import teacher_forced
from rh.heads import Head
from rh.models import attention_modules
from rh.units import Unit, ablate_rows, run_units


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.model.modules())


def test_a_unit_is_a_hashable_value_that_survives_pickling():
    u = Unit(Ablation("random2#0", (Head(1, 2), Head(3, 0)), selection="random", draw=0), ("a", "b"))
    same = Unit(Ablation("random2#0", ("L1H2", "L3H0"), selection="random", draw=0), ["a", "b"])
    assert u == same and hash(u) == hash(same)  # heads parsed, ids a tuple: equal values, one key
    back = pickle.loads(pickle.dumps(u))
    assert back == u and back.condition.heads == (Head(1, 2), Head(3, 0))
    assert u != Unit(u.condition, ("a",)) and u.side_by_side
    assert not Unit(Ablation("q", (Head(0, 0),), "query"), ("a",)).side_by_side
    assert not Unit(Ablation("d", (Head(0, 0),), phase="decode"), ("a",)).side_by_side
    assert Unit(Ablation.baseline(), ("a",)).side_by_side
    w = Unit(Restriction("window-top2", ("L1H2", "L3H0"), sink=2, window=8), ("a",))
    assert pickle.loads(pickle.dumps(w)) == w and not w.side_by_side  # a restriction never shares a batch
    assert w != Unit(Restriction("window-top2", ("L1H2", "L3H0"), sink=2, window=9), ("a",))
    with pytest.raises(ValueError, match="at least one head"):
        Restriction("w", ())
    with pytest.raises(ValueError, match="window=0"):
        Restriction("w", ("L0H0",), window=0)


def test_bad_units_are_refused_naming_what_is_wrong(tiny, tiny_samples):
    with pytest.raises(TypeError, match="rh.ablation.Ablation"):
        Unit("top3", ("a",))
    with pytest.raises(ValueError, match="names no prompt"):
        Unit(Ablation.baseline(), ())
    with pytest.raises(KeyError, match="nope"):
        run_units(tiny, tiny_samples, [Unit(Ablation.baseline(), ("nope",))])


def test_each_row_gets_its_own_heads_zeroed_at_the_o_proj_input(tiny):
    """Against a hand computation: the o_proj input recorded before and after the per-row hook."""
    layer = 2
    o_proj = attention_modules(tiny)[layer].o_proj
    rows = [[Head(layer, 1), Head(layer, 6)], [], [Head(layer, 3), Head(0, 2)]]  # the last also touches layer 0
    seen = {}
    before = o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    n_hooks = _hooks(tiny)
    try:
        with ablate_rows(tiny, rows):
            after = o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0].clone()))
            try:
                with torch.no_grad():
                    tiny.model(input_ids=torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0)))
            finally:
                after.remove()
    finally:
        before.remove()
    assert _hooks(tiny) == n_hooks - 1  # ablate_rows left nothing behind (the recorder is gone too)
    d = tiny.shape.head_dim
    want = seen["x"].clone()
    for r, heads in enumerate(rows):
        for h in heads:
            if h.layer == layer:
                want[r, :, h.head * d:(h.head + 1) * d] = 0
    assert torch.equal(seen["y"], want)
    assert not torch.equal(seen["x"][0], seen["y"][0]) and torch.equal(seen["x"][1], seen["y"][1])


def test_a_forward_of_another_width_is_refused_and_the_hooks_go(tiny):
    n_hooks = _hooks(tiny)
    with pytest.raises(RuntimeError, match="2 rows; this forward has 3"):
        with ablate_rows(tiny, [[Head(1, 1)], [Head(1, 2)]]), torch.no_grad():
            tiny.model(input_ids=torch.ones(3, 8, dtype=torch.long))
    assert _hooks(tiny) == n_hooks


def test_units_side_by_side_give_the_separate_passes_outcomes(tiny, tiny_samples):
    """Random sets, the baseline, a set spanning layers, prompts shared between units, and the
    conditions that cannot share a batch (mean, query, decode-only, a window restriction) in one call: every frame equals
    the separate pass's (correctness and first argmax exactly, log-probabilities within 1e-5)."""
    ids = [s.id for s in tiny_samples]
    rng = np.random.default_rng(0)
    heads = tiny.shape.all_heads()
    means = head_means(tiny, tiny_samples, [Head(1, 0), Head(2, 5)])
    conds = [Ablation.baseline()]
    conds += [Ablation(f"random3#{d}", tuple(heads[i] for i in rng.choice(len(heads), 3, replace=False)),
                       selection="random", draw=d) for d in range(4)]
    conds += [Ablation("mean", (Head(1, 0), Head(2, 5)), "mean", reference=means),
              Ablation("query", (Head(3, 1),), "query"), Ablation("decode", (Head(0, 4), Head(3, 7)), phase="decode"),
              Restriction("window", (Head(0, 2), Head(1, 5), Head(3, 3)), sink=2, window=8)]
    units = [Unit(c, tuple(ids[j] for j in rng.choice(len(ids), int(rng.integers(1, len(ids) + 1)), replace=False)))
             for c in conds]
    n_hooks = _hooks(tiny)
    got = run_units(tiny, tiny_samples, units, batch_size=4)
    assert _hooks(tiny) == n_hooks
    by_id = {s.id: s for s in tiny_samples}
    for u, df in zip(units, got):
        with u.condition.open(tiny):
            want = teacher_forced(tiny, [by_id[i] for i in u.sample_ids], condition=u.condition.name, progress=False)
        assert list(df["id"]) == list(u.sample_ids) and set(df["condition"]) == {u.condition.name}
        assert list(df.columns) == list(want.columns)
        assert df["correct"].tolist() == want["correct"].tolist(), u.condition.name
        assert df["first_argmax"].tolist() == want["first_argmax"].tolist(), u.condition.name
        np.testing.assert_allclose(df["logprob"], want["logprob"], rtol=1e-5, atol=1e-5)
    # the ablations change something: the random sets' log-probs are not the baseline's
    base = teacher_forced(tiny, tiny_samples, progress=False).set_index("id")["logprob"]
    assert any(not np.allclose(df["logprob"], base.loc[list(df["id"])]) for df in got[1:5])
    assert not np.allclose(got[-1]["logprob"], base.loc[list(got[-1]["id"])])  # the window removed keys


def test_a_zero_ablation_unit_equals_ablate(tiny, tiny_samples):
    """The per-row hook and ``ablate``'s hook are two implementations of one intervention: on the
    same batch they give the same logits."""
    heads = [Head(0, 3), Head(2, 1), Head(2, 6)]
    [df] = run_units(tiny, tiny_samples, [Unit(Ablation("s", tuple(heads)), [s.id for s in tiny_samples])],
                     batch_size=len(tiny_samples))
    with ablate(tiny, heads):
        want = teacher_forced(tiny, tiny_samples, condition="s", batch_size=len(tiny_samples), progress=False)
    assert df["correct"].tolist() == want["correct"].tolist()
    np.testing.assert_array_equal(df["logprob"].to_numpy(), want["logprob"].to_numpy())


def _wu24_logprob(model, sample, heads, method, reference=None):
    """The gold answer's log-probability in Wu24's masking loop, written out: the prompt but its last
    token prefilled with no ablation, then the last prompt token and each answer token fed one at a
    time with the heads masked (every call a decoding step)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.model.config)
    ids = list(sample.input_ids)
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
        total = 0.0
        with ablate(model, heads, method, reference=reference):
            for inp, gold in zip([ids[-1], *sample.answer_ids[:-1]], sample.answer_ids):
                logits = model.model(input_ids=torch.tensor([[inp]]), cache=cache, use_cache=True).logits[0, -1]
                total += float(torch.log_softmax(logits.float(), -1)[gold])
    return total


def test_decode_phase_units_run_from_the_clean_prompts_cache_as_wu24s_loop(tiny, tiny_samples):
    """Decode-phase units (Wu24's protocol) of every method run as fan packets: one clean prefill per
    prompt, then each condition's answer steps. Each row equals the teacher-forced pass with the
    condition in the decode phase and Wu24's loop written out; the token-layers are the prefill
    (once, kept for later calls until a weight changes) plus the answer steps; the saving is noted;
    no hook stays; under --plain the units run as full passes."""
    from rh.budget import TokenLayerCounter, plain_passes, saved_token_layers
    from rh.units import forget_prefills, plan_packets

    rng = np.random.default_rng(3)
    heads = tiny.shape.all_heads()
    sets = [tuple(heads[i] for i in rng.choice(len(heads), 4, replace=False)) for _ in range(5)]
    means = head_means(tiny, tiny_samples, list(sets[0]))
    conds = [Ablation(f"random4#{d}", hs, phase="decode", selection="random", draw=d) for d, hs in enumerate(sets)]
    conds += [Ablation(m, sets[0], m, "decode", reference=means if m == "mean" else None)
              for m in ("mean", "query", "logits")]
    ids = tuple(s.id for s in tiny_samples)
    units = [Unit(c, ids) for c in conds]
    by_id = {s.id: s for s in tiny_samples}
    packets = plan_packets(units, by_id, 4)
    assert all(p.fan for p in packets) and len({p.sample_ids[0] for p in packets}) == len(ids)
    with plain_passes():
        assert not any(p.fan for p in plan_packets(units, by_id, 4))
    n_hooks, n_layers = _hooks(tiny), tiny.shape.n_layers
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    forget_prefills(tiny)
    saved = saved_token_layers().get("shared prefill", 0)
    try:
        got = run_units(tiny, tiny_samples, units, batch_size=4)
        first = counter.total
        again = run_units(tiny, tiny_samples, units[:1], batch_size=4)
        second = counter.total - first
        tiny.model.model.layers[1].mlp.down_proj.weight.add_(0.0)  # an in-place edit: the kept prefills go
        run_units(tiny, tiny_samples, units[:1], batch_size=4)
        third = counter.total - first - second
    finally:
        handle.remove()
    assert _hooks(tiny) == n_hooks
    prompts = sum(len(s.input_ids) - 1 for s in tiny_samples)
    steps = sum(len(s.answer_ids) for s in tiny_samples)
    assert first == (prompts + len(units) * steps) * n_layers  # one prefill per prompt, then answer steps only
    assert second == steps * n_layers and third == (prompts + steps) * n_layers
    full = sum(len(s.input_ids) + len(s.answer_ids) - 1 for s in tiny_samples)
    assert saved_token_layers()["shared prefill"] - saved == (len(units) + 2) * full * n_layers - first - second - third
    for u, df in zip(units, got):
        with u.condition.open(tiny):
            want = teacher_forced(tiny, tiny_samples, condition=u.condition.name, batch_size=4, progress=False)
        assert df["correct"].tolist() == want["correct"].tolist(), u.condition.name
        assert df["first_argmax"].tolist() == want["first_argmax"].tolist(), u.condition.name
        np.testing.assert_allclose(df["logprob"], want["logprob"], rtol=1e-5, atol=1e-5)
        c = u.condition
        hand = [_wu24_logprob(tiny, s, c.heads, c.method, c.reference) for s in tiny_samples]
        np.testing.assert_allclose(df["logprob"], hand, rtol=1e-5, atol=1e-5)
    # from the kept prefill, in a batch of its own: equal up to float32 rounding (1 ulp apart on an Intel AMX machine)
    np.testing.assert_allclose(again[0]["logprob"], got[0]["logprob"], rtol=1e-6, atol=0)
    clean = teacher_forced(tiny, tiny_samples, progress=False)
    assert all(not np.allclose(df["logprob"], clean["logprob"], atol=1e-4) for df in got)
