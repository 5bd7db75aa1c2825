"""Reports from several runs side by side: ``python -m rh report a.json b.json [...] -o out.html``.

Each run's JSON report (written by :func:`rh.report.write_report`) becomes one column of a matrix
whose rows are the (claim, parameters) pairs of all runs, so a reader sees at once where 8B and
70B, or the quick and the full profile, reach different verdicts. A header describes each run
(model, revision, profile, date, runtime, rh version, hardware). Rows whose runs disagree are
highlighted; a claim a run did not check shows a dash. The page is self-contained (inline CSS,
no scripts, no network), every value is escaped and Hugging Face tokens are redacted.

Rows are matched by the pytest node id (``claims/test_causal.py::test_...[K=5]``), which the plugin
records for every verdict and every crash, so a crashed test lines up with the verdict another run
reached; an entry without a node id is matched by its claim id and parameters instead.

With a single report, the page is that run's report re-rendered from its JSON (the figures live
only in the run's own HTML file, as the JSON does not keep them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rh.io import atomic_write_text
from rh.report.format import (
    CSS,
    DASH,
    UNSAFE_CHARS_RE,
    badge,
    claim_of,
    display_time,
    escape,
    fmt_ci,
    fmt_effect,
    hardware_text,
    html_head,
    p_text,
    params_text,
    reason_note,
    short_revision,
    status_of,
)
from rh.report.html import provenance, redact, render_html, summarize

__all__ = ["compare_reports", "default_output", "load_report", "main_report", "write_comparison"]

_REQUIRED = ("meta", "verdicts")
_MAX_NAME = 200


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and check one rh report JSON; return it with Hugging Face tokens redacted.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the
    problem for anything that is not an rh report (not UTF-8, not JSON, no ``meta``/``verdicts``,
    a verdict that is not an object or has no status).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; pass the .json files that pytest claims/ writes in reports/")
    if not path.is_file():
        raise ValueError(f"{path}: not a file; pass the .json files that pytest claims/ writes in reports/")
    hint = ""
    if path.suffix.lower() in (".html", ".htm"):
        hint = f"; this looks like the HTML page, pass the JSON beside it ({path.with_suffix('.json').name})"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not an rh report JSON{hint}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){hint}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the JSON is a {type(doc).__name__}, not an object with 'meta' and 'verdicts' "
                         "(an rh report)")
    missing = [key for key in _REQUIRED if key not in doc]
    if missing:
        keys = ", ".join(repr(k) for k in list(doc)[:8]) or "none"
        raise ValueError(f"{path}: not an rh report: missing {', '.join(repr(k) for k in missing)} "
                         f"(its keys: {keys}); pass a reports/<model>-<date>.json file")
    if not isinstance(doc["meta"], dict):
        raise ValueError(f"{path}: 'meta' is a {type(doc['meta']).__name__}, expected an object")
    if not isinstance(doc["verdicts"], list):
        raise ValueError(f"{path}: 'verdicts' is a {type(doc['verdicts']).__name__}, expected a list")
    for i, verdict in enumerate(doc["verdicts"]):
        if not isinstance(verdict, dict):
            raise ValueError(f"{path}: verdicts[{i}] is a {type(verdict).__name__}, expected an object")
        if not isinstance(verdict.get("status"), str) or not verdict["status"]:
            raise ValueError(f"{path}: verdicts[{i}] has no 'status' (supported, refuted, inconclusive or error)")
        if not (verdict.get("claim") or verdict.get("nodeid")):
            raise ValueError(f"{path}: verdicts[{i}] has neither 'claim' nor 'nodeid'")
    return redact(doc)


def compare_reports(paths: Sequence[str | Path]) -> str:
    """One self-contained HTML page comparing the runs in ``paths`` (rh report JSON files).

    Every file is loaded and checked before anything is rendered (see :func:`load_report`).
    One path re-renders that run's report (without figures, which the JSON does not keep).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compare_reports: no reports given; pass one or more rh report .json files")
    docs = [load_report(p) for p in paths]
    if len(docs) == 1:
        return render_html(docs[0]["verdicts"], docs[0]["meta"])
    return _render_comparison(paths, docs)


def write_comparison(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Render :func:`compare_reports` and write it atomically to ``out``; return ``out``.

    Refuses to overwrite one of the inputs or a folder; nothing is written when an input is bad.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the output file's name, e.g. {out / 'comparison.html'}")
    if any(out.resolve() == Path(p).resolve() for p in paths):
        raise ValueError(f"{out}: is one of the input reports; choose another output name")
    page = compare_reports(paths)
    return atomic_write_text(out, page)


def default_output(paths: Sequence[str | Path]) -> Path:
    """``<folder of the first report>/compare-<stem1>-vs-<stem2>....html`` (shortened when long)."""
    paths = [Path(p) for p in paths]
    stems = [UNSAFE_CHARS_RE.sub("_", p.stem) for p in paths]
    if len(stems) == 1:
        name = f"{stems[0]}-rerendered"
    else:
        name = "compare-" + "-vs-".join(stems)
        if len(name) > _MAX_NAME:
            name = f"compare-{stems[0][:120]}-and-{len(stems) - 1}-more"
    return paths[0].parent / f"{name}.html"


def main_report(argv: Sequence[str] | None = None) -> int:
    """``python -m rh report A.json [B.json ...] [-o OUT.html]``; 0 on success, 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog="python -m rh report",
        description="Combine the JSON reports of several pytest claims/ runs into one HTML comparison page "
                    "(one column per run, disagreeing rows highlighted). With one report, re-render its page.",
    )
    ap.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json",
                    help="rh report JSON files (reports/<model>-<date>.json), in column order")
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help="output HTML file (default: compare-<stems>.html beside the first report)")
    try:
        args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code, do not exit
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    out = args.out or default_output(args.reports)
    try:
        written = write_comparison(args.reports, out)
    except (ValueError, OSError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(written)
    return 0


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _row_keys(verdicts: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """A key per verdict: its node id, else (claim, parameters); repeats within a run are numbered."""
    seen: dict[tuple, int] = {}
    keys = []
    for v in verdicts:
        if v.get("nodeid"):
            base: tuple = ("node", str(v["nodeid"]))
        else:
            params = json.dumps(v.get("params"), sort_keys=True, default=str)
            base = ("claim", claim_of(v), params)
        seen[base] = seen.get(base, 0) + 1
        keys.append(base + (seen[base],))
    return keys


def _rows(docs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[Mapping[str, Any] | None]]]:
    """(claim, parameters, one verdict or None per run), grouped by claim in first-appearance order."""
    cells: dict[tuple, list[Mapping[str, Any] | None]] = {}
    labels: dict[tuple, tuple[str, str]] = {}
    for run, doc in enumerate(docs):
        for key, v in zip(_row_keys(doc["verdicts"]), doc["verdicts"]):
            if key not in cells:
                cells[key] = [None] * len(docs)
                labels[key] = (claim_of(v), params_text(v))
            cells[key][run] = v
    order = {claim: i for i, claim in enumerate(dict.fromkeys(claim for claim, _ in labels.values()))}
    keys = sorted(cells, key=lambda k: order[labels[k][0]])  # stable: first appearance within a claim
    return [(labels[k][0], labels[k][1], cells[k]) for k in keys]


def _row_state(cells: Sequence[Mapping[str, Any] | None]) -> str:
    statuses = {status_of(v) for v in cells if v is not None}
    if len(statuses) > 1:
        return "disagree"
    return "partial" if any(v is None for v in cells) else "agree"


def _run_label(i: int, meta: Mapping[str, Any]) -> str:
    bits = [str(meta.get("model") or "?")]
    if meta.get("profile"):
        bits.append(str(meta["profile"]))
    return f"run {i + 1}: " + " ".join(bits)


def _render_comparison(paths: Sequence[Path], docs: Sequence[Mapping[str, Any]]) -> str:
    metas = [d["meta"] for d in docs]
    rows = _rows(docs)
    states = [_row_state(cells) for _, _, cells in rows]
    n_disagree, n_partial = states.count("disagree"), states.count("partial")
    title = "rh comparison \u2014 " + " vs ".join(_run_label(i, m).split(": ", 1)[1] for i, m in enumerate(metas))
    parts = [
        *html_head(title, CSS + _COMPARE_CSS),
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary"><strong>{len(rows)}</strong> claim settings across <strong>{len(docs)}</strong> runs: '
        f'<span class="tag tag-disagree">{n_disagree} disagree</span> '
        f'<span class="tag tag-partial">{n_partial} missing from a run</span></p>',
        _render_disagreements(rows, states),
        '<h2 id="runs">Runs</h2>',
        _render_runs(paths, docs),
        '<h2 id="matrix">Claim matrix</h2>',
        '<p class="legend">Rows where the runs reach different verdicts are highlighted and marked '
        f'\u2260; {escape(DASH)} means the run did not check that claim setting.</p>',
        _render_matrix(rows, states, metas),
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _render_disagreements(rows, states) -> str:
    links = [f'<a href="#{escape(_row_anchor(i))}">{escape(claim)} {escape(params)}</a>'
             for i, ((claim, params, _), state) in enumerate(zip(rows, states)) if state == "disagree"]
    if not links:
        return '<p class="agree-note">The runs agree on every claim setting they share.</p>'
    return '<p class="disagree-list">Disagreements: ' + ", ".join(links) + "</p>"


def _render_runs(paths: Sequence[Path], docs: Sequence[Mapping[str, Any]]) -> str:
    head = ("run", "file", "model", "model id", "revision", "profile", "started", "runtime", "rh version",
            "hardware", "results")
    out = ['<table class="runs"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, (path, doc) in enumerate(zip(paths, docs)):
        meta = doc["meta"]
        prov = provenance(meta)
        revision = prov.get("revision")
        rev_cell = (f'<code title="{escape(revision)}">{escape(short_revision(revision))}</code>'
                    if revision else DASH)
        counts = summarize(doc["verdicts"])
        cells = [
            f"<strong>{i + 1}</strong>",
            f"<code>{escape(redact(path.name))}</code>",
            escape(prov.get("model") or DASH),
            escape(prov.get("model id") or DASH),
            rev_cell,
            escape(prov.get("profile") or DASH) + (f"<br><small>alpha {escape(prov['alpha'])}</small>"
                                                if prov.get("alpha") is not None else ""),
            escape(display_time(meta.get("started")) or DASH),
            escape(prov.get("runtime") or DASH),
            escape(prov.get("rh version") or DASH),
            escape(hardware_text(prov.get("hardware")) or meta.get("platform") or DASH),
            "<br>".join(f"{badge(s)}\u00a0{n}" for s, n in counts.items() if n) or "no claims",
        ]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _render_matrix(rows, states, metas) -> str:
    if not rows:
        return "<p>No claims in any run.</p>"
    head = "<th>claim</th><th>parameters</th>" + "".join(
        f"<th>{escape(_run_label(i, m))}</th>" for i, m in enumerate(metas))
    out = [f'<table class="matrix compare"><thead><tr><th></th>{head}</tr></thead><tbody>']
    for i, ((claim, params, cells), state) in enumerate(zip(rows, states)):
        mark = '<span title="the runs disagree">\u2260</span>' if state == "disagree" else ""
        tds = "".join(_render_cell(v) for v in cells)
        out.append(f'<tr id="{escape(_row_anchor(i))}" class="row-{state}"><td class="mark">{mark}</td>'
                   f"<td>{escape(claim)}</td><td>{escape(params)}</td>{tds}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _render_cell(v: Mapping[str, Any] | None) -> str:
    if v is None:
        return f'<td class="missing" title="not checked in this run">{escape(DASH)}</td>'
    status = status_of(v)
    tooltip = f"pytest: {v['outcome']}" if v.get("outcome") else ""
    lines = [badge(status, tooltip)]
    if status != "error":
        ci = fmt_ci(v.get("ci"))
        effect = fmt_effect(v.get("effect"))
        if effect != DASH or ci:
            lines.append(f'<span class="effect">{escape(effect)}{escape(" " + ci) if ci else ""}</span>')
        stats = [f"p adj {escape(p_text(v))}"] if p_text(v) != DASH else []
        stats += [f"n {escape(v['n'])}"] if v.get("n") is not None else []
        if stats:
            lines.append("<small>" + " · ".join(stats) + "</small>")
    return f'<td class="cell cell-{escape(UNSAFE_CHARS_RE.sub("-", status))}">' + "<br>".join(lines) \
        + reason_note(v, limit=70) + "</td>"


def _row_anchor(i: int) -> str:
    return f"row-{i + 1}"


_COMPARE_CSS = """
table.runs td{font-size:.9em}table.runs td:nth-child(10){min-width:11em}table.runs td:nth-child(7),table.runs td:nth-child(8),table.runs td:last-child{white-space:nowrap}table.runs td code{font-size:.95em}
table.compare td.cell{white-space:nowrap}table.compare td.cell small{white-space:normal}
table.compare td.mark{font-weight:700;color:#cf222e;text-align:center;font-size:1.2em}
table.compare tr.row-disagree>td{background:#fff1c2}
table.compare tr.row-disagree>td:first-child{box-shadow:inset 5px 0 #bf8700}
table.compare tr.row-partial>td.missing{background:#f6f8fa}
td.missing{color:#8c959f;text-align:center;vertical-align:middle}
.tag{display:inline-block;padding:.05em .5em;border-radius:.3em;font-size:.9em}
.tag-disagree{background:#fff1c2;border:1px solid #bf8700}.tag-partial{background:#f6f8fa;border:1px solid #d0d7de}
.disagree-list a{color:#0969da}.legend{color:#57606a}
"""
