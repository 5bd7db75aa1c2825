"""Atomic writes: complete files with ordinary permissions, nothing left on failure; jsonable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from rh.io import atomic_write_json, atomic_write_text, jsonable



def test_written_file_has_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert p.read_text() == "hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_unserialisable_json_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(p, {"a": float("nan")})
    assert p.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


# ---------------------------------------------------------------------------- jsonable


def _same(a, b):
    """Equal values of the same Python types, all the way down (1 == 1.0 == True would hide a slip)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("value, expected", [
    (None, None), ("text", "text"), (True, True), (False, False), (3, 3), (-2.5, -2.5),
    (np.bool_(True), True), (np.int64(7), 7), (np.uint8(255), 255), (np.int32(-3), -3),
    (np.float32(0.5), 0.5), (np.float64(0.1), 0.1), (np.float16(2.0), 2.0),
    (float("nan"), None), (float("inf"), None), (-math.inf, None), (np.float64("nan"), None),
    (np.float32("-inf"), None),
    ((1, 2.0, "a"), [1, 2.0, "a"]), ([(1, 2), [3]], [[1, 2], [3]]),
    ({1: "a", (2, 3): [4], "x": {"y": np.int16(5)}}, {"1": "a", "(2, 3)": [4], "x": {"y": 5}}),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]), (np.array([0.5, np.nan]), [0.5, None]),
    (np.array([True, False]), [True, False]), (np.array(3.5), 3.5), (np.zeros((0, 2)), []),
    ({"a": [np.float64("inf"), (np.int8(1),)]}, {"a": [None, [1]]}),
])
def test_jsonable_converts_json_like_values_in_both_modes(value, expected, strict):
    got = jsonable(value, strict=strict)
    _same(got, expected)
    json.dumps(got, allow_nan=False)  # strict JSON


def test_jsonable_keeps_the_order_of_dict_keys():
    assert list(jsonable({"b": 1, "a": 2, 3: 0})) == ["b", "a", "3"]


@dataclasses.dataclass
class _Point:
    x: int
    y: int


@pytest.mark.parametrize("value", [{1, 2}, frozenset({"a"}), MappingProxyType({"a": 1}), Path("a/b"),
                                   _Point(1, 2), object(), 1 + 2j, b"bytes", {"ok": [1, {2}]}])
def test_strict_jsonable_refuses_what_has_no_json_form(value):
    with pytest.raises(TypeError, match="cannot convert .* to JSON"):
        jsonable(value, strict=True)


class _Tensorish:
    """Stands in for a torch tensor: no JSON type of its own, but tolist() gives one."""

    def __init__(self, data):
        self.data = data

    def tolist(self):
        return self.data


class _Scalarish:
    """tolist() fails, item() works (the report falls back from one to the other)."""

    def tolist(self):
        raise RuntimeError("no list")

    def item(self):
        return float("nan")


class _Broken:
    def tolist(self):
        raise RuntimeError("no list")

    def item(self):
        raise RuntimeError("no item")

    def __str__(self):
        return "broken!"


def test_lenient_jsonable_falls_back_for_everything_else():
    _same(jsonable({3, 1, 2}), [1, 2, 3])  # sorted by repr: "1" < "2" < "3"
    _same(jsonable({10, 9}), [10, 9])  # repr order, not numeric: "10" < "9"
    _same(jsonable(frozenset({"b", "a"})), ["a", "b"])
    _same(jsonable(MappingProxyType({"k": (1, 2)})), {"k": [1, 2]})
    _same(jsonable(OrderedDict([(2, np.float64(1.5))])), {"2": 1.5})
    _same(jsonable(_Tensorish([[1.0, float("nan")], [2.0, 3.0]])), [[1.0, None], [2.0, 3.0]])
    _same(jsonable(_Scalarish()), None)
    _same(jsonable(_Broken()), "broken!")
    _same(jsonable(Path("a/b")), "a/b")
    _same(jsonable(_Point(1, 2)), "_Point(x=1, y=2)")
    _same(jsonable(1 + 2j), "(1+2j)")
    _same(jsonable(np.complex128(1 + 2j)), "(1+2j)")
    _same(jsonable({"s": {np.int64(2)}, "p": [Path("x")]}), {"s": [2], "p": ["x"]})
