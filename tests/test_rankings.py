"""Unit tests of rh.rankings: ordering by hand, save/load round trip, refusal of foreign shapes and
broken files, and the provenance-keyed cache with atomic writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rh.heads import Head, HeadShape
from rh.rankings import FORMAT, Ranking, cache_path, cached_ranking


SHAPE = HeadShape(n_layers=2, n_heads=3, n_kv_heads=1, head_dim=4)

# Hand-made scores with ties: 0.9 (L1H2), then 0.5 three times (L0H1, L1H0, L1H1 by layer, head),
# then 0.2 (L0H2), then -1.0 (L0H0).
SCORES = {
    Head(0, 0): -1.0, Head(0, 1): 0.5, Head(0, 2): 0.2,
    Head(1, 0): 0.5, Head(1, 1): 0.5, Head(1, 2): 0.9,
}
ORDER = [Head(1, 2), Head(0, 1), Head(1, 0), Head(1, 1), Head(0, 2), Head(0, 0)]


def make(scores=None, **kw) -> Ranking:
    return Ranking("hand", SHAPE, dict(SCORES if scores is None else scores), **kw)


def test_heads_are_ordered_by_score_with_ties_by_layer_then_head():
    r = make()
    assert r.heads == ORDER
    assert r.top(1) == [Head(1, 2)]
    assert r.top(4) == ORDER[:4]
    assert r.bottom(2) == [Head(0, 2), Head(0, 0)]  # in ranking order, worst last
    assert r.top(0) == [] and r.bottom(0) == []
    assert r.top(6) == ORDER == r.bottom(6)


def test_tie_order_does_not_depend_on_dict_insertion_order():
    reversed_scores = dict(reversed(list(SCORES.items())))
    assert make(reversed_scores).heads == ORDER


def test_restricted_keeps_the_smaller_grids_heads_in_their_order_and_refuses_a_larger_grid():
    """A ranking restricted to 2 layers x 2 heads orders those heads as the hand-made ORDER does (the
    others dropped: ties stay broken by layer, then head), with their scores and per-setting scores;
    a grid wider than the ranking's is refused. Catches a restriction that re-sorts by position or
    keeps a head outside the grid."""
    r = make(per_setting={"s": {h: float(i) for i, h in enumerate(SHAPE.all_heads())}}, provenance={"model_id": "m"})
    small = r.restricted(HeadShape(2, 2, 2, 0))
    assert small.heads == [h for h in ORDER if h.head < 2]
    assert small.scores == {h: v for h, v in SCORES.items() if h.head < 2}
    assert small.per_setting["s"] == {Head(0, 0): 0.0, Head(0, 1): 1.0, Head(1, 0): 3.0, Head(1, 1): 4.0}
    assert small.provenance == {"model_id": "m", "restricted_to": "2x2"} and r.provenance == {"model_id": "m"}
    assert r.restricted(SHAPE).heads == ORDER
    with pytest.raises(ValueError, match="cannot restrict a 2x3 ranking to a larger grid 3x3"):
        r.restricted(HeadShape(3, 3, 3, 0))


@pytest.mark.parametrize("k", [-1, 7, 100, 2.0, "3", None, True])
def test_top_and_bottom_reject_bad_k(k):
    r = make()
    with pytest.raises(ValueError, match=r"0 <= k <= 6"):
        r.top(k)
    with pytest.raises(ValueError, match=r"0 <= k <= 6"):
        r.bottom(k)


def test_top_accepts_numpy_integers():
    assert make().top(np.int64(2)) == ORDER[:2]


def test_ranking_must_score_every_head_once():
    missing = dict(SCORES)
    del missing[Head(1, 1)]
    with pytest.raises(ValueError, match=r"missing: \['L1H1'\]"):
        make(missing)
    extra = SCORES | {Head(2, 0): 0.0}
    with pytest.raises(ValueError, match=r"extra: \['L2H0'\]"):
        make(extra)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ranking_refuses_non_finite_scores(bad):
    with pytest.raises(ValueError, match="L0H2"):
        make(SCORES | {Head(0, 2): bad})


@settings(max_examples=20, deadline=None)
@given(k=st.integers(0, 16), seed=st.integers(0, 10_000),
       values=st.lists(st.floats(-5, 5, allow_nan=False), min_size=32, max_size=32))
def test_random_outside_top_never_overlaps_top(k, seed, values):
    shape = HeadShape(4, 8, 2, 8)
    r = Ranking("h", shape, dict(zip(shape.all_heads(), values)))
    drawn = r.random_outside_top(k, seed=seed)
    assert len(drawn) == k == len(set(drawn))
    assert not set(drawn) & set(r.top(k))
    assert drawn == r.random_outside_top(k, seed=seed)


# ---------------------------------------------------------------- save / load


def full_ranking() -> Ranking:
    per = {"L128-d0.000": {h: s * 2 for h, s in SCORES.items()}, "L128-d1.000": {h: -s for h, s in SCORES.items()}}
    prov = {"model_id": "tiny-llama", "method": "hand", "lengths": [128], "depths": [0.0, 1.0], "n_samples": 4}
    return make(provenance=prov, per_setting=per)


def test_save_load_round_trip(tmp_path):
    r = full_ranking()
    path = r.save(tmp_path / "sub" / "r.json")
    back = Ranking.load(path, shape=SHAPE)
    assert back.method == r.method and back.shape == r.shape
    assert back.scores == r.scores and back.heads == ORDER
    assert back.provenance == r.provenance
    assert back.per_setting == r.per_setting
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    assert [row["head"] for row in data["heads"]] == [str(h) for h in ORDER]
    assert [row["rank"] for row in data["heads"]] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_load_refuses_another_models_shape(tmp_path):
    path = full_ranking().save(tmp_path / "r.json")
    with pytest.raises(ValueError) as info:
        Ranking.load(path, shape=HeadShape(30, 9, 3, 64))
    msg = str(info.value)
    assert "2 layers x 3 heads" in msg and "30 x 9" in msg and "tiny-llama" in msg


def test_load_truncated_file_names_the_path(tmp_path):
    path = full_ranking().save(tmp_path / "r.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON") as info:
        Ranking.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(format="rh.ranking/0"), "format"),
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.pop("shape"), "shape"),
        (lambda d: d["shape"].update(n_experts=2), "n_experts"),
        (lambda d: d["heads"].pop(), "missing"),
        (lambda d: d["heads"].append(dict(d["heads"][0])), "twice"),
        (lambda d: d["heads"][0].update(head="layer one"), "layer one"),
        (lambda d: d["heads"][0].pop("score"), "score"),
    ],
)
def test_load_rejects_invalid_content_naming_the_file(tmp_path, mutate, needle):
    path = tmp_path / "r.json"
    data = full_ranking().to_json()
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a valid rh ranking") as info:
        Ranking.load(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_load_rejects_a_json_file_that_is_not_an_object(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="no known format"):
        Ranking.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Ranking.load(tmp_path / "nope.json")


# ---------------------------------------------------------------- cache


PROV = {"model_id": "org/tiny", "method": "hand", "task": "passkey", "lengths": [128], "split_seed": 0}


class Counter:
    def __init__(self, ranking: Ranking):
        self.calls = 0
        self.ranking = ranking

    def __call__(self) -> Ranking:
        self.calls += 1
        return self.ranking


def test_cached_ranking_computes_once_then_loads(tmp_path):
    compute = Counter(full_ranking())
    r1, p1, hit1 = cached_ranking(tmp_path, PROV, compute, shape=SHAPE)
    assert (compute.calls, hit1) == (1, False) and p1.exists()
    assert p1.parent == tmp_path and p1.name.startswith("org_tiny-hand-")  # the repo id's "/" is flattened
    r2, p2, hit2 = cached_ranking(tmp_path, PROV, compute, shape=SHAPE)
    assert (compute.calls, hit2) == (1, True) and p2 == p1
    assert r2.scores == r1.scores and r2.provenance == r1.provenance and r2.heads == ORDER
    r3, p3, hit3 = cached_ranking(tmp_path, PROV, compute, shape=SHAPE, recompute=True)
    assert (compute.calls, hit3) == (2, False) and p3 == p1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_cache_entry_changed_after_it_was_written_is_refused_never_trusted(tmp_path):
    """Two scores swapped by hand (valid JSON, same provenance, so the same key), a checksum
    removed, the per-sample scores beside it replaced: each is refused with the fix, and the entry
    is not loaded. --recompute replaces it."""
    import json

    _, path, _ = cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=SHAPE)
    pristine = path.read_text()
    data = json.loads(pristine)
    a, b = data["heads"][0]["score"], data["heads"][1]["score"]
    data["heads"][0]["score"], data["heads"][1]["score"] = b, a
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="changed after rh wrote it.*--recompute"):
        cached_ranking(tmp_path, PROV, lambda: pytest.fail("not recomputed"), shape=SHAPE)
    del data["checksum"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="carries no checksum.*--recompute"):
        cached_ranking(tmp_path, PROV, lambda: pytest.fail("not recomputed"), shape=SHAPE)
    path.write_text(pristine)
    path.with_suffix(".samples.npz").write_bytes(b"not the scores it was written with")
    with pytest.raises(ValueError, match="per-sample scores beside .* are not those.*--recompute"):
        cached_ranking(tmp_path, PROV, lambda: pytest.fail("not recomputed"), shape=SHAPE)
    path.with_suffix(".samples.npz").unlink()
    r, _, hit = cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=SHAPE)
    assert hit and r.heads == ORDER  # the entry as written is trusted again
    r, _, hit = cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=SHAPE, recompute=True)
    assert not hit


def test_cache_path_follows_the_content_fields_of_the_provenance(tmp_path):
    base = cache_path(tmp_path, PROV)
    assert cache_path(tmp_path, dict(reversed(list(PROV.items())))) == base  # key order is irrelevant
    assert cache_path(tmp_path, PROV | {"lengths": [256]}) != base
    assert cache_path(tmp_path, PROV | {"split_seed": 1}) != base
    assert cache_path(tmp_path, PROV | {"revision": "abc"}) != base
    # bookkeeping fields do not change what was computed
    assert cache_path(tmp_path, PROV | {"rh_version": "9.9", "runtime_s": 3.2, "created": "today"}) == base

    compute = Counter(full_ranking())
    cached_ranking(tmp_path, PROV, compute, shape=SHAPE)
    _, p, hit = cached_ranking(tmp_path, PROV | {"lengths": [256]}, compute, shape=SHAPE)
    assert (hit, compute.calls) == (False, 2) and p != base


def test_cached_ranking_refuses_a_cached_file_of_another_shape(tmp_path):
    cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=SHAPE)
    with pytest.raises(ValueError, match="2 layers x 3 heads"):
        cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=HeadShape(4, 8, 2, 8))


def test_failed_compute_leaves_no_ranking_behind(tmp_path):
    def boom() -> Ranking:
        raise RuntimeError("scoring crashed")

    with pytest.raises(RuntimeError, match="scoring crashed"):
        cached_ranking(tmp_path, PROV, boom, shape=SHAPE)
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    # a computed ranking of the wrong shape is refused before it is written
    wrong = Ranking("hand", HeadShape(1, 6, 1, 4), {Head(0, h): float(h) for h in range(6)})
    with pytest.raises(ValueError, match="1 layers x 6 heads"):
        cached_ranking(tmp_path, PROV, lambda: wrong, shape=SHAPE)
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.tmp"))


def test_failed_recompute_keeps_the_old_file(tmp_path):
    _, path, _ = cached_ranking(tmp_path, PROV, Counter(full_ranking()), shape=SHAPE)
    before = path.read_bytes()

    def boom() -> Ranking:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_ranking(tmp_path, PROV, boom, shape=SHAPE, recompute=True)
    assert path.read_bytes() == before


def _race_worker(args):
    """A separate process asking the cache for the same key (as two pytest-xdist workers would)."""
    import time as _time

    from rh.heads import HeadShape as _Shape
    from rh.rankings import Ranking as _Ranking
    from rh.rankings import cached_ranking as _cached

    cache_dir, marker = args
    shape = _Shape(2, 2, 1, 4)

    def compute():
        with open(marker, "a") as fh:
            fh.write("x")
        _time.sleep(2.0)  # long enough that the other worker arrives while this one computes
        return _Ranking("race", shape, {h: float(i) for i, h in enumerate(shape.all_heads())})

    r, _, hit = _cached(cache_dir, {"model_id": "race", "method": "race"}, compute, shape=shape)
    return hit, [str(h) for h in r.heads]


def test_two_processes_racing_for_one_key_compute_it_once(tmp_path):
    import multiprocessing as mp

    marker = tmp_path / "computed"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_race_worker, [(str(tmp_path / "cache"), str(marker))] * 2)
    assert marker.read_text() == "x"  # one computation
    assert sorted(hit for hit, _ in results) == [False, True]
    assert results[0][1] == results[1][1]
