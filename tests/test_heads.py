"""Unit tests of rh.heads: parsing head specs, validation against a model shape, seeded draws."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rh.heads import Head, HeadShape, parse_heads, random_heads, validate_heads


SHAPE = HeadShape(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=8)
ALL = [Head(l, h) for l in range(4) for h in range(8)]  # written out, not SHAPE.all_heads()


# ---------------------------------------------------------------- HeadShape


def test_shape_counts_and_all_heads_by_hand():
    assert SHAPE.n_total == 32
    assert SHAPE.group_size == 4
    assert SHAPE.all_heads() == ALL  # layer-major, every head once
    assert SHAPE.as_dict() == {"n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "head_dim": 8}


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec",
    ["L16H1", "l16h1", " L16H1 ", "16-1", "16_1", "16:1", "16,1", " 16 - 1 ", (16, 1), [16, 1],
     Head(16, 1), (np.int64(16), np.int32(1))],
)
def test_parse_accepts_every_written_form(spec):
    got = Head.parse(spec)
    assert got == Head(16, 1)
    assert type(got) is Head and type(got.layer) is int and type(got.head) is int


def test_parse_keeps_multi_digit_indices_apart():
    assert Head.parse("L1H23") == Head(1, 23)
    assert Head.parse("12-3") == Head(12, 3)
    assert Head.parse("L0H0") == Head(0, 0)


def test_head_prints_as_l_h_and_round_trips():
    for h in ALL:
        assert str(h) == f"L{h.layer}H{h.head}"
        assert Head.parse(str(h)) == h


@pytest.mark.parametrize(
    "spec",
    ["L16", "x", "", "16", "L16H", "H1", "16-", "-1-2", "L-1H2", "16-1-2", "L16H1x", "1.5-2",
     (1,), (1, 2, 3), (1.5, 2), (1, "2"), ("1", "2"), (True, 1), True, None, 16, 16.1, {16: 1}],
)
def test_parse_rejects_bad_specs_with_a_helpful_message(spec):
    with pytest.raises(ValueError) as info:
        Head.parse(spec)
    msg = str(info.value)
    assert repr(spec) in msg  # names the input
    assert "L16H1" in msg and "16-1" in msg  # and says how to write it


def test_parse_heads_keeps_order():
    assert parse_heads(["L3H2", (0, 1), "2-7"]) == [Head(3, 2), Head(0, 1), Head(2, 7)]


# ---------------------------------------------------------------- validation


def test_validate_heads_accepts_the_corners_and_keeps_order():
    heads = ["L3H7", (0, 0), "0-7", Head(3, 0)]
    assert validate_heads(heads, SHAPE) == [Head(3, 7), Head(0, 0), Head(0, 7), Head(3, 0)]
    assert validate_heads([], SHAPE) == []


@pytest.mark.parametrize("bad", [Head(4, 0), Head(0, 8), Head(-1, 0), Head(0, -1), Head(100, 100)])
def test_validate_heads_rejects_heads_outside_the_shape(bad):
    with pytest.raises(ValueError) as info:
        validate_heads([Head(0, 0), bad], SHAPE)
    msg = str(info.value)
    assert str(bad) in msg
    assert "0..3" in msg and "0..7" in msg  # the valid ranges of layers and heads


def test_validate_heads_rejects_duplicates_in_any_spelling():
    with pytest.raises(ValueError, match=r"L1H2.*twice"):
        validate_heads(["L1H2", "L0H0", "1-2"], SHAPE)


# ---------------------------------------------------------------- random draws


def test_random_heads_is_reproducible_and_differs_across_seeds():
    a = random_heads(SHAPE, 6, seed=3)
    assert a == random_heads(SHAPE, 6, seed=3)
    assert len(set(a)) == 6 and set(a) <= set(ALL)
    draws = {tuple(random_heads(SHAPE, 6, seed=s)) for s in range(10)}
    assert len(draws) == 10  # C(32, 6) ~ 900k ordered sets; ten seeds never collide


def test_random_heads_covers_the_pool_uniformly():
    """Over many seeds every allowed head is drawn about equally often (k/|pool| each)."""
    exclude = [Head(0, 0), Head(2, 5)]
    counts = {h: 0 for h in ALL}
    n = 600
    for s in range(n):
        for h in random_heads(SHAPE, 3, exclude=exclude, seed=s):
            counts[h] += 1
    assert counts[Head(0, 0)] == counts[Head(2, 5)] == 0
    expected = n * 3 / 30
    observed = np.array([c for h, c in counts.items() if h not in exclude])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 70  # df = 29; P(chi2 > 70) < 1e-4 under uniform draws


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(0, 32),
    exclude=st.sets(st.sampled_from(ALL), max_size=32),
    seed=st.integers(0, 2**32),
)
def test_random_heads_never_returns_an_excluded_head(k, exclude, seed):
    remaining = 32 - len(exclude)
    if k > remaining:
        with pytest.raises(ValueError) as info:
            random_heads(SHAPE, k, exclude=[str(h) for h in exclude], seed=seed)
        assert re.search(rf"only {remaining} of the model's 32 heads remain", str(info.value))
        return
    got = random_heads(SHAPE, k, exclude=[str(h) for h in exclude], seed=seed)
    assert len(got) == k == len(set(got))
    assert not set(got) & exclude
    assert set(got) <= set(ALL)


def test_random_heads_rejects_k_beyond_the_pool_and_negative_k():
    with pytest.raises(ValueError, match=r"only 30 of the model's 32 heads remain after excluding 2"):
        random_heads(SHAPE, 31, exclude=[Head(0, 0), Head(0, 1)], seed=0)
    assert len(random_heads(SHAPE, 30, exclude=[Head(0, 0), Head(0, 1)], seed=0)) == 30
    with pytest.raises(ValueError, match="k=-1"):
        random_heads(SHAPE, -1, seed=0)


def test_random_heads_validates_the_exclusion():
    with pytest.raises(ValueError, match="L9H0"):
        random_heads(SHAPE, 2, exclude=[Head(9, 0)], seed=0)
    # the same head twice in `exclude` is one exclusion, not an error
    got = random_heads(SHAPE, 31, exclude=[Head(1, 1), "L1H1"], seed=0)
    assert Head(1, 1) not in got and len(got) == 31
