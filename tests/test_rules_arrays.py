"""The array rewrites of the decision rules (rh.rules.claims, rh.rules.field, rh.rules.paired,
rh.stats.wilcoxon_pvalues) against the loops they replaced, kept here verbatim as references: every
rewritten function must return exactly what it returned before (the verdicts of real runs and the
calibration's rates with a fixed seed must not move), and draw the same random numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields

import numpy as np
import pytest
from scipy import stats as _sps

import rh.rules.claims as claims_mod
from rh.rules.claims import (
    ID5_TEST,
    agreement,
    general_heads_rule,
    inconclusive,
    side_decided,
)
from rh.rules.core import Power, three_way
from rh.rules.field import _boot_effects, _equal_pairs, _same_group_pairs
from rh.rules.paired import paired_power
from rh.rules.verdict import Verdict
from rh.stats import wilcoxon_pvalues

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------ references (verbatim)
# The functions as they were before the array rewrites, renamed _reference_*; do not "improve" them.


def _reference_at_least_top(random_correct: np.ndarray, top_correct: np.ndarray) -> np.ndarray:
    """Per random draw, whether its accuracy drop is at least the top K's (the head-set null's
    count, ties included) on the same items; decided from the evaluated items where early stopping
    left some out (:func:`side_decided`): a draw whose indicator is still open is refused."""
    top = float(np.sum(top_correct))
    out = []
    for d, row in enumerate(np.asarray(random_correct, float)):
        side = side_decided(float(np.nansum(row)), int(np.isnan(row).sum()), top)
        if side is None:
            raise ValueError(f"random draw {d} was stopped before its side of the top K's drop was decided")
        out.append(side)
    return np.array(out, dtype=bool)


def _reference_topk_sets(means: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-means, axis=1, kind="stable")[:, :k]


def _reference_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.intersect1d(x, y).size for x, y in zip(a, b)], dtype=float)


def _reference_halves(rng: np.random.Generator, n: int, rounds: int) -> np.ndarray:
    mask = np.zeros((rounds, n))
    for r in range(rounds):
        mask[r, rng.permutation(n)[: n // 2]] = 1.0
    return mask


def _reference_general_heads_rule(ratios: Mapping[str, np.ndarray], candidates: Sequence[str], *, ratio: float = 10.0,
                       alpha: float = 0.05, accuracy: Mapping[str, float] | None = None, baseline_floor: float = 0.5,
                       k: int = 10, extra_details: dict | None = None) -> Verdict:
    """ID-5 from ``ratios[task]`` = ``[n_prompts, n_candidates]`` needle-mass ratios of the candidate
    heads on each task's validation prompts. Supported when at least one candidate is shown above
    ``ratio`` in every task; refuted when every candidate is shown below it in some task (none of
    the heads every task ranks high retrieves in all of them); inconclusive otherwise, or when no
    head is in every top K, or when a task's baseline accuracy is below the floor."""
    from rh.stats import holm

    tasks = sorted(ratios)
    params = {"k": k, "tasks": len(tasks)}
    name = "number of candidates shown general"
    details = {"candidates": list(candidates), "ratio": ratio, **(extra_details or {}),
               "task_accuracy": dict(accuracy or {})}
    if len(tasks) < 2:
        return inconclusive("ID-5", params, f"general heads need at least two tasks, got {tasks}", ID5_TEST, alpha,
                            details=details, min_effect=ratio, effect_name=name)
    low = {t: a for t, a in (accuracy or {}).items() if a < baseline_floor}
    if accuracy is None or low:
        return inconclusive("ID-5", params, "the model does not retrieve on " + (
            ", ".join(f"{t} (accuracy {a:.2f})" for t, a in low.items()) if low else "tasks of unknown accuracy") +
            f" (floor {baseline_floor:.2f}): a model that retrieves nothing has no retrieval heads to share (a floor)",
            ID5_TEST, alpha, details=details, min_effect=ratio, effect_name=name)
    if not candidates:
        return inconclusive("ID-5", params, f"no head is in the top {k} of every task: there is no candidate to test "
                            "(an empty intersection is not a test)", ID5_TEST, alpha, details=details,
                            min_effect=ratio, effect_name=name)
    lr = math.log(ratio)
    p_sup, p_ref, med = [], [], []
    for j in range(len(candidates)):
        ps, pr, mj = [], [], []
        for t in tasks:
            x = np.log(np.maximum(np.asarray(ratios[t], float)[:, j], 1e-12)) - lr
            x = x[x != 0]
            pos, m = int((x > 0).sum()), int(x.size)  # the exact sign test of the median, from scipy's binomial
            nan = bool(np.isnan(x).any())
            ps.append(1.0 if m == 0 else math.nan if nan else
                      float(_sps.binomtest(pos, m, 0.5, alternative="greater").pvalue))
            pr.append(1.0 if m == 0 else math.nan if nan else
                      float(_sps.binomtest(pos, m, 0.5, alternative="less").pvalue))
            mj.append(float(np.median(np.asarray(ratios[t], float)[:, j])))
        p_sup.append(max(ps))  # general = above in every task (intersection-union)
        p_ref.append(min(1.0, len(tasks) * min(pr)))  # not general = below in some task (Bonferroni over tasks)
        med.append(mj)
    adj_s = holm(p_sup)
    adj_r = max(p_ref)  # refuted only if every candidate is shown not general (intersection-union over heads)
    general = [c for c, p in zip(candidates, adj_s) if p < alpha]
    details.update({"per_head": {c: {"p_general": ps, "p_general_adjusted": pa, "p_not_general": pr,
                                     "median_ratio_per_task": dict(zip(tasks, m))}
                                 for c, ps, pa, pr, m in zip(candidates, p_sup, adj_s, p_ref, med)},
                    "general_heads": general})
    n = min(np.asarray(ratios[t]).shape[0] for t in tasks)
    status, why = three_way(min(adj_s), adj_r, alpha,
                            supported_why=f"{len(general)} head(s) retrieve in every task: {', '.join(general)}",
                            refuted_why=f"every candidate falls below {ratio:g}x in some task (p = {adj_r:.3g})",
                            neither_why=f"smallest adjusted p for a general head {min(adj_s):.3g}; for none {adj_r:.3g}")
    return Verdict(claim="ID-5", params=params, status=status,
                   reason=f"{len(candidates)} head(s) are in the top {k} of all {len(tasks)} tasks ({', '.join(tasks)}): "
                   f"{', '.join(candidates)}; {why}", test=ID5_TEST, statistic=float(len(general)),
                   p_value=min(p_sup), p_adjusted=min(adj_s), effect=float(len(general)), ci=None, n=n, alpha=alpha,
                   effect_name=name, details=details, min_effect=ratio,
                   power=Power.none("per-head sign tests across tasks; see the calibration").to_dict())


# ------------------------------------------------------------------------------------ helpers


def _same(a, b) -> bool:
    """Exact equality, NaN equal to NaN, through dicts, lists, tuples and arrays (types kept apart)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _assert_same_verdict(new: Verdict, old: Verdict, *, skip: tuple[str, ...] = ()) -> None:
    for f in fields(Verdict):
        if f.name in skip:
            continue
        a, b = getattr(new, f.name), getattr(old, f.name)
        assert _same(a, b), f"Verdict.{f.name}: {a!r} != {b!r}"


def _outcome(fn, *args, **kw):
    """('ok', result) or ('raise', exception type, message): both versions must fail alike."""
    try:
        return "ok", fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return "raise", type(e), str(e)


# ------------------------------------------------------------------------ Wilcoxon (ID-5, ID-2)


def _wilcoxon_samples(rng, count):
    out = []
    for _ in range(count):
        kind = int(rng.integers(0, 8))
        # scipy's permutation test (ties or zeros, at most 13 values) takes a second at 12 or 13 values
        n = int(rng.choice([1, 2, 3, 5, 8, 14, 20, 40, 50, 51, 64] if kind in (1, 2, 3, 6) else
                           [1, 2, 3, 5, 8, 12, 13, 14, 20, 40, 50, 51, 64]))
        x = rng.normal(rng.normal(0, 0.7), 1.0, n)
        if kind == 1:
            x = np.round(x, 1)  # ties (asymptotic above 13 values, permutation at 13 or fewer)
        elif kind == 2:
            x[: n // 2] = 0.0  # zeros
        elif kind == 3:
            x = np.round(2 * x) / 2  # heavy ties, ties of +a and -a
        elif kind == 4:
            x[0] = np.nan
        elif kind == 5:
            x[-1] = np.inf
        elif kind == 6:
            x = np.full(n, 0.25)  # all equal
        out.append(x)
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_wilcoxon_pvalues_equal_one_scipy_call_per_sample():
    """Catches a batch whose method differs from what scipy's "auto" picks for the sample alone
    (exact vs normal approximation by n, ties, zeros) or samples mixed up between batches."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        xs = _wilcoxon_samples(rng, int(rng.integers(1, 14)))
        for alt in ("greater", "less", "two-sided"):
            new = _outcome(wilcoxon_pvalues, xs, alt)
            old = _outcome(lambda: [float(_sps.wilcoxon(x, alternative=alt).pvalue) for x in xs])
            assert new[0] == old[0] and _same(new[1:], old[1:]), (alt, [x.size for x in xs])
    assert wilcoxon_pvalues([], "less") == []


def _id5_inputs(rng):
    n_tasks, n_cand = int(rng.choice([1, 2, 2, 3, 4])), int(rng.choice([0, 1, 2, 3, 3]))
    ratio = float(rng.choice([10.0, 4.0, 1.0]))
    shift = float(rng.choice([-1.0, 0.0, 1.5]))  # every task's log ratio above, at or below the threshold
    ratios = {}
    for t in range(n_tasks):
        kind = int(rng.integers(0, 9))  # 6-8: plain
        # ties or zeros among 12 or 13 values cost scipy's permutation test a second: keep clear of them
        n = int(rng.choice([1, 3, 6, 30, 40, 55] if kind in (1, 2, 5) else [1, 6, 13, 14, 30, 40, 55, 55]))
        r = np.exp(np.log(ratio) + rng.normal(shift, 0.8, (n, n_cand)))
        if kind == 1:
            r = np.round(r, 0)  # ties, and zeros clamped to 1e-12
        elif kind == 2 and n_cand:
            r[: n // 2, 0] = ratio  # exactly the threshold: zero differences, dropped
        elif kind == 3 and n_cand:
            r[:, -1] = ratio  # a column with no nonzero difference at all (p = 1)
        elif kind == 4 and n_cand:
            r[0, 0] = np.nan
        elif kind == 5:
            r = -np.abs(r)  # clamped to 1e-12: all tied
        ratios[f"t{t}"] = r
    cands = [f"L{j}H{j}" for j in range(n_cand)]
    acc = {t: 0.9 if rng.random() < 0.95 else 0.3 for t in ratios} if rng.random() < 0.95 else None
    return ratios, cands, dict(ratio=ratio, accuracy=acc, alpha=float(rng.choice([0.05, 0.2])), k=5)


def test_general_heads_rule_equals_reference():
    """Catches any change of ID-5's p-values, Holm adjustment, statuses or details (a p from the
    wrong method or the wrong (candidate, task) sample, NaN order in max/min, empty columns)."""
    rng = np.random.default_rng(1)
    decided = {"supported": 0, "refuted": 0, "inconclusive": 0}
    for _ in range(50):
        ratios, cands, kw = _id5_inputs(rng)
        new = _outcome(general_heads_rule, ratios, cands, **kw)
        old = _outcome(_reference_general_heads_rule, ratios, cands, **kw)
        assert new[0] == old[0] and (new[0] == "ok" or new[1:] == old[1:]), (new, old)
        if new[0] == "ok":
            _assert_same_verdict(new[1], old[1], skip=("power",))
            decided[new[1].status] += 1
    assert decided["supported"] >= 3 and decided["refuted"] >= 3


def test_id5_simulation_unchanged():
    """The calibration's ID-5 simulator: same verdicts and the shared rng left in the same state."""
    from rh.heads import HeadShape
    from rh.profiles import get_profile
    from rh.calibration import sim_id5_with, sizes

    sim_id5 = sim_id5_with("right-skewed")

    p = get_profile("quick", HeadShape(30, 9, 3, 64))
    s = sizes(p)
    for effect in (p.spike_ratio, 4 * p.spike_ratio, 1.0):
        r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
        new = sim_id5(p, s, r1, effect)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(claims_mod, "general_heads_rule", _reference_general_heads_rule)
            old = sim_id5(p, s, r2, effect)
        _assert_same_verdict(new[0], old[0], skip=("power",))
        assert r1.bit_generator.state == r2.bit_generator.state


# ------------------------------------------------------------------------ agreement (ID-3, ID-4, ID-7)


def test_topk_sets_equal_stable_argsort():
    """Catches ties broken otherwise than by index (the partition picks any of the tied), the
    order within the top K, -0.0 vs 0.0, infinities, NaN rows, and k at 0, 1, H - 1, H and above."""
    rng = np.random.default_rng(2)
    for _ in range(150):
        rows, heads = int(rng.integers(0, 6)), int(rng.integers(1, 30))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            m = rng.normal(size=(rows, heads))
        elif kind == 1:
            m = rng.integers(0, 3, (rows, heads)).astype(float)  # heavy ties
        elif kind == 2:
            m = rng.choice([0.0, -0.0, 1.0, -np.inf, np.inf], (rows, heads))
        elif kind == 3:
            m = np.full((rows, heads), 0.5)  # all equal
        else:
            m = rng.normal(size=(rows, heads))
            m[rng.random((rows, heads)) < 0.2] = np.nan
        for k in {0, 1, heads - 1, heads, heads + 1, int(rng.integers(1, heads + 1))}:
            if k < 0:
                continue
            new, old = claims_mod._topk_sets(m, k), _reference_topk_sets(m, k)
            assert new.dtype == old.dtype and np.array_equal(new, old), (m, k)


def test_overlaps_equal_intersect1d():
    """Catches duplicated values counted twice, rows of different widths, empty rows."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        rows = int(rng.integers(0, 8))
        ka, kb, hi = int(rng.integers(0, 12)), int(rng.integers(0, 12)), int(rng.integers(1, 25))
        a, b = rng.integers(0, hi, (rows, ka)), rng.integers(0, hi, (rows, kb))
        new, old = claims_mod._overlaps(a, b), _reference_overlaps(a, b)
        assert new.dtype == old.dtype and np.array_equal(new, old)
    a = np.argsort(rng.normal(size=(400, 270)), axis=1)[:, :10]  # the rule's shapes
    b = np.argsort(rng.normal(size=(400, 270)), axis=1)[:, :10]
    assert np.array_equal(claims_mod._overlaps(a, b), _reference_overlaps(a, b))


def test_halves_draw_what_the_loop_drew():
    """Catches other random numbers (or as many drawn differently), which would move every later
    draw of the rule's rng; n = 0, 1 and odd n, no rounds."""
    for n, rounds in [(0, 3), (1, 4), (2, 5), (9, 30), (64, 100), (7, 0)]:
        r1, r2 = np.random.default_rng(n + rounds), np.random.default_rng(n + rounds)
        new, old = claims_mod._halves(r1, n, rounds), _reference_halves(r2, n, rounds)
        assert new.dtype == old.dtype and np.array_equal(new, old)
        assert r1.bit_generator.state == r2.bit_generator.state


def _with_reference_helpers(fn, *args, **kw):
    saved = claims_mod._topk_sets, claims_mod._overlaps, claims_mod._halves
    claims_mod._topk_sets, claims_mod._overlaps, claims_mod._halves = (
        _reference_topk_sets, _reference_overlaps, _reference_halves)
    try:
        return fn(*args, **kw)
    finally:
        claims_mod._topk_sets, claims_mod._overlaps, claims_mod._halves = saved


def test_agreement_equals_reference():
    """The whole ID-3/ID-4/ID-7 rule, new helpers against the old ones: tied scores (so the top K
    depends on tie-breaking), weights that drop prompts, both pairings, K near the number of heads."""
    rng = np.random.default_rng(4)
    for i in range(30):
        n_a = int(rng.integers(8, 30))
        n_b = n_a if i % 2 else int(rng.integers(8, 30))
        heads, k = int(rng.choice([12, 40])), int(rng.choice([1, 3, 10, 11]))
        mu = rng.gamma(1.0, 1.0, heads)
        a = mu + rng.normal(0, 1.0, (n_a, heads))
        b = mu + rng.normal(0, 1.0, (n_b, heads))
        if i % 3 == 0:
            a, b = np.round(a), np.round(b)  # many tied means
        wa = (rng.random(n_a) < 0.8).astype(float) if i % 4 == 0 else None
        kw = dict(k=k, min_effect=0.3 * k, same_prompts=bool(i % 2), weights_a=wa, alpha=0.1, n_boot=40,
                  seed=i, baseline_accuracy=0.9)
        new = agreement("ID-4", a, b, **kw)
        old = _with_reference_helpers(agreement, "ID-4", a, b, **kw)
        _assert_same_verdict(new, old)


@pytest.mark.parametrize("family", ["ID-3/ID-4", "ID-7"])
def test_agreement_simulations_unchanged(family):
    from rh.heads import HeadShape
    from rh.profiles import get_profile
    import rh.catalogue  # noqa: F401
    from rh.calibration import sizes
    from rh.claim_families import family as registered

    p = get_profile("quick", HeadShape(30, 9, 3, 64))
    s = sizes(p)
    sims = registered(family).calibration(p, s).simulate
    for sim in (sims.values() if isinstance(sims, dict) else [sims]):
        for effect in (0.0, 3.0, float(p.id_k)):
            r1, r2 = np.random.default_rng(11), np.random.default_rng(11)
            new = sim(p, s, r1, effect)
            old = _with_reference_helpers(sim, p, s, r2, effect)
            _assert_same_verdict(new[0], old[0])
            assert r1.bit_generator.state == r2.bit_generator.state


# ------------------------------------------------------------------------ ID-8


def test_equal_pairs_and_boot_effects_equal_the_loop():
    """Catches pairs miscounted for runs of equal keys (duplicated heads, a whole row in one group),
    rows without a within-layer pair kept, and row order."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        n_heads, group = int(rng.choice([4, 9, 8])), 1
        group = int(rng.choice([d for d in (1, 2, 3, 4) if n_heads % d == 0]))
        rounds, k = int(rng.integers(0, 20)), int(rng.integers(0, 10))
        boot = rng.integers(0, int(rng.choice([n_heads, 3 * n_heads, 30 * n_heads])), (rounds, k))
        chance = (group - 1) / (n_heads - 1)
        old = []
        for row in boot:
            t_b, p_b, _ = _same_group_pairs(row, n_heads, group)
            if p_b:
                old.append(t_b / p_b - chance)
        new = _boot_effects(boot, n_heads, group, chance)
        assert new.dtype == np.float64 and _same(new.tolist(), old)
        if rounds and k:
            brute = [sum(int(x == y) for i, x in enumerate(r) for y in r[i + 1:]) for r in boot // group]
            assert _equal_pairs(boot // group).tolist() == brute


# ------------------------------------------------------------------------ CA-1, CA-7


def test_at_least_top_equals_reference():
    """Catches a draw decided otherwise (ties with the top K count as at least), NaN (items early
    stopping left out) counted wrong, a different first open draw in the error, Fortran-order input."""
    rng = np.random.default_rng(8)
    for i in range(200):
        draws, n = int(rng.integers(0, 12)), int(rng.integers(0, 15))
        rc = (rng.random((draws, n)) < rng.random()).astype(float)
        if i % 3 == 0:
            rc[rng.random((draws, n)) < 0.3] = np.nan
        if i % 7 == 0:
            rc = rc * rng.random((draws, n))  # not 0/1: the sums are no longer whole
        if i % 5 == 0:
            rc = np.asfortranarray(rc)
        top = (rng.random(n) < rng.random()).astype(float)
        new, old = _outcome(claims_mod._at_least_top, rc, top), _outcome(_reference_at_least_top, rc, top)
        assert new[0] == old[0]
        if new[0] == "ok":
            assert new[1].dtype == old[1].dtype and np.array_equal(new[1], old[1])
        else:
            assert new[1:] == old[1:]


def test_necessity_simulations_unchanged():
    from rh.heads import HeadShape
    from rh.profiles import get_profile
    from rh.calibration import sim_ca1, sim_ca7, sizes
    from rh.rules.paired import decisions_only

    p = get_profile("quick", HeadShape(30, 9, 3, 64))
    s = sizes(p)
    for sim in (sim_ca1, sim_ca7):
        for effect in (0.0, p.ca1_min_gap + 0.1):
            r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
            with decisions_only():
                new = sim(p, s, r1, effect)
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(claims_mod, "_at_least_top", _reference_at_least_top)
                    old = sim(p, s, r2, effect)
            assert len(new) == len(old)
            for a, b in zip(new, old):
                _assert_same_verdict(a, b)
            assert r1.bit_generator.state == r2.bit_generator.state


# ------------------------------------------------------------------------ paired rules' power


def test_paired_power_cache_returns_the_computed_power():
    """Catches a cache keyed too loosely (an int n and a float n, 0 and 0.0 for the alpha or the
    bound sharing an entry with a different result) or a stale value."""
    rng = np.random.default_rng(9)
    args = []
    for _ in range(40):
        n = int(rng.integers(0, 40))
        theta = float(rng.choice([0.0, -0.0, 0.1, 0.2, -0.1, 0.5]))
        bound = float(rng.choice([0.0, 0.1, 0.2, -0.1]))
        args.append((n, theta, bound, str(rng.choice(["greater", "less"])), float(rng.choice([0.05, 0.025, 0.0167]))))
    args += [(20, 0, 0, "greater", 0.05), (20, 0.0, 0.0, "greater", 0.05), (np.int64(20), 0.1, 0.0, "less", 0.05)]
    for a in args + args:  # twice: the second pass is served from the cache
        assert _same(paired_power(*a), paired_power.__wrapped__(*a)), a  # the cache against the function it wraps
    with pytest.raises(ValueError):
        paired_power(10, 0.99, 0.0, "greater", 0.05)
