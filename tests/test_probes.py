"""IV-5's probes: residuals at the last prompt token, cross-validated layer probes, the decision rule."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from rh.probes import answer_labels, decodable_after_heads, last_token_residuals, layer_probes
from rh.report import probe_figure



# ---------------------------------------------------------------------------- residuals


@pytest.fixture(scope="module")
def mixed(tiny, tiny_samples):
    """Two samples of different lengths, so a batch of both is left-padded."""
    from rh.niah import build_passkey_samples

    short = build_passkey_samples(tiny.tokenizer, lengths=[96], depths=[0.5], n_per_setting=1, seed=2,
                                  max_positions=tiny.max_positions)
    return [tiny_samples[1], short[0]]


def test_residuals_have_one_row_per_index_and_start_with_the_last_tokens_embedding(tiny_samples):
    # a model of its own: output_hidden_states=True below makes transformers leave its output-capturing
    # hooks on the layers, and other tests check that the shared `tiny` carries no hook
    from rh.models import tiny_llama

    tiny = tiny_llama(seed=0)
    res = last_token_residuals(tiny, tiny_samples[:2], batch_size=2, progress=False)
    n_layers, hidden = tiny.shape.n_layers, tiny.model.config.hidden_size
    assert res.shape == (2, n_layers + 1, hidden) and res.dtype == np.float32
    emb = tiny.model.get_input_embeddings().weight
    for i, s in enumerate(tiny_samples[:2]):
        np.testing.assert_allclose(res[i, 0], emb[s.input_ids[-1]].detach().numpy(), rtol=0, atol=1e-7)
    # indices 0..n_layers-1 are transformers' hidden states; the last is the un-normed residual,
    # where transformers returns the final norm's output
    ids = torch.tensor([list(tiny_samples[0].input_ids)])
    with torch.no_grad():
        hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(n_layers):
        np.testing.assert_allclose(res[0, i], hs[i][0, -1].numpy(), rtol=1e-5, atol=1e-5)
    normed = tiny.model.model.norm(torch.tensor(res[0, -1])[None])[0]
    np.testing.assert_allclose(normed.detach().numpy(), hs[-1][0, -1].numpy(), rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_each_sample_alone(tiny, mixed):
    assert len(mixed[0].input_ids) != len(mixed[1].input_ids)
    batched = last_token_residuals(tiny, mixed, batch_size=2, progress=False)  # longest last: order restored
    for i, s in enumerate(mixed):
        alone = last_token_residuals(tiny, [s], batch_size=1, progress=False)[0]
        np.testing.assert_allclose(batched[i], alone, rtol=1e-4, atol=1e-5)
    assert answer_labels(mixed).tolist() == [s.answer_ids[0] for s in mixed]


def test_residuals_read_as_work_units_equal_the_prompt_only_pass(tiny, mixed, tmp_path):
    """IV-5's residuals as a reading in prompt-only work units (rh.probes.read_residuals through
    the runner): each prompt's residuals as last_token_residuals reads them, in the caller's order,
    at its token-layers, and read again (not kept: too large for the store) when asked again.
    Catches a row read at the wrong position (the padding), indices paired with the wrong layer,
    rows paired with the wrong prompts, and a reading kept in the store."""
    from rh.budget import TokenLayerCounter
    from rh.probes import ResidualReading, read_residuals
    from rh.runner import ResultStore, Runner, use_runner

    order = [mixed[1], mixed[0]]
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        ref = last_token_residuals(tiny, order, batch_size=2, progress=False)
        plain = counter.total
        store = ResultStore(tmp_path / "rows.jsonl")
        with use_runner(tiny, Runner(tiny, store=store)) as runner:
            got = read_residuals(tiny, order, batch_size=2)
            assert counter.total - plain == plain  # the same forward
            again = read_residuals(tiny, order, batch_size=2)
            assert counter.total - plain == 2 * plain  # not kept: read again
            assert runner.prompts_read == 4 and not runner.computed and not store.reads
    finally:
        handle.remove()
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, got)
    assert ResidualReading.of(tiny).width == (tiny.shape.n_layers + 1) * tiny.model.config.hidden_size
    assert not (tmp_path / "rows.jsonl").exists() or '"read"' not in (tmp_path / "rows.jsonl").read_text()
    with pytest.raises(ValueError, match="opened on a model of"):
        with ResidualReading(tiny.shape.n_layers + 1, 8).open(tiny):
            pass


def test_residuals_read_in_the_baselines_forwards_equal_the_prompt_only_pass_at_no_pass_of_their_own(tiny, mixed):
    """IV-5 reads its residuals in the teacher-forced baseline forwards of CA-6's prompts
    (rh.probes.baseline_residuals): each prompt's residuals as the prompt-only pass reads them (the
    answer tokens after the last prompt token change nothing at it), its rows those of the plain
    baseline, and the token-layers those of the baseline alone. Catches the row read at the last
    answer token instead of the last prompt token, rows paired with the wrong prompts, and a second
    pass for the reading."""
    from rh.budget import TokenLayerCounter
    from rh.causal import evaluate_baseline
    from rh.probes import baseline_residuals
    from rh.runner import Runner, use_runner

    order = [mixed[1], mixed[0]]
    ref = last_token_residuals(tiny, order, batch_size=2, progress=False)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        with use_runner(tiny, Runner(tiny)):
            plain = evaluate_baseline(tiny, order, batch_size=2)
        cost = counter.total
        with use_runner(tiny, Runner(tiny)):
            frame, feats = baseline_residuals(tiny, order, batch_size=2)
        assert counter.total - cost == cost  # the baseline's forwards, nothing more
    finally:
        handle.remove()
    assert feats.shape == ref.shape and feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), plain.reset_index(drop=True))
    with pytest.raises(ValueError, match="samples is empty"):
        baseline_residuals(tiny, [])


# ---------------------------------------------------------------------------- probes


def test_random_labels_decode_nothing():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4, 16))
    y = rng.permutation(np.repeat(np.arange(3), 20))
    df = layer_probes(X, y, folds=5, progress=False)
    assert list(df["layer"]) == [0, 1, 2, 3]
    assert np.allclose(df["chance"], 1 / 3) and (df["n"] == 60).all()
    assert (df["accuracy"] < 1 / 3 + 0.2).all()
    from rh.stats import holm

    assert min(holm(df["p_value"].tolist())) >= 0.05
    v = decodable_after_heads(df, [1])
    assert v.inconclusive and "cannot be tested" in v.reason


def test_a_planted_linear_signal_is_decoded_from_its_layer_on():
    """Decodable from index 3 on, 60 samples. With the first write at index 3 the claim needs indices
    0-2 shown below chance + 0.1, which 60 samples cannot do for all of them: inconclusive, named
    (the rule once supported on not finding decoding there). First write at index 4: index 3 decodes
    far above chance + 0.1, refuted."""
    rng = np.random.default_rng(1)
    n, d = 60, 16
    y = np.repeat(np.arange(3), n // 3)
    X = rng.normal(size=(n, 5, d))
    centers = rng.normal(size=(3, d)) * 4
    X[:, 3:] += centers[y][:, None, :]  # decodable from index 3 on
    df = layer_probes(X, y, progress=False)
    assert (df.loc[df.layer >= 3, "accuracy"] > 0.95).all()
    assert (df.loc[df.layer >= 3, "p_value"] < 1e-15).all()
    assert (df.loc[df.layer < 3, "accuracy"] < 0.6).all()
    from scipy.stats import binomtest

    row = df.iloc[4]
    assert row.p_value == pytest.approx(binomtest(int(row.n_correct), n, 1 / 3, alternative="greater").pvalue)
    v = decodable_after_heads(df, [2])  # first write at index 3 = onset
    early = df.loc[df.layer < 3]
    p_below = [binomtest(int(k), n, 1 / 3 + 0.1, alternative="less").pvalue for k in early["n_correct"]]
    assert v.details["p_below_margin"][:3] == pytest.approx(p_below, abs=1e-6)  # rounded to 6 places
    assert max(p_below) >= 0.05 and v.inconclusive and "cannot be shown below chance + 0.1" in v.reason
    assert decodable_after_heads(df, [3]).refuted  # first write at index 4 > onset 3
    png = probe_figure(df, [2])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_singleton_classes_are_dropped_and_folds_shrink(caplog):
    rng = np.random.default_rng(2)
    y = np.array([0] * 3 + [1] * 3 + [7])
    X = rng.normal(size=(7, 2, 4))
    with caplog.at_level(logging.WARNING, logger="rh.probes"):
        df = layer_probes(X, y, folds=5, progress=False)
    assert "occurs once" in caplog.text
    assert (df["n"] == 6).all() and (df["folds"] == 3).all() and (df["chance"] == 0.5).all()
    one = layer_probes(X[:3], y[:3], progress=False)  # a single class: nothing to probe
    assert one["accuracy"].isna().all() and (one["p_value"] == 1.0).all()
    assert decodable_after_heads(one, [0]).inconclusive


# ---------------------------------------------------------------------------- decision rule


def _df(accuracy, *, n=40, chance=0.1):
    from scipy.stats import binomtest

    rows = []
    for i, a in enumerate(accuracy):
        k = int(round(a * n))
        rows.append({"layer": i, "accuracy": k / n, "n": n, "n_correct": k, "chance": chance,
                     "p_value": binomtest(k, n, chance, alternative="greater").pvalue})
    return pd.DataFrame(rows)


def test_decision_rule_on_hand_built_tables():
    """Support needs every early index shown below chance + δ and a late one above chance; refutation
    an early index shown above chance + δ. Catches support read off the absence of early decoding
    (40 samples cannot show it), and refutation from an early index above chance but not shown
    above chance + δ."""
    from scipy.stats import binomtest

    acc = [0.1, 0.1, 0.1, 0.1, 0.9, 1.0, 1.0]  # onset at index 4 (after layer 3)
    df = _df(acc, n=200)
    sup = decodable_after_heads(df, [3, 5])  # first write at index 4 = onset: "at"
    assert sup.supported and sup.effect == 0 and sup.details["onset"] == 4 and sup.statistic == 4
    below = binomtest(20, 200, 0.2, alternative="less").pvalue  # each early index: 20 of 200 against 0.2
    assert sup.p_value == pytest.approx(max(below, sup.details["p_adjusted"][4]), rel=1e-3)
    assert sup.p_adjusted < 0.05 and sup.details["critical_layers"] == [3, 5] and sup.min_effect == 0.1
    later = decodable_after_heads(df, [1])  # onset 4 after first write at 2: "after"
    assert later.supported and later.effect == 2
    ref = decodable_after_heads(df, [4, 5])  # decodable at 4, before layer 4 writes (index 5)
    assert ref.refuted and ref.effect == -1 and "before index 5" in ref.reason
    from rh.heads import Head

    assert decodable_after_heads(df, [Head(4, 1)]).refuted  # Heads are read as their layers
    unseen = decodable_after_heads(_df(acc, n=40), [3, 5])  # 4 of 40 cannot be shown below 0.2
    assert unseen.inconclusive and "cannot be shown below chance + 0.1" in unseen.reason
    slight = decodable_after_heads(_df([0.1, 0.25, 0.1, 0.9, 1.0], n=200), [2])  # index 1 above chance, not by δ
    assert slight.details["p_adjusted"][1] < 0.05 and slight.inconclusive
    none = decodable_after_heads(_df([0.1] * 7, n=200), [2])
    assert none.inconclusive and none.p_value is None
    few = decodable_after_heads(_df([0.0, 1.0, 1.0], n=4, chance=0.5), [0])  # 0.5**4 > 0.05/3
    assert few.inconclusive and "more samples" in few.reason
    with pytest.raises(ValueError, match="margin"):
        decodable_after_heads(df, [3], margin=0.95)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_the_fix():
    X = np.zeros((5, 3, 4))
    with pytest.raises(ValueError, match="features has 5 samples but labels has 4"):
        layer_probes(X, np.zeros(4), progress=False)
    with pytest.raises(ValueError, match=r"features must be \[n_samples, n_indices, hidden\]"):
        layer_probes(np.zeros((5, 4)), np.zeros(5), progress=False)
    df = _df([0.1, 0.1, 1.0])
    with pytest.raises(ValueError, match=r"critical layers \[2\] are outside the model's layers 0..1"):
        decodable_after_heads(df, [2])
    with pytest.raises(ValueError, match="critical_layers is empty"):
        decodable_after_heads(df, [])
    with pytest.raises(ValueError, match="lacks columns"):
        decodable_after_heads(df.drop(columns="p_value"), [0])


def test_probe_power_is_the_rules_own_rate_on_independent_indices():
    """The exact power equals the rate at which the rule itself supports (refutes) tables drawn at the
    stated alternatives with independent binomial indices (1,500 tables each, within 4 Monte-Carlo
    SE). Catches a wrong cut (cdf vs sf, off by one hit), Holm's level over the wrong count of
    indices, or early and late swapped."""
    from scipy.stats import binomtest

    from rh.probes import probe_power

    rng = np.random.default_rng(7)
    n, chance, margin, crit = 40, 0.2, 0.15, [2]  # first write at index 3: 3 early indices, 3 late ones
    m, early = 6, 3
    pw = probe_power(n, chance, margin, early=early, late=m - early, alpha=0.05)

    def table(acc):
        hits = rng.binomial(n, acc)
        return pd.DataFrame([{"layer": i, "accuracy": k / n, "n": n, "n_correct": int(k), "chance": chance,
                              "p_value": binomtest(int(k), n, chance, alternative="greater").pvalue}
                             for i, k in enumerate(hits)])

    alt = chance + 2 * margin
    reps = 1500
    sup = np.mean([decodable_after_heads(table([chance] * early + [alt] * (m - early)), crit, margin=margin).supported
                   for _ in range(reps)])
    ref = np.mean([decodable_after_heads(table([alt] * m), crit, margin=margin).refuted for _ in range(reps)])
    for got, want in ((sup, pw.support), (ref, pw.refute)):
        assert abs(got - want) <= 4 * np.sqrt(max(want * (1 - want), 1e-3) / reps), (got, want)
    assert 0.05 < pw.support < 0.95 and pw.refute > 0.5  # the check above is not at a trivial 0 or 1


def test_every_probe_verdict_carries_a_power():
    from rh.probes import probe_power

    v = decodable_after_heads(_df([0.1, 0.1, 0.1, 0.9, 0.9], n=40), [1])
    assert v.power.support is not None and v.power == probe_power(40, 0.1, 0.1, early=2, late=3, alpha=0.05)
    few = decodable_after_heads(_df([0.1, 0.9], n=3, chance=0.5), [0])  # no test can reject: inconclusive
    assert few.inconclusive and few.power.support == 0.0
