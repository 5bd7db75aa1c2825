"""Unit tests of rh.report.compare: the multi-run comparison page and ``python -m rh report``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rh.report import compare_reports, default_output, load_report, main_report, write_comparison


TOKEN = "hf_" + "abcdefghijklmnopqrstuvwxyzABCD"  # hf_ + 30 letters
XSS = "<script>alert(1)</script>"
NODE = "claims/test_causal.py::test_top_k[K={}]"


def _v(claim: str, k: int | None, status: str, **extra) -> dict:
    v = {"claim": claim, "params": {"k": k} if k is not None else {}, "status": status,
         "reason": f"{claim} {status}", "test": "sign test", "statistic": 3.0, "p_value": 0.01,
         "p_adjusted": 0.02, "effect": 0.5, "ci": [0.2, 0.8], "ci_level": 0.95, "n": 16, "alpha": 0.05,
         "effect_name": "drop", "details": {}, "statement": "s", "source": "seed 001"}
    if k is not None:
        v["nodeid"] = NODE.format(k)
    v.update(extra)
    return v


def _doc(model: str, profile: str, verdicts: list[dict], **meta) -> dict:
    counts = {s: sum(v["status"] == s for v in verdicts) for s in ("supported", "refuted", "inconclusive", "error")}
    return {"meta": {"model": model, "profile": profile, "rh_version": "0.1.0", "started": "2025-01-02T03:04:05",
                     "runtime_s": 95.5, "revision": "0123456789abcdef0123456789abcdef01234567", **meta},
            "summary": counts, "verdicts": verdicts}


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    a = _doc("smollm2-135m", "quick", [
        _v("CA-1", 5, "supported"),
        _v("CA-1", 10, "supported", reason=f"fine {XSS}"),
        _v("CA-1", 20, "supported"),
        _v("ID-1", None, "inconclusive", reason="baseline accuracy 0.2 < floor 0.5", params={"task": XSS}),
    ], env={"HF_TOKEN": TOKEN}, hardware={"device": "cpu", "gpu": None, "cpu_count": 2, "torch_threads": 2})
    b = _doc("llama8b", "full", [
        _v("CA-1", 5, "refuted", p_adjusted=0.4, effect=-0.1, ci=[-0.3, 0.1]),  # disagrees with run 1
        _v("CA-1", 10, "supported"),
        # a crash carries no params, only its node id: it still lines up with run 1's K=20 row
        {"nodeid": NODE.format(20), "claim": "CA-1", "status": "error", "outcome": "error",
         "reason": f"OSError: 401 for {TOKEN}"},
        _v("IV-4", None, "inconclusive", reason="needs a pair of models"),
    ], model_id=f"meta-llama/{XSS}", hardware={"device": "cuda", "gpu": "NVIDIA H100", "cpu_count": 16,
                                               "torch_threads": 16})
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a), encoding="utf-8")
    pb.write_text(json.dumps(b), encoding="utf-8")
    return pa, pb


def _rows(page: str) -> list[tuple[str, list[str]]]:
    """(row class, [cell html, ...]) for each row of the comparison matrix."""
    out = []
    for cls, body in re.findall(r'<tr id="row-\d+" class="row-(\w+)">(.*?)</tr>', page, re.S):
        out.append((cls, re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)))
    return out


def test_matrix_highlights_disagreement_and_dashes_missing_claims(two_runs):
    page = compare_reports(list(two_runs))
    rows = _rows(page)
    by_label = {(cells[1], cells[2]): (cls, cells[3:]) for cls, cells in rows}
    assert len(rows) == 5  # CA-1 x3, ID-1 (run 1 only), IV-4 (run 2 only)
    cls, cells = by_label[("CA-1", "k=5")]
    assert cls == "disagree" and "badge-supported" in cells[0] and "badge-refuted" in cells[1]
    assert by_label[("CA-1", "k=10")][0] == "agree"
    cls, cells = by_label[("CA-1", "k=20")]  # supported vs a crash: a disagreement, in one row
    assert cls == "disagree" and "badge-error" in cells[1]
    id1 = next(v for (claim, _), v in by_label.items() if claim == "ID-1")
    assert id1[0] == "partial" and "badge-inconclusive" in id1[1][0] and id1[1][1] == "\u2014"
    cls, cells = by_label[("IV-4", "\u2014")]
    assert cls == "partial" and cells[0] == "\u2014" and "badge-inconclusive" in cells[1]
    # the highlighted rows are listed at the top, and styled
    assert page.count('class="row-disagree"') == 2 and "2 disagree" in page
    assert re.search(r"tr\.row-disagree>td\{background:#[0-9a-f]+", page)
    # effect [CI] and adjusted p in a cell
    assert "0.500 [0.200, 0.800]" in by_label[("CA-1", "k=5")][1][0] and "p adj 0.02" in page
    # one column per run, described in the runs header
    head = page.split('id="runs"', 1)[1].split('id="matrix"', 1)[0]
    for text in ("smollm2-135m", "llama8b", "quick", "full", "2025-01-02 03:04:05", "95.5 s", "0.1.0",
                 "0123456789ab", "NVIDIA H100", "a.json", "b.json"):
        assert text in head, text
    assert "run 1: smollm2-135m quick" in page and "run 2: llama8b full" in page


def test_output_is_escaped_redacted_and_offline(two_runs, tmp_path):
    out = write_comparison(list(two_runs), tmp_path / "out" / "cmp.html")
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert TOKEN not in page and not re.search(r"hf_[A-Za-z]{20,}", page) and "hf_***" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//|@import|<link\b|<script\b", page, re.IGNORECASE)
    assert [p.name for p in out.parent.iterdir()] == ["cmp.html"]  # atomic: no temporary file left


def test_cli_writes_page_and_single_report_rerenders(two_runs, tmp_path, capsys):
    out = tmp_path / "c.html"
    assert main_report([str(two_runs[0]), str(two_runs[1]), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and "run 2: llama8b full" in out.read_text(encoding="utf-8")
    single = tmp_path / "single.html"
    assert main_report([str(two_runs[1]), "--out", str(single)]) == 0
    page = single.read_text(encoding="utf-8")
    assert 'id="matrix"' in page and "IV-4" in page and TOKEN not in page
    assert default_output(list(two_runs)) == two_runs[0].parent / "compare-a-vs-b.html"


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "missing": (tmp_path / "nope.json", "no such file"),
        "not json": (tmp_path / "broken.json", "not valid JSON"),
        "html": (tmp_path / "run.html", "pass the JSON beside it"),
        "list": (tmp_path / "list.json", "not an object"),
        "ranking": (tmp_path / "ranking.json", "missing 'meta', 'verdicts'"),
        "verdicts not a list": (tmp_path / "vd.json", "'verdicts' is a dict"),
        "no status": (tmp_path / "nostatus.json", "verdicts[1] has no 'status'"),
        "binary": (tmp_path / "bin.json", "not UTF-8"),
    }
    cases["not json"][0].write_text('{"meta": {}, "verdicts": [', encoding="utf-8")
    cases["html"][0].write_text("<!DOCTYPE html><html></html>", encoding="utf-8")
    cases["list"][0].write_text("[1, 2]", encoding="utf-8")
    cases["ranking"][0].write_text('{"format": "rh-ranking", "heads": []}', encoding="utf-8")
    cases["verdicts not a list"][0].write_text('{"meta": {}, "verdicts": {}}', encoding="utf-8")
    cases["no status"][0].write_text(json.dumps({"meta": {}, "verdicts": [{"claim": "A", "status": "supported"},
                                                                          {"claim": "B"}]}), encoding="utf-8")
    cases["binary"][0].write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return cases


def test_bad_inputs_exit_2_name_the_file_and_write_nothing(two_runs, tmp_path, capsys):
    for name, (bad, why) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / f"{name.replace(' ', '_')}.html"
        assert main_report([str(two_runs[0]), str(bad), "-o", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert str(bad) in err and why in err, (name, err)
        assert not out.exists() and not out.parent.exists(), name
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(bad))):
            load_report(bad)


def test_usage_errors_exit_2(two_runs, tmp_path, capsys):
    assert main_report([]) == 2  # at least one report
    assert "REPORT.json" in capsys.readouterr().err
    before = two_runs[1].read_bytes()
    assert main_report([str(two_runs[0]), str(two_runs[1]), "-o", str(two_runs[1])]) == 2
    assert "one of the input reports" in capsys.readouterr().err and two_runs[1].read_bytes() == before
    assert main_report([str(two_runs[0]), str(two_runs[1]), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
