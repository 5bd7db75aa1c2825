"""Unit tests of rh.report (rh.report.html): JSON/HTML contents, escaping, redaction, embedding, file safety."""

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

from rh.report import format_matrix, provenance, redact, render_html, report_stem, summarize, write_report


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


# --------------------------------------------------------------------------------------------
# Terminal matrix
# --------------------------------------------------------------------------------------------


def test_format_matrix_lists_every_entry_and_hand_counted_totals(verdicts):
    text = format_matrix(verdicts, width=100)
    assert "\x1b[" not in text  # no colour unless asked
    lines = text.splitlines()
    assert lines[0].split() == ["claim", "parameters", "verdict", "effect", "[CI]", "p", "adj", "n"]
    body = [line for line in lines[2:-1] if not line.startswith("    ")]
    assert len(body) == len(verdicts)
    for line, v in zip(body, verdicts):
        assert line.startswith(v["claim"])
        assert v["status"] in line
    assert "k=10" in body[0] and "k=20" in body[1]
    assert "+ supported" in body[0] and "x refuted" in body[1] and "? inconclusive" in body[2]
    assert "! error" in body[4]
    assert "0.620 [0.410, 0.800]" in body[0] and "0.0369" in body[0] and body[0].rstrip().endswith("40")
    # inconclusive and errored rows carry their reason on the next line
    assert any("baseline too low" in line for line in lines) and any("CUDA out of memory" in line for line in lines)
    hand = {"supported": 2, "refuted": 1, "inconclusive": 1, "error": 1}
    assert lines[-1] == f"{len(verdicts)} results: " + ", ".join(f"{n} {s}" for s, n in hand.items())


def test_format_matrix_colour_width_and_empty(verdicts):
    verdicts[0]["params"] = {"task": "x" * 300, "k": 10}
    coloured = format_matrix(verdicts, color=True, width=80)
    assert "\x1b[32m" in coloured and "\x1b[1;31m" in coloured and "\x1b[33m" in coloured and "\x1b[0m" in coloured
    plain = format_matrix(verdicts, width=80)
    assert max(len(line) for line in plain.splitlines()) <= 80
    assert "..." in plain.splitlines()[2]  # the long parameter is cut, not wrapped
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain  # colour changes nothing else
    assert format_matrix([]).splitlines()[-1] == "0 results: 0 supported, 0 refuted, 0 inconclusive, 0 error"


def test_format_matrix_error_row_takes_params_from_nodeid():
    text = format_matrix([{"claim": "CA-1", "nodeid": "claims/t.py::test_a[K=20]", "status": "error",
                           "reason": "boom"}])
    assert "K=20" in text.splitlines()[2] and "! error" in text


# --------------------------------------------------------------------------------------------
# Per-run page: provenance, per-claim figures, visibly distinct statuses
# --------------------------------------------------------------------------------------------


def _section(page: str, anchor: str) -> str:
    start = page.index(f'id="{anchor}"')
    return page[start:page.index("</section>", start)]


def test_provenance_block_has_model_revision_seeds_runtime_and_hardware(verdicts, meta):
    meta = {**meta, "ranking": {"provenance": {"revision": "a" * 40, "split_seed": 0, "dtype": "bfloat16"}},
            "hardware": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "torch_threads": 8}}
    prov = provenance(meta)
    assert prov["revision"] == "a" * 40 and prov["rh version"] == "0.1.0" and prov["dtype"] == "bfloat16"
    assert prov["seeds"] == {"split": 0, "random_heads": [1, 2, 3]} and prov["runtime"] == "2 min 00 s"
    page = render_html(verdicts, meta)
    block = page.split('id="provenance"', 1)[1].split('id="run"', 1)[0]
    for text in ("smollm2-135m", "a" * 40, "0.1.0", "random_heads", "2 min 00 s", "NVIDIA H100 80GB HBM3",
                 "torch_threads", "cpu_count", "pytest claims/", "quick"):
        assert text in block, text
    sub = page.split('class="sub"', 1)[1].split("</p>", 1)[0]
    assert "a" * 12 in sub and "NVIDIA H100 80GB HBM3 (cuda), 16 CPUs, 8 torch threads" in sub
    assert page.index('id="matrix"') < page.index('id="claims"') < page.index('id="provenance"') < page.index('id="run"')
    # without a ranking provenance, the seeds fall back to nothing rather than failing
    assert "seeds" not in provenance({"model": "m"})


def test_provenance_says_where_the_passes_ran_and_the_peak_memory_of_each_process():
    layout = {"model": "m", "executor": "ray", "replicas": 4, "gpus_per_replica": 2.0, "threads_per_replica": None,
              "device": "cuda", "device_map": "auto", "attn": "sdpa", "controller_weights": False}
    memory = {"process": {"rss_peak_bytes": 1_050_000_000},
              "replicas": [{"rss_peak_bytes": 2_000_000_000, "cuda_peak_bytes": {"cuda:0": 70e9, "cuda:1": 69e9}}]}
    prov = provenance({"model": "m", "layout": layout, "memory": memory})
    assert prov["layout"] == ("4 Ray replica(s) of 2 GPUs, device cuda, device_map auto, attention sdpa, the controller "
                              "holds no weights")
    assert prov["memory"].startswith("peak in this process: 1.05 GB resident; replica 0: 2.00 GB resident, GPU tensors "
                                     "cuda:0 70.00 GB, cuda:1 69.00 GB")
    local = provenance({"model": "m", "layout": {**layout, "executor": "local", "replicas": 1, "device": "cpu",
                                                 "device_map": None, "controller_weights": True}})
    assert local["layout"] == "in one process, device cpu, attention sdpa" and "memory" not in local


def test_claim_prefixed_figures_go_to_their_claim_section(verdicts, meta):
    png = _png_bytes()
    figures = {"CA-1: accuracy vs K": png, "ID-2: spike": png + b"2", "ZZ-9: no such claim": png,
               "head grid": png}
    page = render_html(verdicts, meta, figures)
    ca1, id2, id1 = _section(page, "claim-CA-1"), _section(page, "claim-ID-2"), _section(page, "claim-ID-1")
    assert 'alt="CA-1: accuracy vs K"' in ca1 and "<figcaption>accuracy vs K</figcaption>" in ca1
    assert 'alt="ID-2: spike"' in id2 and "<figure" not in id1
    global_figs = page.split('id="figures"', 1)[1].split('id="provenance"', 1)[0]
    assert 'alt="head grid"' in global_figs and 'alt="ZZ-9: no such claim"' in global_figs
    assert "CA-1: accuracy vs K" not in global_figs
    assert page.count("data:image/png;base64,") == 4
    # only claim figures: no global Figures section at all
    assert 'id="figures"' not in render_html(verdicts, meta, {"CA-1: curve": png})


def test_refuted_inconclusive_and_error_are_visibly_distinct(verdicts, meta):
    page = render_html(verdicts, meta)
    matrix = page.split('id="matrix"', 1)[1].split('id="claims"', 1)[0]
    assert re.findall(r'<tr class="row-(\w+)"', matrix) == [v["status"] for v in verdicts]
    css = page.split("<style>", 1)[1].split("</style>", 1)[0]
    backgrounds = {s: re.search(rf"tr\.row-{s}>td\{{background:(#[0-9a-f]+)", css).group(1)
                   for s in ("refuted", "inconclusive", "error")}
    assert len(set(backgrounds.values())) == 3 and "#ffffff" not in backgrounds.values()
    symbols = {s: re.search(rf'\.badge-{s}::before\{{content:"([^"]+)"', css).group(1)
               for s in ("supported", "refuted", "inconclusive", "error")}
    assert len(set(symbols.values())) == 4  # a symbol per status, readable without colour
    assert "baseline too low" in matrix  # an inconclusive row says why in the matrix
    claims = page.split('id="claims"', 1)[1]
    for status in ("supported", "refuted", "inconclusive", "error"):
        assert f'class="verdict verdict-{status}"' in claims


def test_hardware_with_a_list_of_gpus_is_summarised(verdicts, meta):
    meta = {**meta, "hardware": {"device": "cuda", "gpus": ["NVIDIA H100", "NVIDIA H100", "A100"], "cpu_count": 16,
                                 "torch_threads": 16}}
    sub = render_html(verdicts, meta).split('class="sub"', 1)[1].split("</p>", 1)[0]
    assert "2 x NVIDIA H100, A100 (cuda), 16 CPUs, 16 torch threads" in sub


def test_html_shows_delta_and_power_beside_the_ci_and_flags_low_power(meta):
    base = {"claim": "CA-6", "status": "inconclusive", "reason": "neither shown", "effect": 0.1, "ci": [0.0, 0.2],
            "ci_level": 0.9, "n": 16, "alpha": 0.05, "params": {"depth": 0.5}}
    low = {**base, "min_effect": 0.2, "power": {"support": 0.37, "support_at": 0.3, "refute": 0.03, "refute_at": 0.0,
                                                "method": "exact", "note": ""}}
    high = {**base, "claim": "CA-4", "min_effect": 0.25, "power": {"support": 0.98, "support_at": 0.3, "refute": 0.99,
                                                                   "refute_at": 0.0, "method": "exact", "note": ""}}
    page = render_html([low, high], meta)
    claims = page.split('id="matrix"', 1)[1]
    assert "Δ = 0.2 · power support 0.37 / refute 0.03 · underpowered at these sizes" in claims
    assert "Δ = 0.25 · power support 0.98 / refute 0.99" in claims
    assert claims.count("underpowered at these sizes") == 1
    assert "smallest effect of interest Δ" in page and "support 0.37 at 0.3, refute 0.03 at 0" in page
    # a supported verdict with low power to refute: its test rejected, so no "underpowered" beside it
    decided = render_html([{**low, "status": "supported", "reason": ""}], meta).split('id="matrix"', 1)[1]
    assert "power support 0.37 / refute 0.03" in decided and "underpowered" not in decided


def test_the_new_powers_reach_the_report_and_its_flag(meta):
    """The agreement rule's simulated power (ID-4), from a real verdict through to_dict to the page:
    an inconclusive verdict of 9 prompts on heads that noise cannot separate is flagged
    underpowered; CA-5's reason without numbers is shown as its power. Catches a power that stops
    at the verdict (not serialised, or not read by the report)."""
    import numpy as np

    from rh.rules.claims import agreement
    from rh.rules.verdict import Power

    rng = np.random.default_rng(0)
    v = agreement("ID-4", rng.normal(0, 1, (9, 40)), rng.normal(0, 1, (9, 40)), k=5, min_effect=2,
                  same_prompts=True, baseline_accuracy=0.9, n_boot=50)
    assert v.inconclusive and v.power.method.startswith("simulated") and v.power.support < 0.8
    ca5 = {"claim": "CA-5", "status": "supported", "reason": "", "params": {"k": 10}, "n": 4, "alpha": 0.05,
           "power": Power.none("an exact identity").to_dict()}
    claims = render_html([v.to_dict(), ca5], meta).split('id="matrix"', 1)[1]
    assert f"Δ = 2 · power support {v.power.support:.2f} / refute {v.power.refute:.2f} · underpowered" in claims
    assert "power: an exact identity" in claims
