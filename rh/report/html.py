"""The run report: one JSON file for machines, one self-contained HTML page and a terminal matrix for people.

Every ``pytest claims/`` run ends here. Verdicts arrive as plain dicts (``Verdict.to_dict()`` plus
the pytest ``nodeid``/``outcome``); a crashed claim arrives as ``{"status": "error", ...}`` and is
kept apart from the three verdicts. Both files are redacted of Hugging Face tokens, rendered fully
in memory and only then written atomically, so a failure leaves nothing half-written on disk. The
HTML page has no external resources: inline CSS, figures as base64 data URIs, no scripts.
:func:`format_matrix` prints the same claim matrix as plain text for the pytest terminal summary;
:mod:`rh.report.compare` combines the JSON reports of several runs into one page. The formatting
both pages share is in :mod:`rh.report.format`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rh.io import atomic_write_text, jsonable
from rh.report.format import (
    CSS,
    DASH,
    UNSAFE_CHARS_RE,
    as_float,
    badge,
    claim_of,
    display_time,
    escape,
    fmt_ci,
    fmt_effect,
    fmt_p,
    fmt_scalar,
    hardware_text,
    html_head,
    memory_text,
    p_text,
    params_text,
    reason_note,
    short_revision,
    shorten,
    status_of,
)
from rh.rules.verdict import STATUSES as VERDICT_STATUSES
from rh.rules.verdict import format_power

__all__ = [
    "STATUSES",
    "format_matrix",
    "provenance",
    "redact",
    "render_html",
    "report_stem",
    "summarize",
    "write_report",
]

#: The statuses a report counts, in display order; ``error`` is a crash, not a verdict.
STATUSES: tuple[str, ...] = (*VERDICT_STATUSES, "error")

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_REDACTED = "hf_***"
_STEM_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_STEM = 200
_MAX_LIST_ITEMS = 20  # long lists in details/meta are cut in the HTML (the JSON keeps them whole)

# Terminal: a symbol per status so the matrix reads without colour, ANSI SGR codes when it has it.
_SYMBOLS: dict[str, str] = {"supported": "+", "refuted": "x", "inconclusive": "?", "error": "!"}
_ANSI: dict[str, str] = {"supported": "32", "refuted": "1;31", "inconclusive": "33", "error": "1;35"}

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` with every Hugging Face token (``hf_`` + 20+ alphanumerics) replaced.

    Walks dicts (keys and values), lists, tuples and sets; any substring of a string that looks
    like a token becomes ``"hf_***"``, so a token inside a longer message is caught too.
    """
    if isinstance(obj, str):
        return _TOKEN_RE.sub(_REDACTED, obj)
    if isinstance(obj, Mapping):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [redact(v) for v in sorted(obj, key=repr)]
    return obj


def summarize(verdicts: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Count entries by status: always the four of :data:`STATUSES`, plus any unexpected status."""
    counts = {status: 0 for status in STATUSES}
    for verdict in verdicts:
        status = status_of(verdict)
        counts[status] = counts.get(status, 0) + 1
    return counts


def report_stem(model_key: str, when: datetime) -> str:
    """File stem ``<model>-<YYYYmmdd-HHMMSS>`` for a run of ``model_key`` started at ``when``.

    A Hugging Face id keeps its organisation (``meta-llama/Llama-3.3-70B-Instruct`` becomes
    ``meta-llama_Llama-3.3-70B-Instruct``); a local path becomes its last component; any other
    character outside letters, digits, ``-``, ``_``, ``.`` becomes ``_``.
    """
    if not isinstance(model_key, str) or not model_key.strip():
        raise ValueError(f"report_stem: model_key must be a non-empty string, got {model_key!r}")
    if not isinstance(when, datetime):
        raise ValueError(f"report_stem: when must be a datetime, got {when!r}")
    key = model_key.strip()
    if _looks_like_path(key):
        stripped = key.rstrip("/\\")
        name = PureWindowsPath(stripped).name if "\\" in stripped else PurePosixPath(stripped).name
        key = name or stripped
    safe = UNSAFE_CHARS_RE.sub("_", key).strip("._") or "model"
    return f"{safe}-{when.strftime('%Y%m%d-%H%M%S')}"


def format_matrix(verdicts: Sequence[Mapping[str, Any]], *, color: bool = False, width: int = 100) -> str:
    """The claim matrix as plain text for the terminal, then the counts (no trailing newline).

    One row per verdict — claim, parameters, verdict, effect [CI], adjusted p, n — in the order
    given; each status has its own symbol (``+`` supported, ``x`` refuted, ``?`` inconclusive,
    ``!`` error) and, with ``color=True``, its own ANSI colour. Inconclusive and errored rows get
    their reason on an indented line. The parameters column (then the reason) is cut with
    ``...`` to keep lines within ``width`` characters where that is possible.
    """
    verdicts = [v if isinstance(v, Mapping) else {"reason": repr(v)} for v in verdicts]
    width = max(int(width), 40)
    header = ("claim", "parameters", "verdict", "effect [CI]", "p adj", "n")
    rows: list[tuple[str, ...]] = []
    for v in verdicts:
        status = status_of(v)
        if status == "error":
            effect = p_cell = n_cell = "-"
        else:
            effect = _plain(fmt_effect(v.get("effect")) + (f" {fmt_ci(v.get('ci'))}" if fmt_ci(v.get("ci")) else ""))
            p_cell = _plain(p_text(v))
            n_cell = _plain(fmt_scalar(v.get("n")))
        rows.append((shorten(claim_of(v), 24), _plain(params_text(v)), _status_word(status),
                     effect, p_cell, n_cell))
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    gap = "  "
    fixed = sum(widths) - widths[1] + len(gap) * (len(header) - 1)
    widths[1] = max(min(widths[1], width - fixed), min(widths[1], 12))
    numeric = {3, 4, 5}

    def line(cells: Sequence[str], status: str | None = None) -> str:
        out = []
        for i, cell in enumerate(cells):
            text = shorten(cell, widths[i])
            text = text.rjust(widths[i]) if i in numeric else text.ljust(widths[i])
            if i == 2 and status is not None:
                text = _ansi(text, status, color)
            out.append(text)
        return gap.join(out).rstrip()

    lines = [line(header), gap.join("-" * w for w in widths)]
    for v, row in zip(verdicts, rows):
        status = status_of(v)
        lines.append(line(row, status))
        reason = " ".join(str(v.get("reason") or "").split())
        if status not in ("supported", "refuted") and reason:
            lines.append(shorten(f"    {_SYMBOLS.get(status, '~')} {reason}", width))
    if not verdicts:
        lines.append("(no claims were run)")
    counts = summarize(verdicts)
    parts = [_ansi(f"{n} {status}", status, color and n > 0) for status, n in counts.items()]
    lines.append(f"{len(verdicts)} results: " + ", ".join(parts))
    return "\n".join(lines)


def _fmt_architecture(arch: Any) -> str | None:
    """``llama (a family rh tests): GQA (9 query heads, 3 KV heads)``, from the run's
    ``meta["architecture"]`` (:func:`rh.models.attention_features`)."""
    if not isinstance(arch, Mapping) or not arch.get("model_type"):
        return None
    tested = (f"the {arch['tested_family']} family rh tests" if arch.get("tested_family")
              else "a family rh has no tiny-model tests for")
    feats = ", ".join(arch.get("features") or []) or "no special attention features"
    return f"{arch['model_type']} ({tested}): {feats}"


def provenance(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust or reproduce a run, as label -> value, from a report's meta.

    Model, model id and revision, dtype, rh version, profile and alpha, seeds, start/finish and
    runtime, command, software versions, platform and hardware. Values missing from the top level
    of ``meta`` are taken from the ranking's provenance (``meta["ranking"]["provenance"]``) where
    it has them; labels with no value are left out.
    """
    meta = meta if isinstance(meta, Mapping) else {}
    ranking = meta.get("ranking") if isinstance(meta.get("ranking"), Mapping) else {}
    rprov = ranking.get("provenance") if isinstance(ranking.get("provenance"), Mapping) else {}

    def first(*values: Any) -> Any:
        return next((v for v in values if v not in (None, "", {}, [])), None)

    seeds = meta.get("seeds")
    if not seeds:
        seeds = {k: rprov[k] for k in ("split_seed", "sample_seed", "draw_seed") if rprov.get(k) is not None}
    software = {k: meta[k] for k in ("python", "torch", "transformers") if meta.get(k)}
    runtime = as_float(meta.get("runtime_s"))
    out: dict[str, Any] = {
        "model": meta.get("model"),
        "model id": first(meta.get("model_id"), rprov.get("model_id")),
        "revision": first(meta.get("revision"), meta.get("model_revision"), rprov.get("revision")),
        "architecture": _fmt_architecture(meta.get("architecture")),
        "dtype": first(meta.get("dtype"), rprov.get("dtype")),
        "dtype chosen because": meta.get("dtype_reason"),
        "numerics": meta.get("numerics"),
        "head file": meta.get("heads_model_warning"),
        "rankings identified in": rprov.get("dtype") if meta.get("dtype") and rprov.get("dtype") != meta.get("dtype")
        else None,
        "quantization": first(meta.get("quant"), rprov.get("quant")),
        "rh version": first(meta.get("rh_version"), rprov.get("rh_version")),
        "profile": meta.get("profile"),
        "alpha": meta.get("alpha"),
        "seeds": seeds,
        "started": display_time(meta.get("started")) or None,
        "finished": display_time(meta.get("finished")) or None,
        "runtime": _fmt_runtime(runtime) if runtime is not None else meta.get("runtime_s"),
        "command": meta.get("command"),
        "software": software,
        "platform": meta.get("platform"),
        "hardware": first(meta.get("hardware"), meta.get("device")),
        "forward passes": _fmt_cost(meta.get("cost")),
        "layout": _fmt_layout(meta.get("layout")),
        "memory": memory_text(meta.get("memory")) or None,
        "ranking's stable core": _fmt_core(meta.get("ranking_uncertainty")),
        "budget": meta.get("budget", {}).get("summary") if isinstance(meta.get("budget"), Mapping) else None,
        "interrupted": (f"by {meta['interrupted'].get('by')}, {len(meta['interrupted'].get('not_run') or [])} "
                        "claims not run") if isinstance(meta.get("interrupted"), Mapping) else None,
        "resumed": (f"{len(meta['resumed'].get('claims') or [])} verdicts replayed from "
                    f"{meta['resumed'].get('journal')}") if isinstance(meta.get("resumed"), Mapping) else None,
    }
    if out["model id"] == out["model"]:
        out["model id"] = None
    return {k: v for k, v in out.items() if v not in (None, "", {}, [])}


def _fmt_layout(layout: Any) -> str | None:
    """Where the passes ran (:class:`rh.runner.Layout`) as a line: the executor and its replicas,
    the device and its map, the attention kernel."""
    if not isinstance(layout, Mapping) or not layout:
        return None
    if layout.get("executor") == "ray":
        each = [f"{layout['threads_per_replica']} threads" if layout.get("threads_per_replica") else "",
                f"{layout['gpus_per_replica']:g} GPUs" if layout.get("gpus_per_replica") else ""]
        where = f"{layout.get('replicas')} Ray replica(s)" + (f" of {', '.join(b for b in each if b)}"
                                                              if any(each) else "")
    else:
        where = "in one process"
    bits = [where, f"device {layout.get('device')}"]
    if layout.get("device_map"):
        bits.append(f"device_map {layout['device_map']}")
    if layout.get("attn"):
        bits.append(f"attention {layout['attn']}")
    if layout.get("controller_weights") is False:
        bits.append("the controller holds no weights")
    return ", ".join(bits)


def _fmt_core(unc: Any) -> str | None:
    """The ranking's stable core (:mod:`rh.uncertainty`) as a line: which heads, how sure, how it narrows."""
    if not isinstance(unc, Mapping) or not unc.get("p_top"):
        return None
    core = list(unc.get("stable_core") or [])
    line = (f"{len(core)} of the top {unc.get('k')} heads are in the top {unc.get('k')} of at least "
            f"{float(unc.get('core_threshold', 0.9)):.0%} of {unc.get('n_boot')} resamples of the "
            f"{unc.get('n_units')} {unc.get('unit', 'unit')}s: {', '.join(core) or 'none'}")
    nar = [r for r in unc.get("narrowing") or [] if isinstance(r, Mapping)]
    if nar:
        line += "; core size by units resampled: " + ", ".join(f"{r.get('n_units')}: {r.get('core_size')}" for r in nar)
    return line


def _fmt_cost(cost: Any) -> str | None:
    """``{"total": n, ...}`` token-layers as a line: the run's deterministic forward-pass bill."""
    if not isinstance(cost, Mapping) or cost.get("total") is None:
        return None
    from rh.budget import format_cost

    lines = format_cost(cost).splitlines()
    line = lines[0]
    if cost.get("seconds_per_token_layer"):
        line += f"; this machine: {float(cost['seconds_per_token_layer']) * 1e6:.2f} us per token-layer"
    rest = [x.strip() for x in lines[1:]]
    saved = [x for x in rest if x.startswith("left out")]
    per_claim = [" ".join(x.split()) for x in rest if not x.startswith("left out")]
    if saved:
        line += "; " + saved[0]
    if per_claim:
        line += "; per claim (shared fixtures billed to the first claim that ran): " + ", ".join(per_claim)
    return line


def render_html(
    verdicts: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    figures: Mapping[str, bytes] | None = None,
) -> str:
    """Render the report as one self-contained HTML page (inline CSS, no scripts, no network).

    Layout: title, provenance line and counts; the claim matrix; one section per claim id (statement,
    source, its figures, then each parametrization's verdict); the remaining figures; provenance
    (model, revision, rh version, seeds, runtime, hardware) and the full run metadata. A figure whose
    title starts with a claim id of this run and a colon (``"<claim id>: accuracy vs K"``) is shown in that
    claim's section; any other figure in the global Figures section. Every user-supplied value is
    HTML-escaped; inputs are not redacted here (:func:`write_report` redacts before rendering).
    """
    verdicts = [v if isinstance(v, Mapping) else {"reason": repr(v)} for v in verdicts]
    meta = meta if isinstance(meta, Mapping) else {"meta": meta}
    figures = dict(figures or {})
    claim_figures, global_figures = _split_figures(figures, [claim_of(v) for v in verdicts])
    counts = summarize(verdicts)
    model = meta.get("model") or meta.get("model_id") or "unknown model"
    when = display_time(meta.get("started") or meta.get("finished"))
    title = f"rh report \u2014 {model}" + (f" \u2014 {when}" if when else "")

    parts: list[str] = [
        *html_head(title, CSS),
        f"<h1>{escape(title)}</h1>",
        _render_subtitle(meta),
        _render_summary(counts, len(verdicts)),
        _render_interrupted(meta.get("interrupted")),
        _render_resumed(meta.get("resumed")),
        _render_nav(bool(global_figures)),
        '<h2 id="matrix">Claim matrix</h2>',
        _render_matrix(verdicts),
        '<h2 id="claims">Claims</h2>',
        _render_claim_sections(verdicts, claim_figures),
    ]
    if global_figures:
        parts += ['<h2 id="figures">Figures</h2>', _render_figures(global_figures)]
    prov = provenance(meta)
    parts += [
        '<h2 id="provenance">Provenance</h2>',
        _render_value(prov) if prov else f"<p>{DASH}</p>",
        '<h2 id="run">Run metadata</h2>',
        _render_value(meta) if meta else f"<p>{DASH}</p>",
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_report(
    verdicts: list[dict],
    meta: dict,
    out_dir: str | Path,
    stem: str,
    figures: dict[str, bytes] | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.html``; return their paths. A report
    already there (another run started in the same second) is kept: this one becomes ``<stem>-2``.

    Tokens are redacted from verdicts, meta and figure titles first. Both documents are built in
    memory before either file is touched, and each is written atomically, so bad input raises
    ``ValueError`` without leaving anything on disk. Non-finite floats become ``null`` in JSON.
    """
    if not isinstance(stem, str) or not _is_safe_stem(stem):
        raise ValueError(
            f"write_report: stem {stem!r} is not a safe file name; use letters, digits, '-', '_' "
            f"and '.' only (not starting with '.', at most {_MAX_STEM} characters), "
            "e.g. report_stem(model_key, datetime.now())"
        )
    if figures is not None and not isinstance(figures, Mapping):
        raise ValueError(f"write_report: figures must be a dict of title -> PNG bytes, got {type(figures).__name__}")
    clean_verdicts = jsonable(redact(list(verdicts)))
    clean_meta = jsonable(redact(dict(meta)))
    clean_figures = {redact(str(title)): data for title, data in (figures or {}).items()}
    document = {"meta": clean_meta, "summary": summarize(clean_verdicts), "verdicts": clean_verdicts}
    json_text = json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    html_text = render_html(clean_verdicts, clean_meta, clean_figures)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"write_report: out_dir {str(out)!r} exists and is not a folder")
    n = 1
    base = stem
    while (out / f"{stem}.json").exists() or (out / f"{stem}.html").exists():  # never overwrite another run's
        n += 1
        stem = f"{base}-{n}"
    json_path = atomic_write_text(out / f"{stem}.json", json_text)
    html_path = atomic_write_text(out / f"{stem}.html", html_text)
    return json_path, html_path


# --------------------------------------------------------------------------------------------
# Helpers: values
# --------------------------------------------------------------------------------------------


def _is_safe_stem(stem: str) -> bool:
    return bool(_STEM_RE.fullmatch(stem)) and not stem.startswith(".") and len(stem) <= _MAX_STEM


def _looks_like_path(key: str) -> bool:
    """A model key is a local path if it exists or is shaped like one (an HF id is ``org/name``)."""
    if key.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in key or re.match(r"^[A-Za-z]:", key):
        return True
    if key.count("/") > 1 or key.endswith("/"):
        return True
    try:
        return "/" in key and Path(key).expanduser().exists()
    except OSError:
        return False


def _plain(text: str) -> str:
    """Terminal text: the HTML dash for a missing value becomes an ASCII ``-``."""
    return text.replace(DASH, "-")


def _ansi(text: str, status: str, color: bool) -> str:
    code = _ANSI.get(status)
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def _status_word(status: str) -> str:
    return f"{_SYMBOLS.get(status, '~')} {status}"


def _fmt_runtime(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 120:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _split_figures(figures: Mapping[str, Any], claims: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Figures titled ``"<claim id>: ..."`` for a claim in this run go to that claim; the rest stay global."""
    known = set(claims)
    per_claim: dict[str, dict[str, Any]] = {}
    rest: dict[str, Any] = {}
    for title, data in figures.items():
        prefix, sep, _ = str(title).partition(":")
        if sep and prefix.strip() in known:
            per_claim.setdefault(prefix.strip(), {})[title] = data
        else:
            rest[title] = data
    return per_claim, rest


def _anchor(claim: str) -> str:
    return "claim-" + (UNSAFE_CHARS_RE.sub("-", claim).strip("-") or "unnamed")


# --------------------------------------------------------------------------------------------
# Helpers: HTML pieces
# --------------------------------------------------------------------------------------------


def _render_subtitle(meta: Mapping[str, Any]) -> str:
    prov = provenance(meta)
    bits = []
    for label in ("model id", "revision", "dtype", "profile", "rh version", "runtime"):
        value = prov.get(label)
        if value in (None, ""):
            continue
        if label == "revision":
            bits.append(f'{escape(label)}: <code title="{escape(value)}">{escape(short_revision(value))}</code>')
        else:
            bits.append(f"{escape(label)}: <code>{escape(value)}</code>")
    hardware = hardware_text(prov.get("hardware"))
    if hardware:
        bits.append(f"hardware: <code>{escape(hardware)}</code>")
    return f'<p class="sub">{" · ".join(bits)}</p>' if bits else ""


def _render_nav(has_figures: bool) -> str:
    links = [("matrix", "claim matrix"), ("claims", "claims")]
    links += [("figures", "figures")] if has_figures else []
    links += [("provenance", "provenance"), ("run", "run metadata")]
    return '<p class="nav">' + " · ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in links) + "</p>"


def _render_summary(counts: Mapping[str, int], total: int) -> str:
    items = [f"{badge(status)} {counts[status]}" for status in counts]
    return f'<p class="summary"><strong>{total}</strong> results: {" &nbsp; ".join(items)}</p>'


def _node_items(nodes: Any) -> tuple[list[str], str]:
    """Node ids as strings, and as the items of an HTML list."""
    names = [str(n) for n in nodes or []]
    return names, "".join(f"<li><code>{escape(n)}</code></li>" for n in names)


def _render_interrupted(stop: Any) -> str:
    """A run that a signal ended: say so above the matrix, with the claims it did not run."""
    if not isinstance(stop, Mapping):
        return ""
    not_run, items = _node_items(stop.get("not_run"))
    return (f'<div class="interrupted"><p><strong>Interrupted</strong> by {escape(str(stop.get("by")))}: '
            f'{escape(fmt_scalar(stop.get("finished")))} of {escape(fmt_scalar(stop.get("collected")))} claims '
            f"finished, and their verdicts are below; {len(not_run)} not run"
            + (f":</p><ul>{items}</ul></div>" if not_run else ".</p></div>"))


def _render_resumed(resumed: Any) -> str:
    """A run that resumed an interrupted one: which verdicts it replayed from the journal."""
    if not isinstance(resumed, Mapping) or not resumed.get("claims"):
        return ""
    claims, items = _node_items(resumed.get("claims"))
    return (f'<div class="resumed"><p><strong>Resumed</strong>: {len(claims)} verdict(s) below were finished by an '
            f"earlier run of the same inputs (model, options, rh's source, the claims' files) and replayed from "
            f"<code>{escape(str(resumed.get('journal')))}</code>; {escape(fmt_scalar(resumed.get('computed')))} "
            f"computed by this run.</p><details><summary>replayed</summary><ul>{items}</ul></details></div>")


def _render_matrix(verdicts: Sequence[Mapping[str, Any]]) -> str:
    if not verdicts:
        return "<p>No claims were run.</p>"
    rows = ["<table class=\"matrix\"><thead><tr><th>claim</th><th>parameters</th><th>verdict</th>"
            "<th>effect [CI]</th><th>p (adj.)</th><th>n</th><th>test</th></tr></thead><tbody>"]
    for v in verdicts:
        claim = claim_of(v)
        status = status_of(v)
        tooltip = f"pytest: {v['outcome']}" if v.get("outcome") else ""
        verdict_cell = badge(status, tooltip) + reason_note(v)
        if status == "error":
            effect_cell = p_cell = n_cell = test_cell = DASH
        else:
            effect_cell = _effect_cell(v)
            p_cell = _p_cell(v)
            n_cell = escape(fmt_scalar(v.get("n")))
            test_cell = escape(v.get("test") or DASH)
        rows.append(
            f'<tr class="row-{escape(UNSAFE_CHARS_RE.sub("-", status))}">'
            f'<td><a href="#{escape(_anchor(claim))}">{escape(claim)}</a></td>'
            f"<td>{escape(params_text(v))}</td>"
            f"<td>{verdict_cell}</td>"
            f'<td class="num">{effect_cell}</td><td class="num">{p_cell}</td>'
            f'<td class="num">{n_cell}</td><td>{test_cell}</td></tr>'
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _effect_cell(v: Mapping[str, Any]) -> str:
    effect = fmt_effect(v.get("effect"))
    ci = fmt_ci(v.get("ci"))
    name = v.get("effect_name") or ""
    level = as_float(v.get("ci_level"))
    tip = str(name) + (f" ({level * 100:g}% CI)" if level is not None and ci else "")
    text = escape(effect) + (f" {escape(ci)}" if ci else "")
    small = f'<br><small class="ename">{escape(name)}</small>' if name else ""
    title = f' title="{escape(tip)}"' if tip else ""
    return f"<span{title}>{text}</span>{small}{_power_note(v)}"


_POWER_TARGET = 0.8


def _power_note(v: Mapping[str, Any]) -> str:
    """Δ and the power to support / refute beside the CI; an inconclusive verdict is flagged when
    either is below 0.8 (it may have ended so for want of data). A supported or refuted verdict is
    not: the test that decided it rejected, whatever the other's power."""
    delta = as_float(v.get("min_effect"))
    power = v.get("power") if isinstance(v.get("power"), Mapping) else None
    if delta is None and not power:
        return ""
    parts = [f"Δ = {delta:g}"] if delta is not None else []
    if power:
        sup, ref = as_float(power.get("support")), as_float(power.get("refute"))
        if sup is not None or ref is not None:
            parts.append("power " + " / ".join(
                f"{w} {x:.2f}" for w, x in (("support", sup), ("refute", ref)) if x is not None))
            if status_of(v) == "inconclusive" and min(x for x in (sup, ref) if x is not None) < _POWER_TARGET:
                parts.append("underpowered at these sizes")  # why it may have ended so; a decided verdict stands
        elif power.get("note"):
            parts.append(f"power: {power['note']}")
    return f'<br><small class="power" title="{escape(str(power or ""))}">{escape(" · ".join(parts))}</small>'


def _p_cell(v: Mapping[str, Any]) -> str:
    adjusted, raw = v.get("p_adjusted"), v.get("p_value")
    if as_float(adjusted) is not None:
        return f"{escape(fmt_p(adjusted))}<br><small>raw {escape(fmt_p(raw))}</small>"
    if as_float(raw) is not None:
        return f"{escape(fmt_p(raw))}<br><small>unadjusted</small>"
    return DASH


def _render_claim_sections(
    verdicts: Sequence[Mapping[str, Any]], claim_figures: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    if not verdicts:
        return f"<p>{DASH}</p>"
    claim_figures = claim_figures or {}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for v in verdicts:  # first-appearance order, which is pytest's collection order
        groups.setdefault(claim_of(v), []).append(v)
    out: list[str] = []
    for claim, items in groups.items():
        statement = next((str(v["statement"]) for v in items if v.get("statement")), "")
        source = next((str(v["source"]) for v in items if v.get("source")), "")
        badges = " ".join(badge(s) + f" {n}" for s, n in summarize(items).items() if n)
        out.append(f'<section class="claim" id="{escape(_anchor(claim))}">')
        out.append(f"<h3>{escape(claim)} <span class=\"counts\">{badges}</span></h3>")
        if statement:
            out.append(f'<p class="statement">{escape(statement)}</p>')
        if source:
            out.append(f'<p class="source">Source: {escape(source)}</p>')
        if claim_figures.get(claim):
            out.append(_render_figures(claim_figures[claim], strip_prefix=claim))
        out.extend(_render_verdict(v) for v in items)
        out.append("</section>")
    return "\n".join(out)


def _render_verdict(v: Mapping[str, Any]) -> str:
    status = status_of(v)
    head = f"{badge(status)} <strong>{escape(params_text(v))}</strong>"
    if v.get("outcome"):
        head += f' <small>pytest: {escape(v["outcome"])}</small>'
    lines = [f'<div class="verdict verdict-{escape(UNSAFE_CHARS_RE.sub("-", status))}">', f"<p>{head}</p>"]
    reason = v.get("reason")
    if reason not in (None, ""):
        lines.append(f'<pre class="reason">{escape(reason)}</pre>')
    if status != "error":
        stats: list[tuple[str, str]] = []
        if v.get("test"):
            stats.append(("test", escape(v["test"])))
        if as_float(v.get("statistic")) is not None:
            stats.append(("statistic", escape(format(as_float(v["statistic"]), ".4g"))))
        stats.append(("p", escape(fmt_p(v.get("p_value")))))
        if as_float(v.get("p_adjusted")) is not None:
            stats.append(("p adjusted", escape(fmt_p(v.get("p_adjusted")))))
        label = str(v.get("effect_name") or "effect")
        ci = fmt_ci(v.get("ci"))
        level = as_float(v.get("ci_level"))
        ci_text = f" {ci}" + (f" ({level * 100:g}% CI)" if level is not None else "") if ci else ""
        stats.append((label, escape(fmt_effect(v.get("effect")) + ci_text)))
        if v.get("n") is not None:
            stats.append(("n", escape(fmt_scalar(v.get("n")))))
        if as_float(v.get("alpha")) is not None:
            stats.append(("alpha", escape(fmt_scalar(as_float(v.get("alpha"))))))
        if as_float(v.get("min_effect")) is not None:
            stats.append(("smallest effect of interest Δ", escape(format(as_float(v["min_effect"]), "g"))))
        if isinstance(v.get("power"), Mapping):
            stats.append(("power", escape(format_power(dict(v["power"])))))
        lines.append('<p class="stats">' + " · ".join(f"{escape(k)}: {val}" for k, val in stats) + "</p>")
    if v.get("nodeid"):
        lines.append(f'<p class="nodeid"><code>{escape(v["nodeid"])}</code></p>')
    details = v.get("details")
    if details not in (None, {}, [], ""):
        lines.append('<details open><summary>details</summary>')
        lines.append(_render_value(details))
        lines.append("</details>")
    lines.append("</div>")
    return "\n".join(lines)


def _render_value(value: Any, depth: int = 0) -> str:
    """Generic, escaped rendering of JSON-like data: dicts as key/value tables, lists shortened."""
    if depth > 8:
        return escape(json.dumps(jsonable(value))[:500])
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        rows = "".join(f"<tr><th>{escape(k)}</th><td>{_render_value(v, depth + 1)}</td></tr>"
                       for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        if not items:
            return "[]"
        shown = items[:_MAX_LIST_ITEMS]
        more = len(items) - len(shown)
        tail = f" <small>… ({more} more; full list in the JSON)</small>" if more else ""
        if all(not isinstance(x, Mapping | list | tuple | set | frozenset) for x in shown):
            return "[" + ", ".join(escape(fmt_scalar(x)) for x in shown) + "]" + tail
        lis = "".join(f"<li>{_render_value(x, depth + 1)}</li>" for x in shown)
        return f"<ol start=\"0\">{lis}</ol>{tail}"
    return escape(fmt_scalar(value))


def _render_figures(figures: Mapping[str, Any], strip_prefix: str = "") -> str:
    """Figures as ``<figure>`` with data URIs; ``strip_prefix`` drops ``"<claim id>:"`` from captions."""
    out = []
    for title, data in figures.items():
        caption = str(title)
        if strip_prefix and caption.partition(":")[0].strip() == strip_prefix:
            caption = caption.partition(":")[2].strip() or caption
        mime = _image_mime(data)
        if mime is None:
            out.append(f'<p class="missing">Figure {escape(title)} could not be embedded '
                       "(not PNG, JPEG or GIF bytes).</p>")
            continue
        uri = f"data:{mime};base64,{base64.b64encode(bytes(data)).decode('ascii')}"
        out.append(f'<figure><img src="{uri}" alt="{escape(title)}">'
                   f"<figcaption>{escape(caption)}</figcaption></figure>")
    return "\n".join(out)


def _image_mime(data: Any) -> str | None:
    if not isinstance(data, bytes | bytearray | memoryview):
        return None
    head = bytes(data[:8])
    return next((mime for magic, mime in _IMAGE_MAGIC if head.startswith(magic)), None)
