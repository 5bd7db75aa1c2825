"""Formatting shared by the run report (:mod:`rh.report.html`) and the comparison page
(:mod:`rh.report.compare`): escaping, the status badge, numbers, p-values, CIs, parameters, times,
revisions, hardware, the page head and its CSS. Every function returns text; none reads files."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rh.io import jsonable

__all__ = [
    "CSS",
    "DASH",
    "UNSAFE_CHARS_RE",
    "as_float",
    "badge",
    "claim_of",
    "display_time",
    "escape",
    "fmt_ci",
    "fmt_effect",
    "fmt_p",
    "fmt_params",
    "fmt_scalar",
    "hardware_text",
    "html_head",
    "p_text",
    "params_text",
    "reason_note",
    "short_revision",
    "shorten",
    "status_of",
]

#: Characters not allowed in a file stem or an HTML id/class (each run becomes ``_`` or ``-``).
UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
#: Shown for a missing value.
DASH = "\u2014"

_BADGE_COLOURS: dict[str, tuple[str, str]] = {  # status -> (background, text)
    "supported": ("#1a7f37", "#ffffff"),
    "refuted": ("#cf222e", "#ffffff"),
    "inconclusive": ("#d4a72c", "#1f2328"),
    "error": ("#24292f", "#ffffff"),
}
_UNKNOWN_BADGE = ("#8c959f", "#ffffff")
_NODEID_PARAMS_RE = re.compile(r"\[(.*)\]$")
_REVISION_SHORT = 12


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def escape(value: Any) -> str:
    """HTML-escape ``str(value)``, quotes included (safe in text and attributes)."""
    return html.escape(str(value), quote=True)


def status_of(verdict: Mapping[str, Any]) -> str:
    """The entry's status, lower-cased (``"unknown"`` when it has none)."""
    status = verdict.get("status")
    return str(status).strip().lower() if status not in (None, "") else "unknown"


def claim_of(v: Mapping[str, Any]) -> str:
    """The entry's claim id, else its pytest node id, else ``"?"``."""
    return str(v.get("claim") or v.get("nodeid") or "?")


def as_float(value: Any) -> float | None:
    """A finite float, or None for None, NaN, infinities and anything non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fmt_p(value: Any) -> str:
    """A p-value to 3 significant digits, ``<1e-4`` below that, a dash when missing."""
    p = as_float(value)
    if p is None:
        return DASH
    return "<1e-4" if p < 1e-4 else format(p, ".3g")


def fmt_effect(value: Any) -> str:
    """An effect to 3 decimals, a dash when missing or not finite."""
    x = as_float(value)
    return DASH if x is None else format(x, ".3f")


def fmt_ci(ci: Any) -> str:
    """``[lo, hi]`` for a two-element interval with a finite end, else ``""``."""
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        lo, hi = (as_float(c) for c in ci)
        if lo is not None or hi is not None:
            return f"[{fmt_effect(lo)}, {fmt_effect(hi)}]"
    return ""


def fmt_scalar(value: Any) -> str:
    """Plain text for a scalar in details/meta: floats to 4 significant digits, None to a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".4g") if math.isfinite(value) else str(value)
    return str(value)


def fmt_params(params: Any) -> str:
    """``key=value, ...`` for a parameter dict (nested values as JSON), a dash for none."""
    if isinstance(params, Mapping):
        pairs = []
        for key, value in params.items():
            nested = isinstance(value, Mapping | list | tuple | set | frozenset)
            pairs.append(f"{key}={json.dumps(jsonable(value)) if nested else fmt_scalar(value)}")
        return ", ".join(pairs) or DASH
    if params in (None, "", [], ()):
        return DASH
    return str(params)


def params_text(v: Mapping[str, Any]) -> str:
    """The verdict's parameters; for a crashed test (no params) the id in its nodeid's brackets."""
    text = fmt_params(v.get("params"))
    if text == DASH and v.get("nodeid"):
        match = _NODEID_PARAMS_RE.search(str(v["nodeid"]))
        if match and match.group(1):
            return match.group(1)
    return text


def p_text(v: Mapping[str, Any]) -> str:
    """The adjusted p-value, else the raw one marked as such, else a dash."""
    if as_float(v.get("p_adjusted")) is not None:
        return fmt_p(v.get("p_adjusted"))
    if as_float(v.get("p_value")) is not None:
        return f"{fmt_p(v.get('p_value'))} (raw)"
    return DASH


def display_time(value: Any) -> str:
    """An ISO timestamp as ``YYYY-mm-dd HH:MM:SS`` (other text unchanged, ``""`` for none)."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else (text[: max(limit - 3, 0)] + "...")[:limit]


def short_revision(revision: Any) -> str:
    """A commit hash or ``sha256:<hex>`` digest cut to its first 12 hex digits (the full one is a tooltip)."""
    text = str(revision)
    prefix, _, digest = text.rpartition(":")
    if re.fullmatch(r"[0-9a-fA-F]{13,}", digest):
        return (f"{prefix}:" if prefix else "") + digest[:_REVISION_SHORT]
    return text


def hardware_text(hardware: Any) -> str:
    """One line for a ``meta["hardware"]`` dict: GPU(s) (``gpu`` or ``gpus``) or device, CPU count, threads."""
    if not isinstance(hardware, Mapping):
        return "" if hardware in (None, "") else str(hardware)
    bits = []
    device, gpu = hardware.get("device"), hardware.get("gpu")
    gpus = hardware.get("gpus")
    if isinstance(gpus, list | tuple) and gpus:  # one name per device: "2 x NVIDIA H100"
        names = [str(g) for g in gpus]
        gpu = ", ".join(f"{names.count(g)} x {g}" if names.count(g) > 1 else g for g in dict.fromkeys(names))
    if gpu:
        bits.append(f"{gpu}" + (f" ({device})" if device and str(device) not in str(gpu) else ""))
    elif device:
        bits.append(str(device))
    if hardware.get("cpu_count") is not None:
        bits.append(f"{hardware['cpu_count']} CPUs")
    if hardware.get("torch_threads") is not None:
        bits.append(f"{hardware['torch_threads']} torch threads")
    known = {"device", "gpu", "gpus", "cpu_count", "torch_threads"}
    bits += [f"{k}: {fmt_scalar(v)}" for k, v in hardware.items() if k not in known and v not in (None, "")]
    return ", ".join(bits)


def _gb(n: Any) -> str:
    return f"{float(n) / 1e9:.2f} GB" if isinstance(n, int | float) else "?"


def _one_memory(m: Mapping[str, Any]) -> str:
    bits = [f"{_gb(m['rss_peak_bytes'])} resident" if m.get("rss_peak_bytes") is not None else "resident ?"]
    cuda = m.get("cuda_peak_bytes")
    if isinstance(cuda, Mapping) and cuda:
        bits.append("GPU tensors " + ", ".join(f"{d} {_gb(v)}" for d, v in cuda.items()))
    if m.get("prefix_cache_max_bytes"):
        bits.append(f"prefix cache at most {float(m.get('prefix_cache_peak_bytes') or 0) / 2**20:,.0f} MiB of its "
                    f"{float(m['prefix_cache_max_bytes']) / 2**20:,.0f} MiB cap")
    return ", ".join(bits)


def memory_text(memory: Any) -> str:
    """One line for a ``meta["memory"]`` dict (:meth:`rh.run.Run.memory`): the peak of this process
    and of each replica, in GB (10^9 bytes), and each prefix cache's peak against its cap."""
    if not isinstance(memory, Mapping):
        return ""
    parts = []
    if isinstance(memory.get("process"), Mapping):
        parts.append("peak in this process: " + _one_memory(memory["process"]))
    replicas = [m for m in memory.get("replicas") or [] if isinstance(m, Mapping)]
    if replicas:
        parts.append("; ".join(str(m["error"]) if m.get("error") else f"replica {i}: {_one_memory(m)}"
                               for i, m in enumerate(replicas)))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------


def html_head(title: str, css: str) -> list[str]:
    """The opening lines of a self-contained page, up to and including ``<body>``."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{css}</style>",
        "</head>",
        "<body>",
    ]


def badge(status: str, tooltip: str = "") -> str:
    """The coloured status label (``<span class="badge ...">``), with an optional tooltip."""
    bg, fg = _BADGE_COLOURS.get(status, _UNKNOWN_BADGE)
    title = f' title="{escape(tooltip)}"' if tooltip else ""
    return (f'<span class="badge badge-{escape(UNSAFE_CHARS_RE.sub("-", status))}" '
            f'style="background:{bg};color:{fg}"{title}>{escape(status)}</span>')


def reason_note(v: Mapping[str, Any], limit: int = 90) -> str:
    """For an inconclusive or errored entry, its reason in small text (cut; the whole as a tooltip)."""
    reason = " ".join(str(v.get("reason") or "").split())
    if status_of(v) in ("supported", "refuted") or not reason:
        return ""
    return f'<br><small class="why" title="{escape(reason)}">{escape(shorten(reason, limit))}</small>'


#: The report page's stylesheet; the comparison page adds its own rules to it.
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:72em;
padding:0 1em;color:#1f2328;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#57606a;margin-top:0}.summary{font-size:1.1em}
.interrupted{border:2px solid #cf222e;background:#ffebe9;padding:.2em 1em;margin:.5em 0}
.resumed{border:1px solid #9a6700;background:#fff8c5;padding:.2em 1em;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #d0d7de;padding:.25em .6em;
vertical-align:top;text-align:left}thead th{background:#f6f8fa}
table.matrix td.num{text-align:right;white-space:nowrap}
table.kv th{background:#f6f8fa;font-weight:600;white-space:nowrap}table.kv td{overflow-wrap:anywhere}
table.matrix td.num small.ename{white-space:normal}table.matrix th{white-space:nowrap}
.badge{display:inline-block;padding:.05em .55em;border-radius:.8em;font-size:.85em;font-weight:600}
small{color:#57606a}
section.claim{border-top:1px solid #d0d7de;padding-top:.4em;margin-top:1em}
.statement{font-style:italic}.source{color:#57606a;margin-top:-.5em}
.verdict{margin:.6em 0 .6em 1em;padding-left:.8em;border-left:3px solid #d0d7de}
pre.reason{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:.4em .6em;margin:.2em 0}
.stats{font-size:.92em}.nodeid{font-size:.85em;color:#57606a}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{color:#57606a}
.counts{font-size:.7em;font-weight:normal}
.nav{font-size:.9em}.nav a{color:#0969da}
.badge-supported::before{content:"\\2713\\00a0"}.badge-refuted::before{content:"\\2717\\00a0"}
.badge-inconclusive::before{content:"?\\00a0"}.badge-error::before{content:"!\\00a0"}
tr.row-refuted>td{background:#ffebe9}tr.row-inconclusive>td{background:#fff8c5}
tr.row-error>td{background:#eaeef2}
tr.row-refuted>td:first-child{box-shadow:inset 4px 0 #cf222e}
tr.row-inconclusive>td:first-child{box-shadow:inset 4px 0 #d4a72c}
tr.row-error>td:first-child{box-shadow:inset 4px 0 #24292f}
tr.row-supported>td:first-child{box-shadow:inset 4px 0 #1a7f37}
.verdict-supported{border-left-color:#1a7f37}.verdict-refuted{border-left-color:#cf222e;background:#fff5f5}
.verdict-inconclusive{border-left-color:#d4a72c;background:#fffbe6}
.verdict-error{border-left-color:#24292f;background:#f3f4f6}
small.why{display:inline-block;max-width:22em}
"""
