"""IV-6's attribution: the direct-logit target, captum IG's completeness on the tiny model, the
needle mass ratio and the decision rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rh.attribution import (
    attribution_concentrates,
    integrated_gradients,
    needle_mass_ratio,
    target_value,
)
from rh.heads import Head
from rh.report import attribution_figure


HEADS = [Head(1, 2), Head(2, 5), Head(2, 0)]


@pytest.fixture(scope="module")
def short(tiny):
    """One 96-token passkey prompt: IG runs n_steps forwards and backwards, so keep it short."""
    from rh.niah import build_passkey_samples

    return build_passkey_samples(tiny.tokenizer, lengths=[96], depths=[0.5], n_per_setting=1, seed=3,
                                 max_positions=tiny.max_positions)[0]


def test_the_target_is_the_heads_direct_logit_attribution(tiny, short):
    """Recomputed by hand: capture the o_proj inputs, project through W_O, the final norm's weight
    over the clean RMS, and the answer token's unembedding row."""
    hf = tiny.model
    d = tiny.shape.head_dim
    seen = {}
    hooks = [hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, _l=l: seen.__setitem__(_l, args[0][0, -1].clone())) for l in (1, 2)]
    hooks.append(hf.model.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("res", args[0][0, -1])))
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([list(short.input_ids)])).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    a = short.answer_ids[0]
    res = seen["res"].double()
    rms = torch.sqrt(res.pow(2).mean() + hf.model.norm.variance_epsilon)
    u = hf.lm_head.weight[a].double() * hf.model.norm.weight.double() / rms
    want = sum(float(u @ (hf.model.layers[h.layer].self_attn.o_proj.weight[:, h.head * d:(h.head + 1) * d].double()
                          @ seen[h.layer][h.head * d:(h.head + 1) * d].double())) for h in HEADS)
    assert target_value(tiny, short, HEADS) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert target_value(tiny, short, ["L1H2"]) != pytest.approx(want)
    # heads=None: the answer token's full logit
    assert target_value(tiny, short, None) == pytest.approx(float(logits[a]), rel=1e-4, abs=1e-5)


def test_ig_completeness_holds_on_the_tiny_model_in_fp32(tiny, short, caplog):
    # a token's embedding as the baseline keeps the path away from all-zero embeddings, where every
    # RMSNorm amplifies a vanishing residual by 1/sqrt(eps) and F jumps at the baseline
    the = tiny.tokenizer(" the", add_special_tokens=False).input_ids[0]
    with caplog.at_level(logging.WARNING, logger="rh.attribution"):
        attr = integrated_gradients(tiny, short, HEADS, n_steps=16, baseline=the)
    assert "zero vector" not in caplog.text
    assert attr.token_attr.shape == (len(short.input_ids),)
    assert attr.dtype == "float32" and attr.heads == HEADS and attr.sample_id == short.id
    assert attr.f_input == pytest.approx(target_value(tiny, short, HEADS), rel=1e-5, abs=1e-7)
    assert abs(attr.f_input - attr.f_baseline) > 1e-3
    assert attr.completeness_error < 1e-3
    assert attr.delta == pytest.approx(attr.token_attr.sum() - (attr.f_input - attr.f_baseline), abs=1e-4)
    assert attr.needle_mass_ratio == pytest.approx(needle_mass_ratio(attr.token_attr, short.needle_span))
    png = attribution_figure(attr.token_attr, short.needle_span, "test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_zero_baseline_is_flagged(tiny, short, caplog):
    """The tiny model's pad row is zero (``padding_idx``): the 'pad' baseline is as singular as 'zeros'."""
    assert float(tiny.model.get_input_embeddings().weight[tiny.tokenizer.pad_token_id].abs().max()) == 0.0
    with caplog.at_level(logging.WARNING, logger="rh.attribution"):
        attr = integrated_gradients(tiny, short, [Head(0, 1)], n_steps=2)
    assert "zero vector" in caplog.text and attr.f_baseline == 0.0


def test_needle_mass_ratio_on_a_hand_made_vector():
    attr = np.array([1.0, -1.0, 4.0, -4.0, 0.0, 2.0, 0.0, 0.0])  # |attr| sums to 12
    # needle [2, 4): |4| + |-4| = 8 of 12, over 2 of 8 tokens: (8/12) / (2/8) = 8/3
    assert needle_mass_ratio(attr, (2, 4)) == pytest.approx(8 / 3)
    assert needle_mass_ratio(np.ones(10), (3, 7)) == pytest.approx(1.0)
    assert needle_mass_ratio(attr, (6, 8)) == 0.0


def test_verdict_rule():
    rng = np.random.default_rng(0)
    high = np.exp(rng.normal(1.0, 0.3, size=12))
    v = attribution_concentrates(high)
    assert v.supported and v.claim == "IV-6" and v.effect == pytest.approx(np.log(np.median(high)))
    lo, hi = v.ci
    assert lo <= v.effect <= hi and v.p_value < 0.001
    flat = np.exp(rng.normal(-0.5, 0.3, size=12))
    assert attribution_concentrates(flat).refuted
    few = attribution_concentrates(high[:4])  # 0.5**4 = 0.0625 cannot pass 0.05
    assert few.inconclusive and "cannot reach" in few.reason
    errs = np.full(12, 0.01)
    errs[3] = 0.4
    bad = attribution_concentrates(high, completeness_errors=errs, sample_ids=[f"s{i}" for i in range(12)])
    assert bad.inconclusive and "s3 (0.4)" in bad.reason and bad.details["failed"] == ["s3"]
    assert attribution_concentrates(high, completeness_errors=errs, tolerance=0.5).supported


def test_every_iv6_verdict_states_its_power():
    """The sign tests' power at the verdict's size, also where IG completeness fails (the same n, the
    same rule) and exactly 0 where the prompts are too few for any sign test to reach α. Catches a
    failed-completeness verdict stated without power, or with another number than the decided one."""
    from math import comb

    from scipy.stats import norm

    rng = np.random.default_rng(0)
    high = np.exp(rng.normal(1.0, 0.3, size=12))
    errs = np.full(12, 0.01)
    errs[3] = 0.4
    decided = attribution_concentrates(high)
    bad = attribution_concentrates(high, completeness_errors=errs)
    assert bad.inconclusive and bad.power == decided.power
    # by hand: 12 prompts, the sign test rejects at 10 or more positives (P = 79/4096 < 0.05; 9: 0.073);
    # support planted at a median ratio of 2 (Δ), log ratios normal at their spread
    q = float(norm.cdf(np.log(2.0) / np.log(high).std(ddof=1)))
    hand = sum(comb(12, j) * q ** j * (1 - q) ** (12 - j) for j in range(10, 13))
    assert decided.power.support == pytest.approx(hand, abs=1e-12) and decided.power.support_at == pytest.approx(2.0)
    few = attribution_concentrates(high[:4])
    assert (few.power.support, few.power.refute) == (0.0, 0.0)


def test_bad_input_is_refused_with_the_fix(tiny, short):
    with pytest.raises(ValueError, match=r"heads: head L4H0 is outside the model: it has layers 0..3"):
        integrated_gradients(tiny, short, [Head(4, 0)], n_steps=2)
    with pytest.raises(ValueError, match="heads is empty"):
        target_value(tiny, short, [])
    with pytest.raises(ValueError, match=r"needle_span \(90, 100\) is outside the sequence of 96 tokens"):
        needle_mass_ratio(np.ones(96), (90, 100))
    import dataclasses

    broken = dataclasses.replace(short, needle_span=(10, 999))
    with pytest.raises(ValueError, match="needle_span .* is outside its 96 tokens"):
        integrated_gradients(tiny, broken, HEADS, n_steps=2)
    with pytest.raises(ValueError, match="3 completeness_errors for 12 ratios"):
        attribution_concentrates(np.ones(12), completeness_errors=[0, 0, 0])
    with pytest.raises(ValueError, match="baseline='nope'"):
        integrated_gradients(tiny, short, HEADS, n_steps=2, baseline="nope")


def test_attributions_run_as_tasks_of_the_runner_in_order_and_stop_where_asked(tiny):
    """rh.attribution.attribute: each prompt's integrated gradients as run directly, in the callers'
    order, through the model's runner (rh.runner.Runner.call), at the same token-layers; with
    ``until``, no prompt after the first one where it holds (one replica: waves of one). An
    executor that cannot run tasks, or a model with an intervention on, runs them here. Catches
    results paired with the wrong prompt, a stop that reads past the first prompt off completeness,
    and passes that escape the bill."""
    from rh.ablation import ablate
    from rh.attribution import attribute
    from rh.budget import TokenLayerCounter
    from rh.niah import build_passkey_samples
    from rh.runner import LocalExecutor, Runner, use_runner

    samples = build_passkey_samples(tiny.tokenizer, lengths=[96, 112], depths=[0.0, 1.0], n_per_setting=1, seed=5,
                                    max_positions=tiny.max_positions)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        direct = [integrated_gradients(tiny, s, HEADS, n_steps=4) for s in samples]
        tl = counter.total
        got = attribute(tiny, samples, HEADS, n_steps=4)
        assert counter.total == 2 * tl
        chunked = attribute(tiny, samples, HEADS, n_steps=4, internal_batch_size=3)  # path points 3, then 1
        assert counter.total == 3 * tl  # the memory bound runs the same tokens
        seen = []
        stopped = attribute(tiny, samples, HEADS, n_steps=4, until=lambda a: seen.append(a.sample_id) or len(seen) == 2)
        assert [a.sample_id for a in stopped] == [s.id for s in samples[:2]]

        class NoTasks(LocalExecutor):
            call = None

        with use_runner(tiny, Runner(tiny, executor=NoTasks(tiny))):
            here = attribute(tiny, samples[:1], HEADS, n_steps=4)
        with ablate(tiny, [Head(0, 3)]):
            hooked = attribute(tiny, samples[:1], HEADS, n_steps=4)
            want = integrated_gradients(tiny, samples[0], HEADS, n_steps=4)
    finally:
        handle.remove()
    assert [a.sample_id for a in got] == [s.id for s in samples]
    for a, b in zip(chunked, direct):  # the gradients summed in other chunks: equal to float32 rounding
        np.testing.assert_allclose(a.token_attr, b.token_attr, rtol=1e-5, atol=1e-8)
        assert a.completeness_error == pytest.approx(b.completeness_error, abs=1e-6)
    for a, b in zip(got, direct):
        np.testing.assert_allclose(a.token_attr, b.token_attr, rtol=1e-6, atol=1e-9)
        assert a.completeness_error == pytest.approx(b.completeness_error, abs=1e-9)
    np.testing.assert_allclose(here[0].token_attr, direct[0].token_attr, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(hooked[0].token_attr, want.token_attr, rtol=1e-6, atol=1e-9)
    assert not np.allclose(want.token_attr, direct[0].token_attr)  # the intervention was on
