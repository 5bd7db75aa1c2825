"""``python -m rh audit``: published head files re-checked end to end on the tiny model; bad
input refused before the weights load."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rh.__main__ import main


SIZES = ["--model", "tiny-llama", "--n", "2", "--draws", "20", "--k", "4"]


def _files(tmp_path):
    """One file in each published format for the tiny Llama (4 layers x 8 heads, 2 KV heads)."""
    rng = np.random.default_rng(0)
    qr = sorted(([f"{l}-{h}", float(rng.random())] for l in range(4) for h in range(8)), key=lambda r: -r[1])
    (tmp_path / "qrhead.json").write_text(json.dumps(qr))
    (tmp_path / "qrhead_set.txt").write_text("2-5,1-3,0-7")
    gates = np.array([[0.9, 0.1], [0.2, 0.7], [0.0, 0.3], [0.5, 0.4]])
    (tmp_path / "full_attention_heads.tsv").write_text("\n".join("\t".join(map(str, r)) for r in gates) + "\n")
    (tmp_path / "razor.json").write_text(json.dumps({"1": [3, 0], "3": [7]}))
    (tmp_path / "heads.yaml").write_text("- L0H1\n- L2H2\n")
    return qr, gates


@pytest.mark.slow  # CA-1 and CA-2 on the tiny model for each of seven formats
def test_an_audit_of_every_format_reports_ca1_and_ca2_where_there_is_an_order(tmp_path, capsys):
    qr, gates = _files(tmp_path)
    names = ["qrhead.json", "qrhead_set.txt", "full_attention_heads.tsv", "razor.json", "heads.yaml"]
    rc = main(["audit", *(str(tmp_path / n) for n in names), "--heads", "L3H3", *SIZES,
               "--report-dir", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert rc == 0, out
    planned = re.search(r"audit plan: (\d+) prompts x [\d,]+ conditions = up to [\d,]+ forward passes, about "
                        r"([\d,]+) token-layers", out)
    assert planned, out[:2000]
    length = int(re.search(r"(\d+) fresh .* prompts of (\d+) tokens", out).group(2))
    assert f"{planned.group(1)} fresh" in out  # the prompts it then built
    counted = int(re.search(r"forward passes: ([\d,]+) token-layers", out).group(1).replace(",", ""))
    # the plan is the plain count at the prompts' length: what ran (early stopping, prefix reuse) is
    # at most that, but for the answer tokens a teacher-forced pass adds (under 16 here)
    assert 0 < counted <= int(planned.group(2).replace(",", "")) * (length + 16) / length
    [report] = (tmp_path / "reports").glob("audit-tiny-llama-*.json")
    assert report.with_suffix(".html").exists() and str(report) in out
    verdicts = json.loads(report.read_text())["verdicts"]
    by = {(v["claim"], v["params"]["source"]): v for v in verdicts}
    assert len(verdicts) == 12  # six inputs x (CA-1, CA-2)
    # rankings: CA-1 at --k, the top K is the file's own order
    top_qr = [f"L{k.split('-')[0]}H{k.split('-')[1]}" for k, _ in qr[:4]]
    assert by[("CA-1", "qrhead.json")]["params"]["k"] == 4
    assert by[("CA-1", "qrhead.json")]["details"]["top_heads"] == top_qr
    # DuoAttention: the top 4 are layer 0's KV group 0 (gate 0.9); a cut at 4 splits no tie
    assert by[("CA-1", "full_attention_heads.tsv")]["details"]["top_heads"] == ["L0H0", "L0H1", "L0H2", "L0H3"]
    assert "ties_at_cut" not in by[("CA-1", "full_attention_heads.tsv")]["details"]
    # head sets: CA-1 at K = the set's size; CA-2 not applicable
    for name, k in [("qrhead_set.txt", 3), ("razor.json", 3), ("heads.yaml", 2), ("--heads", 1)]:
        assert by[("CA-1", name)]["params"]["k"] == k, name
        assert "not applicable to a head set" in by[("CA-2", name)]["reason"]
    assert set(by[("CA-1", "razor.json")]["details"]["top_heads"]) == {"L1H0", "L1H3", "L3H7"}
    # CA-2 ran for the rankings, on their order
    assert "not applicable" not in by[("CA-2", "qrhead.json")]["reason"]
    # a random model supports nothing
    assert {v["status"] for v in verdicts} == {"inconclusive"}
    assert "baseline accuracy" in by[("CA-1", "qrhead.json")]["reason"]


def test_a_cut_inside_a_tie_is_noted(tmp_path, capsys):
    _files(tmp_path)
    rc = main(["audit", str(tmp_path / "full_attention_heads.tsv"), *SIZES[:-1], "2",
               "--report-dir", str(tmp_path / "reports")])
    assert rc == 0
    assert "the top-2 cut falls inside a tie of 4 heads" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    ([], "give at least one head file"),
    (["{tmp}/missing.json"], "missing.json' does not exist"),
    (["{tmp}/bad.tsv"], "has 2 rows, but the model has 4 layers"),
    (["--heads", "L0H1,L0H1"], "listed twice"),
    (["--heads", "L0H1", "--n", "0"], "--n 0: give a positive whole number"),
    (["--heads", "L0H1", "--draws", "5"], "random_draws=5 is too few"),
    (["{tmp}/qrhead.json", "--k", "30"], "too large for a model with 32 heads"),
    (["{tmp}/qrhead.json", "--k", "0"], "--k 0: give positive whole numbers"),
    (["--heads", "L0H1", "--length", "5"], "--length 5: length=5 tokens is too short"),
    (["--heads", "L0H1", "--report-dir", "{tmp}/bad.tsv/reports"], "is not a writable folder"),
])
def test_bad_input_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    import rh.models

    _files(tmp_path)
    (tmp_path / "bad.tsv").write_text("0.5\t0.5\n0.5\t0.5\n")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(rh.models, "load_model", no_load)
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["audit", *given, "--model", "tiny-llama",
               *([] if "--report-dir" in given else ["--report-dir", str(tmp_path / "reports")])])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "reports").exists()
