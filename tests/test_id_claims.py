"""Identification claims' decision rules on hand-made inputs, and the ID-2 ratio against eager attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rh.heads import Head, HeadShape
from rh.id_claims import general_heads_exist, needle_mass_per_head, needle_mass_ratios, sparsity, variants_share_heads
from rh.rankings import Ranking
from rh.scoring import SampleScores



def test_needle_mass_ratio_equals_eager_attention(tiny, tiny_eager, tiny_samples):
    heads = [Head(1, 2), Head(3, 5)]
    got = needle_mass_ratios(tiny, tiny_samples, heads, batch_size=4)
    for s, g in zip(tiny_samples, got):
        with torch.no_grad():
            att = tiny_eager.model(input_ids=torch.tensor([s.input_ids]), output_attentions=True).attentions
        a, b = s.needle_span
        want = np.mean([float(att[h.layer][0, h.head, -1, a:b].sum()) / (b - a) * len(s.input_ids) for h in heads])
        assert g == pytest.approx(want, rel=1e-4)


def _scores(n_trials, n_heads, strong, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 0.02, (n_trials, n_heads))
    s[:, :strong] = rng.uniform(0.5, 0.9, (n_trials, strong))
    return SampleScores("wu24", [str(i) for i in range(n_trials)], s[:, None, :], np.ones(n_trials, bool),
                        [{} for _ in range(n_trials)])


def test_sparsity_is_decided_by_where_the_count_bounds_lie():
    """At the quick profile's 64 trials: 2 of 200 heads above (1%) is supported, 30 (15%) refuted;
    9 (4.5%, the limit being 10) still supported, 11 refuted; 30 trials cannot show the rest below."""
    v = sparsity(_scores(64, 200, 2))
    assert v.supported and v.details["count_bounds"] == [2, 2]
    assert sparsity(_scores(64, 200, 9)).supported and sparsity(_scores(64, 200, 11)).refuted
    dense = sparsity(_scores(64, 200, 30))
    assert dense.refuted and dense.statistic == pytest.approx(0.15)
    short = sparsity(_scores(30, 200, 2))  # an all-zero head's p is 0.055 at 30 trials: above alpha / 10
    assert short.inconclusive
    few = sparsity(_scores(3, 200, 2))
    assert few.inconclusive and "trials" in few.reason


def test_betting_p_values_are_valid_for_any_distribution_on_the_unit_interval():
    """At the boundary mean, P(p <= a) <= a for Bernoulli, zero-inflated and skewed scores (20,000
    simulated heads of 64 trials each, both directions), and an all-zero head's p is near (1 - t)^n."""
    from rh.rules.claims import betting_p_below

    rng = np.random.default_rng(3)
    n, heads, m = 64, 20_000, 0.1
    shapes = {"bernoulli": (rng.random((n, heads)) < m).astype(float),
              "zero-inflated": (rng.random((n, heads)) < 0.2) * rng.uniform(0.3, 0.7, (n, heads)),
              "beta": rng.beta(0.2, 1.8, (n, heads))}
    for name, x in shapes.items():
        for a in (0.05, 0.01, 0.0036):
            assert (betting_p_below(x, m) <= a).mean() <= a + 3 * np.sqrt(a / heads), (name, a)
            assert (betting_p_below(1 - x, 1 - m) <= a).mean() <= a + 3 * np.sqrt(a / heads), (name, a)
    assert 0.9 ** 64 <= betting_p_below(np.zeros((64, 1)), 0.1)[0] < 2 * 0.9 ** 64


def test_count_bounds_follow_their_definition_by_enumerating_the_sets():
    """u: the smallest value from which every "N >= w + 1" is rejected, each rejection checked over
    every set of w + 1 heads (Rüger's j-th order statistic within the set); l likewise over sets of
    H - w + 1 heads. Brute force over all subsets of 7 heads."""
    from itertools import combinations

    from rh.rules.claims import count_bounds

    rng = np.random.default_rng(4)
    heads, alpha = 7, 0.05
    for trial in range(60):
        pb = rng.choice([1e-4, 0.003, 0.01, 0.03, 0.2, 1.0], heads)
        pa = rng.choice([1e-4, 0.003, 0.01, 0.03, 0.2, 1.0], heads)
        need = int(rng.integers(1, heads + 1))

        def rejects_at_least(w):  # "N >= w + 1"
            r = max(min(w, need - 1), w // 2)
            j = w + 1 - r
            return all(sorted(pb[list(s)])[j - 1] <= j * alpha / (w + 1) for s in combinations(range(heads), w + 1))

        def rejects_at_most(w):  # "N <= w - 1": every set of heads - w + 1 heads holds one shown above
            size = heads - w + 1
            return all(min(pa[list(s)]) <= alpha / size for s in combinations(range(heads), size))

        u = min(x for x in range(heads + 1) if all(rejects_at_least(w) for w in range(x, heads)))
        lo = max(x for x in range(heads + 1) if all(rejects_at_most(w) for w in range(1, x + 1)))
        assert count_bounds(pb, pa, alpha, need) == (lo, max(u, lo)), (trial, pb, pa, need)


def _ranking(shape, seed):
    rng = np.random.default_rng(seed)
    return Ranking("t", shape, {h: float(v) for h, v in zip(shape.all_heads(), rng.random(shape.n_total))})


def test_general_heads_are_tested_per_head_on_fresh_prompts(tiny, tiny_samples):
    same = _ranking(tiny.shape, 0)
    heads = same.top(3)
    per = needle_mass_per_head(tiny, tiny_samples, heads, batch_size=4)
    assert per.shape == (len(tiny_samples), 3)
    np.testing.assert_allclose(per.mean(axis=1), needle_mass_ratios(tiny, tiny_samples, heads, batch_size=4), rtol=1e-5)
    tasks = {"a": tiny_samples, "b": tiny_samples}
    v = general_heads_exist(tiny, {"a": same, "b": same}, tasks, k=3, accuracy={"a": 0.9, "b": 0.9})
    assert v.details["candidates"] == [str(h) for h in heads] and set(v.details["per_head"]) == set(v.details["candidates"])
    # a model that does not retrieve on a task has no general heads to find, whatever its attention does
    low = general_heads_exist(tiny, {"a": same, "b": same}, tasks, k=3, accuracy={"a": 0.0, "b": 0.9})
    assert low.inconclusive and "floor" in low.reason
    assert general_heads_exist(tiny, {"a": same}, {"a": tiny_samples}, k=3, accuracy={"a": 0.9}).inconclusive


def test_variants_claim_is_inconclusive_without_a_pair_and_compares_other_shapes_on_their_shared_heads():
    """One variant: inconclusive. Rankings of 4x4 and 5x4 heads drawn from one seed score the 16
    heads of layers 0-3 alike, so on the heads both have the top 3 coincide (p = 1 / C(16, 3)); a
    top 9 among 16 shared heads is refused (any two 9-sets of 16 overlap). Catches a shape mismatch
    left inconclusive, and a restriction that takes other heads than the shared ones."""
    a = _ranking(HeadShape(4, 4, 2, 4), 1)
    b = _ranking(HeadShape(5, 4, 2, 4), 1)
    assert variants_share_heads(a, None, k=3).inconclusive
    v = variants_share_heads(a, b, k=3)
    assert v.supported and v.statistic == 3 and v.n == 16 and v.p_value == pytest.approx(1 / 560)
    assert "on the 16 heads both models have" in v.reason
    few = variants_share_heads(a, b, k=9)
    assert few.inconclusive and "share only 16 heads" in few.reason and "fewer than 2K = 18" in few.reason
    assert variants_share_heads(a, a, k=3).statistic == 3


def test_id6_power_names_the_overlap_that_supports_and_that_it_never_refutes():
    """Top 3 of 16 heads: P(X >= 2) = (3 x 13 + 1) / 560 = 0.071 and P(X >= 3) = 1/560, so the rule
    supports exactly from 3 shared heads on: power 1 at an effect of 3 - 9/16, and 0 to refute, as
    nothing can refute. Catches the tail taken as P(X > o) (which would name 2), the critical
    overlap stated as a count instead of the effect's units, and verdicts left without power."""
    a = _ranking(HeadShape(4, 4, 2, 4), 1)
    b = _ranking(HeadShape(5, 4, 2, 4), 1)
    v = variants_share_heads(a, b, k=3)
    assert (v.power.support, v.power.refute, v.power.refute_at) == (1.0, 0.0, 0.0)
    assert v.power.support_at == pytest.approx(3 - 9 / 16) and "3 or more of the top 3" in v.power.note
    assert v.effect >= v.power.support_at  # supported: its effect is at least the critical one
    one = variants_share_heads(a, None, k=3)
    assert one.power.method == "none" and "one variant" in one.power.note
    few = variants_share_heads(a, b, k=9)
    assert (few.power.support, few.power.refute) == (0.0, 0.0)
    tight = variants_share_heads(_ranking(HeadShape(1, 4, 2, 4), 1), _ranking(HeadShape(1, 4, 2, 4), 2), k=1)
    assert tight.power.support == 0.0 and "never supported" in tight.power.note  # 1 of 4: p >= 1/4


def _eager_sum_attention(eager_model, samples) -> np.ndarray:
    """``[layers, heads]``: each head's sum attention on the needle, averaged over the samples, from
    transformers' eager attention weights (what a sum-attention ranking orders heads by)."""
    from reference import eager_needle_attention

    return np.mean([eager_needle_attention(eager_model, s) for s in samples], axis=0)


def _overlap_by_hand(sa: np.ndarray, sb: np.ndarray, k: int) -> dict:
    """ID-6's numbers from two score grids: the grid both have (the smaller layer and head counts),
    each grid's top k there (ties by layer, then head), their overlap, its hypergeometric tail
    P(X >= overlap) with scipy, the chance expectation and Spearman's rho over the shared heads."""
    from scipy import stats

    n_layers, n_heads = min(sa.shape[0], sb.shape[0]), min(sa.shape[1], sb.shape[1])
    a, b = sa[:n_layers, :n_heads], sb[:n_layers, :n_heads]
    grid = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    top = lambda s: {Head(*h) for h in sorted(grid, key=lambda h: (-s[h], h))[:k]}  # noqa: E731
    top_a, top_b = top(a), top(b)
    n = n_layers * n_heads
    overlap = len(top_a & top_b)
    return {"n": n, "overlap": overlap, "p": float(stats.hypergeom.sf(overlap - 1, n, k, k)),
            "expected": k * k / n, "rho": float(stats.spearmanr(a.ravel(), b.ravel()).statistic),
            "top_a": top_a, "top_b": top_b}


@pytest.mark.parametrize("other", [{}, {"n_layers": 5, "n_heads": 4, "n_kv_heads": 2}],
                         ids=["same shape", "other shape"])
def test_id6_on_two_tiny_llamas_equals_the_overlap_test_by_hand(tiny, tiny_eager, tiny_samples, other):
    """ID-6 through the real path (sum-attention rankings of the tiny Llama and of a second random
    Llama, seed 1, by rh.scoring.identify) against the top-K overlap computed by hand from eager
    attention: same shape over all 32 heads; a 5-layer x 4-head second model over the 16 heads
    both have (layers 0-3, heads 0-3), its reason and details saying so. Catches a verdict taken
    over the wrong population (the full grid, or top-K sets cut before restricting), a wrong
    hypergeometric tail or chance level, and a capture left on either model."""
    from rh.models import tiny_llama
    from rh.scoring import identify

    k = 4
    second = tiny_llama(seed=1, **other)
    second_eager = tiny_llama(seed=1, attn_implementation="eager", **other)
    ra = identify(tiny, tiny_samples, "sum_attention", progress=False)
    rb = identify(second, tiny_samples, "sum_attention", progress=False)
    v = variants_share_heads(ra, rb, k=k, names=("seed0", "seed1"))
    want = _overlap_by_hand(_eager_sum_attention(tiny_eager, tiny_samples),
                            _eager_sum_attention(second_eager, tiny_samples), k)
    assert v.status == ("supported" if want["p"] < 0.05 and want["overlap"] > want["expected"] else "inconclusive")
    assert v.statistic == want["overlap"] and v.n == want["n"] == (16 if other else 32)
    assert v.p_value == pytest.approx(want["p"], rel=1e-9)
    assert v.details["expected"] == pytest.approx(want["expected"])
    assert v.details["spearman_rho"] == pytest.approx(want["rho"], abs=1e-6)
    assert set(v.details["top_a"]) == {str(h) for h in want["top_a"]}
    assert set(v.details["top_b"]) == {str(h) for h in want["top_b"]}
    if other:
        assert v.details["heads_compared"] == {"scope": "shared heads", "n": 16, "n_layers": 4, "n_heads": 4,
                                               "models": ["seed0", "seed1"], "shapes": [[4, 8], [5, 4]]}
        assert ("on the 16 heads both models have (layers 0-3 x heads 0-3; the shapes differ: seed0 4 layers x 8 "
                "heads, seed1 5 x 4)") in v.reason and "Spearman rho over the 16 shared heads" in v.reason
    else:
        assert "heads_compared" not in v.details and "over all 32 heads" in v.reason
    for m in (tiny, second):
        assert m.model.config._attn_implementation == "sdpa"
        assert not any(m_._forward_pre_hooks or m_._forward_hooks for m_ in m.model.modules())


# --------------------------------------------------------------------------- ID-5's capture beside the baselines


@pytest.fixture(scope="module")
def mixed_tasks(tiny):
    """Three tasks' prompts of two lengths (112 and 128 tokens) whose answers take 1 to 7 tokens:
    teacher-forced batches of 4 pad their rows by different amounts, and differently from the
    prompt-only batches of the same prompts."""
    from rh.niah import Sweep, build_samples

    sweep = Sweep((112, 128), (0.0, 0.5, 1.0), 2, ("passkey", "employee_count", "hq_state"), seed=3)
    samples = build_samples(tiny.tokenizer, sweep, max_positions=tiny.max_positions)
    return {t: [s for s in samples if s.task == t] for t in sweep.tasks}


def _separate_pass(model, samples, heads, batch_size):
    """The reference: ID-5's capture as it ran before it moved into the baselines' forwards, a
    pass of its own over the prompts alone, read at the last query row (the last prompt token),
    needle span shifted by the prompt-only batch's padding, over the uniform share 1/len(prompt)."""
    from rh.attention import capture_attention
    from rh.batching import make_batches

    out = {}
    for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
        with torch.no_grad(), capture_attention(model.model) as cap:
            model.model(**batch.model_inputs(model.device), use_cache=False)
        probs = cap.step(0)  # per layer [b, heads, kv]
        for r, s in enumerate(batch.samples):
            a, b = batch.needle_span(r)
            uniform = (s.needle_span[1] - s.needle_span[0]) / len(s.input_ids)
            out[s.id] = [float(probs[h.layer][r, h.head, a:b].double().sum()) / uniform for h in heads]
    return np.array([out[s.id] for s in samples])


def test_id5_needle_mass_read_beside_the_task_baselines_equals_its_own_pass(tiny, mixed_tasks):
    """The shared pass gives ID-5 the numbers its own pass gave (1e-5 relative, fp32), the baseline
    outcomes of the plain baseline pass and its token-layers, and ID-5 then runs nothing. Catches
    reading the wrong query row of the teacher-forced pass (its last position is the answer's
    second-to-last token, not the prompt's last; rows of different answer lengths sit at different
    offsets from the end) and a needle span not shifted by that batch's own padding."""
    from rh.batching import make_batches
    from rh.budget import TokenLayerCounter
    from rh.causal import evaluate_baseline
    from rh.id_claims import id5_candidates, task_baselines

    same = _ranking(tiny.shape, 0)
    rankings = {t: same for t in mixed_tasks}
    heads = id5_candidates(rankings, 6)
    assert len({h.layer for h in heads}) >= 3
    pads = [b.pad for t in mixed_tasks for b in make_batches(mixed_tasks[t], 4, tiny.tokenizer.pad_token_id,
                                                                with_answer=True)]
    assert any(len(set(p)) > 2 for p in pads)  # rows of one batch end their prompts at different offsets

    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        counter.label = "plain"
        plain = {t: evaluate_baseline(tiny, s, batch_size=4) for t, s in mixed_tasks.items()}
        counter.label = "shared"
        shared = task_baselines(tiny, mixed_tasks, rankings, k=6, batch_size=4)
        counter.label = "ID-5"
        acc = {t: 0.9 for t in mixed_tasks}
        v = general_heads_exist(tiny, rankings, mixed_tasks, k=6, accuracy=acc, batch_size=4,
                                needle_mass=shared.needle_mass)
    finally:
        handle.remove()
    assert counter.counts["shared"] == counter.counts["plain"] > 0 and counter.counts.get("ID-5", 0) == 0
    assert shared.needle_mass is not None and shared.needle_mass.heads == tuple(heads)
    for t, samples in mixed_tasks.items():
        want = _separate_pass(tiny, samples, heads, batch_size=4)
        np.testing.assert_allclose(shared.needle_mass.ratios[t], want, rtol=1e-5)
        assert shared[t]["correct"].tolist() == plain[t]["correct"].tolist()
        np.testing.assert_allclose(shared[t]["logprob"], plain[t]["logprob"], rtol=1e-5)
    old = general_heads_exist(tiny, rankings, mixed_tasks, k=6, accuracy=acc, batch_size=4)
    assert (v.status, v.statistic) == (old.status, old.statistic)
    for h, got in v.details["per_head"].items():
        want = old.details["per_head"][h]
        p_values = [k for k in want if k.startswith("p_")]
        assert p_values and {k: got[k] for k in p_values} == {k: want[k] for k in p_values}
        assert got["median_ratio_per_task"] == pytest.approx(want["median_ratio_per_task"], rel=1e-5)
    with pytest.raises(ValueError, match="candidates"):
        general_heads_exist(tiny, rankings, mixed_tasks, k=5, accuracy=acc, needle_mass=shared.needle_mass)


def test_the_shared_pass_keeps_the_prefix_ca4_starts_from(tiny, mixed_tasks):
    """Under prefix reuse with CA-4's hint (the general heads' first layer), the baselines that read
    ID-5's needle mass store the residual stream there, and the ablated passes start from it.
    Catches reading through an attention capture (it reads every layer, so the pass may neither keep
    nor reuse a prefix), which would quietly cost CA-4 its prefix saving."""
    from rh.ablation import ablate
    from rh.evaluate import teacher_forced
    from rh.id_claims import id5_candidates, task_baselines
    from rh.prefix import first_layers, hinting, reuse_prefixes

    rankings = {t: _ranking(tiny.shape, 0) for t in mixed_tasks}
    heads = id5_candidates(rankings, 3)  # layers 1 and 3
    first = min(h.layer for h in heads)
    assert first > 0
    with reuse_prefixes(tiny) as cache:
        with hinting(tiny, first_layers([heads])):
            got = task_baselines(tiny, mixed_tasks, rankings, k=3, batch_size=4)
        assert got.needle_mass is not None
        assert {layer for (_, layer) in cache.entries} == {first}
        hits = cache.hits
        with ablate(tiny, heads):
            teacher_forced(tiny, mixed_tasks["passkey"], batch_size=4, progress=False)
        assert cache.hits > hits and cache.token_layers_saved > 0


def test_a_resumed_run_serves_the_needle_mass_from_the_store_and_reads_it_where_only_the_rows_are(tiny, mixed_tasks,
                                                                                                     tmp_path):
    """The needle mass is stored beside the baseline rows (one file, read back by a new store): a
    resumed run serves rows and mass with no forward at all, the same numbers. A store that holds
    the rows but not the mass (written by a claim that read nothing) has those rows computed again
    with the reading, in the plain baseline's forwards and token-layers, never a pass of ID-5's own.
    Catches a reading lost on resume (ID-5 would then see no forward), a row served without its
    mass, and a mass keyed by the prompt alone (another head set's mass would be served)."""
    from rh.budget import TokenLayerCounter
    from rh.causal import evaluate_baseline
    from rh.id_claims import id5_candidates, task_baselines
    from rh.runner import ResultStore, Runner, use_runner

    rankings = {t: _ranking(tiny.shape, 0) for t in mixed_tasks}
    heads = id5_candidates(rankings, 6)
    path = tmp_path / "rows.jsonl"
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        counter.label = "first"
        with use_runner(tiny, Runner(tiny, store=ResultStore(path))):
            first = task_baselines(tiny, mixed_tasks, rankings, k=6, batch_size=4)
        counter.label = "resumed"
        with use_runner(tiny, Runner(tiny, store=ResultStore(path))) as runner:
            again = task_baselines(tiny, mixed_tasks, rankings, k=6, batch_size=4)
            assert runner.computed == 0 and runner.reused == sum(len(s) for s in mixed_tasks.values())
        # rows alone in the store: the baselines of a claim that reads nothing
        rows_only = tmp_path / "rows-only.jsonl"
        counter.label = "rows"
        with use_runner(tiny, Runner(tiny, store=ResultStore(rows_only))):
            for samples in mixed_tasks.values():
                evaluate_baseline(tiny, samples, batch_size=4)
        counter.label = "with the mass"
        with use_runner(tiny, Runner(tiny, store=ResultStore(rows_only))) as runner:
            read_again = task_baselines(tiny, mixed_tasks, rankings, k=6, batch_size=4)
            assert runner.reused == 0 and runner.computed == sum(len(s) for s in mixed_tasks.values())
        # another head set on the same rows: its own mass, not the stored one
        other = {t: _ranking(tiny.shape, 1) for t in mixed_tasks}
        counter.label = "another head set"
        with use_runner(tiny, Runner(tiny, store=ResultStore(path))) as runner:
            moved = task_baselines(tiny, mixed_tasks, other, k=6, batch_size=4)
            assert runner.computed == sum(len(s) for s in mixed_tasks.values())
    finally:
        handle.remove()
    assert counter.counts.get("resumed", 0) == 0
    assert counter.counts["with the mass"] == counter.counts["rows"] == counter.counts["first"] > 0
    for got in (again, read_again):
        assert got.needle_mass.heads == tuple(heads)
        for t, samples in mixed_tasks.items():
            np.testing.assert_allclose(got.needle_mass.ratios[t], first.needle_mass.ratios[t], rtol=1e-6)
            assert got[t]["correct"].tolist() == first[t]["correct"].tolist()
    want = {t: _separate_pass(tiny, s, id5_candidates(other, 6), batch_size=4) for t, s in mixed_tasks.items()}
    for t in mixed_tasks:
        np.testing.assert_allclose(moved.needle_mass.ratios[t], want[t], rtol=1e-5)


def test_id2_reads_the_mass_the_baseline_read_and_runs_nothing(tiny, tiny_samples):
    """The plugin's baseline reads the top K's needle mass beside its rows; ID-2 asks for the same
    reading and gets it from the store: no forward, and the ratios of its former pass of its own
    (needle_mass_ratios: a prompt-only sum-attention capture), 1e-5 relative in float32. Catches a
    reading keyed differently by the two (ID-2 would pay a pass) and a mean over the wrong axis."""
    from rh.budget import TokenLayerCounter
    from rh.causal import evaluate_baseline
    from rh.id_claims import read_needle_mass
    from rh.runner import Runner, use_runner

    heads = _ranking(tiny.shape, 2).top(4)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        counter.label = "plain baseline"
        plain = evaluate_baseline(tiny, tiny_samples, batch_size=4)
        with use_runner(tiny, Runner(tiny)):
            counter.label = "baseline"
            frame, _ = read_needle_mass(tiny, tiny_samples, heads, batch_size=4)
            counter.label = "ID-2"
            again, per_head = read_needle_mass(tiny, tiny_samples, heads, batch_size=4)
    finally:
        handle.remove()
    assert counter.counts.get("ID-2", 0) == 0 and counter.counts["baseline"] == counter.counts["plain baseline"]
    assert frame["correct"].tolist() == plain["correct"].tolist() == again["correct"].tolist()
    np.testing.assert_allclose(per_head.mean(axis=1), needle_mass_ratios(tiny, tiny_samples, heads, batch_size=4),
                               rtol=1e-5)


def test_a_reading_is_refused_where_it_would_see_no_forward_of_its_own_row(tiny, tiny_samples):
    """Decode-phase rows run from a shared prefill, and one prompt twice in a forward would mix two
    rows' readings: both are refused with a message, before any forward. Catches a reading that
    quietly returns another row's values."""
    from rh.ablation import Ablation
    from rh.id_claims import NeedleMassReading
    from rh.runner import Runner
    from rh.units import Unit

    reading = NeedleMassReading((Head(1, 0),))
    ids = tuple(s.id for s in tiny_samples[:4])
    runner = Runner(tiny)
    with pytest.raises(ValueError, match="decode-phase"):
        runner.read(tiny_samples, [Unit(Ablation("d", (Head(0, 1),), phase="decode"), ids)], reading, batch_size=4)
    with pytest.raises(ValueError, match="twice"):
        runner.read(tiny_samples, [Unit(Ablation.baseline(), ids), Unit(Ablation("z", (Head(0, 1),)), ids)], reading,
                    batch_size=8)
    assert runner.computed == 0


def test_sparsity_power_is_high_where_silent_heads_are_silent_and_low_where_they_are_not():
    """ID-1's power read off the data's own structure: Wu24-like scores (most heads never score)
    leave the rule able to support at 1% of heads above and to refute at 15%; heads that score a
    little on every trial (normal noise around 0.02) cannot be shown below 0.1 in 64 trials, so the
    support power is near 0 there -- the calibration's two shapes (0.97 and 0.00). Catches a power
    computed from a tidy model instead of the data, and the two sides swapped."""
    from rh.rules.claims import sparsity_power, sparsity_rule

    rng = np.random.default_rng(5)
    n, heads = 64, 270
    mu = np.where(rng.random(heads) < 0.9, 0.0, rng.uniform(0.0, 0.005, heads))
    mu[:3] = rng.uniform(0.2, 0.6, 3)
    sparse = (rng.random((n, heads)) < (mu / 0.6)) * rng.uniform(0.2, 1.0, (n, heads))
    pw = sparsity_rule(sparse).power
    assert pw.support >= 0.9 and pw.refute >= 0.9
    assert pw.support_at == pytest.approx(3 / 270) and pw.refute_at == pytest.approx(41 / 270)
    smooth = np.clip(rng.normal(0.02, 0.03, (n, heads)), 0, 1)
    assert sparsity_power(smooth, threshold=0.1, max_fraction=0.05, alpha=0.05, draws=50).support <= 0.1
    again = sparsity_power(sparse, threshold=0.1, max_fraction=0.05, alpha=0.05)
    assert again == pw  # seeded: one power per data


def test_no_power_is_simulated_inside_the_calibrations_decision_runs():
    from rh.rules.claims import sparsity_power
    from rh.rules.paired import decisions_only

    with decisions_only():
        assert sparsity_power(np.zeros((64, 20)), threshold=0.1, max_fraction=0.05, alpha=0.05).support is None
