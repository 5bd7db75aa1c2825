"""Early stopping of CA-1's random head sets (rh.causal.necessity_outcomes, stop_early=True): the
verdict is the one the full evaluation gives, for fewer passes."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

import rh.causal as causal
from rh.causal import necessity_outcomes, necessity_verdicts, needed_items
from rh.rules.claims import side_decided
from rh.heads import HeadShape
from rh.rankings import Ranking
from rh.seeds import derive_seed



@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_side_is_decided_exactly_when_every_completion_agrees(n):
    """Brute force over every outcome of the remaining items: decided iff all completions give the
    same indicator (drop at least the top K's <=> at most as many right as the top K)."""
    for top in range(n + 1):
        for known in range(n + 1):
            for correct in range(known + 1):
                remaining = n - known
                finals = {correct + extra <= top for extra in range(remaining + 1)}
                want = finals.pop() if len(finals) == 1 else None
                assert side_decided(correct, remaining, top) == want, (n, top, known, correct)


def test_the_paired_items_of_a_draw_are_those_the_rule_reads():
    n, draws = 16, 5
    pairs = {(i % draws, i) for i in range(n)}
    got = {(d, i) for d in range(draws) for i in needed_items(d, draws, n)}
    assert got == pairs


# ---------------------------------------------------------------- a model whose outcomes are a table


class _TableModel:
    """Stands in for a model: the outcome of item i under a head set is a fixed table entry, so the
    full and the early-stopped evaluation can be compared on thousands of planted tables."""

    def __init__(self, shape: HeadShape, outcomes: dict[tuple, np.ndarray]):
        self.shape = shape
        self.outcomes = outcomes  # frozenset of heads (empty: baseline) -> 0/1 per item
        self.current: frozenset = frozenset()
        self.evaluated = 0


def _ranking(shape: HeadShape, rng) -> Ranking:
    return Ranking("test", shape, {h: float(x) for h, x in zip(shape.all_heads(), rng.random(shape.n_total))})


class _Sample:
    def __init__(self, i: int):
        self.id, self.task, self.length, self.depth = f"s{i}", "passkey", 8, 0.0
        self.index = i
        self.input_ids, self.answer_ids = (1,) * 8, (2,)


@pytest.fixture
def table(monkeypatch):
    def make(rng, n: int, draws: int, top_acc: float, rand_acc: float, base_acc: float = 0.95):
        shape = HeadShape(6, 4, 2, 8)
        ranking = _ranking(shape, rng)
        samples = [_Sample(i) for i in range(n)]
        base = (rng.random(n) < base_acc).astype(float)
        outcomes = {frozenset(): base, frozenset(ranking.top(3)): ((rng.random(n) < top_acc) * base)}
        for d in range(draws):
            heads = frozenset(ranking.random_outside_top(3, seed=derive_seed(0, 3, d)))
            outcomes[heads] = (rng.random(n) < rand_acc) * base
        model = _TableModel(shape, outcomes)

        @contextlib.contextmanager
        def fake_ablate(m, heads, *a, **k):
            before = m.current
            m.current = frozenset(heads)
            try:
                yield list(heads)
            finally:
                m.current = before

        def fake_tf(m, subset, *, condition="baseline", batch_size=8, progress=True):
            m.evaluated += len(subset)
            c = m.outcomes[m.current]
            return pd.DataFrame([{"id": s.id, "task": s.task, "length": s.length, "depth": s.depth,
                                  "condition": condition, "correct": bool(c[s.index]),
                                  "logprob": float(-1.0 + c[s.index] + 0.01 * s.index), "first_token_prob": 0.5}
                                 for s in subset])

        def fake_units(m, samples, units, *, batch_size=8):
            by_id = {s.id: s for s in samples}
            out = []
            for u in units:
                with fake_ablate(m, u.condition.heads):
                    out.append(fake_tf(m, [by_id[i] for i in u.sample_ids], condition=u.condition.name))
            return out

        def fake_one(m, subset, condition, *, batch_size=8):
            with fake_ablate(m, condition.heads):
                return fake_tf(m, subset, condition=condition.name)

        monkeypatch.setattr(causal, "run", fake_units)
        monkeypatch.setattr(causal, "run_one", fake_one)
        return model, samples, ranking

    return make


def _run(model, samples, ranking, draws, stop_early, baseline_floor=None):
    model.evaluated = 0
    outs = [necessity_outcomes(model, samples, ranking, 3, draws=draws, seed=0, stop_early=stop_early,
                               baseline_floor=baseline_floor)]
    return outs, model.evaluated


def test_early_stopping_gives_the_full_evaluations_verdict_on_planted_tables(table):
    """Across tables from 'top K kills retrieval' to 'top K does nothing', the verdict, both
    p-values, the effect and its CI are those of the full evaluation; the evaluated entries are
    the full ones; and where the top K's drop is far from the random sets', far fewer items run."""
    rng = np.random.default_rng(3)
    savings = []
    for rep in range(60):
        n, draws = int(rng.choice([8, 16, 20])), int(rng.choice([19, 49]))
        top_acc, rand_acc = float(rng.choice([0.0, 0.1, 0.5, 0.9])), float(rng.choice([0.6, 0.9, 1.0]))
        model, samples, ranking = table(rng, n, draws, top_acc, rand_acc)
        full, cost_full = _run(model, samples, ranking, draws, False)
        fast, cost_fast = _run(model, samples, ranking, draws, True)
        a = necessity_verdicts(full, alpha=0.05, n_boot=200)[3]
        b = necessity_verdicts(fast, alpha=0.05, n_boot=200)[3]
        assert (a.status, a.reason) == (b.status, b.reason), rep
        assert (a.p_value, a.p_adjusted, a.effect, a.ci) == (b.p_value, b.p_adjusted, b.effect, b.ci), rep
        assert a.details["headset_null_p"] == b.details["headset_null_p"]
        rc, fc = fast[0].random_correct, full[0].random_correct
        seen = ~np.isnan(rc)
        assert np.array_equal(rc[seen], fc[seen])
        assert not np.isnan(fc).any()
        assert cost_fast <= cost_full
        if top_acc == 0.0 and rand_acc == 1.0:
            savings.append(cost_fast / cost_full)
    assert savings and max(savings) < 0.5  # top K at 0: each random set stops after its first right item


def test_a_stopped_draw_with_an_open_side_is_refused(table):
    """The rule never guesses: an outcome matrix with an undecided draw is an error, not a verdict."""
    rng = np.random.default_rng(0)
    model, samples, ranking = table(rng, 8, 19, 0.5, 0.9)
    outs, _ = _run(model, samples, ranking, 19, True)
    o = outs[0]
    broken = o.random_correct.copy()
    broken[:, :] = np.nan
    for d in range(broken.shape[0]):
        for i in needed_items(d, broken.shape[0], broken.shape[1]):
            broken[d, i] = o.random_correct[d, i]
    o.random_correct = broken
    if all(side_decided(np.nansum(r), int(np.isnan(r).sum()), o.top_correct.sum()) is not None for r in broken):
        pytest.skip("every draw happens to be decided by its paired items alone")
    with pytest.raises(ValueError, match="stopped before its side"):
        necessity_verdicts(outs, n_boot=100)


def test_on_the_tiny_model_the_evaluated_entries_equal_the_full_evaluation(tiny, tiny_samples):
    """On a real (random) model: every entry early stopping evaluates has the outcome and
    log-probability of the full evaluation (different chunks, same prompts), and the verdicts agree."""
    shape = tiny.shape
    rng = np.random.default_rng(1)
    r = _ranking(shape, rng)
    full = necessity_outcomes(tiny, tiny_samples, r, 3, draws=4, seed=2, batch_size=4, stop_early=False)
    fast = necessity_outcomes(tiny, tiny_samples, r, 3, draws=4, seed=2, batch_size=4, stop_early=True)
    seen = ~np.isnan(fast.random_correct)
    assert seen.sum() >= len(tiny_samples)  # at least the paired items
    assert np.array_equal(fast.random_correct[seen], full.random_correct[seen])
    np.testing.assert_allclose(fast.random_logprob[seen], full.random_logprob[seen], rtol=1e-5, atol=1e-5)
    a, b = necessity_verdicts([full], n_boot=100)[3], necessity_verdicts([fast], n_boot=100)[3]
    assert (a.status, a.p_value, a.effect) == (b.status, b.p_value, b.effect)


def test_early_stopping_counts_what_it_left_out(table):
    from rh.budget import saved_token_layers

    rng = np.random.default_rng(5)
    model, samples, ranking = table(rng, 16, 19, 0.0, 1.0)
    model.shape = HeadShape(6, 4, 2, 8)
    before = saved_token_layers().get("early stopping", 0)
    outs, cost = _run(model, samples, ranking, 19, True)
    skipped = int(np.isnan(outs[0].random_correct).sum())
    assert skipped > 0
    per_item = (8 + 1 - 1) * 6  # prompt + answer - 1 tokens, 6 layers
    assert saved_token_layers()["early stopping"] - before == skipped * per_item
    assert cost == 16 + 16 + 19 * 16 - skipped  # baseline, top, random: all but the skipped


# ---------------------------------------------------------------- the floor decides before the random sets


def test_below_the_floor_no_random_set_runs_and_the_verdict_is_the_full_evaluations(table):
    """A baseline below the floor makes CA-1 inconclusive whatever the random sets show: with the
    floor given, they are not evaluated at all (baseline and top K only), and the status and
    reason are those of evaluating every set on every item. Above the floor, giving the floor
    changes nothing (the same entries evaluated, the same verdict)."""
    rng = np.random.default_rng(11)
    seen_floor = 0
    for rep in range(40):
        n, draws = int(rng.choice([8, 16])), int(rng.choice([19, 49]))
        base_acc = float(rng.choice([0.0, 0.2, 0.4, 0.95]))
        model, samples, ranking = table(rng, n, draws, float(rng.choice([0.0, 0.5])), float(rng.choice([0.6, 1.0])),
                                        base_acc)
        full, _ = _run(model, samples, ranking, draws, False)
        fast, cost = _run(model, samples, ranking, draws, True, baseline_floor=0.5)
        a = necessity_verdicts(full, alpha=0.05, n_boot=100)[3]
        b = necessity_verdicts(fast, alpha=0.05, n_boot=100)[3]
        assert (a.status, a.reason) == (b.status, b.reason), rep
        if fast[0].baseline_correct.mean() < 0.5:
            seen_floor += 1
            assert a.status == "inconclusive" and "floor" in a.reason
            assert cost == 2 * n  # the baseline and the top K, no random set
            assert np.isnan(fast[0].random_correct).all() and np.isnan(fast[0].random_logprob).all()
            assert b.details["random_accuracy"] is None and b.details["random_items_evaluated"] == 0
            assert b.details["top_accuracy"] == a.details["top_accuracy"]
        else:
            plain, _ = _run(model, samples, ranking, draws, True)
            assert np.array_equal(np.isnan(fast[0].random_correct), np.isnan(plain[0].random_correct))
    assert seen_floor >= 10


def test_the_floor_shortcut_is_off_in_plain_passes_and_counts_what_it_left_out(table):
    from rh.budget import plain_passes, saved_token_layers

    rng = np.random.default_rng(2)
    model, samples, ranking = table(rng, 16, 19, 0.0, 1.0, base_acc=0.0)
    with plain_passes():
        _, cost = _run(model, samples, ranking, 19, None, baseline_floor=0.5)
    assert cost == 16 * (2 + 19)  # --plain: every random set on every item
    before = saved_token_layers().get("floor", 0)
    _, cost = _run(model, samples, ranking, 19, None, baseline_floor=0.5)
    assert cost == 32
    assert saved_token_layers()["floor"] - before == 19 * 16 * (8 + 1 - 1) * 6  # sets x items x tokens x layers


def test_below_the_floor_the_sweeps_run_no_ablation_and_keep_the_full_verdicts(tiny, tiny_samples, monkeypatch):
    """CA-9 and CA-10 on the tiny random model (it does not retrieve: below the floor): with the
    floor given, the runner is never called for their ablations, and the verdicts are those of
    the full evaluation."""
    from rh.causal import curve_outcomes, evaluate_baseline, minimality_outcomes
    from rh.rules.sweep import ablation_curve, minimality

    base = evaluate_baseline(tiny, tiny_samples, batch_size=4)
    correct = base["correct"].to_numpy(float)
    assert correct.mean() < 0.5
    r = _ranking(tiny.shape, np.random.default_rng(4))
    calls = []
    real = causal.run
    monkeypatch.setattr(causal, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    ks = [1, 2]
    full = curve_outcomes(tiny, tiny_samples, r, ks, baseline=base, batch_size=4, stop_early=False, baseline_floor=0.5)
    n_full = len(calls)
    fast = curve_outcomes(tiny, tiny_samples, r, ks, baseline=base, batch_size=4, baseline_floor=0.5)
    assert n_full >= 1 and len(calls) == n_full and np.isnan(fast.top).all() and np.isnan(fast.rand).all()
    a, b = (ablation_curve(o.base, o.top, o.rand, ks, n_boot=50) for o in (full, fast))
    assert (a.status, a.reason) == (b.status, b.reason) == ("inconclusive", a.reason) and "floor" in a.reason
    heads = r.top(2)
    top_f, drop_f = minimality_outcomes(tiny, tiny_samples, heads, batch_size=4, baseline_correct=correct,
                                        baseline_floor=0.5, stop_early=False)
    n_full = len(calls)
    top_s, drop_s = minimality_outcomes(tiny, tiny_samples, heads, batch_size=4, baseline_correct=correct,
                                        baseline_floor=0.5)
    assert len(calls) == n_full and np.isnan(top_s).all() and all(np.isnan(v).all() for v in drop_s.values())
    a, b = minimality(top_f, drop_f, correct), minimality(top_s, drop_s, correct)
    assert (a.status, a.reason) == (b.status, b.reason) and "floor" in a.reason


def test_items_random_sets_keep_are_read_first_and_the_verdict_is_unchanged(table, monkeypatch):
    """Items differ: random ablations lose some (fragile) items most of the time and keep the
    others. Reading next the items random sets kept most often so far decides each set with fewer
    items than reading in the baseline's fixed order, and the verdict is the full evaluation's.
    Catches an order that ignores what the sets have shown (the fixed order read fragile items
    again and again, one wave each), and any order that changed the verdict."""
    rng = np.random.default_rng(21)
    fixed_cost, adaptive_cost = [], []
    for rep in range(12):
        n, draws = 40, 19
        model, samples, ranking = table(rng, n, draws, 0.03, 0.9)
        fragile = rng.random(n) < 0.5
        item_acc = np.where(fragile, 0.15, 0.97)
        base = model.outcomes[frozenset()]
        for key in list(model.outcomes):
            if key and key != frozenset(ranking.top(3)):
                model.outcomes[key] = (rng.random(n) < item_acc) * base
        full, _ = _run(model, samples, ranking, draws, False)
        fast, cost = _run(model, samples, ranking, draws, True)
        a = necessity_verdicts(full, alpha=0.05, n_boot=100)[3]
        b = necessity_verdicts(fast, alpha=0.05, n_boot=100)[3]
        assert (a.status, a.reason, a.p_value, a.effect) == (b.status, b.reason, b.p_value, b.effect), rep
        paired = n  # every item is some set's paired item: read whatever the order
        adaptive_cost.append(cost - 2 * n - paired)  # the items read beyond the baseline, the top K and the pairs
        with monkeypatch.context() as m:  # the baseline's fixed order, as before
            m.setattr(causal, "_next_items", lambda rest, size, p, rank, right: (rest[:size], rest[size:]))
            _, cost = _run(model, samples, ranking, draws, True)
        fixed_cost.append(cost - 2 * n - paired)
    assert sum(adaptive_cost) < 0.8 * sum(fixed_cost), (sum(adaptive_cost), sum(fixed_cost))
