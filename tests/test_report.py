"""Unit tests of rh.report: JSON/HTML contents, escaping, redaction, embedding, file safety."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections import Counter
from datetime import datetime

import pytest

from rh.report import redact, render_html, report_stem, summarize, write_report

pytestmark = pytest.mark.unit

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz123456"
XSS = "<script>alert(1)</script>"


def _verdict(claim: str, status: str, **extra) -> dict:
    base = {
        "claim": claim,
        "params": {"k": 10},
        "status": status,
        "reason": f"{claim} is {status}",
        "test": "paired permutation",
        "statistic": 2.5,
        "p_value": 0.0123,
        "p_adjusted": 0.0369,
        "effect": 0.62,
        "ci": [0.41, 0.8],
        "ci_level": 0.95,
        "n": 40,
        "alpha": 0.05,
        "effect_name": "accuracy drop (top - random)",
        "details": {"drops": [0.1, 0.2, 0.3], "baseline": {"accuracy": 0.9}},
        "nodeid": f"claims/test_x.py::test_{claim.replace('-', '_')}[k=10]",
        "outcome": {"supported": "passed", "refuted": "failed", "inconclusive": "skipped"}[status],
    }
    base.update(extra)
    return base


@pytest.fixture
def verdicts() -> list[dict]:
    return [
        _verdict("CA-1", "supported", statement="Ablating top-K heads hurts more than random.",
                 source="seeds 000 §2.4, 001, 002"),
        _verdict("CA-1", "refuted", params={"k": 20}, p_value=0.3, p_adjusted=0.6, effect=-0.01,
                 ci=[-0.05, 0.03]),
        _verdict("ID-1", "inconclusive", reason=f"baseline too low {XSS}", p_value=None,
                 p_adjusted=None, effect=None, ci=None, statistic=None),
        _verdict("ID-2", "supported", p_value=3e-7, p_adjusted=1e-6, effect=float("nan")),
        # a crashed test: only the minimal keys
        {"nodeid": "claims/test_iv.py::test_transplant", "claim": "IV-4", "status": "error",
         "reason": "RuntimeError: CUDA out of memory"},
    ]


@pytest.fixture
def meta() -> dict:
    return {
        "model": "smollm2-135m",
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "rh_version": "0.1.0",
        "profile": "quick",
        "alpha": 0.05,
        "seeds": {"split": 0, "random_heads": [1, 2, 3]},
        "started": "2025-01-02T03:04:05",
        "finished": "2025-01-02T03:06:05",
        "runtime_s": 120.0,
        "command": "pytest claims/",
        "env": {"HF_TOKEN": TOKEN, "note": f"Bearer {TOKEN} was used"},
        "baseline": {"accuracy": 0.9, "per_depth": [0.8, 0.9, 1.0]},
    }


def _png_bytes() -> bytes:
    """A tiny valid PNG, from matplotlib when present, else written by hand (1x1 grey pixel)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(0.5, 0.5), dpi=20)
        ax.plot([0, 1], [0, 1])
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()
    except ImportError:

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def test_json_round_trips_with_hand_counted_summary(tmp_path, verdicts, meta):
    json_path, html_path = write_report(verdicts, meta, tmp_path / "reports", "run-1")
    assert json_path == tmp_path / "reports" / "run-1.json"
    assert html_path == tmp_path / "reports" / "run-1.html"
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert set(doc) == {"meta", "summary", "verdicts"}
    hand = Counter(v["status"] for v in verdicts)
    assert doc["summary"] == {"supported": 2, "refuted": 1, "inconclusive": 1, "error": 1}
    assert doc["summary"] == {s: hand.get(s, 0) for s in ("supported", "refuted", "inconclusive", "error")}
    assert [v["claim"] for v in doc["verdicts"]] == [v["claim"] for v in verdicts]
    assert doc["verdicts"][0]["ci"] == [0.41, 0.8]
    assert doc["verdicts"][3]["effect"] is None  # NaN is not valid JSON; it becomes null
    assert doc["meta"]["model"] == "smollm2-135m"
    assert not list(tmp_path.joinpath("reports").glob("*.tmp"))  # no temporary files left behind


def test_summary_counts_unexpected_status_separately():
    counts = summarize([{"status": "supported"}, {"status": "weird"}, {}])
    assert counts == {"supported": 1, "refuted": 0, "inconclusive": 0, "error": 0, "weird": 1, "unknown": 1}


def test_html_shows_every_claim_and_a_badge_per_verdict(verdicts, meta):
    page = render_html(verdicts, meta)
    for claim in ("CA-1", "ID-1", "ID-2", "IV-4"):
        assert claim in page
    matrix = page.split('id="matrix"', 1)[1].split('id="claims"', 1)[0]
    badges = re.findall(r'class="badge badge-(\w+)"', matrix)
    assert badges == [v["status"] for v in verdicts]
    assert re.search(r'class="badge badge-error"[^>]*>error</span>', matrix)
    assert "RuntimeError: CUDA out of memory" in page  # the crash's reason is shown
    # the matrix comes before the per-claim sections, figures and metadata
    assert page.index('id="matrix"') < page.index('id="claims"') < page.index('id="run"')
    # statement and source appear in the claim's section
    assert "Ablating top-K heads hurts more than random." in page
    assert "seeds 000 §2.4, 001, 002" in page
    assert "smollm2-135m" in page.split("</title>")[0] and "2025-01-02" in page.split("</title>")[0]


def test_html_number_formatting(verdicts, meta):
    page = render_html(verdicts, meta)
    assert "0.620 [0.410, 0.800]" in page
    assert "accuracy drop (top - random)" in page  # effect name shown
    assert "0.0369" in page and "raw 0.0123" in page  # adjusted p, raw p in small text
    assert "&lt;1e-4" in page  # p = 1e-6 adjusted
    assert "—" in page  # None values


def test_user_text_is_escaped(tmp_path, verdicts, meta):
    meta = {**meta, "model": XSS}
    verdicts[0]["details"]["<b>key</b>"] = XSS
    _, html_path = write_report(verdicts, meta, tmp_path, "esc")
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "<b>key</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_token_is_redacted_from_both_files(tmp_path, verdicts, meta):
    verdicts[1]["reason"] = f"401 for token {TOKEN}"
    json_path, html_path = write_report(verdicts, meta, tmp_path, "secret", figures={TOKEN: _png_bytes()})
    for path in (json_path, html_path):
        text = path.read_text(encoding="utf-8")
        assert TOKEN not in text
        assert "hf_abcdefghijklmnopqrst" not in text
        assert "hf_***" in text
    assert meta["env"]["HF_TOKEN"] == TOKEN  # the caller's dict is not mutated


def test_redact_walks_nested_values():
    obj = {"a": [TOKEN, ("x", {"b": f"pre {TOKEN} post"})], "short": "hf_abc", "n": 3}
    assert redact(obj) == {"a": ["hf_***", ["x", {"b": "pre hf_*** post"}]], "short": "hf_abc", "n": 3}


def test_figure_is_embedded_and_page_has_no_network_references(tmp_path, verdicts, meta):
    png = _png_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    _, html_path = write_report(verdicts, meta, tmp_path, "fig", figures={"dose-response": png})
    page = html_path.read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)) == png
    assert "dose-response" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//|@import|<link\b|<script\b", page, re.IGNORECASE)


def test_non_image_figure_is_reported_not_embedded(verdicts, meta):
    page = render_html(verdicts, meta, figures={"broken": b"not a png"})
    assert "data:image" not in page
    assert "could not be embedded" in page


@pytest.mark.parametrize("stem", ["", "../escape", "a/b", "a b", "x;rm", ".hidden", "ünï", "a\\b"])
def test_bad_stem_raises_and_writes_nothing(tmp_path, verdicts, meta, stem):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="stem"):
        write_report(verdicts, meta, out, stem)
    assert list(out.iterdir()) == []
    assert list(tmp_path.iterdir()) == [out]


def test_unserialisable_meta_is_coerced_not_half_written(tmp_path, verdicts):
    class Odd:
        def __str__(self) -> str:
            return "odd-object"

    json_path, _ = write_report(verdicts, {"model": "m", "thing": Odd(), "inf": float("inf")}, tmp_path, "odd")
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert doc["meta"]["thing"] == "odd-object" and doc["meta"]["inf"] is None


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("meta-llama/Llama-3.3-70B-Instruct", "meta-llama_Llama-3.3-70B-Instruct"),
        ("smollm2-135m", "smollm2-135m"),
        ("/data/models/my-llama/", "my-llama"),
        ("./checkpoints/run 7", "run_7"),
        ("C:\\models\\tiny", "tiny"),
    ],
)
def test_report_stem(key, expected):
    when = datetime(2025, 3, 4, 5, 6, 7)
    stem = report_stem(key, when)
    assert stem == f"{expected}-20250304-050607"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", stem)


def test_report_stem_is_accepted_by_write_report(tmp_path, verdicts, meta):
    stem = report_stem("meta-llama/Llama-3.3-70B-Instruct", datetime(2025, 1, 1))
    json_path, html_path = write_report(verdicts, meta, tmp_path, stem)
    assert json_path.name == f"{stem}.json" and html_path.name == f"{stem}.html"


def test_report_stem_rejects_empty_key():
    with pytest.raises(ValueError, match="model_key"):
        report_stem("  ", datetime(2025, 1, 1))
