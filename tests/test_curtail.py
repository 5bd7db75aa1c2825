"""Curtailment of the paired families (rh.rules.paired.family_decided, rh.curtail): a status is
declared part-way only when every completion of the unread items gives it, checked here by
enumerating the completions, and the curtailed mechanisms give the full evaluation's verdicts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rh.rules.core import Bounds
from rh.rules.paired import Partial, family_decided, paired_family

pytestmark = pytest.mark.unit

_KINDS = {  # the bounds of the families that curtail: a drop (CA-4, CA-6, CA-8 top, IV-3), a loss kept small
    "drop": Bounds("greater", 0.0, 0.2),
    "threshold": Bounds("greater", 0.1, 0.1),
    "keeps": Bounds("less", 0.1, 0.1),
}


def _family(groups, bounds):
    return paired_family("X", groups, param="g", bounds=bounds, alpha=0.05, baseline_floor=0.5, test="t",
                         effect_name="drop", describe=lambda g, b, a: f"{g}")


def _completions(groups):
    """Every way the unread (NaN) entries of every group's ``after`` can turn out, jointly."""
    holes = [(g, i) for g, (_, a) in groups.items() for i in np.flatnonzero(np.isnan(a))]
    for values in itertools.product((0.0, 1.0), repeat=len(holes)):
        full = {g: (b, a.copy()) for g, (b, a) in groups.items()}
        for (g, i), v in zip(holes, values):
            full[g][1][i] = v
        yield full


def _random_family(rng, n_groups: int, n: int, holes: int):
    groups, bounds = {}, {}
    for j in range(n_groups):
        acc = rng.choice([0.3, 0.8, 1.0])
        before = (rng.random(n) < acc).astype(float)
        drop = rng.choice([0.0, 0.5, 1.0])
        after = before * (rng.random(n) >= drop)
        after[rng.random(n) < 0.1] = 1.0
        groups[f"g{j}"] = (before, after)
        bounds[f"g{j}"] = _KINDS[rng.choice(list(_KINDS))]
    # unread: `holes` items in all, spread over the groups at random
    spots = rng.permutation([(g, i) for g in groups for i in range(n)])[:holes]
    for g, i in spots:
        groups[g][1][int(i)] = np.nan
    return groups, bounds


@pytest.mark.parametrize("seed", range(6))
def test_a_status_is_declared_exactly_when_every_completion_of_the_family_gives_it(seed):
    """Brute force over every joint completion of the unread items (Holm couples the groups): a
    declared status is the full evaluation's at every completion, and where every completion
    agrees the status is declared (the Holm extremes are reached at real completions)."""
    rng = np.random.default_rng(seed)
    checked = declared = 0
    for _ in range(40):
        n_groups, n = int(rng.integers(1, 4)), int(rng.integers(4, 12))
        groups, bounds = _random_family(rng, n_groups, n, int(rng.integers(0, 8)))
        got = family_decided(groups, bounds=bounds, alpha=0.05, baseline_floor=0.5)
        seen = {g: set() for g in groups}
        for full in _completions(groups):
            for g, v in _family(full, bounds).items():
                seen[g].add(v.status)
        for g in groups:
            if got[g] is not None:
                assert seen[g] == {got[g]}, (seed, g, got[g], seen[g])
                declared += 1
            else:
                assert len(seen[g]) > 1, (seed, g, seen[g])
            checked += 1
    assert declared > checked // 4  # the sample exercises declared statuses, not only open ones


def test_a_curtailed_verdict_has_the_full_status_and_says_what_it_read():
    """Twenty items, a drop on every one: after eight the support cannot be undone. The verdict
    reports the items read, its effect is theirs, and its p-value bounds every completion's."""
    before = np.ones(20)
    after = np.zeros(20)
    part = after.copy()
    part[8:] = np.nan
    bounds = _KINDS["drop"]
    assert family_decided({"a": (before, part)}, bounds=bounds, alpha=0.05, baseline_floor=0.5)["a"] == "supported"
    v = _family({"a": (before, part)}, bounds)["a"]
    worst = np.where(np.isnan(part), 1.0, part)  # the unread items unchanged: the weakest evidence of any completion
    w = _family({"a": (before, worst)}, bounds)["a"]
    assert v.status == w.status == "supported"
    assert v.p_value == pytest.approx(w.p_value) and v.p_adjusted == pytest.approx(w.p_adjusted)
    assert v.effect == 1.0 and v.details["curtailed"]["items_read"] == 8 and v.n == 20
    assert "8 of 20" in v.reason and "8 of 20" in v.effect_name


def test_a_family_stopped_too_soon_is_refused():
    before = np.ones(20)
    part = np.full(20, np.nan)
    part[:2] = 0.0
    with pytest.raises(ValueError, match="stopped before"):
        _family({"a": (before, part)}, _KINDS["drop"])


def test_partial_counts_the_unread_items_by_their_baseline():
    pt = Partial.of([1, 1, 0, 1, 0], [0, np.nan, np.nan, 1, 1])
    assert (pt.b, pt.c, pt.u1, pt.u0, pt.read) == (1, 1, 1, 1, 3)
    with pytest.raises(ValueError, match="baseline"):
        Partial.of([1, np.nan], [0, 0])


# ---------------------------------------------------------------- the mechanism: rh.curtail.curtailed


class _Counted:
    """A planted intervention: item i's outcome is ``table[i]``; counts the items evaluated."""

    def __init__(self, table):
        self.table, self.calls = np.asarray(table, float), 0

    def __call__(self, part):
        self.calls += len(part)
        return self.table[[s.index for s in part]]


class _Item:
    def __init__(self, i: int):
        self.id, self.index = f"s{i}", i
        self.input_ids, self.answer_ids = (1,) * 8, (2,)


class _Shape:
    class shape:
        n_layers = 6


def test_curtailed_families_give_the_full_evaluations_statuses_on_planted_tables():
    """From 'the intervention kills retrieval' to 'it does nothing', in families of one to five
    arms of each kind: the statuses are those of reading every item, the items read have the full
    outcomes, and where the effect is far from the bounds far fewer items are read."""
    from rh.curtail import Arm, curtailed, paired_decider

    rng = np.random.default_rng(7)
    fractions = []
    for rep in range(40):
        n, n_arms = int(rng.choice([16, 40, 80])), int(rng.integers(1, 6))
        items = [_Item(i) for i in range(n)]
        before = (rng.random(n) < rng.choice([0.4, 0.9, 1.0])).astype(float)
        arms, bounds, evals = {}, {}, {}
        for j in range(n_arms):
            drop = float(rng.choice([0.0, 0.05, 0.15, 0.5, 1.0]))
            table = np.where(rng.random(n) < drop, 0.0, before)
            table[rng.random(n) < 0.03] = 1.0
            evals[j] = _Counted(table)
            arms[j] = Arm(items, before, evaluate=evals[j])
            bounds[j] = _KINDS[rng.choice(list(_KINDS))]
        decide = paired_decider(bounds=bounds, alpha=0.05, baseline_floor=0.5)
        fast = curtailed(_Shape(), arms, decide, seed=rep, batch_size=8)
        read = sum(e.calls for e in evals.values())
        full = {j: e.table for j, e in evals.items()}
        a = _family({j: (before, full[j]) for j in arms}, bounds)
        b = _family({j: (before, fast[j]) for j in arms}, bounds)
        assert {j: v.status for j, v in a.items()} == {j: v.status for j, v in b.items()}, rep
        for j in arms:
            seen = ~np.isnan(fast[j])
            assert np.array_equal(fast[j][seen], full[j][seen])
        assert read <= n * n_arms
        if before.mean() >= 0.5:
            fractions.append(read / (n * n_arms))
    assert fractions and min(fractions) < 0.4 and np.median(fractions) < 1.0


def test_curtailment_counts_what_it_left_out():
    from rh.budget import saved_token_layers
    from rh.curtail import Arm, curtailed, paired_decider

    n = 40
    items = [_Item(i) for i in range(n)]
    ev = _Counted(np.zeros(n))
    decide = paired_decider(bounds=_KINDS["drop"], alpha=0.05, baseline_floor=0.5)
    before = saved_token_layers().get("curtailment", 0)
    out = curtailed(_Shape(), {"a": Arm(items, np.ones(n), evaluate=ev)}, decide, seed=0)
    skipped = int(np.isnan(out["a"]).sum())
    assert skipped == n - ev.calls > 0
    assert saved_token_layers()["curtailment"] - before == skipped * (8 + 1 - 1) * 6
    full = curtailed(_Shape(), {"a": Arm(items, np.ones(n), evaluate=_Counted(np.zeros(n)))}, decide, seed=0,
                     stop_early=False)
    assert not np.isnan(full["a"]).any()


def test_a_floored_arm_reads_nothing_and_an_arm_needs_one_intervention():
    from rh.curtail import Arm, curtailed, paired_decider

    items = [_Item(i) for i in range(10)]
    ev = _Counted(np.zeros(10))
    out = curtailed(_Shape(), {"a": Arm(items, np.zeros(10), evaluate=ev)},
                    paired_decider(bounds=_KINDS["drop"], alpha=0.05, baseline_floor=0.5), seed=0)
    assert ev.calls == 0 and np.isnan(out["a"]).all()
    with pytest.raises(ValueError, match="one"):
        Arm(items, np.zeros(10))


@pytest.fixture(scope="module")
def many(tiny):
    from rh.niah import build_passkey_samples

    return build_passkey_samples(tiny.tokenizer, lengths=[100], depths=[0.0, 0.5, 1.0], n_per_setting=8, seed=3,
                                 max_positions=tiny.max_positions)


def _counted(model, fn):
    from rh.budget import TokenLayerCounter

    counter = TokenLayerCounter()
    handle = counter.attach(model)
    try:
        return fn(), counter.total
    finally:
        handle.remove()


def test_the_claims_curtailed_on_the_tiny_model_match_reading_every_item(tiny, many):
    """CA-3, CA-4, CA-8, IV-1, IV-2 and IV-3 through their mechanisms on a real (random) model, with a planted
    baseline that gets every prompt right (the random model gets them wrong: every intervention
    'drops' accuracy): the statuses of the curtailed and the full evaluation agree, the curtailed
    ones read fewer items and cost fewer token-layers."""
    import pandas as pd

    from rh.causal import ablation_hurts, inverse_ablation
    from rh.field import compression_verdicts
    from rh.interventions import attention_override, incremental_ablation, position_patching
    from rh.profiles import get_profile
    from rh.rankings import Ranking

    rng = np.random.default_rng(0)
    shape = tiny.shape
    ranking = Ranking("t", shape, {h: float(x) for h, x in zip(shape.all_heads(), rng.random(shape.n_total))})
    base = pd.DataFrame({"id": [s.id for s in many], "correct": True})
    profile = get_profile("quick", shape)
    runs = {
        "CA-3": lambda stop: inverse_ablation(tiny, many, ranking, (2, 4), base, batch_size=8, stop_early=stop),
        "CA-4": lambda stop: ablation_hurts("CA-4", tiny, {d: [s for s in many if s.depth == d] for d in (0.0, 1.0)},
                                            ranking.top(3), base, param="depth", batch_size=2, stop_early=stop),
        "CA-8": lambda stop: compression_verdicts(tiny, many, base, ranking, profile, stop_early=stop),
        "IV-1": lambda stop: incremental_ablation(tiny, many, ranking.top(3), base, levels=(1, 2, 3), full=[3],
                                                  stop_early=stop)[0],
        "IV-3": lambda stop: attention_override(tiny, many, ranking.top(3), base, hub=5, stop_early=stop),
        "IV-2": lambda stop: {"noise": position_patching(tiny, many, base, layer=1, hub=5, stop_early=stop)},
    }
    for claim, fn in runs.items():
        full, cost_full = _counted(tiny, lambda: fn(False))
        fast, cost_fast = _counted(tiny, lambda: fn(True))
        assert {g: v.status for g, v in full.items()} == {g: v.status for g, v in fast.items()}, claim
        assert cost_fast < cost_full, claim
        assert any(v.details["curtailed"]["items_read"] < v.n for v in fast.values()), claim
        assert all("curtailed" not in v.details for v in full.values())
    _, frames = incremental_ablation(tiny, many, ranking.top(3), base, levels=(1, 2, 3), full=[3])
    assert len(frames[3]) == len(many) and len(frames[1]) < len(many)  # IV-7 reads the full level


def test_plain_passes_read_every_item_unless_a_caller_says_otherwise():
    """``pytest --plain`` (rh.budget.plain_passes) turns curtailment and early stopping off where
    the mechanism is left to choose; an explicit ``stop_early`` still wins."""
    from rh.budget import plain_passes, stops_early
    from rh.curtail import Arm, curtailed, paired_decider

    n = 40
    items = [_Item(i) for i in range(n)]
    decide = paired_decider(bounds=_KINDS["drop"], alpha=0.05, baseline_floor=0.5)
    assert stops_early(None) and not stops_early(False)
    with plain_passes():
        assert not stops_early(None) and stops_early(True)
        ev = _Counted(np.zeros(n))
        out = curtailed(_Shape(), {"a": Arm(items, np.ones(n), evaluate=ev)}, decide, seed=0)
    assert ev.calls == n and not np.isnan(out["a"]).any()
    assert stops_early(None)


def test_curtailed_ablations_reuse_the_prefixes_their_baseline_kept(tiny, many):
    """Each arm reads whole baseline batches, one pass each: the residual stream the hinted
    baseline stored for that batch is found, and the ablated passes run only the layers from the
    first ablated one (before, chunks of other compositions missed the cache)."""
    import pandas as pd

    from rh.causal import evaluate_baseline, inverse_ablation
    from rh.prefix import first_layers, hinting, reuse_prefixes
    from rh.rankings import Ranking

    rng = np.random.default_rng(0)
    shape = tiny.shape
    # the lowest-scoring heads sit in the last two layers: the ablated passes can start at layer 2
    scores = {h: float(x) + (h.layer < 2) for h, x in zip(shape.all_heads(), rng.random(shape.n_total))}
    ranking = Ranking("t", shape, scores)
    assert min(h.layer for h in ranking.bottom(4)) >= 2
    planted = pd.DataFrame({"id": [s.id for s in many], "correct": True})
    with reuse_prefixes(tiny) as cache:
        with hinting(tiny, first_layers([ranking.bottom(2), ranking.bottom(4)])):
            evaluate_baseline(tiny, many, batch_size=8)
        hits = cache.hits
        out = inverse_ablation(tiny, many, ranking, (2, 4), planted, batch_size=8)
    read = sum(v.details["curtailed"]["items_read"] for v in out.values())
    assert 0 < read < 2 * len(many)
    assert cache.hits - hits == read // 8  # every batch read found its prefix


@pytest.mark.parametrize("seed", range(4))
def test_iv2_is_declared_exactly_when_every_completion_gives_its_status(seed):
    """IV-2's two patched arms curtailed together (rh.rules.claims.position_decided): brute force
    over every completion of the items unread in either arm. A declared status is the full rule's
    at every completion; with the same items unread in both arms (as the mechanism reads them) the
    declaration is also complete often enough to save passes. Catches a bound taken at the wrong
    end (McNemar's p falls with b), or Bonferroni's factor left out of the ranges."""
    from rh.rules.claims import position, position_decided

    rng = np.random.default_rng(seed)
    declared = checked = 0
    for _ in range(60):
        n = int(rng.integers(6, 14))
        base = (rng.random(n) < rng.choice([0.4, 0.9, 1.0])).astype(float)
        hub = base * (rng.random(n) >= rng.choice([0.0, 0.3, 0.9]))
        other = base * (rng.random(n) >= rng.choice([0.0, 0.1, 0.5]))
        holes = rng.permutation(n)[:int(rng.integers(0, 5))]
        h, o = hub.copy(), other.copy()
        h[holes] = np.nan
        o[holes if rng.random() < 0.8 else rng.permutation(n)[:len(holes)]] = np.nan
        got = position_decided(base, h, o, hub_min=0.1, nonhub_max=0.05, alpha=0.05, baseline_floor=0.5)
        spots = [("h", i) for i in np.flatnonzero(np.isnan(h))] + [("o", i) for i in np.flatnonzero(np.isnan(o))]
        seen = set()
        for values in itertools.product((0.0, 1.0), repeat=len(spots)):
            fh, fo = h.copy(), o.copy()
            for (arm, i), v in zip(spots, values):
                (fh if arm == "h" else fo)[i] = v
            seen.add(position(base, fh, fo, hub_min=0.1, nonhub_max=0.05, alpha=0.05, baseline_floor=0.5).status)
        checked += 1
        if got is not None:
            assert seen == {got}, (seed, got, seen)
            declared += 1
            if spots:  # the curtailed verdict: the full status, the items it read, a p bounding every completion
                v = position(base, h, o, hub_min=0.1, nonhub_max=0.05, alpha=0.05, baseline_floor=0.5)
                assert v.status == got and v.n == n
                if base.mean() >= 0.5 and (~np.isnan(h) & ~np.isnan(o)).any():
                    assert v.details["curtailed"]["items"] == n
    assert declared > checked // 3


def test_ca3_below_the_floor_reads_no_ablation_and_counts_it_saved_unless_plain(tiny, many):
    """CA-3 with a baseline below the floor is inconclusive whatever its ablations show: they are
    left unread and their plain passes go to the ledger as "floor" (each level over every prompt);
    under --plain they are read, and the verdicts are the same. Would catch: the floor skip counting
    nothing saved, or --plain skipping passes (then --plan and a plain run disagree)."""
    import pandas as pd

    from rh.budget import plain_passes, saved_token_layers
    from rh.causal import inverse_ablation
    from rh.rankings import Ranking

    rng = np.random.default_rng(1)
    shape = tiny.shape
    ranking = Ranking("t", shape, {h: float(x) for h, x in zip(shape.all_heads(), rng.random(shape.n_total))})
    low = pd.DataFrame({"id": [s.id for s in many], "correct": [i % 4 == 0 for i in range(len(many))]})
    before = saved_token_layers().get("floor", 0)
    fast, cost_fast = _counted(tiny, lambda: inverse_ablation(tiny, many, ranking, (2, 4), low, batch_size=8))
    noted = saved_token_layers().get("floor", 0) - before
    with plain_passes():
        full, cost_full = _counted(tiny, lambda: inverse_ablation(tiny, many, ranking, (2, 4), low, batch_size=8))
    plain = sum(len(s.input_ids) + len(s.answer_ids) - 1 for s in many) * shape.n_layers
    assert cost_fast == 0 and noted == 2 * plain
    assert cost_full >= 2 * plain  # both levels over every prompt (padding included)
    assert {k: (v.status, v.reason) for k, v in fast.items()} == {k: (v.status, v.reason) for k, v in full.items()}
    assert all(v.status == "inconclusive" and "floor" in v.reason for v in fast.values())
