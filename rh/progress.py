"""Progress of rh's long loops, for whoever shows it: a tqdm bar by default, or the listeners that
a host registers (the pytest plugin prints a line through pytest's terminal reporter, since pytest
captures tqdm). A ContextVar, not a module global, holds the listeners."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import TypeVar

T = TypeVar("T")
Listener = Callable[[str, int, "int | None"], None]

_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("rh_progress_listeners", default=())


def listen(fn: Listener) -> Token:
    """Call ``fn(what, done, total)`` before each step of every tracked loop (and once at its end);
    returns the token :func:`unlisten` takes."""
    return _listeners.set((*_listeners.get(), fn))


def unlisten(token: Token) -> None:
    _listeners.reset(token)


def listened() -> bool:
    """Whether a host shows progress (then inner tqdm bars stay quiet)."""
    return bool(_listeners.get())


def step(what: str, done: int, total: int | None) -> None:
    """Report a loop's position to the listeners (for loops that are not a :func:`track`)."""
    for fn in _listeners.get():
        fn(what, done, total)


def track(items: Iterable[T], what: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate ``items``, reporting ``what`` and the count done to the listeners, or through tqdm."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    listeners = _listeners.get()
    if not listeners:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=what, total=total, unit=unit, leave=False)
        return
    done = 0
    for item in items:
        for fn in listeners:
            fn(what, done, total)
        yield item
        done += 1
    for fn in listeners:
        fn(what, done, total)
