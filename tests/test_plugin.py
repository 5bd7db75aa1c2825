"""The pytest plugin end to end on the tiny random model: claims run, verdicts land in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


CA1 = "claims/test_causal.py::test_top_k_heads_are_necessary_for_retrieval"


def _run_claims(tmp_path, *extra, target=CA1):
    cmd = [sys.executable, "-m", "pytest", target, "--model", "tiny-llama", "-p", "no:cacheprovider", "-q",
           "--report-dir", str(tmp_path / "reports"), "--ranking-cache", str(tmp_path / "rankings"), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_claims_on_the_tiny_model_write_a_report_with_a_verdict_per_k(tmp_path):
    expected = tmp_path / "expected.json"
    proc = _run_claims(tmp_path, "--expected", str(expected), "--update-expected")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted((tmp_path / "reports").glob("tiny-llama-*.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".html").exists()
    data = json.loads(reports[0].read_text())
    ca1 = [v for v in data["verdicts"] if v["claim"] == "CA-1"]
    assert sorted(v["params"]["k"] for v in ca1) == [2, 4]  # the tiny quick profile's K levels
    # a random model cannot retrieve a passkey: the claim is inconclusive (skipped), never supported
    assert {v["status"] for v in ca1} == {"inconclusive"}
    assert all("baseline accuracy" in v["reason"] for v in ca1)
    assert data["meta"]["baseline"]["accuracy"] < 0.5
    assert data["meta"]["ranking"]["cache"] == "computed"
    assert len(list((tmp_path / "rankings").glob("tiny-llama-sum_attention-*.json"))) == 1
    assert "2 passed" in proc.stdout  # under --update-expected every verdict is as expected

    assert json.loads(expected.read_text())["verdicts"] == {"CA-1[k=2]": "inconclusive", "CA-1[k=4]": "inconclusive"}
    assert "rh claim matrix" in proc.stdout and "2 inconclusive" in proc.stdout

    # a second run loads the cached ranking, and its verdicts match the expected file
    again = _run_claims(tmp_path, "--expected", str(expected))
    assert again.returncode == 0, again.stdout[-2000:]
    assert "all 2 verdicts as expected" in again.stdout
    newest = max((tmp_path / "reports").glob("tiny-llama-*.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["meta"]["ranking"]["cache"] == "hit"

    # a verdict that differs from the expected file fails the run, naming the claim
    data = json.loads(expected.read_text())
    data["verdicts"]["CA-1[k=4]"] = "supported"
    expected.write_text(json.dumps(data))
    changed = _run_claims(tmp_path, "--expected", str(expected))
    assert changed.returncode == 1
    assert "CA-1[k=4]: expected supported, got inconclusive" in changed.stdout


def test_a_bad_ranking_file_is_an_error_in_the_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "rh.ranking/1", "heads": [')
    proc = _run_claims(tmp_path, "--rankings", str(bad))
    assert proc.returncode != 0
    data = json.loads(next((tmp_path / "reports").glob("*.json")).read_text())
    assert {v["status"] for v in data["verdicts"]} == {"error"}
    assert all(v["claim"] == "CA-1" for v in data["verdicts"])
    assert "not valid JSON" in data["verdicts"][0]["reason"]


def test_an_unknown_model_is_a_usage_error_naming_the_choices(tmp_path):
    proc = _run_claims(tmp_path, "--model", "smollm3")
    assert proc.returncode == 4  # pytest's usage error
    assert "unknown model 'smollm3'" in proc.stderr and "smollm2-135m" in proc.stderr
    assert not (tmp_path / "reports").exists()
