"""The expected-verdicts file (``fixtures/expected/<model>.json``): what CI compares a run with.

    {"model": "smollm2-135m", "profile": "quick",
     "verdicts": {"CA-1[k=10]": "supported", ...},
     "nodes": {"claims/test_causal.py::test_...[K=10]":
               {"key": "CA-1[k=10]", "status": "supported", "token_layers": 12345, "dtype": "float32"}},
     "fixture_token_layers": {"ca1_outcomes": 98765, ...},
     "recorded": {"float32": "...the run that measured the float32 rows..."}}

``verdicts`` is the contract; ``nodes`` ties each test to its verdict key and records what the
test cost in token-layers (:mod:`rh.budget`), so that a run with a budget can plan which claims
fit, and a run that checks only some claims knows which keys it left out. A file with only
``verdicts`` (the first format) still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rh.io import no_duplicate_keys
from rh.rules.verdict import STATUSES


@dataclass
class Expected:
    path: Path
    model: str | None = None
    profile: str | None = None
    verdicts: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixture_token_layers: dict[str, int] = field(default_factory=dict)
    fixture_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # {"seconds", "seconds_per_token_layer"}
    recorded: dict[str, str] = field(default_factory=dict)

    def key_of(self, nodeid: str) -> str | None:
        node = self.nodes.get(nodeid)
        return node.get("key") if node else None

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "profile": self.profile, "verdicts": dict(sorted(self.verdicts.items())),
                "nodes": dict(sorted(self.nodes.items())),
                "fixture_token_layers": dict(sorted(self.fixture_token_layers.items())),
                "fixture_seconds": dict(sorted(self.fixture_seconds.items())),
                "recorded": dict(sorted(self.recorded.items()))}


def load_expected(path: str | Path, *, missing_ok: bool = False) -> Expected:
    """Read and check an expected-verdicts file; every problem names the file and the fix."""
    p = Path(path)
    if not p.exists():
        if missing_ok:
            return Expected(p)
        raise FileNotFoundError(f"--expected {p}: no such file; create it with --expected {p} --update-expected")
    try:
        data = json.loads(p.read_text(), object_pairs_hook=no_duplicate_keys(f"--expected {p}", "; keep one"))
    except UnicodeDecodeError:
        raise ValueError(f"--expected {p}: not a text file; give the JSON file written by --update-expected") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--expected {p}: not valid JSON ({exc.msg} at line {exc.lineno}); restore it from git "
                         f"or rewrite it with --update-expected") from None
    if not isinstance(data, dict) or not isinstance(data.get("verdicts"), dict):
        raise ValueError(f"--expected {p}: expected a JSON object with a \"verdicts\" mapping of claim keys to "
                         f"statuses; rewrite it with --update-expected")
    bad = {k: v for k, v in data["verdicts"].items() if v not in STATUSES}
    if bad:
        raise ValueError(f"--expected {p}: statuses must be one of {', '.join(STATUSES)}; found {bad}")
    nodes = data.get("nodes") or {}
    if not isinstance(nodes, dict) or not all(isinstance(v, dict) and "key" in v for v in nodes.values()):
        raise ValueError(f"--expected {p}: \"nodes\" must map test ids to objects with a \"key\"")
    return Expected(p, data.get("model"), data.get("profile"), dict(data["verdicts"]), dict(nodes),
                    {str(k): int(v) for k, v in (data.get("fixture_token_layers") or {}).items()},
                    dict(data.get("fixture_seconds") or {}), dict(data.get("recorded") or {}))


@dataclass(frozen=True)
class Comparison:
    ok: bool
    lines: list[str]
    checked: int
    left_out: list[str]


def estimated_seconds(token_layers: float | None, record: dict[str, Any] | None, per_tl: float) -> float | None:
    """Seconds a test or fixture should take on this machine (``per_tl`` seconds per token-layer):
    its token-layers at this machine's speed, or, where the recording run also timed it, that time
    scaled by the two machines' speeds, whichever is larger (the second covers work that is not a
    forward pass: backward passes, bootstraps, probe fitting). None without a recorded cost."""
    if token_layers is None:
        return None
    est = float(token_layers) * per_tl
    if record and record.get("seconds") is not None and record.get("seconds_per_token_layer"):
        est = max(est, float(record["seconds"]) * per_tl / float(record["seconds_per_token_layer"]))
    return est


def compare(expected: Expected, rows: list[dict[str, Any]], *, left_out: dict[str, str]) -> Comparison:
    """Each verdict of this run against the file. ``rows`` are the run's verdict rows (``key``,
    ``status``, ``nodeid``); ``left_out`` the tests deliberately not run (budget, ``-k``), by
    node id, with the reason. A key of the file that was neither run nor left out is a failure
    (a claim that vanished); one that was left out is listed, not failed."""
    got = {r["key"]: r for r in rows}
    lines: list[str] = []
    ok = True
    for key, row in sorted(got.items()):
        want = expected.verdicts.get(key)
        if row["status"] == "left_out":
            continue
        if want is None:
            lines.append(f"{key}: got {row['status']}, absent from {expected.path}")
            ok = False
        elif want != row["status"]:
            lines.append(f"{key}: expected {want}, got {row['status']}")
            ok = False
    left_keys = {expected.key_of(n) or n: why for n, why in left_out.items()}
    left_keys.update({k: r.get("reason", "left out") for k, r in got.items() if r["status"] == "left_out"})
    missing = [k for k in sorted(expected.verdicts) if k not in got and k not in left_keys]
    unmapped = sorted(n for n in left_out if expected.key_of(n) is None)
    for k in missing:
        hint = (f" (left out without a recorded key: {', '.join(unmapped)}; record them with --update-expected)"
                if unmapped else "")
        lines.append(f"{k}: expected {expected.verdicts[k]}, but no test produced it{hint}")
        ok = False
    checked = sum(1 for r in got.values() if r["status"] != "left_out")
    if ok:
        lines.insert(0, f"all {checked} verdicts checked are as expected in {expected.path}")
    if left_keys:
        lines.append(f"left out ({len(left_keys)}, not compared): "
                     + "; ".join(f"{k} ({why})" for k, why in sorted(left_keys.items())))
    return Comparison(ok, lines, checked, sorted(left_keys))


def update(expected: Expected, rows: list[dict[str, Any]], *, model: str, profile: str, dtype: str,
           recorded: str, fixture_token_layers: dict[str, int], complete: bool,
           fixture_seconds: dict[str, float] | None = None,
           seconds_per_token_layer: float | None = None) -> tuple[Expected, list[str]]:
    """The file rewritten from this run. A run of every claim replaces the verdicts; a run of some
    (``complete=False``) merges into them and says which it kept. Refused for another model or
    profile; rows in error are never written (the old entry stays, and the caller fails the run)."""
    if expected.model not in (None, model) or expected.profile not in (None, profile):
        raise ValueError(f"--update-expected {expected.path}: the file is for model {expected.model!r}, profile "
                         f"{expected.profile!r}, this run is {model!r}, {profile!r}; give another --expected path")
    good = [r for r in rows if r["status"] in STATUSES]
    errors = [r for r in rows if r["status"] == "error"]
    new = Expected(expected.path, model, profile)
    if not complete:
        new.verdicts = dict(expected.verdicts)
        new.nodes = dict(expected.nodes)
        new.fixture_token_layers = dict(expected.fixture_token_layers)
        new.fixture_seconds = dict(expected.fixture_seconds)
        new.recorded = dict(expected.recorded)
    for r in errors:  # an errored claim keeps what the file said of it
        old_key = expected.key_of(r["nodeid"]) or r["key"]
        if old_key in expected.verdicts:
            new.verdicts[old_key] = expected.verdicts[old_key]
        if r["nodeid"] in expected.nodes:
            new.nodes[r["nodeid"]] = expected.nodes[r["nodeid"]]
    for r in good:
        new.verdicts[r["key"]] = r["status"]
        node = {"key": r["key"], "status": r["status"], "token_layers": r.get("token_layers"), "dtype": dtype}
        if r.get("seconds") is not None and seconds_per_token_layer:
            node.update(seconds=round(float(r["seconds"]), 2), seconds_per_token_layer=seconds_per_token_layer)
        new.nodes[r["nodeid"]] = node
    new.fixture_token_layers.update(fixture_token_layers)
    if seconds_per_token_layer:
        new.fixture_seconds.update({k: {"seconds": round(float(v), 2), "seconds_per_token_layer": seconds_per_token_layer}
                                    for k, v in (fixture_seconds or {}).items()})
    new.recorded[dtype] = recorded
    kept = sorted(set(new.verdicts) - {r["key"] for r in good})
    lines = [f"wrote {len(good)} verdicts to {expected.path}"
             + (f", kept {len(kept)} from the file (not run): {', '.join(kept)}" if kept and not complete else "")]
    if errors:
        lines.append(f"not written, in error: {', '.join(r['key'] for r in errors)} (their old entries stay)")
    return new, lines
