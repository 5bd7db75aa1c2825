"""Named sites of a Llama-style decoder, and the one place rh hooks them to read or rewrite them.

In the spirit of TransformerLens' ``run_with_cache(names_filter=...)`` and ``run_with_hooks``, with
its names:

==============================  ===========================================================  =========================
site                            what it is                                                   shape
==============================  ===========================================================  =========================
``blocks.{l}.hook_resid_pre``   the residual stream entering decoder layer ``l``             ``[batch, pos, hidden]``
``blocks.{l}.hook_resid_post``  the residual stream leaving decoder layer ``l`` (the last    ``[batch, pos, hidden]``
                                layer's is what the final norm reads)
``blocks.{l}.attn.hook_z``      the input of layer ``l``'s ``o_proj``: what each query head  ``[batch, pos, n_heads *
                                writes, heads side by side (head ``h`` is the slice          head_dim]``
                                ``h * head_dim : (h + 1) * head_dim``; TransformerLens keeps
                                heads on their own axis)
==============================  ===========================================================  =========================

- :func:`recording` caches the sites' tensors of each forward inside the block ("what did head h
  write"): ``with recording(model, [attn_z(3)]) as cache: model(...)`` then ``cache[attn_z(3)]``.
- :func:`reading` streams them instead: a function per site, called at every forward (running
  sums over many batches without holding the tensors).
- :func:`rewriting` calls a function per site that returns the tensor the site carries instead
  (a patch).

A reading hook sees what the module really consumed or produced, after every rewrite (an ablation,
a patch) registered on it, whatever the order the blocks were entered in; a rewriting hook runs
before the module. Every hook goes when the block ends, however it ends (an exception in the body
or in a hook, a KeyboardInterrupt, ``stop_after``); names are checked before any hook goes on.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rh.models import attention_modules, decoder_layers

__all__ = ["Site", "site", "resid_pre", "resid_post", "attn_z", "head_slice", "reading", "recording", "rewriting"]

KINDS = ("hook_resid_pre", "hook_resid_post", "attn.hook_z")
_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|attn\.hook_z)$")


@dataclass(frozen=True, order=True)
class Site:
    """One named place in the forward: ``layer`` and ``kind`` (one of :data:`KINDS`)."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


def site(name: Site | str) -> Site:
    """A :class:`Site` from itself or its TransformerLens name (``"blocks.3.attn.hook_z"``)."""
    if isinstance(name, Site):
        if name.kind not in KINDS:
            raise ValueError(f"site kind {name.kind!r} is not one of {', '.join(KINDS)}")
        return name
    m = _NAME.match(str(name))
    if not m:
        raise ValueError(f"unknown site {name!r}: use blocks.<layer>.hook_resid_pre, blocks.<layer>.hook_resid_post "
                         "or blocks.<layer>.attn.hook_z (rh.recording.resid_pre / resid_post / attn_z)")
    return Site(int(m.group(1)), m.group(2))


def resid_pre(layer: int) -> Site:
    return Site(int(layer), "hook_resid_pre")


def resid_post(layer: int) -> Site:
    return Site(int(layer), "hook_resid_post")


def attn_z(layer: int) -> Site:
    return Site(int(layer), "attn.hook_z")


def head_slice(z: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    """Query head ``head``'s part of an ``attn_z`` tensor (its last axis)."""
    return z[..., head * head_dim : (head + 1) * head_dim]


class _StopForward(Exception):
    """Raised by the last site of a ``stop_after`` block; caught by the block."""


def _resolve(model: Any, names: Iterable[Site | str]) -> list[Site]:
    """The sites of ``names``, checked against the model (each once, each in one of its layers)."""
    sites = [site(n) for n in names]
    twice = sorted({str(s) for s in sites if sites.count(s) > 1})
    if twice:
        raise ValueError(f"sites {twice} are given twice: give each once")
    n_layers = len(decoder_layers(model))
    bad = sorted({s.layer for s in sites if not 0 <= s.layer < n_layers})
    if bad:
        raise ValueError(f"sites in layers {bad}: the model has layers 0..{n_layers - 1}")
    return sites


def _first(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module(model: Any, s: Site) -> torch.nn.Module:
    if s.kind == "attn.hook_z":
        return attention_modules(model)[s.layer].o_proj
    return decoder_layers(model)[s.layer]


@contextlib.contextmanager
def reading(model: Any, fns: Mapping[Site | str, Callable[[torch.Tensor], Any]], *,
            stop_after: bool = False) -> Iterator[None]:
    """Within the block, every forward of ``model`` calls ``fns[site](x)`` with the tensor ``x`` the
    site carries, as the module consumed (``resid_pre``, ``attn_z``) or produced (``resid_post``)
    it: after every rewrite registered on that module, in whatever order the blocks were entered.
    What the functions return is ignored; they must not change ``x`` in place.

    ``stop_after``: the forward is cut short once every site was read, and the block ends there,
    so put the forward last in the block: the layers after the last site are not run (attribution
    through early heads needs no logits). Reads happen when a module has run: ``resid_pre(l)`` is
    read once layer ``l`` has run, as ``resid_post(l)`` is."""
    calls = dict(zip(_resolve(model, fns), fns.values()))
    fired: set[Site] = set()

    def make(s: Site, fn):
        def hook(module, args, kwargs, out):
            fn(_output(out) if s.kind == "hook_resid_post" else _first(args, kwargs))
            fired.add(s)
            if stop_after and len(fired) == len(calls):
                raise _StopForward
        hook._rh_reader = True  # it changes nothing: rh.prefix keeps the clean streams after it
        return hook

    with contextlib.ExitStack() as stack:
        for s, fn in calls.items():
            stack.callback(_module(model, s).register_forward_hook(make(s, fn), with_kwargs=True).remove)
        try:
            yield
        except _StopForward:
            pass


@contextlib.contextmanager
def recording(model: Any, names: Iterable[Site | str], *, keep: Callable[[torch.Tensor], Any] | None = None,
              detach: bool = True, stop_after: bool = False) -> Iterator[dict[Site, Any]]:
    """Cache what the sites ``names`` carry (:func:`reading`): within the block, ``cache[site]`` is
    the latest forward's tensor there. Keys are :class:`Site` values
    (``cache[site("blocks.3.attn.hook_z")]`` for a name).

    ``keep`` maps each tensor to what is cached (e.g. ``lambda x: x[:, -1].float().cpu()``: only the
    last position, off the accelerator; without it every site's full tensor is held until the
    next forward). ``detach=False`` keeps the autograd graph (gradients through the sites).
    ``stop_after``: as for :func:`reading`."""
    sites = _resolve(model, names)
    cache: dict[Site, Any] = {}

    def store(s: Site):
        def fn(x: torch.Tensor) -> None:
            x = x.detach() if detach else x
            cache[s] = keep(x) if keep is not None else x
        return fn

    with reading(model, {s: store(s) for s in sites}, stop_after=stop_after):
        yield cache


@contextlib.contextmanager
def rewriting(model: Any, fns: Mapping[Site | str, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Within the block, every forward of ``model`` replaces what each site carries by
    ``fns[site](x)`` (None: left as it is). ``resid_pre`` and ``attn_z`` are rewritten before their
    module runs (a pre-hook: what the layer, or ``o_proj``, then consumes), ``resid_post`` after the
    layer ran (its output)."""
    calls = dict(zip(_resolve(model, fns), fns.values()))

    def before(fn):
        def hook(module, args, kwargs):
            new = fn(_first(args, kwargs))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    def after(fn):
        def hook(module, args, kwargs, out):
            new = fn(_output(out))
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, (tuple, list)) else new
        return hook

    with contextlib.ExitStack() as stack:
        for s, fn in calls.items():
            mod = _module(model, s)
            if s.kind == "hook_resid_post":
                h = mod.register_forward_hook(after(fn), with_kwargs=True)
            else:
                h = mod.register_forward_pre_hook(before(fn), with_kwargs=True)
            stack.callback(h.remove)
        yield
