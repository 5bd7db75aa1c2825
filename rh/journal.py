"""Claim-level resume: every finished claim's verdict is kept in a journal as it finishes, so the
same command run again after an interruption (SIGTERM from a batch scheduler, Ctrl-C, a lost
node, a ``--budget`` that ran out) computes only the claims that had not finished.

A journal belongs to one set of inputs: its file is named by :func:`session_fingerprint` (the
options that can change a verdict, the model's identity and the dtype it loads in, the versions
of torch, transformers and numpy, the source of the ``rh`` package, and the content of a
``--rankings`` file), and each record also carries its claim's own fingerprint
(:func:`item_fingerprint`: its node id and the source of its test file and of the conftest files
above it). A record is replayed only where both match; a change to any of them computes the claim
again. A journal whose run finished every claim it holds is removed at the end of that run: the
report is the run's record, and the next run of the command starts afresh.

The records are JSON lines, appended and flushed as each claim finishes; a torn last line (the
process died while writing it) is skipped and its claim computed again. No lock is taken: two
runs of the same inputs at once append whole lines, and either's records are valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the pytest options (their ``dest``) that cannot change a verdict: where the passes run, what the
#: verdicts are compared with, what is printed or kept, how long the run may take. Every other rh
#: option is part of a journal's inputs.
NEUTRAL_OPTIONS = frozenset({
    "expected", "update_expected", "budget", "plan", "ray", "replicas", "threads_per_replica", "gpus_per_replica",
    "store", "report_dir", "ranking_cache", "max_memory", "fresh", "journal",
})


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def tree_digest(root: Path, pattern: str = "*.py") -> str:
    """The digest of every file under ``root`` matching ``pattern``: names and contents."""
    root = Path(root)
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    return _sha(b for p in files for b in (p.relative_to(root).as_posix().encode(), p.read_bytes()))


def code_digest() -> str:
    """The digest of the installed ``rh`` package's source: a changed rule, mechanism or fixture
    computes every claim again."""
    import rh

    return tree_digest(Path(rh.__file__).parent)


def file_digest(path: str | os.PathLike) -> str | None:
    """A file's content digest, a folder's (every file in it), or None where nothing is there."""
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        return tree_digest(p, "*")
    return None


def model_identity(name: str) -> dict[str, Any]:
    """What identifies ``--model``'s weights before they load: the registry entry or repo id; the
    bundled package's version; a local folder's files (names, sizes, modification times)."""
    from importlib import metadata

    from rh.models import resolve_spec

    spec = resolve_spec(name)
    out: dict[str, Any] = {"key": spec.key, "kind": spec.kind, "source": spec.source, "gguf": spec.gguf_file}
    if spec.kind == "bundled-gguf":
        try:
            out["package"] = metadata.version(spec.source)
        except metadata.PackageNotFoundError:
            out["package"] = None
    elif spec.kind == "local":
        root = Path(spec.source)
        out["files"] = sorted([p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                              for p in root.rglob("*") if p.is_file())
    return out


def versions() -> dict[str, str | None]:
    """The versions of the libraries whose numerics a verdict rests on."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def session_fingerprint(options: Mapping[str, Any], *, model: Mapping[str, Any], dtype: str,
                        files: Mapping[str, str | None] | None = None, code: str | None = None,
                        libraries: Mapping[str, Any] | None = None) -> str:
    """The digest of a run's inputs (see the module's docstring). ``options``: every rh option by
    its ``dest`` (those in :data:`NEUTRAL_OPTIONS` are left out here)."""
    body = {
        "options": {k: options[k] for k in sorted(options) if k not in NEUTRAL_OPTIONS},
        "model": dict(model), "dtype": str(dtype), "files": dict(files or {}),
        "code": code if code is not None else code_digest(),
        "libraries": dict(libraries if libraries is not None else versions()),
    }
    return _digest(body)


def item_fingerprint(session: str, nodeid: str, sources: Iterable[str | os.PathLike]) -> str:
    """A claim's inputs beyond the session's: its node id (parameters included) and the content of
    ``sources``: its test file, the conftest files it sees, and the data files or folders its
    marker declares (``@pytest.mark.claim("X-1", inputs=["data/prompts.csv"])``); a missing one
    counts as empty."""
    parts = [session.encode(), nodeid.encode()]
    for s in sources:
        p = Path(s)
        parts += [str(p.name).encode(), p.read_bytes() if p.is_file() else (file_digest(p) or "").encode()]
    return _sha(parts)


def conftests(test_file: Path, root: Path) -> list[Path]:
    """The conftest.py files from ``root`` down to the test file's folder (those that exist)."""
    test_file, root = Path(test_file).resolve(), Path(root).resolve()
    folder, out = test_file.parent, []
    while True:
        c = folder / "conftest.py"
        if c.is_file():
            out.append(c)
        if folder == root or folder.parent == folder:
            break
        folder = folder.parent
    return out[::-1]


class Journal:
    """The journal of one set of inputs, in ``folder`` (created when the first record is written).

    :meth:`get` gives the record of a claim finished by an earlier run with the same inputs;
    :meth:`add` keeps one; :attr:`meta` is the last session metadata an earlier run kept (the
    model's provenance, the ranking's, the baseline's: what a report of replayed verdicts needs).
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.fingerprint = fingerprint
        self.path = Path(folder) / f"{fingerprint[:20]}.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] | None = None
        self.skipped = 0
        self._meta_written: str | None = None
        self._fh = None
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        for rec in read_json_lines(self.path):
            if rec is None or rec.get("session") != self.fingerprint:
                self.skipped += 1
            elif rec.get("kind") == "meta" and isinstance(rec.get("meta"), dict):
                self.meta = rec["meta"]
                self._meta_written = _digest(rec["meta"])
            elif (rec.get("kind") == "claim" and isinstance(rec.get("nodeid"), str)
                  and isinstance(rec.get("verdict"), dict) and isinstance(rec.get("item"), str)):
                self.records[rec["nodeid"]] = rec
            else:
                self.skipped += 1
        if self.skipped:
            log.warning("rh journal %s: %d line(s) unreadable (torn or edited); their claims run again",
                        self.path, self.skipped)

    def get(self, nodeid: str, item: str) -> dict[str, Any] | None:
        """The finished record of ``nodeid`` whose claim fingerprint is ``item``, or None."""
        rec = self.records.get(nodeid)
        return rec if rec is not None and rec.get("item") == item else None

    def add(self, nodeid: str, item: str, verdict: Mapping[str, Any], cost: Mapping[str, Any],
            meta: Mapping[str, Any] | None = None) -> None:
        """Keep a finished claim (and the session metadata, where it changed since last kept)."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        lines = []
        if meta is not None:
            m = json.loads(json.dumps(meta, default=str))
            d = _digest(m)
            if d != self._meta_written:
                lines.append({"kind": "meta", "session": self.fingerprint, "meta": m})
                self._meta_written, self.meta = d, m
        rec = {"kind": "claim", "session": self.fingerprint, "nodeid": nodeid, "item": item,
               "verdict": json.loads(json.dumps(verdict, default=str)), "cost": dict(cost), "finished": now}
        lines.append(rec)
        self.records[nodeid] = rec
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open_for_append(self.path)
        self._fh.write("".join(json.dumps(x, default=str) + "\n" for x in lines))
        self._fh.flush()

    def discard(self) -> None:
        """Remove the journal (its run finished every claim it holds)."""
        self.close()
        self.path.unlink(missing_ok=True)
        self.records.clear()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_json_lines(path: Path):
    """Each line of a JSON-lines file as a dict, or None where the line is not one (torn, edited)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            yield rec if isinstance(rec, dict) else None


def open_for_append(path: Path):
    """``path`` opened to append JSON lines: a torn last line (no newline: the writer died) is ended
    first, so the next record starts a line of its own instead of joining the torn one."""
    torn = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    fh = open(path, "a", encoding="utf-8")
    if torn:
        fh.write("\n")
    return fh


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
