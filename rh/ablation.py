"""Head ablation: ``ablate(model, heads, method=...)`` removes chosen query heads for every forward
inside the block, by one of four mechanisms (design decision 2 and seed 001's comparison):

========  ==============================================================  ==========================
method    what is changed                                                 what the head then emits
========  ==============================================================  ==========================
zero      the head's slice of the ``o_proj`` input is set to 0            nothing (exactly 0)
mean      that slice is replaced by its mean over reference prompts       a constant vector
query     the head's query is zeroed after RoPE (Wu24's flash path)       the mean of V over the
                                                                          keys it can see
logits    the head's pre-softmax scores are zeroed (Wu24's eager path)    the same mean of V
========  ==============================================================  ==========================

``zero`` and ``mean`` are ``o_proj`` pre-hooks, independent of the attention implementation.
``query`` and ``logits`` run inside rh's registered attention function (the one the attention
capture uses), so they see the very query/key/value the model uses, with its causal and padding
mask and grouped KV heads, under sdpa, eager or flash. Softmax over all-zero scores is uniform over
the visible keys, so both give the mean of V there, not zero: seed 001's table is wrong on this.

``phase="decode"`` ablates only decoding, as Wu24's masking experiment did: its loop prefills the
prompt but its last token unablated, then feeds that last token and each generated one with the
heads masked. Forward calls with one query position are decoding steps; in a wider forward run
inside ``rh.batching.running(batch, decode_from=...)`` (rh's teacher-forced passes and its greedy
generation give each row's last prompt token, :func:`rh.evaluate.decode_positions`) the
positions from there on are, so a teacher-forced pass gives the outcome of Wu24's ablated decoding
in one forward; any other prefill is untouched. :mod:`rh.units` runs decode-phase work units
from the clean prompt's cache: one prefill per prompt, then each condition's answer steps only.

Blocks nest and compose: the union of their heads is ablated, each head by its own method. Every
hook, intervention and attention-implementation swap is undone in ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rh.attention import AttentionIntervention, add_intervention, rh_attention_active
from rh.batching import Batch, decode_start, make_batches
from rh.heads import Head, HeadShape, heads_by_layer, parse_heads, validate_heads
from rh.models import attention_modules, hf_model
from rh.recording import attn_z, reading

METHODS = ("zero", "mean", "query", "logits")
PHASES = ("all", "decode")

HeadMeans = dict[Head, torch.Tensor]


def unpruned_modules(model: Any, heads: Iterable[Head], shape: HeadShape, verb: str) -> list[torch.nn.Module]:
    """The attention modules, refused unless there is one per layer of ``shape`` and every layer of
    ``heads`` still has all its heads (a pruned layer's head indices no longer mean the same heads)."""
    modules = attention_modules(model)
    if len(modules) != shape.n_layers:
        raise ValueError(f"the model has {len(modules)} layers but its shape says {shape.n_layers}: pass its own shape")
    width = shape.n_heads * shape.head_dim
    for layer in sorted({h.layer for h in heads}):
        o_proj = getattr(modules[layer], "o_proj", None)
        if o_proj is not None and getattr(o_proj, "in_features", width) != width:
            raise ValueError(f"layer {layer}'s o_proj takes {o_proj.in_features} features, not {shape.n_heads} heads x "
                             f"{shape.head_dim}: this model was pruned; {verb} heads of the unpruned model")
    return modules


def _head_mask(n_heads: int, head_dim: int, heads: Iterable[int], device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n_heads, head_dim, dtype=torch.bool, device=device)
    mask[list(heads)] = True
    return mask.reshape(-1)


# ---------------------------------------------------------------------------- which positions


def _phase_rows(phase: str, q_len: int, device: torch.device) -> torch.Tensor | bool | None:
    """Which query positions an ablation of ``phase`` touches in a forward of ``q_len`` positions:
    ``None`` = all of them, ``False`` = none, else a ``[b, q_len]`` boolean mask."""
    if phase == "all" or q_len == 1:
        return None
    start = decode_start(q_len)
    if start is None:
        return False  # a prefill: decode-only ablation leaves it alone
    return torch.arange(q_len, device=device)[None, :] >= start.to(device)[:, None]


# ---------------------------------------------------------------------------- uniform attention


def uniform_attention(query: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                      heads: Sequence[int], *, with_weights: bool = False, chunk_elems: int = 1 << 23,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What query heads ``heads`` emit when their pre-softmax scores are all zero: softmax(0 + mask)
    times V, i.e. the mean of V over the keys each query position can see.

    ``query`` is ``[b, n_heads, q, d]`` (only its shape is read), ``value`` ``[b, n_kv, kv, d]``;
    query head ``h`` reads KV head ``h // (n_heads // n_kv)``. The mask is honoured as the
    attention function receives it: absent (causal, with sdpa's crop for a prefill into an empty
    static cache), a 2-D padding mask (flash: causal and padding), or a 4-D boolean or additive
    mask. Returns the output ``[b, q, len(heads), d]`` in float32 and, if asked, the weights
    ``[b, len(heads), q, kv]``.
    """
    b, n_heads, q_len, _ = query.shape
    n_kv, kv_len = value.shape[1], value.shape[2]
    groups = n_heads // n_kv
    kv_idx = torch.tensor([h // groups for h in heads], device=value.device)
    v = value.index_select(1, kv_idx).float()  # [b, n, kv, d]
    n = len(heads)
    if attention_mask is None:
        if q_len > 1 and kv_len > q_len:  # sdpa crops the keys of a prefill into an empty static cache
            v = v[:, :, :q_len]
            kv_len = q_len
        offset = kv_len - q_len
        ends = torch.arange(q_len, device=v.device) + offset  # last visible key of each query
        out = v.cumsum(2)[:, :, ends] / (ends + 1).to(v.dtype)[None, None, :, None]
        weights = None
        if with_weights:
            keys = torch.arange(value.shape[2], device=v.device)
            allowed = keys[None, :] <= ends[:, None]
            weights = (allowed.float() / allowed.sum(-1, keepdim=True)).expand(b, n, q_len, -1)
        return out.transpose(1, 2), weights

    if attention_mask.dim() == 2:  # flash: [b, kv] padding mask, causal implied
        offset = kv_len - q_len
        keys = torch.arange(kv_len, device=v.device)
        causal = keys[None, :] <= (torch.arange(q_len, device=v.device) + offset)[:, None]
        mask = causal[None, None] & attention_mask[:, None, None, -kv_len:].to(v.device).bool()
    else:
        mask = attention_mask[..., :kv_len].to(v.device)
        if mask.shape[1] > 1:  # a per-head mask
            mask = mask[:, list(heads)]
    outs, ws = [], []
    step = max(1, chunk_elems // max(1, b * kv_len * mask.shape[1]))
    for q0 in range(0, q_len, step):
        m = mask[:, :, q0 : q0 + step]
        if m.dtype == torch.bool:
            scores = torch.zeros(m.shape, device=v.device).masked_fill(~m, float("-inf"))
            w = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row (padding) emits 0
        else:  # additive: the dtype's minimum (or -inf) masks a key
            dead = (m <= torch.finfo(m.dtype).min / 2).all(-1, keepdim=True)
            w = torch.softmax(m.float(), dim=-1).masked_fill(dead, 0.0)
        w = w.expand(b, n, w.shape[2], kv_len)
        outs.append(w @ v)
        if with_weights:
            ws.append(w)
    out = torch.cat(outs, dim=2)
    return out.transpose(1, 2), (torch.cat(ws, dim=2) if with_weights else None)


class _ZeroQuery(AttentionIntervention):
    """Wu24's flash path: zero the query of ``heads`` (after RoPE) before the attention kernel."""

    def __init__(self, heads: Sequence[int], phase: str):
        self.heads, self.phase = list(heads), phase

    def before(self, module, query, key, value, attention_mask):
        rows = _phase_rows(self.phase, query.shape[2], query.device)
        if rows is False:
            return query, key, value
        query = query.clone()
        idx = self.heads
        if rows is None:
            query[:, idx] = 0.0
        else:
            query[:, idx] = query[:, idx] * (~rows)[:, None, :, None].to(query.dtype)
        return query, key, value


class _ZeroLogits(AttentionIntervention):
    """Wu24's eager path: the pre-softmax scores of ``heads`` are zero, so their attention is
    softmax(mask) and their output the mean of V over the visible keys; computed explicitly after
    the kernel ran (sdpa and flash never expose the scores)."""

    def __init__(self, heads: Sequence[int], phase: str):
        self.heads, self.phase = list(heads), phase

    def after(self, module, output, weights, query, key, value, attention_mask, scaling):
        rows = _phase_rows(self.phase, query.shape[2], query.device)
        if rows is False:
            return output, weights
        idx = self.heads
        uni, uni_w = uniform_attention(query, value, attention_mask, idx, with_weights=weights is not None)
        output = output.clone()
        if rows is None:
            output[:, :, idx] = uni.to(output.dtype)
        else:
            output[:, :, idx] = torch.where(rows[:, :, None, None], uni.to(output.dtype), output[:, :, idx])
        if weights is not None:
            weights = weights.clone()
            uni_w = uni_w.to(weights.dtype)
            if uni_w.shape[-1] < weights.shape[-1]:  # cropped keys carry no weight
                uni_w = torch.nn.functional.pad(uni_w, (0, weights.shape[-1] - uni_w.shape[-1]))
            if rows is None:
                weights[:, idx] = uni_w
            else:
                weights[:, idx] = torch.where(rows[:, None, :, None], uni_w, weights[:, idx])
        return output, weights

    def last_row(self, module, probs, query, key, attention_mask, scaling):
        rows = _phase_rows(self.phase, query.shape[2], query.device)
        if rows is False or (rows is not None and not bool(rows[:, -1].any())):
            return probs
        from rh.attention import last_row_probs

        uni = last_row_probs(torch.zeros_like(query), key, attention_mask, scaling)  # softmax(0 + mask)
        probs = probs.clone()
        sel = uni[:, self.heads]
        if rows is not None:
            sel = torch.where(rows[:, -1, None, None].to(probs.device), sel, probs[:, self.heads])
        probs[:, self.heads] = sel
        return probs


# ---------------------------------------------------------------------------- reference means


def _shape_of(model: Any, shape: HeadShape | None) -> HeadShape:
    shape = shape or getattr(model, "shape", None)
    if shape is None:
        raise ValueError("this needs the model's HeadShape: pass a LoadedModel or shape=")
    return shape


def _input_batches(model: Any, data: Any, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs from samples, ``Batch`` objects, input dicts or an ``input_ids`` tensor."""
    from rh.niah import Sample

    device = hf_model(model).get_input_embeddings().weight.device
    if isinstance(data, torch.Tensor):
        data = [{"input_ids": data}]
    items = list(data)
    if not items:
        raise ValueError("the reference set is empty: give at least one prompt to average over")
    if all(isinstance(x, Sample) for x in items):
        tok = getattr(model, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            raise ValueError("samples need a LoadedModel whose tokenizer has a pad token to be batched")
        items = list(make_batches(items, batch_size, pad))
    for item in items:
        if isinstance(item, Batch):
            yield item.model_inputs(device)
        elif isinstance(item, Mapping):
            yield {k: v.to(device) for k, v in item.items()}
        else:
            raise ValueError(
                f"cannot read reference prompts from a {type(item).__name__}: give Samples, rh Batches, "
                "dicts of model inputs, or an input_ids tensor"
            )


def head_means(model: Any, data: Any, heads: Iterable[Head | str | tuple[int, int]] | None = None, *,
               shape: HeadShape | None = None, batch_size: int = 8, progress: bool = False) -> HeadMeans:
    """Each head's mean ``o_proj``-input slice over every real token of the reference prompts
    ``data`` (samples, batches, input dicts or an ``input_ids`` tensor), padding excluded: the
    vector ``ablate(..., method="mean")`` substitutes. float32 on the CPU, keyed by ``Head``.

    Whatever interventions are active around the call apply (means of an ablated model).
    """
    shape = _shape_of(model, shape)
    heads = validate_heads(shape.all_heads() if heads is None else heads, shape)
    hf = hf_model(model)
    layers = sorted({h.layer for h in heads})
    width = shape.n_heads * shape.head_dim
    sums: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None, "count": 0}

    def add(layer: int):
        def fn(x: torch.Tensor) -> None:
            if x.shape[-1] != width:
                raise ValueError(f"layer {layer}'s o_proj takes {x.shape[-1]} features, not {width}: a pruned model?")
            m = state["mask"]
            m = torch.ones(x.shape[:2], device=x.device) if m is None else m.to(x.device, torch.float32)
            s = torch.einsum("bqf,bq->f", x.float(), m).double().cpu()
            sums[layer] = sums[layer] + s if layer in sums else s
        return fn

    with reading(model, {attn_z(layer): add(layer) for layer in layers}):
        batches = _input_batches(model, data, batch_size)
        for inputs in tqdm(batches, desc="reference means", unit="batch", disable=not progress, leave=False):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            state["mask"] = mask
            state["count"] += int(mask.sum()) if mask is not None else ids.numel()
            with torch.no_grad():
                hf(**inputs, use_cache=False, logits_to_keep=1)
    d = shape.head_dim
    return {h: (sums[h.layer][h.head * d : (h.head + 1) * d] / state["count"]).float() for h in heads}


def _check_means(reference: Any, heads: list[Head], shape: HeadShape, model: Any, batch_size: int) -> HeadMeans:
    if reference is None:
        raise ValueError(
            "method='mean' needs reference=: the per-head means from head_means(model, prompts), or the "
            "reference prompts (Samples) to compute them from"
        )
    if isinstance(reference, Mapping):
        means = {Head.parse(k): torch.as_tensor(v) for k, v in reference.items()}
    else:
        means = head_means(model, reference, heads, shape=shape, batch_size=batch_size)
    missing = [str(h) for h in heads if h not in means]
    if missing:
        raise ValueError(
            f"reference= has no mean for head(s) {', '.join(missing)}: compute it with "
            "head_means(model, prompts, heads) for every head you ablate"
        )
    for h in heads:
        if tuple(means[h].shape) != (shape.head_dim,):
            raise ValueError(
                f"the reference mean of {h} has shape {tuple(means[h].shape)}, not ({shape.head_dim},): "
                "one o_proj-input slice per head, as head_means returns"
            )
    return {h: means[h].float() for h in heads}


# ---------------------------------------------------------------------------- ablate

_Spec = tuple[str, str, "torch.Tensor | None"]
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> {Head: [spec, ...]}


def active_ablations(model: Any) -> dict[Head, tuple[str, str]]:
    """The heads ablated on ``model`` right now, with (method, phase): what enclosing blocks do."""
    table = _ACTIVE.get(hf_model(model), {})
    return {h: specs[-1][:2] for h, specs in table.items() if specs}


def _check_conflicts(hf: Any, heads: list[Head], method: str, phase: str, means: HeadMeans | None) -> None:
    table = _ACTIVE.get(hf, {})
    for h in heads:
        for m, p, vec in table.get(h, []):
            if (m, p) != (method, phase):
                raise ValueError(
                    f"head {h} is already ablated with method={m!r}, phase={p!r} by an enclosing block; "
                    f"ablating it again with method={method!r}, phase={phase!r} is ambiguous: use one method per head"
                )
            if method == "mean" and not torch.equal(vec, means[h]):
                raise ValueError(
                    f"head {h} is already mean-ablated with other reference means by an enclosing block; "
                    "use one reference per head"
                )


@contextlib.contextmanager
def ablate(
    model: Any,
    heads: Iterable[Head | str | tuple[int, int]],
    method: str = "zero",
    *,
    phase: str = "all",
    reference: Mapping[Head | str, torch.Tensor] | Sequence[Any] | None = None,
    shape: HeadShape | None = None,
    batch_size: int = 8,
) -> Iterator[list[Head]]:
    """Ablate ``heads`` for every forward of ``model`` inside the block; yields the parsed heads.

    ``method``: ``"zero"`` (default; the head's ``o_proj`` input slice is 0), ``"mean"`` (that
    slice is ``reference``'s mean for the head: a mapping from :func:`head_means`, or reference
    Samples to compute it from), ``"query"`` (query zeroed after RoPE) or ``"logits"``
    (pre-softmax scores zeroed); the last two make the head emit the mean of V over the visible
    keys. ``phase``: ``"all"`` (prefill and decoding) or ``"decode"`` (decoding steps only, as
    Wu24). ``model`` is a ``LoadedModel`` or a transformers model with ``shape`` given. Weights
    are never touched; every hook goes in ``finally``. Blocks nest (the union of their heads); one
    head under two different methods is refused.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ablation method={method!r}: use one of {', '.join(repr(m) for m in METHODS)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase={phase!r}: use 'all' (prefill and decoding) or 'decode' (decoding steps only)")
    if reference is not None and method != "mean":
        raise ValueError(f"reference= only applies to method='mean', not method={method!r}; drop it")
    shape = _shape_of(model, shape)
    heads = validate_heads(heads, shape)
    modules = unpruned_modules(model, heads, shape, "ablate")
    hf = hf_model(model)
    means = _check_means(reference, heads, shape, model, batch_size) if method == "mean" else None
    _check_conflicts(hf, heads, method, phase, means)

    by_layer = heads_by_layer(heads)
    table = _ACTIVE.setdefault(hf, {})
    registered: list[Head] = []
    try:
        for h in heads:
            table.setdefault(h, []).append((method, phase, means[h] if means else None))
            registered.append(h)
        # Unwound last-in first-out: hooks and interventions go before the implementation is restored.
        with contextlib.ExitStack() as stack:
            if method in ("zero", "mean"):
                for layer, idx in sorted(by_layer.items()):
                    o_proj = modules[layer].o_proj
                    hook = _o_proj_hook(shape, idx, phase, means, layer, o_proj.weight.device)
                    stack.callback(o_proj.register_forward_pre_hook(hook, with_kwargs=True).remove)
            else:
                stack.enter_context(rh_attention_active(hf))
                cls = _ZeroQuery if method == "query" else _ZeroLogits
                for layer, idx in sorted(by_layer.items()):
                    stack.callback(add_intervention(modules[layer], cls(sorted(idx), phase)))
            yield heads
    finally:
        for h in registered:
            specs = table.get(h)
            if specs:
                specs.pop()
                if not specs:
                    del table[h]
        if not table:
            _ACTIVE.pop(hf, None)


def _o_proj_hook(shape: HeadShape, idx: list[int], phase: str, means: HeadMeans | None, layer: int,
                 device: torch.device):
    """The ``o_proj`` pre-hook that zeroes (or mean-fills) the slices of query heads ``idx``."""
    if device.type == "meta":  # weights offloaded by accelerate: build on the CPU, moved to the input per call
        device = torch.device("cpu")
    mask = _head_mask(shape.n_heads, shape.head_dim, idx, device)
    fill = None
    if means is not None:
        fill = torch.zeros(shape.n_heads, shape.head_dim)
        for i in idx:
            fill[i] = means[Head(layer, i)]
        fill = fill.reshape(-1).to(device)

    def pre_hook(module, args, kwargs):
        x = args[0]
        rows = _phase_rows(phase, x.shape[1], x.device)
        if rows is False:
            return None
        m = mask.to(x.device)
        if rows is not None:
            m = rows[:, :, None] & m
        x = x.masked_fill(m, 0.0) if fill is None else torch.where(m, fill.to(x.device, x.dtype), x)
        return (x, *args[1:]), kwargs

    return pre_hook


SELECTIONS = ("baseline", "top", "random", "bottom", "heads")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One condition of an ablation experiment, declared rather than named: what it ablates and why.

    ``name`` labels its rows in the results (``"top10"``, ``"random10#3"``, ``"mean"``);
    ``heads`` (empty for the baseline), ``method`` and ``phase`` are :func:`ablate`'s;
    ``selection`` says how the heads were chosen: ``"baseline"`` (none), ``"top"``, ``"random"``
    or ``"bottom"`` (by a ranking) or ``"heads"`` (given); ``draw`` numbers the random draws;
    ``reference`` feeds ``method="mean"`` (it is not part of the value's identity).

    :func:`rh.evaluate.evaluate_conditions` opens it and writes :meth:`columns` beside each row, so
    the figures read ``selection``, ``k`` and ``draw`` from the results, never from the name.
    """

    name: str
    heads: tuple[Head, ...] = ()
    method: str = "zero"
    phase: str = "all"
    selection: str = "heads"
    draw: int | None = None
    reference: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(parse_heads(self.heads)))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an Ablation needs a non-empty name, not {self.name!r}")
        if self.method not in METHODS:
            raise ValueError(f"condition {self.name!r}: unknown ablation method={self.method!r}: use one of "
                             f"{', '.join(repr(m) for m in METHODS)}")
        if self.phase not in PHASES:
            raise ValueError(f"condition {self.name!r}: unknown phase={self.phase!r}: use 'all' or 'decode'")
        if self.selection not in SELECTIONS:
            raise ValueError(f"condition {self.name!r}: unknown selection={self.selection!r}: use one of "
                             f"{', '.join(repr(x) for x in SELECTIONS)}")
        if (self.selection == "baseline") != (not self.heads):
            raise ValueError(f"condition {self.name!r}: selection='baseline' is the one condition without heads "
                             f"(selection={self.selection!r}, {len(self.heads)} heads)")
        if (self.draw is not None) != (self.selection == "random"):
            raise ValueError(f"condition {self.name!r}: draw= numbers random draws only "
                             f"(selection={self.selection!r}, draw={self.draw!r})")
        if self.method == "mean" and self.reference is None:
            raise ValueError(f"condition {self.name!r}: method='mean' needs reference=: the means from "
                             "head_means(model, prompts, heads)")
        if self.reference is not None and self.method != "mean":
            raise ValueError(f"condition {self.name!r}: reference= only applies to method='mean', not "
                             f"method={self.method!r}; drop it")

    @classmethod
    def baseline(cls, name: str = "baseline") -> Ablation:
        """The condition that ablates nothing."""
        return cls(name, selection="baseline")

    @property
    def k(self) -> int:
        """The number of heads ablated."""
        return len(self.heads)

    @property
    def params(self) -> tuple:
        """What besides heads, method and phase sets the rows: nothing (a stored row's key reads it)."""
        return ()

    def columns(self) -> dict[str, Any]:
        """What the condition is, as the columns :func:`rh.evaluate.evaluate_conditions` adds to its rows."""
        on = bool(self.heads)
        return {"selection": self.selection, "k": self.k, "draw": self.draw,
                "method": self.method if on else None, "phase": self.phase if on else None}

    def open(self, model: Any) -> contextlib.AbstractContextManager:
        """The block that applies the condition to ``model``: :func:`ablate`, or nothing for the baseline."""
        if not self.heads:
            return contextlib.nullcontext([])
        return ablate(model, self.heads, self.method, phase=self.phase, reference=self.reference)


def ablation_conditions(model: Any, heads: Iterable[Head | str | tuple[int, int]], methods: Sequence[str] = METHODS, *,
                        phase: str = "all", reference: Any = None, baseline: bool = True,
                        ) -> dict[str, Ablation]:
    """Declared conditions for ``rh.evaluate.evaluate_conditions``: ``"baseline"`` (no ablation,
    unless ``baseline=False``) and one :class:`Ablation` of ``heads`` per method, named by it.

    ``reference`` feeds ``"mean"``; pass the means from :func:`head_means` rather than samples,
    or they are recomputed for the condition.
    """
    heads = tuple(validate_heads(heads, _shape_of(model, None)))
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown ablation method={m!r}: use one of {', '.join(repr(x) for x in METHODS)}")
    if "mean" in methods and reference is None:
        raise ValueError("the 'mean' condition needs reference=: the means from head_means(model, prompts, heads)")
    out: dict[str, Ablation] = {"baseline": Ablation.baseline()} if baseline else {}
    for m in methods:
        out[m] = Ablation(m, heads, m, phase, reference=reference if m == "mean" else None)
    return out
