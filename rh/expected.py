"""The expected-verdicts file (``fixtures/expected/<model>.json``): what CI compares a run with.

    {"model": "smollm2-135m", "profile": "quick",
     "verdicts": {"CA-1[k=10]": "supported", ...},
     "nodes": {"claims/test_causal.py::test_...[K=10]":
               {"key": "CA-1[k=10]", "status": "supported", "token_layers": 12345, "dtype": "float32"}},
     "fixture_token_layers": {"ca1_outcomes": 98765, ...},
     "recorded": {"float32": "...the run that measured the float32 rows..."}}

``verdicts`` is the contract; ``numerics`` says which arithmetic gave them (:func:`rh.models.numerics`:
the dtype and the kernels, e.g. ``"bfloat16 on CPU AVX512 + avx512_bf16"``). A borderline verdict can
move with the kernels' rounding: bf16 matmuls on AMX tiles and on AVX-512 BF16 units accumulate in
another order, and an item at the edge of its answer flips. A run on other numerics writes
(``--update-expected``) only the statuses that differ there, under ``differences[numerics]``, and a
run on those numerics is compared with them (every other key with ``verdicts``)::

    "numerics": "bfloat16 on CPU AVX512 + avx512_bf16",
    "differences": {"bfloat16 on CPU AVX512 + AMX, 2 threads": {"CA-10[k=10,phase=decode]": "refuted"}}

An empty map records numerics that gave every status of ``verdicts``. Numerics with no record are
compared with ``verdicts``, and a difference is said to be possibly theirs. ``nodes`` ties each test to its verdict key and records what the
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
    numerics: str | None = None  # the arithmetic ``verdicts`` were computed in (rh.models.numerics)
    differences: dict[str, dict[str, str]] = field(default_factory=dict)  # other numerics: the statuses that differ

    def want(self, key: str, numerics: str | None = None) -> str | None:
        """The status expected for ``key`` on ``numerics``: the one recorded for them where it
        differs, else the file's."""
        if numerics is not None and numerics != self.numerics:
            other = self.differences.get(numerics) or {}
            if key in other:
                return other[key]
        return self.verdicts.get(key)

    def recorded_for(self, numerics: str | None) -> bool:
        """Whether the file holds statuses computed on ``numerics`` (its own, or a record of theirs)."""
        return numerics is None or self.numerics in (None, numerics) or numerics in self.differences

    def key_of(self, nodeid: str) -> str | None:
        node = self.nodes.get(nodeid)
        return node.get("key") if node else None

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "profile": self.profile, "verdicts": dict(sorted(self.verdicts.items())),
                "nodes": dict(sorted(self.nodes.items())),
                "fixture_token_layers": dict(sorted(self.fixture_token_layers.items())),
                "fixture_seconds": dict(sorted(self.fixture_seconds.items())),
                "recorded": dict(sorted(self.recorded.items())),
                **({"numerics": self.numerics} if self.numerics else {}),
                **({"differences": {n: dict(sorted(d.items())) for n, d in sorted(self.differences.items())}}
                   if self.differences else {})}


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
    numerics = data.get("numerics")
    if numerics is not None and not isinstance(numerics, str):
        raise ValueError(f"--expected {p}: \"numerics\" must be a string such as \"bfloat16 on CPU AVX512 + AMX, 2 threads\"")
    differences = data.get("differences") or {}
    if not isinstance(differences, dict) or not all(isinstance(d, dict) for d in differences.values()):
        raise ValueError(f"--expected {p}: \"differences\" must map numerics to {{claim key: status}}")
    bad = {f"{n}: {k}": v for n, d in differences.items() for k, v in d.items() if v not in STATUSES}
    if bad:
        raise ValueError(f"--expected {p}: statuses under \"differences\" must be one of {', '.join(STATUSES)}; "
                         f"found {bad}")
    return Expected(p, data.get("model"), data.get("profile"), dict(data["verdicts"]), dict(nodes),
                    {str(k): int(v) for k, v in (data.get("fixture_token_layers") or {}).items()},
                    dict(data.get("fixture_seconds") or {}), dict(data.get("recorded") or {}), numerics,
                    {str(n): dict(d) for n, d in differences.items()})


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


def compare(expected: Expected, rows: list[dict[str, Any]], *, left_out: dict[str, str],
            numerics: str | None = None) -> Comparison:
    """Each verdict of this run against the file. ``rows`` are the run's verdict rows (``key``,
    ``status``, ``nodeid``); ``left_out`` the tests deliberately not run (budget, ``-k``), by
    node id, with the reason; ``numerics`` this run's arithmetic (:func:`rh.models.numerics`):
    its statuses are those the file records for it (:meth:`Expected.want`). A key of the file that
    was neither run nor left out is a failure (a claim that vanished); one that was left out is
    listed, not failed."""
    got = {r["key"]: r for r in rows}
    lines: list[str] = []
    ok = True
    for key, row in sorted(got.items()):
        want = expected.want(key, numerics)
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
        lines.append(f"{k}: expected {expected.want(k, numerics)}, but no test produced it{hint}")
        ok = False
    if numerics is not None and expected.numerics not in (None, numerics):
        if expected.recorded_for(numerics):
            where = (f"compared with the statuses recorded for this run's numerics ({numerics}): the file's own are "
                     f"{expected.numerics}'s")
        else:
            where = (f"this run's numerics ({numerics}) are not the file's ({expected.numerics}) and the file records "
                     "none of theirs: a borderline verdict can move with the kernels' rounding. If the run is "
                     "otherwise sound, record these numerics' statuses with --update-expected (only those that "
                     "differ are written)")
        if not ok:
            lines.append(where)
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
           seconds_per_token_layer: float | None = None, numerics: str | None = None) -> tuple[Expected, list[str]]:
    """The file rewritten from this run. A run of every claim replaces the verdicts; a run of some
    (``complete=False``) merges into them and says which it kept. Refused for another model or
    profile; rows in error are never written (the old entry stays, and the caller fails the run).

    A run on other ``numerics`` than the file's writes only the statuses that differ from the
    file's, under ``differences[numerics]`` (:func:`record_differences`); the file's verdicts and
    costs stay. A run on the file's numerics (or into a file that names none) rewrites the
    verdicts; another numerics' differences that now equal them are dropped."""
    if expected.model not in (None, model) or expected.profile not in (None, profile):
        raise ValueError(f"--update-expected {expected.path}: the file is for model {expected.model!r}, profile "
                         f"{expected.profile!r}, this run is {model!r}, {profile!r}; give another --expected path")
    if numerics is not None and expected.numerics not in (None, numerics):
        return record_differences(expected, rows, numerics=numerics, recorded=recorded, complete=complete)
    good = [r for r in rows if r["status"] in STATUSES]
    errors = [r for r in rows if r["status"] == "error"]
    new = Expected(expected.path, model, profile, numerics=numerics or expected.numerics)
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
    new.recorded[numerics or dtype] = recorded
    for other, diff in expected.differences.items():  # kept where they still differ from the new verdicts
        new.differences[other] = {k: v for k, v in diff.items() if new.verdicts.get(k) != v}
        if other in expected.recorded:
            new.recorded[other] = expected.recorded[other]
    kept = sorted(set(new.verdicts) - {r["key"] for r in good})
    lines = [f"wrote {len(good)} verdicts to {expected.path}"
             + (f", kept {len(kept)} from the file (not run): {', '.join(kept)}" if kept and not complete else "")]
    if errors:
        lines.append(f"not written, in error: {', '.join(r['key'] for r in errors)} (their old entries stay)")
    return new, lines


def record_differences(expected: Expected, rows: list[dict[str, Any]], *, numerics: str, recorded: str,
                       complete: bool) -> tuple[Expected, list[str]]:
    """The file with this run's statuses on ``numerics`` (not the file's) recorded where they differ
    from the file's verdicts: ``differences[numerics]``, replaced by a run of every claim, merged
    by a run of some. The verdicts, nodes and costs stay as they were."""
    import copy

    good = [r for r in rows if r["status"] in STATUSES]
    errors = [r for r in rows if r["status"] == "error"]
    new = copy.deepcopy(expected)
    diff = {} if complete else dict(expected.differences.get(numerics) or {})
    for r in good:
        if expected.verdicts.get(r["key"]) == r["status"]:
            diff.pop(r["key"], None)
        else:
            diff[r["key"]] = r["status"]
    new.differences[numerics] = diff
    new.recorded[numerics] = recorded
    lines = [f"recorded {len(good)} verdicts on {numerics} in {expected.path}, beside its own on {expected.numerics}: "
             + (f"{len(diff)} differ there ({', '.join(f'{k} {v}' for k, v in sorted(diff.items()))})" if diff
                else "none differ")]
    if errors:
        lines.append(f"not written, in error: {', '.join(r['key'] for r in errors)}")
    return new, lines
