"""The planted positive control through the claims (#33's acceptance, the slow tier): on the model
whose retrieval heads are known by construction (rh.planted), CA-1 is supported for the planted
heads and refuted for a control set outside the circuit, under both ablation protocols, and CA-6 at
every needle depth likewise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rh.planted import PLANTED_HEADS, control_heads

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _necessity(tmp_path: Path, heads: list) -> dict:
    """CA-1 and CA-6 at every position and while decoding, with ``--heads`` the set under test:
    key -> status."""
    cmd = [sys.executable, "-m", "pytest", "claims/test_causal.py", "-k", "necessary or every_depth", "--model",
           "planted",
           "--heads", ",".join(str(h) for h in heads), "-p", "no:cacheprovider", "-q",
           "--report-dir", str(tmp_path / "reports"), "--journal", str(tmp_path / "journal")]
    # about 4.5 min a set on a quiet 2-core machine; twice that and more when the machine is shared
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    reports = sorted((tmp_path / "reports").glob("planted-*.json"))
    assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {v["key"]: v["status"] for v in json.loads(reports[-1].read_text())["verdicts"]}


def _expected(status: str) -> dict:
    keys = ["CA-1[k=4]", "CA-1[k=4,phase=decode]"]
    for phase in ("", ",phase=decode"):
        keys += [f"CA-6[depth={d}{phase}]" for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return dict.fromkeys(keys, status)


@pytest.mark.parametrize("which", ["planted", "control"])
def test_necessity_is_supported_for_the_planted_heads_and_refuted_for_a_control_set(tmp_path, which):
    """Bug caught: a necessity rule that cannot recognise heads known to be necessary (a positive
    control it fails), or that calls any set necessary (the control, outside the circuit, must be
    refuted: its ablation leaves the retrieval intact, so its drop is shown < Δ). One set a test,
    so each has its own time limit."""
    if which == "planted":
        assert _necessity(tmp_path, list(PLANTED_HEADS)) == _expected("supported")
    else:
        assert _necessity(tmp_path, control_heads(len(PLANTED_HEADS))) == _expected("refuted")
