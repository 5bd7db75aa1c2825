"""Atomic writes: complete files with ordinary permissions, nothing left on failure."""

from __future__ import annotations

import os
import stat

import pytest

from rh.io import atomic_write_json, atomic_write_text

pytestmark = pytest.mark.unit


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
