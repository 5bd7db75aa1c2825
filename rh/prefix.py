"""Prefix reuse: an intervention whose first touched decoder layer is L leaves layers 0..L-1
exactly as they are, so the residual stream entering layer L is the unmodified model's. Computed
once per batch of prompts, it is reused by every later pass over the same batch whose first
modified layer is L or deeper: that pass runs layers L.. only (issue #15's exact saving).

Inside :func:`reuse_prefixes` (the plugin opens one per session), :func:`forward` is the forward
pass rh's evaluations run (``rh.evaluate.teacher_forced``). For each batch it

1. finds the first modified layer M (:func:`first_modified_layer`): the first decoder layer that
   has a hook (on itself or any submodule) or an rh attention intervention (``ablate``,
   ``patch_positions``, ``override_attention``, ...). Anything that could change the prefix from
   outside the layers -- a hook on the embedding, the rotary embedding, the model itself, a
   global module hook, an active attention capture (it records every layer) -- turns reuse off
   for that pass;
2. if a stored residual stream of this very batch (same token ids, mask and positions, same
   attention implementation) sits at some layer L <= M, and the parameters of the embedding and of
   layers 0..L-1 are the very tensors, unmodified, that computed it (identity and version counter:
   a transplant or an in-place edit invalidates it), runs the model from layer L with that state
   as ``inputs_embeds`` and the decoder layers 0..L-1 left out;
3. stores the stream entering layer M (and entering every *hinted* layer <= M, see
   :func:`hinting`) for the passes to come, within a byte budget (least recently used first out).
   A reader (:func:`rh.attention.reading_rows`, :func:`rh.recording.reading`'s hooks: they change
   nothing) sets M, since it must see its layers run, but not the hints' bound: the streams hinted
   above it are clean, and kept, up to the first layer something changes (even when it reads from
   layer 0 on, as IV-5's residual reading does).

Layers left out are not executed, so the token-layer counter (a pre-hook on every decoder layer)
does not count them. The outputs are those of the plain pass: the same operations on the same
inputs (``tests/test_prefix.py`` checks logits and per-prompt correctness against the plain path).

Hints: a pass with no intervention has M = the number of layers and stores nothing unless asked:
``with hinting(model, layers):`` around a baseline makes it keep the streams the conditions to come
will start from (e.g. the first layer of the heads a claim will ablate).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rh.budget import note_saved
from rh.models import decoder_layers, hf_model, layer_slice

DEFAULT_MAX_BYTES = int(float(os.environ.get("RH_PREFIX_CACHE_MB", "2048")) * 2**20)


def passive(fn):
    """Mark a hook function as one that reads and never changes what it sees (the token-layer
    counter, the prefix capture): :func:`first_modified_layer` ignores such hooks."""
    target = getattr(fn, "__func__", fn)
    target._rh_passive = True
    return fn


#: transformers (5.x) installs these forward hooks on every layer (and attention module) the first
#: time a forward asks for ``output_hidden_states`` or ``output_attentions``, and never removes
#: them; they append what they see to the collector of the forward that asked, and return None.
_TRANSFORMERS_READERS = {("transformers.utils.output_capturing", "output_capturing_hook")}


def transformers_reader(hook: Any) -> bool:
    """Whether ``hook`` is one of transformers' own output recorders (read-only, never removed)."""
    return (getattr(hook, "__module__", None), getattr(hook, "__name__", None)) in _TRANSFORMERS_READERS


def _is_passive(hook: Any) -> bool:
    return bool(getattr(hook, "_rh_passive", False)) or transformers_reader(hook)


def _is_reader(hook: Any) -> bool:
    """A hook that reads its module's input or output and changes nothing (``rh.recording.reading``
    marks its hooks ``_rh_reader``): unlike a passive one, its module must run, so it bounds where a
    pass may start; unlike a change, the streams after it are clean."""
    return bool(getattr(hook, "_rh_reader", False))


def _hooked(module: torch.nn.Module, *, readers: bool = True) -> bool:
    """Whether ``module`` or a submodule has a hook that is not passive, or an rh attention
    intervention (``readers=False``: one that changes something; a reader, an intervention with
    ``changes = False`` or a hook marked ``_rh_reader``, is left out)."""
    from rh.attention import interventions

    for m in module.modules():
        for table in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks,
                      getattr(m, "_backward_pre_hooks", {})):
            if any(not _is_passive(h) and (readers or not _is_reader(h)) for h in table.values()):
                return True
        if any(readers or getattr(h, "changes", True) for h in interventions(m)):
            return True
    return False


def _global_hooks() -> bool:
    from torch.nn.modules import module as mm

    return any(getattr(mm, name, None) for name in (
        "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def first_modified_layer(model: Any, *, readers: bool = True) -> int:
    """The first decoder layer whose computation something changes right now (a hook, an rh
    attention intervention); the number of layers when nothing does; 0 when the change could reach
    the prefix from outside the layers (hooks on the embedding, the rotary embedding or the model,
    global hooks, an active attention capture), so that no prefix may be reused.

    A reader (an attention intervention with ``changes = False``: :func:`rh.attention.reading_rows`;
    a hook of :func:`rh.recording.reading`) counts as a modification, since it must see its layers
    run; ``readers=False`` leaves it out:
    the first layer whose computation actually changes, below which every stream is the clean one."""
    from rh.attention import capturing

    hf = hf_model(model)
    inner = getattr(hf, "model", None)
    layers = decoder_layers(hf, missing_ok=True)
    if inner is None or not layers or _global_hooks() or capturing(hf):
        return 0
    embed, rotary = getattr(inner, "embed_tokens", None), getattr(inner, "rotary_emb", None)
    if embed is None or rotary is None or _hooked(embed) or _hooked(rotary):
        return 0
    for m in (hf, inner):  # their own hooks only: their submodules include the layers
        if any(not _is_passive(h) for t in (m._forward_pre_hooks, m._forward_hooks) for h in t.values()):
            return 0
    for i, layer in enumerate(layers):
        if _hooked(layer, readers=readers):
            return i
    return len(layers)


def _signature(hf: Any, upto: int) -> tuple:
    """What computed the stream entering layer ``upto``: every parameter and buffer of the
    embedding and of layers 0..upto-1, by identity and version counter (in-place edits bump it)."""
    inner = hf.model
    mods = [inner.embed_tokens, inner.rotary_emb, *decoder_layers(hf, missing_ok=True)[:upto]]
    sig = []
    for m in mods:
        sig.append(id(m))
        for t in (*m.parameters(), *m.buffers()):
            sig.append((id(t), t._version))
    return tuple(sig)


def _batch_key(hf: Any, inputs: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in ("input_ids", "attention_mask", "position_ids"):
        t = inputs.get(name)
        h.update(name.encode())
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    from rh.attention import base_implementation

    impl = base_implementation(hf)  # rh's wrapper runs the same kernel: the same prefix
    h.update(impl.encode())
    h.update(str(next(hf.parameters()).dtype).encode())
    return h.hexdigest()


@dataclass
class _Entry:
    state: torch.Tensor  # the residual stream entering the layer
    signature: tuple
    nbytes: int


@dataclass
class PrefixCache:
    """Stored residual streams, keyed by (batch, layer); at most ``max_bytes``, least recently used
    first out. ``hits`` counts passes that reused a prefix, ``layers_saved`` the decoder layers they
    left out (per row of the batch: token-layers saved = layers_saved x tokens); ``peak_nbytes`` is
    the most it held at once (never above ``max_bytes``)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    entries: OrderedDict = field(default_factory=OrderedDict)
    hints: list[set[int]] = field(default_factory=list)
    nbytes: int = 0
    peak_nbytes: int = 0
    hits: int = 0
    misses: int = 0
    token_layers_saved: int = 0

    def hinted(self) -> set[int]:
        return set().union(*self.hints) if self.hints else set()

    def best(self, key: str, upto: int, hf: Any) -> tuple[int, torch.Tensor] | None:
        """The deepest valid stored state of this batch at a layer <= ``upto``."""
        for layer in range(upto, 0, -1):
            e = self.entries.get((key, layer))
            if e is None:
                continue
            if e.signature != _signature(hf, layer):
                self._drop((key, layer))
                continue
            self.entries.move_to_end((key, layer))
            return layer, e.state
        return None

    def put(self, key: str, layer: int, state: torch.Tensor, signature: tuple) -> None:
        nbytes = state.numel() * state.element_size()
        if nbytes > self.max_bytes:
            return
        if (key, layer) in self.entries:
            self._drop((key, layer))
        while self.entries and self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[(key, layer)] = _Entry(state, signature, nbytes)
        self.nbytes += nbytes
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def memory(self) -> dict[str, int]:
        """Its peak and cap in bytes, as the report's memory line reads them."""
        return {"prefix_cache_peak_bytes": int(self.peak_nbytes), "prefix_cache_max_bytes": int(self.max_bytes)}

    def _drop(self, k) -> None:
        e = self.entries.pop(k)
        self.nbytes -= e.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> PrefixCache


def active_cache(model: Any) -> PrefixCache | None:
    return _CACHES.get(hf_model(model))


@contextlib.contextmanager
def reuse_prefixes(model: Any, *, max_bytes: int | None = None) -> Iterator[PrefixCache]:
    """Within the block, :func:`forward` reuses prefixes on ``model``. Nested blocks share the
    outer cache. The stored states are dropped when the outermost block ends."""
    hf = hf_model(model)
    existing = _CACHES.get(hf)
    if existing is not None:
        yield existing
        return
    cache = PrefixCache(max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes))
    _CACHES[hf] = cache
    try:
        yield cache
    finally:
        cache.clear()
        _CACHES.pop(hf, None)


@contextlib.contextmanager
def hinting(model: Any, layers: Iterable[int]) -> Iterator[None]:
    """Within the block, passes over ``model`` also store the streams entering ``layers`` (those
    below the pass's first modified layer), for conditions to come that start there. A no-op
    outside :func:`reuse_prefixes`."""
    cache = active_cache(model)
    wanted = {int(x) for x in layers if int(x) > 0}
    if cache is None or not wanted:
        yield
        return
    cache.hints.append(wanted)
    try:
        yield
    finally:
        cache.hints.remove(wanted)


def active_hints(model: Any) -> set[int]:
    """The layers the open :func:`hinting` blocks on ``model`` ask passes to keep (none outside
    :func:`reuse_prefixes`): what a runner passes to replicas running the same passes elsewhere."""
    cache = active_cache(model)
    return set().union(*cache.hints) if cache is not None and cache.hints else set()


def first_layers(head_sets: Iterable[Iterable[Any]]) -> set[int]:
    """The first layer of each head set (``Head`` objects or anything with ``.layer``): the hints
    for a baseline whose conditions will ablate these sets."""
    out = set()
    for heads in head_sets:
        layers = [h.layer for h in heads]
        if layers:
            out.add(min(layers))
    return out


def forward(model: Any, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
    """``model(**inputs, **kwargs)``, reusing a stored prefix where :func:`reuse_prefixes` is active
    (see the module docstring); the plain forward otherwise."""
    hf = hf_model(model)
    cache = _CACHES.get(hf)
    if cache is None or kwargs.get("use_cache") or "inputs_embeds" in inputs:
        return hf(**inputs, **kwargs)
    first = first_modified_layer(hf)  # where the pass must start at the latest (a reader sees its layers run)
    layers = decoder_layers(hf, missing_ok=True)
    n_layers = len(layers)
    # the streams this pass computes clean: up to its first layer that something changes (a reader
    # changes nothing, so a baseline that reads, even from layer 0 on, still keeps the streams
    # hinted above its layers)
    clean = first_modified_layer(hf, readers=False) if first < n_layers else first
    if clean == 0:
        cache.misses += 1
        return hf(**inputs, **kwargs)
    key = _batch_key(hf, inputs)
    found = cache.best(key, first if first < n_layers else n_layers - 1, hf)
    start = found[0] if found else 0
    keep = {layer for layer in cache.hinted() | ({first} if first < n_layers else set()) if start < layer <= clean
            and layer < n_layers and (key, layer) not in cache.entries}
    stored: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int):
        @passive
        def grab(module, args, kw):
            x = args[0] if args else kw["hidden_states"]
            stored[layer] = x.detach().clone()
        return grab

    try:
        for layer in sorted(keep):
            handles.append(layers[layer].register_forward_pre_hook(make(layer), with_kwargs=True, prepend=True))
        if found is None:
            cache.misses += 1
            out = hf(**inputs, **kwargs)
        else:
            cache.hits += 1
            b, t = found[1].shape[:2]
            cache.token_layers_saved += start * b * t
            note_saved("prefix reuse", start * b * t)
            out = _run_from(hf, start, found[1], inputs, kwargs)
    finally:
        for h in handles:
            h.remove()
    for layer, state in stored.items():
        cache.put(key, layer, state, _signature(hf, layer))
    return out


def _run_from(hf: Any, start: int, state: torch.Tensor, inputs: Mapping[str, torch.Tensor], kwargs: dict) -> Any:
    """The model's forward from decoder layer ``start`` on, ``state`` entering it: the embedding's
    output is replaced by ``state`` and layers 0..start-1 are out of the layer list for the call."""
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    # no KV cache (reuse is off for a pass that asks for one): a cache built from a config whose
    # layer_types are sliced with the layers (rh.models.layer_slice) has fewer layers than indices
    kwargs = {**kwargs, "use_cache": False}
    with layer_slice(hf, start):
        return hf(inputs_embeds=state, **rest, **kwargs)
