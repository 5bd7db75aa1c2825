"""Compression safety: restrict heads to an attention sink plus a recent window, as KV-cache
compression does to every head it does not keep whole.

DuoAttention (Xiao et al. 2024), StreamingLLM (Xiao et al. 2023) and the KV-compression work
built on them keep full attention only for *retrieval heads*; every other head ("streaming head")
attends to the first few tokens (the attention sink) and a window of the most recent ones, and its
KV cache shrinks to those tokens. The claim to test is that this is safe exactly when the heads
left whole are the retrieval heads. :func:`restrict_window` applies the restriction to chosen
query heads for every forward inside a block; :func:`kv_cache_bytes` says what the policy saves.

The mask (query at key index ``i`` of a row, key at index ``j``; ``sink``/``window`` as given)::

    keep(i, j) = base(i, j)                 # the model's own mask: causal and padding (and any
                                            # other restriction the attention function receives)
                 and j <= i                 # causal, stated again for masks that are absent
                 and (j > i - window        # the recent window: `window` positions, the query's own included
                      or rank(j) < sink)    # the sink: the first `sink` real (non-padding) tokens of the row

``rank(j)`` counts the row's real tokens before ``j`` (so with left padding the sink starts at the
row's first real token, and a padded row computes what the row alone computes). ``i`` is the key
index of query ``q`` of the call: ``kv_len - q_len + q`` (the cache plus the new positions; at a
decoding step, the last key), where, with a 4-D mask, ``kv_len`` counts the keys up to the last one
the call's final query may see (itself), so the empty slots of a static cache are not positions.
``real`` tokens are those the mask lets some query of the call see (a sliding-window layer hides
the first tokens from the last query, not from the first ones). At a decoding step (one query) that
is the last query's row: on a sliding-window layer whose window no longer covers the row's first
tokens (or whose cache dropped them), the sink is then counted from the first key the step still
sees; teacher-forced passes and prefills (every rh evaluation) see the whole row. With ``sink + window`` at least the
number of real tokens nothing is removed and the block is an exact no-op.

Where rh follows DuoAttention / StreamingLLM:

- the sink is the *first* tokens of the sequence and the window the most recent positions, kept
  whole and causal; the definition is DuoAttention's training mask (``generate_streaming_mask`` in
  mit-han-lab/duo-attention: ``j < sink_size`` or ``i - j < recent_size``, and ``j <= i``), so
  ``window`` here is their ``recent_size``;
- restricted heads keep their own weights and scores; only which keys they may see changes.

Where it departs:

- the restriction applies to the prefill as well as to decoding. DuoAttention's deployed code
  prefills the prompt with full attention for every head (or, chunked, lets each chunk see the sink,
  the recent window and the chunk itself) and compresses the cache afterwards; rh's evaluation is a
  single teacher-forced pass (``rh.evaluate.teacher_forced``), so the one consistent definition is
  to apply the mask at every position, which also equals step-by-step decoding with a cache. This is
  the stricter test: the prompt's own tokens are processed under the restriction too;
- at a decoding step DuoAttention's streaming head sees ``sink_size + recent_size`` cached tokens
  *plus* the new one; rh's window counts the query itself, so ``window = recent_size + 1`` is their
  decoding and ``window = recent_size`` their training mask;
- the restriction is per *query* head. DuoAttention gates per KV head (a whole GQA group is full or
  streaming), and only a fully restricted group frees cache memory: :func:`kv_cache_bytes` makes
  that rule explicit;
- the sink counts from each row's first real token (left padding), where DuoAttention's cache
  (batch size 1 in its evaluations) takes the first positions of the KV tensor;
- no KV cache is actually evicted: the full cache is kept and the restricted heads are prevented
  from reading the rest. The outputs equal those of an evicting implementation; the memory does not.

Implementation: an :class:`rh.attention.AttentionIntervention` per layer, run inside rh's
registered attention function (so under sdpa, eager and flash, with grouped KV heads and any
``rh_kv_heads`` map already expanded). After the model's kernel ran, its ``after`` recomputes the
restricted heads' output from the same query/key/value over the kept keys only (banded: each query
scores ``sink + window + chunk`` keys, not all ``kv_len``), in float32, and writes it into those
heads' slice of the output; query rows that lose no key keep the kernel's output bit for bit.
Under eager the returned attention weights are the restricted ones, and ``last_row`` makes an
attention capture (``rh.attention.capture_attention``) record the restricted attention.

Composition with ``rh.ablation.ablate`` on the same head: ``"zero"`` and ``"mean"`` replace the
head's ``o_proj`` input after attention, and ``"query"`` zeroes the query before it (the head then
emits the mean of V over its window); all three act at other points of the computation, compose in
either nesting order and are allowed. ``"logits"`` overwrites the head's attention output in the
same place this intervention does, so the result would depend on which was attached last: that
combination is refused, at entry and on every forward.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rh.attention import AttentionIntervention, add_intervention, logit_softcap, rh_attention_active, softcap_scores
from rh.heads import Head, HeadShape, heads_by_layer, parse_heads, validate_heads
from rh.models import head_shape, hf_model

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> {Head: (sink, window)}

CHUNK_ELEMS = 1 << 23  # float32 scores held at once per block of query rows


def active_restrictions(model: Any) -> dict[Head, tuple[int, int]]:
    """The heads :func:`restrict_window` restricts on ``model`` right now, with (sink, window)."""
    return dict(_ACTIVE.get(hf_model(model), {}))


# ---------------------------------------------------------------------------- the mask


@dataclass
class _Geometry:
    """What one attention call's mask says, normalised: see the module docstring for ``keep``."""

    kv_len: int  # keys after sdpa's crop
    allowed: torch.Tensor | None  # bool [b, 1 | heads, q, kv]: the base mask; None = causal only
    bias: torch.Tensor | None  # float [b, 1 | heads, q, kv]: an additive mask's values
    real: torch.Tensor  # bool [b, kv]: non-padding keys
    in_sink: torch.Tensor  # bool [b, kv]: the first `sink` real keys
    sink_idx: torch.Tensor  # long [b, s]: their indices (0 where a row has fewer)
    sink_ok: torch.Tensor  # bool [b, s]: which of sink_idx are real sink keys
    qpos: torch.Tensor  # long [b, q]: the key index of each query
    removed: torch.Tensor  # bool [b, q]: the query loses at least one key it could see


def _geometry(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
              sink: int, window: int) -> _Geometry:
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    dev = query.device
    if attention_mask is None and q_len > 1 and kv_len > q_len:
        kv_len = q_len  # sdpa crops the keys of a prefill into an empty static cache
    keys = torch.arange(kv_len, device=dev)
    qpos = (torch.arange(q_len, device=dev) + (kv_len - q_len)).expand(b, q_len).clone()
    allowed = bias = None
    if attention_mask is None:
        real = torch.ones(b, kv_len, dtype=torch.bool, device=dev)
    elif attention_mask.dim() == 2:  # flash: [b, kv] padding mask, causal implied
        real = attention_mask[:, -kv_len:].to(dev).bool()
    elif attention_mask.dim() == 4:
        m = attention_mask.to(dev)
        if m.shape[-1] < kv_len:
            raise ValueError(f"the attention mask covers {m.shape[-1]} keys but the call has {kv_len}: "
                             "restrict_window cannot tell which keys are real")
        m = m[..., :kv_len]
        if m.shape[-2] != q_len:
            m = m[..., -q_len:, :]
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = m > torch.finfo(m.dtype).min / 2
            bias = m
        # a key any query of the call may see: the last query's row alone would miss the keys a
        # sliding-window layer's mask hides from it, and count the sink from the window's start
        real = allowed.any(2).any(1)
        # the last query sees itself: its key index ends the sequence (a static cache's empty slots
        # come after it), and the queries before it are the positions just before
        seen = real.any(-1)
        end = kv_len - 1 - real.flip(-1).to(torch.uint8).argmax(-1)
        end = torch.where(seen, end, torch.full_like(end, kv_len - 1))
        qpos = end[:, None] - (q_len - 1) + torch.arange(q_len, device=dev)[None, :]
    else:
        raise ValueError(f"cannot read an attention mask of shape {tuple(attention_mask.shape)}: "
                         "expected none, a 2-D padding mask or a 4-D mask")
    rank = real.long().cumsum(-1) - 1
    in_sink = real & (rank < sink)
    s = min(sink, kv_len)
    if s:
        order = torch.where(in_sink, keys, kv_len).topk(s, dim=-1, largest=False, sorted=True).values
        sink_ok = order < kv_len
        sink_idx = order.clamp(max=kv_len - 1)
    else:
        sink_idx = torch.zeros(b, 0, dtype=torch.long, device=dev)
        sink_ok = torch.zeros(b, 0, dtype=torch.bool, device=dev)
    # a query loses a key iff a real non-sink key lies at or before qpos - window
    outside = (real & ~in_sink).long().cumsum(-1)
    edge = qpos - window
    removed = (edge >= 0) & (outside.gather(1, edge.clamp(min=0, max=kv_len - 1)) > 0)
    return _Geometry(kv_len, allowed, bias, real, in_sink, sink_idx, sink_ok, qpos, removed)


def _head_rows(t: torch.Tensor | None, heads: Sequence[int], rows: slice) -> torch.Tensor | None:
    """``t[:, heads | 0, rows]`` for a mask with one or per-head entries."""
    if t is None:
        return None
    t = t[:, :, rows]
    return t[:, list(heads)] if t.shape[1] > 1 else t


def _kv_of(query: torch.Tensor, key: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} KV heads evenly")
    groups = n_heads // n_kv
    return torch.tensor([h // groups for h in heads], device=key.device)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, g: _Geometry,
            heads: Sequence[int], scaling: float, sink: int, window: int, *, rows: slice,
            dense: bool, softcap: float | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Restricted attention of query heads ``heads`` for query positions ``rows``, float32.

    Returns the output ``[b, n, r, d]`` (None without ``value``) and, if ``dense``, the weights
    ``[b, n, r, kv]``. ``dense=False`` scores only the window band and the sink keys of each query
    (``r + window - 1 + sink`` keys per row); ``dense=True`` scores every key. ``softcap``: the
    scaled scores are soft-capped before the mask, as the model's own attention does (Gemma 2).
    """
    kv_idx = _kv_of(query, key, heads)
    b, n = query.shape[0], len(heads)
    qb = query[:, list(heads), rows].float()  # [b, n, r, d]
    qp = g.qpos[:, rows]  # [b, r]
    k = key[:, :, : g.kv_len].index_select(1, kv_idx)
    v = value[:, :, : g.kv_len].index_select(1, kv_idx) if value is not None else None
    allowed, bias = _head_rows(g.allowed, heads, rows), _head_rows(g.bias, heads, rows)
    if dense:
        cols = torch.arange(g.kv_len, device=qb.device)
        keep = (cols <= qp[:, :, None]) & ((cols > qp[:, :, None] - window) | g.in_sink[:, None, :])
        keep = keep[:, None] & g.real[:, None, None, :]
        if allowed is not None:
            keep = keep & allowed
        scores = softcap_scores(torch.einsum("bnrd,bnkd->bnrk", qb, k.float()) * scaling, softcap)
        if bias is not None:
            scores = scores + bias.float()
        w = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
        out = w @ v.float() if v is not None else None
        return out, w
    # banded: the window's contiguous key range for these rows, plus the sink keys before it
    lo = max(0, int(qp.min()) - window + 1)
    hi = min(g.kv_len, int(qp.max()) + 1)
    cols = torch.arange(lo, hi, device=qb.device)
    keep_w = (cols <= qp[:, :, None]) & (cols > qp[:, :, None] - window)  # [b, r, c]
    keep_w = keep_w[:, None] & g.real[:, None, None, lo:hi]
    s_w = softcap_scores(torch.einsum("bnrd,bnkd->bnrk", qb, k[:, :, lo:hi].float()) * scaling, softcap)
    if allowed is not None:
        keep_w = keep_w & allowed[..., lo:hi]
    if bias is not None:
        s_w = s_w + bias[..., lo:hi].float()
    parts_s, parts_k = [s_w], [keep_w]
    s = g.sink_idx.shape[1]
    if s:
        si = g.sink_idx  # [b, s]
        ks = k.gather(2, si[:, None, :, None].expand(b, n, s, k.shape[-1])).float()
        s_s = softcap_scores(torch.einsum("bnrd,bnkd->bnrk", qb, ks) * scaling, softcap)
        keep_s = (g.sink_ok[:, None, :] & (si[:, None, :] <= qp[:, :, None] - window))[:, None]  # [b, 1, r, s]
        if allowed is not None:
            keep_s = keep_s & allowed.gather(-1, si[:, None, None, :].expand(*allowed.shape[:3], s))
        if bias is not None:
            s_s = s_s + bias.gather(-1, si[:, None, None, :].expand(*bias.shape[:3], s)).float()
        parts_s.insert(0, s_s)
        parts_k.insert(0, keep_s.expand(b, keep_s.shape[1], qp.shape[1], s))
    keep = torch.cat([p.expand(b, n, qp.shape[1], p.shape[-1]) for p in parts_k], dim=-1)
    scores = torch.cat(parts_s, dim=-1).masked_fill(~keep, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that may see nothing emits 0
    out = w[..., s:] @ v[:, :, lo:hi].float()
    if s:
        vs = v.gather(2, g.sink_idx[:, None, :, None].expand(b, n, s, v.shape[-1])).float()
        out = out + w[..., :s] @ vs
    return out, None


def _pad_keys(w: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(w, (0, width - w.shape[-1])) if w.shape[-1] < width else w


class _Window(AttentionIntervention):
    """Restricts query heads ``heads`` of one layer to the sink and the recent window; see
    :func:`restrict_window`."""

    def __init__(self, heads: Sequence[int], sink: int, window: int, layer: int, hf: Any):
        self.heads, self.sink, self.window, self.layer = sorted(heads), int(sink), int(window), int(layer)
        self._hf = weakref.ref(hf)

    def _check(self, query: torch.Tensor) -> None:
        if self.heads[-1] >= query.shape[1]:
            raise RuntimeError(f"layer {self.layer} runs {query.shape[1]} query heads but restrict_window was given "
                               f"head {self.heads[-1]}: the model changed shape inside the block")
        hf = self._hf()
        if hf is not None:
            from rh.ablation import active_ablations

            for h, (method, _) in active_ablations(hf).items():
                if method == "logits" and h.layer == self.layer and h.head in self.heads:
                    raise ValueError(_logits_conflict(h))

    def _rows(self, q_len: int, g: _Geometry, budget: int) -> Iterator[slice]:
        start = int(g.removed.any(0).nonzero()[0]) if bool(g.removed.any()) else q_len
        b, n = g.qpos.shape[0], len(self.heads)
        step = max(1, min(256, CHUNK_ELEMS // max(1, b * n * budget)))
        for q0 in range(start, q_len, step):
            yield slice(q0, min(q_len, q0 + step))

    def after(self, module, output, weights, query, key, value, attention_mask, scaling):
        self._check(query)
        g = _geometry(query, key, attention_mask, self.sink, self.window)
        if not bool(g.removed.any()):
            return output, weights  # nothing is out of reach: exactly the unrestricted attention
        idx = self.heads
        dense = weights is not None
        budget = g.kv_len if dense else self.window + self.sink + 256
        output = output.clone()
        if dense:
            weights = weights.clone()
        for rows in self._rows(query.shape[2], g, budget):
            out, w = _attend(query, key, value, g, idx, scaling, self.sink, self.window, rows=rows, dense=dense,
                             softcap=logit_softcap(module))
            lost = g.removed[:, rows]  # [b, r]: rows that lose nothing keep the kernel's output
            cur = output[:, rows, idx]  # [b, r, n, d]
            output[:, rows, idx] = torch.where(lost[:, :, None, None], out.transpose(1, 2).to(output.dtype), cur)
            if dense:
                w = _pad_keys(w, weights.shape[-1]).to(weights.dtype)
                weights[:, idx, rows] = torch.where(lost[:, None, :, None], w, weights[:, idx, rows])
        return output, weights

    def last_row(self, module, probs, query, key, attention_mask, scaling):
        g = _geometry(query, key, attention_mask, self.sink, self.window)
        lost = g.removed[:, -1]
        if not bool(lost.any()):
            return probs
        q_len = query.shape[2]
        _, w = _attend(query, key, None, g, self.heads, scaling, self.sink, self.window,
                       rows=slice(q_len - 1, q_len), dense=True, softcap=logit_softcap(module))
        probs = probs.clone()
        w = w[:, :, 0].to(probs.device, probs.dtype)
        probs[:, self.heads] = torch.where(lost[:, None, None].to(probs.device), w, probs[:, self.heads])
        return probs


def _logits_conflict(h: Head) -> str:
    return (f"head {h} is logit-ablated (ablate(..., method='logits')) and window-restricted at once: both replace "
            "the head's attention output, so the result would depend on which was attached last; ablate it "
            "with method='query', 'zero' or 'mean' (these compose with the restriction), or do not restrict it")


def _check_size(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return int(value)


@contextlib.contextmanager
def restrict_window(model: Any, heads: Iterable[Head | str | tuple[int, int]], *, sink: int = 4, window: int = 64,
                    shape: HeadShape | None = None) -> Iterator[list[Head]]:
    """Within the block, each query head in ``heads`` attends only to the first ``sink`` real
    tokens of its row and the ``window`` most recent positions up to its own (causal); yields the
    parsed heads. The exact mask, and where it follows and departs from DuoAttention and
    StreamingLLM, are in the module docstring.

    ``model`` is a ``LoadedModel`` or a transformers model (its shape is read from the config, or
    give ``shape``). Heads not listed are untouched, bit for bit. Applies to every forward in the
    block -- prefill, teacher-forced passes and decoding steps with a KV cache alike -- under sdpa,
    eager or flash. Everything attached is detached in ``finally``, also when the body raises.

    Cost: per restricted head and forward, one float32 pass over ``q_len x (sink + window + 256)``
    scores (blocks of at most 256 query rows), on top of the kernel's own full attention (not
    skipped: the kernel computes every head at once). Under eager, and for a capture's last row, the
    restricted weights are computed over all keys (``q_len x kv_len``), as eager's own are.

    Refused: a head restricted by an enclosing block (one window per head), and a head under
    ``ablate(..., method="logits")`` (see the module docstring); other ablations compose.
    """
    sink = _check_size("sink", sink, 0)
    window = _check_size("window", window, 1)
    hf = hf_model(model)
    shape = shape or getattr(model, "shape", None) or head_shape(hf)
    heads = validate_heads(heads, shape)
    from rh.ablation import active_ablations, unpruned_modules

    modules = unpruned_modules(model, heads, shape, "restrict")
    taken = [str(h) for h in heads if h in _ACTIVE.get(hf, {})]
    if taken:
        raise ValueError(f"head(s) {', '.join(taken)} are already window-restricted by an enclosing block; "
                         "give each head one sink and window")
    ablated = active_ablations(hf)
    for h in heads:
        if ablated.get(h, ("",))[0] == "logits":
            raise ValueError(_logits_conflict(h))
    by_layer = heads_by_layer(heads)
    table = _ACTIVE.setdefault(hf, {})
    registered: list[Head] = []
    try:
        for h in heads:
            table[h] = (sink, window)
            registered.append(h)
        with contextlib.ExitStack() as stack:
            if by_layer:
                stack.enter_context(rh_attention_active(hf))
            for layer, idx in sorted(by_layer.items()):
                stack.callback(add_intervention(modules[layer], _Window(idx, sink, window, layer, hf)))
            yield heads
    finally:
        for h in registered:
            table.pop(h, None)
        if not table:
            _ACTIVE.pop(hf, None)


@dataclass(frozen=True)
class Restriction:
    """A window restriction declared as a condition, as :class:`rh.ablation.Ablation` declares an
    ablation: ``heads`` restricted to ``sink`` plus ``window`` (:func:`restrict_window`) in every
    position, rows labelled ``name``. A :class:`rh.units.Unit` takes it as its condition, so the
    restricted passes are work units like the ablations (stored, shipped to replicas, counted)."""

    name: str
    heads: tuple[Head, ...]
    sink: int = 4
    window: int = 64
    selection: str = "heads"

    method = "window"  # what a unit's rows and the store read beside the heads
    phase = "all"
    draw = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(parse_heads(self.heads)))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a Restriction needs a non-empty name, not {self.name!r}")
        if not self.heads:
            raise ValueError(f"condition {self.name!r}: a window restriction needs at least one head")
        object.__setattr__(self, "sink", _check_size("sink", self.sink, 0))
        object.__setattr__(self, "window", _check_size("window", self.window, 1))

    @property
    def k(self) -> int:
        return len(self.heads)

    @property
    def params(self) -> tuple[int, int]:
        """What besides heads and method sets the rows: (sink, window)."""
        return self.sink, self.window

    def columns(self) -> dict[str, Any]:
        return {"selection": self.selection, "k": self.k, "draw": None, "method": self.method, "phase": self.phase}

    def open(self, model: Any) -> contextlib.AbstractContextManager:
        return restrict_window(model, self.heads, sink=self.sink, window=self.window)


# ---------------------------------------------------------------------------- memory


def kv_cache_bytes(shape: HeadShape, head_dim: int, *, full_heads: Iterable[Head | str | tuple[int, int]],
                   length: int, sink: int, window: int, bytes_per_value: int = 2) -> dict[str, Any]:
    """KV-cache bytes (K and V, all layers, one sequence) at ``length`` tokens: the full model's,
    and under the policy that keeps ``full_heads`` whole and restricts every other query head to
    ``sink + window`` tokens.

    Grouped-query attention: a KV head is shared by ``shape.group_size`` query heads, and its cache
    can only shrink when *every* query head reading it is restricted (DuoAttention gates per KV
    head for this reason). ``saved_bytes`` / ``saved_fraction`` / ``kv_heads_compressed`` follow
    that rule. ``saved_fraction_if_per_query_head`` is the figure often quoted -- the restricted
    share of query heads times the share of tokens dropped -- which only holds if each query head
    had its own KV head (no GQA); GQA does not allow it.

    A compressed KV head keeps ``min(length, sink + window)`` tokens (the restriction's window
    counts the current token, so after appending it the cache holds at most ``sink + window``).
    """
    length = _check_size("length", length, 0)
    sink = _check_size("sink", sink, 0)
    window = _check_size("window", window, 1)
    head_dim = _check_size("head_dim", head_dim, 1)
    bytes_per_value = _check_size("bytes_per_value", bytes_per_value, 1)
    full = set(validate_heads(full_heads, shape))
    group = shape.group_size
    if group * shape.n_kv_heads != shape.n_heads:
        raise ValueError(f"{shape.n_heads} query heads cannot share {shape.n_kv_heads} KV heads evenly")
    kept = min(length, sink + window)
    per_token = 2 * head_dim * bytes_per_value  # K and V of one KV head
    n_kv_total = shape.n_layers * shape.n_kv_heads
    compressed = sum(
        1
        for layer in range(shape.n_layers)
        for kv in range(shape.n_kv_heads)
        if not any(Head(layer, h) in full for h in range(kv * group, (kv + 1) * group))
    )
    full_bytes = n_kv_total * length * per_token
    policy_bytes = (n_kv_total - compressed) * length * per_token + compressed * kept * per_token
    saved = full_bytes - policy_bytes
    restricted_q = shape.n_total - len(full)
    dropped = (length - kept) / length if length else 0.0
    return {
        "length": length,
        "sink": sink,
        "window": window,
        "tokens_kept_per_compressed_head": kept,
        "bytes_per_value": bytes_per_value,
        "full_bytes": full_bytes,
        "policy_bytes": policy_bytes,
        "saved_bytes": saved,
        "saved_fraction": saved / full_bytes if full_bytes else 0.0,
        "kv_heads_total": n_kv_total,
        "kv_heads_compressed": compressed,
        "query_heads_restricted": restricted_q,
        "query_heads_total": shape.n_total,
        "saved_fraction_if_per_query_head": restricted_q / shape.n_total * dropped,
    }
