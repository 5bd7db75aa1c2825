"""The one mechanism that captures attention rows while the model runs (design decision 1).

``capture_attention(model, reduce)`` registers, with transformers' ``AttentionInterface``, an
attention function that calls the model's own implementation (sdpa, eager, flash) for the output
and, beside it, computes only the last query row's attention probabilities from the very
``query``/``key`` tensors the model used (after RoPE, with grouped KV heads expanded). At prefill
that row is the last prompt token; while decoding it is the current token. The mask function is
registered under the same name, or the causal mask would silently disappear. Nothing is forked,
no projection is recomputed, and no N x N matrix is built: the cost is O(L) per head.

The same registered function is where interventions on the attention computation run
(:class:`AttentionIntervention`, attached per module with :func:`add_intervention`): query
zeroing and logit zeroing in ``rh.ablation``, and the query-head -> KV-head map of a pruned layer
(``rh_kv_heads``, see ``rh.pruning``). Interventions run before the capture, so a capture sees the
attention the model actually computed.

Several query rows: ``capture_attention(model, reduce, rows=R)`` records, per forward and
layer, the rows ``R`` (an int m = the last m positions, or Python-style negative positions such
as ``(-5, -1)``, counted from the end so that they line up across left-padded rows) as
``[batch, heads, len(R), kv]`` (:func:`rows_probs`): O(len(R) * L) per head, never N x N. The
default (``rows=None``) is the last-row path above, unchanged in what it computes and costs.

Reading beside a pass: :func:`reading_rows` attaches a reader (an :class:`AttentionIntervention`
whose :meth:`~AttentionIntervention.read` records and changes nothing) to chosen layers, which hands
``reduce`` the attention of one query position per batch row, chosen per forward (e.g. each
prompt's last token inside a teacher-forced prompt + answer pass). Unlike a capture it reads only
its layers, so a pass under it may still keep and reuse residual streams below the first of them
(``rh.prefix`` counts that layer as the pass's first modified one).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from rh.models import hf_model, layer_slice

_PREFIX = "rh_capture__"
_active: ContextVar[AttentionCapture | None] = ContextVar("rh_attention_capture", default=None)

Reducer = Callable[[int, torch.Tensor], Any]


@dataclass
class AttentionCapture:
    """What a capture block recorded: ``steps[t][layer]`` is ``reduce(layer, probs)`` for call ``t``.

    ``probs`` is float32 of shape ``[batch, n_heads, kv_len]``: the attention of the last query
    position of each forward call. Call 0 is the prefill; later calls are decoding steps. With
    ``rows`` (see :func:`capture_attention`) it is ``[batch, n_heads, len(rows), kv_len]``, row
    ``r`` being query position ``rows[r]`` counted from the end (-1 = last).
    """

    reduce: Reducer
    n_layers: int
    steps: list[dict[int, Any]] = field(default_factory=list)
    _model_id: int = 0
    rows: tuple[int, ...] | None = None

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        if layer == 0 or not self.steps or layer in self.steps[-1]:
            self.steps.append({})
        self.steps[-1][layer] = self.reduce(layer, probs)

    def step(self, t: int = 0) -> list[Any]:
        """Per-layer results of forward call ``t`` (0 = prefill), in layer order."""
        rec = self.steps[t]
        missing = [l for l in range(self.n_layers) if l not in rec]
        if missing:
            raise RuntimeError(f"attention capture saw no call for layers {missing} at step {t}")
        return [rec[l] for l in range(self.n_layers)]


def logit_softcap(module: torch.nn.Module | None, kwargs: dict[str, Any] | None = None) -> float | None:
    """The attention-logit soft-cap an attention call applies (Gemma 2: ``tanh(s / cap) * cap`` on the
    scaled scores, before the mask), or None: the ``softcap`` the module passes its attention
    function, else the module's ``attn_logit_softcapping``."""
    cap = (kwargs or {}).get("softcap")
    if cap is None and module is not None:
        cap = getattr(module, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``tanh(scores / softcap) * softcap`` (as Gemma 2's eager attention does), or ``scores`` unchanged."""
    if not softcap:
        return scores
    return torch.tanh(scores / softcap) * softcap


def last_row_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    softcap: float | None = None, sliding_window: int | None = None,
) -> torch.Tensor:
    """Softmax attention of the last query position: ``[batch, n_heads, kv_len]`` in float32.

    ``query`` is ``[b, n_heads, q_len, d]`` and ``key`` ``[b, n_kv_heads, kv_len, d]`` as the
    attention function receives them; query head ``h`` reads KV head ``h // (n_heads // n_kv)``,
    the grouping ``repeat_kv`` uses. The mask row is honoured whether it is absent (causal: the
    last query sees every key), boolean (True = attend), additive float, or a 2-D padding mask.
    ``softcap``: the scaled scores are soft-capped before the mask, as the model's attention does.
    ``sliding_window``: where the mask is absent or 2-D (flash attention receives the window as an
    argument, not in the mask), the last query sees only the last ``sliding_window`` keys; a 4-D
    mask already holds the window.
    """
    b, n_heads, q_len, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    if attention_mask is None and q_len > 1 and kv_len > q_len:
        key = key[:, :, :q_len]  # sdpa's crop for a prefill into an empty static cache
        kv_len = q_len
    q = query[:, :, -1, :].float().reshape(b, n_kv, groups, d)
    scores = softcap_scores(torch.einsum("bkgd,bkld->bkgl", q, key.float()).reshape(b, n_heads, kv_len) * scaling,
                            softcap)
    if attention_mask is not None:
        m = attention_mask
        if m.dim() == 2:  # [b, kv] padding mask (flash attention)
            row = m[:, None, -kv_len:].bool()
        else:  # [b, 1 | heads, q, kv]
            row = m[:, :, -1, :kv_len]
        if row.dtype == torch.bool:
            scores = scores.masked_fill(~row, float("-inf"))
        else:
            scores = scores + row.float()
    if sliding_window and kv_len > sliding_window and (attention_mask is None or attention_mask.dim() == 2):
        scores[..., : kv_len - sliding_window] = float("-inf")
    return torch.softmax(scores, dim=-1)


def _row_chunk(b: int, n_heads: int, kv_len: int, n_rows: int) -> int:
    """Rows per chunk so that one chunk's float32 scores stay near 2**26 elements (256 MB)."""
    return max(1, min(n_rows, (1 << 26) // max(1, b * n_heads * kv_len)))


def rows_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
    rows: tuple[int, ...], softcap: float | None = None, sliding_window: int | None = None,
) -> torch.Tensor:
    """Softmax attention of the query positions ``rows`` (negative, counted from the end of the
    query: -1 is the last): ``[batch, n_heads, len(rows), kv_len]`` in float32.

    The same computation as :func:`last_row_probs`, per row: GQA grouping as ``repeat_kv``; the
    mask's rows where it is 4-D (it holds causality and padding); where it is absent (sdpa's
    causal skip) or 2-D (flash: padding only), the causal constraint is added explicitly: query
    ``i`` of ``q_len`` sees keys ``0 .. kv_len - q_len + i``. Rows are computed in chunks, so the
    transient memory is one chunk's scores beside the output; no N x N matrix is built. A query
    row that sees no key at all (a left-padding position) comes back as zeros.
    """
    b, n_heads, q_len, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    idx = [q_len + r for r in rows]
    if any(not 0 <= i < q_len for i in idx):
        raise RuntimeError(
            f"attention capture of rows {rows}: this forward has only {q_len} query positions (a decoding step has "
            "one); capture several rows on a forward over at least that many new tokens"
        )
    if attention_mask is None and q_len > 1 and kv_len > q_len:
        key = key[:, :, :q_len]  # sdpa's crop for a prefill into an empty static cache
        kv_len = q_len
    out = torch.empty(b, n_heads, len(idx), kv_len, dtype=torch.float32, device=query.device)
    kf = key.float()
    keys = torch.arange(kv_len, device=query.device)
    step = _row_chunk(b, n_heads, kv_len, len(idx))
    for c in range(0, len(idx), step):
        sel = torch.tensor(idx[c : c + step], device=query.device)
        q = query.index_select(2, sel).float().reshape(b, n_kv, groups, len(sel), d)
        scores = softcap_scores(
            torch.einsum("bkgrd,bkld->bkgrl", q, kf).reshape(b, n_heads, len(sel), kv_len) * scaling, softcap)
        m = attention_mask
        if m is not None and m.dim() == 4:
            row = m.index_select(2, sel)[..., :kv_len]
            if row.dtype == torch.bool:
                scores = scores.masked_fill(~row, float("-inf"))
            else:
                scores = scores + row.float()
        else:
            causal = keys[None, :] <= (kv_len - q_len + sel)[:, None]  # [r, kv]
            if sliding_window:  # flash receives the window as an argument, not in the mask
                causal &= keys[None, :] > (kv_len - q_len + sel)[:, None] - sliding_window
            scores = scores.masked_fill(~causal[None, None], float("-inf"))
            if m is not None:  # [b, kv] padding mask (flash attention)
                scores = scores.masked_fill(~m[:, None, None, -kv_len:].bool(), float("-inf"))
        # a padding query row sees no key: zeros, not softmax's NaN
        out[:, :, c : c + len(sel)] = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return out


class AttentionIntervention:
    """A change to one attention module's computation, run inside the registered attention function.

    ``before`` may replace the query/key/value the base implementation sees (``[b, heads, q, d]``
    and ``[b, kv_heads, kv, d]``, after RoPE and the KV cache); ``after`` may replace its output
    (``[b, q, heads, d]``) and attention weights (eager only, else ``None``); ``last_row`` may
    replace the capture's last-row probabilities (``[b, heads, kv]``) so a capture records the
    attention the intervention produced. Every method defaults to the identity.

    A multi-row capture (``capture_attention(..., rows=...)``) computes its rows from the query and
    key that ``before`` returned, so query/key interventions show in it; but ``last_row`` rewrites
    only the last row, with that row's semantics, so a multi-row capture refuses (RuntimeError) to
    run on a module with an intervention that overrides ``last_row``, rather than record rows the
    model did not compute.
    """

    def before(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return query, key, value

    def after(self, module: torch.nn.Module, output: torch.Tensor, weights: torch.Tensor | None,
              query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        return output, weights

    def last_row(self, module: torch.nn.Module, probs: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        return probs

    def read(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
             attention_mask: torch.Tensor | None, scaling: float, softcap: float | None,
             sliding_window: int | None) -> None:
        """Read the call's attention (``query``/``key`` as the base implementation saw them, after
        every ``before``; detached) without changing anything: a reader's whole work
        (:func:`reading_rows`). Called after ``after``, under ``torch.no_grad``."""


_INTERVENTIONS_ATTR = "_rh_attention_interventions"


def add_intervention(module: torch.nn.Module, intervention: AttentionIntervention) -> Callable[[], None]:
    """Attach ``intervention`` to one attention module; return the function that detaches it.

    It only runs while the model uses the registered attention function (inside
    :func:`rh_attention_active` or :func:`capture_attention`).
    """
    table: dict[int, AttentionIntervention] = module.__dict__.setdefault(_INTERVENTIONS_ATTR, {})
    key = id(intervention)
    table[key] = intervention

    def remove() -> None:
        t = module.__dict__.get(_INTERVENTIONS_ATTR)
        if t is not None:
            t.pop(key, None)
            if not t:
                del module.__dict__[_INTERVENTIONS_ATTR]

    return remove


def interventions(module: torch.nn.Module) -> tuple[AttentionIntervention, ...]:
    """The interventions attached to ``module``, in the order they were added."""
    return tuple(module.__dict__.get(_INTERVENTIONS_ATTR, {}).values())


def expand_kv(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One KV head per query head where a pruned layer's groups are uneven (``module.rh_kv_heads``
    maps each remaining query head to its KV head); unchanged elsewhere."""
    index = getattr(module, "rh_kv_heads", None)
    if index is None:
        return key, value
    index = index.to(key.device)
    return key.index_select(1, index), value.index_select(1, index)


def _base_function(name: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"cannot find the eager attention of {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_wrapper(base: str) -> Callable:
    def rh_capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        key, value = expand_kv(module, key, value)
        hooks = interventions(module)
        for h in hooks:
            query, key, value = h.before(module, query, key, value, attention_mask)
        out = _base_function(base, module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if hooks:
            output, weights = out
            for h in hooks:
                output, weights = h.after(module, output, weights, query, key, value, attention_mask, scale)
            out = (output, weights)
            readers = [h for h in hooks if type(h).read is not AttentionIntervention.read]
            if readers:
                softcap, window = logit_softcap(module, kwargs), kwargs.get("sliding_window")
                with torch.no_grad():
                    for h in readers:
                        h.read(module, query.detach(), key.detach(), attention_mask, scale, softcap, window)
        cap = _active.get()
        if cap is not None and cap._model_id == id(getattr(module, "config", None)):
            softcap, window = logit_softcap(module, kwargs), kwargs.get("sliding_window")
            if cap.rows is None:
                with torch.no_grad():
                    probs = last_row_probs(query.detach(), key.detach(), attention_mask, scale, softcap, window)
                    for h in hooks:
                        probs = h.last_row(module, probs, query.detach(), key.detach(), attention_mask, scale)
            else:
                rewriting = [type(h).__name__ for h in hooks
                             if type(h).last_row is not AttentionIntervention.last_row]
                if rewriting:
                    raise RuntimeError(
                        f"a multi-row attention capture cannot run with {', '.join(rewriting)} attached to layer "
                        f"{module.layer_idx}: it rewrites only the last row of the capture; capture the last row "
                        "(rows=None) or remove the intervention"
                    )
                with torch.no_grad():
                    probs = rows_probs(query.detach(), key.detach(), attention_mask, scale, cap.rows, softcap, window)
            cap._record(int(module.layer_idx), probs)
        return out

    return rh_capture_attention


def _register(base: str) -> str:
    """Register the capture wrapper and the base's mask function under one name; return it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[base] if base in ALL_MASK_ATTENTION_FUNCTIONS else None
        if mask_fn is None:
            raise ValueError(f"attention implementation {base!r} has no registered mask function")
        AttentionMaskInterface.register(name, mask_fn)
    return name


def install_rh_attention(model: Any) -> str:
    """Switch ``model`` to rh's registered attention function for good and return its name: a
    pruned model whose layers map query heads to KV heads unevenly needs it on every forward."""
    hf = hf_model(model)
    name = _register(hf.config._attn_implementation.removeprefix(_PREFIX))
    if hf.config._attn_implementation != name:
        hf.set_attn_implementation(name)
    return name


@contextlib.contextmanager
def rh_attention_active(model: Any) -> Iterator[str]:
    """Within the block the model runs rh's registered attention function (its own
    implementation, plus interventions and capture); the previous name is restored in ``finally``.

    Blocks nest: an inner block finds the wrapper already in place and leaves it so.
    """
    hf = hf_model(model)
    previous = hf.config._attn_implementation
    name = _register(previous.removeprefix(_PREFIX))
    if previous != name:
        hf.set_attn_implementation(name)
    try:
        yield name
    finally:
        if hf.config._attn_implementation != previous:
            hf.set_attn_implementation(previous)


def base_implementation(model: Any) -> str:
    """The attention implementation the model's kernels are, under rh's wrapper or not."""
    return str(getattr(hf_model(model).config, "_attn_implementation", "")).removeprefix(_PREFIX)


def capturing(model: Any) -> bool:
    """Whether an attention capture on ``model`` is active (it records every layer's attention)."""
    cap = _active.get()
    return cap is not None and cap._model_id == id(getattr(hf_model(model), "config", None))


def keep_rows(layer: int, probs: torch.Tensor) -> torch.Tensor:
    """Default reducer: keep the whole last-token row of every head, on the CPU."""
    return probs.cpu()


def _capture_rows(rows: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if rows is None:
        return None
    if isinstance(rows, bool):
        raise ValueError(f"rows={rows!r}: give a row count or negative positions counted from the end")
    if isinstance(rows, int):
        if rows < 1:
            raise ValueError(f"rows={rows}: capture at least one row")
        return tuple(range(-rows, 0))
    out = tuple(int(r) for r in rows)
    if not out or any(r >= 0 for r in out):
        raise ValueError(f"rows={rows!r}: give negative positions counted from the end (-1 = the last query)")
    return out


@contextlib.contextmanager
def capture_attention(model: Any, reduce: Reducer = keep_rows, *,
                      through_layer: int | None = None,
                      rows: int | Sequence[int] | None = None) -> Iterator[AttentionCapture]:
    """Within the block, every forward of ``model`` (a ``LoadedModel`` or transformers model) records ``reduce(layer, probs)`` per layer.

    The model's attention implementation is swapped for the capture wrapper of the same base and
    restored in ``finally``, also when the block raises. Outputs are those of the base
    implementation, unchanged (unless an intervention such as ``ablate(..., method="query")`` is
    active, whose effect the capture then records).

    ``through_layer=L``: the forwards in the block run decoder layers 0..L only (a causal layer
    cannot change what the layers before it attend to), the capture records those, and the model's
    outputs are not its real ones: for passes that only read the attention of heads up to layer L.

    ``rows``: record several query rows per forward: an int ``m`` (the last ``m`` positions, in
    order) or negative positions counted from the end (``(-3, -1)``); ``reduce`` then receives
    ``[batch, heads, len(rows), kv]``. Counted from the end, rows line up across left-padded
    batch rows. Every forward in the block must have that many query positions (a decoding step
    has one: RuntimeError), and no intervention that rewrites the last row may be attached (see
    :class:`AttentionIntervention`). ``rows=None`` (default) is the last-row capture.
    """
    hf = hf_model(model)
    config = hf.config
    current = _active.get()
    if current is not None and current._model_id == id(config):
        raise RuntimeError("capture_attention blocks on the same model cannot be nested")
    n_layers = int(config.num_hidden_layers)
    if through_layer is not None and not 0 <= int(through_layer) < n_layers:
        raise ValueError(f"through_layer={through_layer}: the model has layers 0..{n_layers - 1}")
    stop = None if through_layer is None else int(through_layer) + 1
    cap = AttentionCapture(reduce=reduce, n_layers=n_layers if stop is None else stop, _model_id=id(config),
                           rows=_capture_rows(rows))
    with rh_attention_active(hf), contextlib.ExitStack() as stack:
        if stop is not None and stop < n_layers:  # later layers cannot change what the earlier ones attend to
            from rh.budget import note_saved
            from rh.models import decoder_layers

            def _left_out(module, args, kwargs, skipped=n_layers - stop) -> None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if hidden is not None and hidden.dim() >= 3:  # the layers the plain pass would also have run
                    note_saved("shorter captures", int(hidden.shape[0]) * int(hidden.shape[1]) * skipped)

            _left_out._rh_passive = True  # it only counts: rh.prefix.first_modified_layer ignores it
            handle = decoder_layers(hf)[0].register_forward_pre_hook(_left_out, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(layer_slice(hf, 0, stop))
        token = _active.set(cap)
        try:
            yield cap
        finally:
            _active.reset(token)


class _RowReader(AttentionIntervention):
    """One layer's reader of :func:`reading_rows`: changes nothing, reads one query row per batch row."""

    changes = False  # rh.prefix: the streams past its layer stay clean (kept for hinted layers above it)

    def __init__(self, layer: int, positions: Callable[[int], Sequence[int]], reduce: Reducer):
        self.layer, self.positions, self.reduce = layer, positions, reduce

    def read(self, module, query, key, attention_mask, scaling, softcap, sliding_window) -> None:
        rewriting = [type(h).__name__ for h in interventions(module)
                     if type(h).last_row is not AttentionIntervention.last_row]
        if rewriting:
            raise RuntimeError(f"reading_rows cannot read layer {self.layer} with {', '.join(rewriting)} attached: it "
                               "changes the probabilities without changing the query or key the reader sees")
        b, q_len = query.shape[0], query.shape[2]
        pos = [int(p) for p in self.positions(q_len)]
        if len(pos) != b or any(not 0 <= p < q_len for p in pos):
            raise RuntimeError(f"reading_rows at layer {self.layer}: positions {pos} for a forward of {b} rows and "
                               f"{q_len} query positions")
        rows = sorted({p - q_len for p in pos})  # counted from the end, as rows_probs takes them
        probs = rows_probs(query, key, attention_mask, scaling, tuple(rows), softcap, sliding_window)
        pick = torch.tensor([rows.index(p - q_len) for p in pos], device=probs.device)
        self.reduce(self.layer, probs[torch.arange(b, device=probs.device), :, pick])  # [b, heads, kv]


@contextlib.contextmanager
def reading_rows(model: Any, layers: Sequence[int], positions: Callable[[int], Sequence[int]],
                 reduce: Reducer) -> Iterator[None]:
    """Within the block, every forward of ``model`` calls ``reduce(layer, probs)`` at each of
    ``layers``: ``probs`` ``[batch, n_heads, kv_len]`` (float32, as :func:`rows_probs` computes it
    from the very query and key the model used) is the attention of query position
    ``positions(q_len)[r]`` (0-based, among the forward's ``q_len`` query positions) of batch row
    ``r``. Nothing the model computes changes.

    The readers sit on the layers' attention modules as interventions, so ``rh.prefix`` counts the
    first of ``layers`` as the pass's first modified layer: a pass may start from a residual stream
    stored at or below it (the layers it reads all run) and keeps the stream entering it (and
    entering every hinted layer, above it too: a reader changes nothing) for the passes to come. An
    attention capture (:func:`capture_attention`), which reads every layer, turns both off. Every
    reader is detached in ``finally``."""
    from rh.models import attention_modules

    mods = attention_modules(hf_model(model))
    wanted = sorted({int(x) for x in layers})
    bad = [x for x in wanted if not 0 <= x < len(mods)]
    if bad:
        raise ValueError(f"reading_rows: layers {bad} are not among the model's {len(mods)}")
    removers: list[Callable[[], None]] = []
    with rh_attention_active(model):
        try:
            for layer in wanted:
                removers.append(add_intervention(mods[layer], _RowReader(layer, positions, reduce)))
            yield
        finally:
            for remove in removers:
                remove()
