"""Small file helpers: atomic writes, so that a killed run never leaves a half-written file, and
:func:`jsonable`, the one conversion of values to strict JSON types."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(obj: Any, *, strict: bool = False) -> Any:
    """``obj`` as plain JSON types, ready for ``json.dumps(..., allow_nan=False)``.

    Always: ``None``, ``str`` and ``bool`` stay; numpy booleans become ``bool``; ints and numpy
    integers ``int``; floats and numpy floats ``float``, with NaN and infinities as ``None``;
    dicts get ``str`` keys; lists and tuples become lists; numpy arrays nested lists. Every
    container is converted recursively.

    ``strict=True`` accepts only those and raises ``TypeError`` for anything else (a set, a
    Mapping that is not a dict, a dataclass, a path...): what a :class:`~rh.rules.verdict.Verdict` may hold.
    Otherwise (the report's metadata) any Mapping becomes a dict, a set or frozenset a list sorted
    by ``repr``, an object with ``tolist()`` or ``item()`` (a torch tensor, a numpy scalar of another
    kind) what that returns, converted in turn, and anything else (paths, dataclasses) ``str(obj)``.
    """
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        obj = float(obj)
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict) or (not strict and isinstance(obj, Mapping)):
        return {str(k): jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, strict=strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), strict=strict)
    if strict:
        raise TypeError(f"cannot convert {type(obj).__name__} value {obj!r} to JSON; "
                        "store numbers, strings, lists or dicts in a Verdict")
    if isinstance(obj, set | frozenset):
        return [jsonable(v) for v in sorted(obj, key=repr)]
    for method in ("tolist", "item"):  # torch tensors, numpy scalars not caught above
        if callable(getattr(obj, method, None)):
            try:
                return jsonable(getattr(obj, method)())
            except Exception:  # noqa: BLE001 - fall back to text below
                pass
    return str(obj)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON; raises before touching disk if it cannot serialise."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def no_duplicate_keys(where: str, fix: str = ""):
    """A ``json.loads`` ``object_pairs_hook`` refusing a key given twice (JSON parsers keep the last,
    silently): the error names ``where`` and ends with ``fix``."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"{where}: key {k!r} appears twice{fix}")
            out[k] = v
        return out

    return hook


def unwritable_folder(folder: str | os.PathLike) -> Path | None:
    """Why files could not be written under ``folder`` (created as needed): the nearest existing
    path at or above it when that is not a writable folder (a file in the way, a read-only
    folder), else None. For checking an output path before a long run rather than after it."""
    folder = Path(folder)
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return None if nearest.is_dir() and os.access(nearest, os.W_OK) else nearest



def cache_message(option: str, cache: str | os.PathLike, blocked: Path) -> str:
    """The one-line refusal of a ranking cache folder that cannot be written (``blocked``, from
    :func:`unwritable_folder`), the same under pytest (``--ranking-cache``) and ``rh identify``
    (``--cache``)."""
    what = "a file, not a folder" if blocked.exists() and not blocked.is_dir() else "a folder that cannot be written"
    return (f"{option} {cache}: {blocked} is {what}; choose another folder (the cache locks each ranking while it "
            "reads or computes it, and keeps those it computes)")


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's lock, which deletes its file on release there
    fcntl = None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock named by ``path`` (a file in a folder of lock files only) for the
    block, across processes and threads, and leave no file behind.

    ``flock`` on the file; on release the file is removed while still held, then the folder if it
    is empty. A process that was waiting on the removed file finds, once it holds it, that the path
    no longer names it and locks the path afresh, so two holders never overlap. Lock files that a
    killed run left in the folder (no one holds them) are removed on the way in."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except (FileNotFoundError, FileExistsError):  # a holder removed the empty folder meanwhile
            if _is_file(path.parent):
                raise
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us removed this file: lock the one at the path now
    try:
        _remove_stale(path)
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only if empty: other entries' locks keep it


def _is_file(path: Path) -> bool:
    """Whether something other than a folder is at ``path`` (one stat: a folder removed meanwhile is not)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)


def _remove_stale(path: Path) -> None:
    """Remove the other lock files of ``path``'s folder that no process holds (left by a killed run)."""
    for other in path.parent.glob("*.lock"):
        if other == path:
            continue
        try:
            fd = os.open(other, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run's
            os.close(fd)
            continue
        try:
            if _names(other, fd):
                other.unlink(missing_ok=True)
        finally:
            os.close(fd)
