"""Interventions on critical heads beyond plain ablation (seed 004; claims IV-1 ... IV-7).

"Critical heads" are the top of a :class:`~rh.rankings.Ranking` (any method); these primitives
reuse the ablation and capture layers rather than growing their own:

- :func:`patch_positions` replaces the residual stream (or chosen heads' outputs) at chosen
  token positions with noise scaled to the activations' own statistics, with their mean, or with
  activations recorded from other prompts (:func:`record_activations`).
- :func:`override_attention` forces heads' attention to a pattern (hub, uniform over the visible
  keys, sequential i -> i-1, or a given causal matrix) through the registered attention function
  that also runs the capture (:mod:`rh.attention`), so it works under sdpa, eager and flash.
- :func:`transplant_heads` copies heads' ``q/k/v/o`` slices from a donor of the same shape into
  a recipient for the duration of a block; under grouped-query attention the transplanted head
  gets a KV head of its own, so exactly that head changes.
- :func:`hub_position` finds the position the critical heads attend to most (seed 004's hub).

The claim-level functions (:func:`incremental_ablation`, :func:`position_patching`,
:func:`attention_override`, :func:`transplant_function`, :func:`difficulty_strata`) turn these
into :class:`~rh.rules.verdict.Verdict` objects. Positions are always prompt positions (0 = the first
prompt token); left padding is accounted for through :func:`rh.batching.current_batch`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from rh.ablation import Ablation, uniform_attention
from rh.attention import AttentionIntervention, add_intervention, rh_attention_active
from rh.batching import current_batch, make_batches
from rh.evaluate import teacher_forced
from rh.heads import Head, HeadShape, heads_by_layer, parse_heads, validate_heads
from rh.id_claims import inconclusive
from rh.models import LoadedModel, attention_modules, head_shape, hf_model
from rh.niah import Sample
from rh.recording import attn_z, head_slice, recording, resid_pre, rewriting
from rh.runner import run_one
from rh.seeds import derive_seed
from rh.rules.verdict import Power, Verdict

log = logging.getLogger(__name__)

PATCH_MODES = ("noise", "mean", "source")
PATTERNS = ("hub", "uniform", "sequential")

Positions = Sequence[int] | Mapping[str, Sequence[int]] | Callable[[Sample], Sequence[int]]


def _row_pads(attention_mask: torch.Tensor | None, b: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The left padding of each row (its first real key), from the mask as the attention function
    receives it: absent (no padding), 2-D padding mask, or 4-D bool/additive. Under a sliding
    window the last query no longer sees its row's first tokens, so the first key it sees is followed
    back through the queries of the call: the first key the query at that position sees, until it no
    longer moves. Only real queries are visited (a key a real query sees is real), so the rows a
    kernel fills for padding queries do not count. (At a single decoding step under a sliding window
    the first key that step sees is taken: the mask no longer shows the row's start.)"""
    if attention_mask is None:
        return torch.zeros(b, dtype=torch.long)
    m = attention_mask
    if m.dim() == 2:
        return m[:, -kv_len:].bool().float().argmax(-1).cpu().long()
    rows = m[:, 0, :, :kv_len]
    seen = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
    first = seen[:, -1].float().argmax(-1)
    if seen.shape[1] != q_len:  # one row broadcast over the queries
        return first.cpu().long()
    offset, rows_b = kv_len - q_len, torch.arange(seen.shape[0], device=seen.device)
    for _ in range(kv_len):
        q = first - offset
        valid = q >= 0
        back = seen[rows_b, q.clamp(min=0)].float().argmax(-1)
        moved = torch.where(valid, torch.minimum(first, back), first)
        if bool((moved == first).all()):
            break
        first = moved
    return first.cpu().long()


# ============================================================================ position patching


def _positions_of(positions: Positions, sample: Sample | None) -> list[int]:
    if callable(positions):
        if sample is None:
            raise ValueError("per-sample positions need the batch's samples: run inside rh.evaluate.teacher_forced "
                             "(or rh.batching.running)")
        return [int(p) for p in positions(sample)]
    if isinstance(positions, Mapping):
        if sample is None:
            raise ValueError("per-sample positions need the batch's samples: run inside rh.evaluate.teacher_forced "
                             "(or rh.batching.running)")
        if sample.id not in positions:
            raise ValueError(f"no patch positions were given for sample {sample.id!r}")
        return [int(p) for p in positions[sample.id]]
    return [int(p) for p in positions]


def record_activations(model: LoadedModel, samples: Sequence[Sample], layer: int, *,
                       heads: Sequence[Head | str] | None = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """What :func:`patch_positions` with ``mode="source"`` writes: per sample id, the residual
    stream entering decoder layer ``layer`` (``[length, hidden]``), or with ``heads`` (all in
    ``layer``) those heads' ``o_proj`` inputs (``[length, len(heads), head_dim]``), on the CPU."""
    heads = validate_heads(heads, model.shape) if heads else None
    _check_layer(model, layer, heads)
    store: dict[str, torch.Tensor] = {}
    where = attn_z(layer) if heads else resid_pre(layer)
    with recording(model, [where]) as seen:
        for batch in make_batches(samples, batch_size, model.tokenizer.pad_token_id):
            with torch.no_grad():
                model.model(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
            x = seen[where].float().cpu()
            for row, s in enumerate(batch.samples):
                v = x[row, batch.pad[row] :]
                if heads:
                    d = model.shape.head_dim
                    v = torch.stack([head_slice(v, h.head, d) for h in heads], dim=1)
                store[s.id] = v.clone()
    return store


def _check_layer(model: LoadedModel, layer: int, heads: Sequence[Head] | None) -> None:
    n = model.shape.n_layers
    if not (isinstance(layer, (int, np.integer)) and 0 <= int(layer) < n):
        raise ValueError(f"layer={layer!r} is outside the model: it has layers 0..{n - 1}")
    if heads and any(h.layer != layer for h in heads):
        raise ValueError(f"every patched head must be in layer {layer}; got {[str(h) for h in heads]}: "
                         "patch one layer per block (blocks nest)")


@contextlib.contextmanager
def patch_positions(model: LoadedModel, layer: int, positions: Positions, *, mode: str = "noise",
                    heads: Sequence[Head | str] | None = None, source: Mapping[str, torch.Tensor] | None = None,
                    seed: int = 0) -> Iterator[None]:
    """Within the block, replace activations at prompt ``positions`` in every forward of ``model``.

    Where: the residual stream entering decoder layer ``layer`` (a forward pre-hook), or, with
    ``heads`` (all in ``layer``), those heads' outputs at the ``o_proj`` input. ``positions``: the
    same prompt positions for every sample, a mapping sample id -> positions, or a function of the
    :class:`~rh.niah.Sample`. ``mode``:

    - ``"noise"``: Gaussian noise with the per-feature mean and standard deviation of the row's
      own activations at that point (over its real tokens), seeded by ``(seed, sample id, layer)``
      so a result does not depend on batching;
    - ``"mean"``: that per-feature mean;
    - ``"source"``: the activations ``source[sample id]`` recorded by :func:`record_activations`
      (from another prompt of the same length, or the same prompt: then nothing changes).

    Per-sample positions, noise seeds and sources need the batch's samples, which
    ``rh.evaluate.teacher_forced`` provides (:func:`rh.batching.running`). The hook goes when the
    block ends (:func:`rh.recording.rewriting`).
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"unknown patch mode={mode!r}: use one of {', '.join(repr(m) for m in PATCH_MODES)}")
    if mode == "source" and source is None:
        raise ValueError("mode='source' needs source=: the activations from record_activations(model, prompts, layer)")
    if mode != "source" and source is not None:
        raise ValueError(f"source= only applies to mode='source', not mode={mode!r}; drop it")
    heads = validate_heads(heads, model.shape) if heads else None
    _check_layer(model, layer, heads)
    if not (callable(positions) or isinstance(positions, Mapping)):
        fixed = _positions_of(positions, None)
        if not fixed:
            raise ValueError("positions is empty: give at least one prompt position to patch")
        bad = [p for p in fixed if p < 0]
        if bad:
            raise ValueError(f"patch positions {bad} are negative: positions count from 0, the first prompt token")
    d = model.shape.head_dim
    cols = None if not heads else torch.cat([torch.arange(h.head * d, (h.head + 1) * d) for h in heads])
    where = attn_z(layer) if heads else resid_pre(layer)

    def patch(x: torch.Tensor) -> torch.Tensor:
        batch = current_batch()
        b, width = x.shape[0], x.shape[1]
        if batch is not None and len(batch.samples) != b:
            batch = None
        x = x.clone()
        for row in range(b):
            sample = batch.samples[row] if batch is not None else None
            pad = batch.pad[row] if batch is not None else 0
            length = sample.length if sample is not None else width
            pos = _positions_of(positions, sample)
            for p in pos:
                if not 0 <= p < length:
                    where = f"sample {sample.id!r}" if sample is not None else "this input"
                    raise ValueError(f"patch position {p} is outside the prompt of {where} ({length} tokens)")
            if width < pad + max(pos) + 1:
                continue  # a decoding step: the prompt positions were patched at prefill
            idx = torch.tensor([pad + p for p in pos], device=x.device)
            acts = x[row, pad:] if cols is None else x[row, pad:][:, cols.to(x.device)]
            if mode == "source":
                key = sample.id if sample is not None else None
                if key not in source:
                    raise ValueError(f"source= has no activations for sample {key!r}: record them with "
                                     "record_activations on the same samples")
                src = source[key]
                src = src.reshape(src.shape[0], -1)
                if src.shape[1] != acts.shape[1] or src.shape[0] <= max(pos):
                    raise ValueError(f"source activations for {key!r} have shape {tuple(src.shape)}; patching "
                                     f"needs [>{max(pos)}, {acts.shape[1]}]: record them at the same layer and heads")
                new = src[torch.tensor(pos)].to(x.device, x.dtype)
            else:
                a = acts[: sample.length if sample is not None else None].float()  # the prompt's own tokens
                mu, sd = a.mean(0), a.std(0, unbiased=False)
                if mode == "mean":
                    new = mu.expand(len(pos), -1)
                else:
                    g = torch.Generator().manual_seed(derive_seed(seed, sample.id if sample else row, layer))
                    z = torch.randn(len(pos), a.shape[1], generator=g).to(a.device)
                    new = mu + sd * z
                new = new.to(x.dtype)
            if cols is None:
                x[row, idx] = new
            else:
                c = cols.to(x.device)
                block = x[row, idx]
                block[:, c] = new
                x[row, idx] = block
        return x

    with rewriting(model, {where: patch}):
        yield


def hub_position(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head | str], *,
                 batch_size: int = 8) -> tuple[int, np.ndarray]:
    """Seed 004's hub: the prompt position the critical ``heads`` attend to most from the last
    token, their attention averaged over heads and ``samples`` (which must share one length).
    Returns ``(position, mean attention per position)``. Each sample's needle span is left out of
    its average: retrieval heads attend to the needle, and needles at one depth share positions, so
    without this the hub would be where one depth's needles sit. The hub is a position the prompts
    share outside the needle (for Llama-family models usually the first token, the attention sink)."""
    from rh.scoring import read_last_token_attention

    heads = validate_heads(heads, model.shape)
    if not samples:
        raise ValueError("hub_position needs at least one sample")
    lengths = {len(s.input_ids) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"hub_position needs samples of one length (positions are compared across them); got {sorted(lengths)}")
    # the clean prompt-only forwards through the deepest head are work units (on Ray, on the replicas)
    rows = []
    for s, row in zip(samples, read_last_token_attention(model, samples, heads, mean=True, batch_size=batch_size)):
        row[s.needle_span[0] : s.needle_span[1]] = np.nan
        rows.append(row)
    with np.errstate(invalid="ignore"):
        prof = np.nanmean(np.stack(rows), axis=0)  # NaN only where every sample's needle sits
    return int(np.nanargmax(prof)), prof


def non_hub_positions(samples: Sequence[Sample], hub: int, *, seed: int = 0) -> dict[str, list[int]]:
    """One control position per sample, drawn (seeded by sample id) from its haystack context
    outside the needle span, away from the hub: the "non-hub" of seed 004's comparison."""
    out = {}
    for s in samples:
        c0, c1 = s.meta.get("context_span", (1, s.length - 1))
        n0, n1 = s.needle_span
        cand = [p for p in range(max(c0, 1), c1) if not n0 <= p < n1 and abs(p - hub) > 1]
        if not cand:
            raise ValueError(f"sample {s.id!r} has no context position outside the needle and the hub")
        rng = np.random.default_rng(derive_seed(seed, s.id, "non-hub"))
        out[s.id] = [int(rng.choice(cand))]
    return out


@dataclass(frozen=True)
class Patch:
    """IV-2's patching declared as a condition (a :class:`rh.units.Unit` takes it, as it takes an
    :class:`~rh.ablation.Ablation`): the residual stream entering layer ``layer`` replaced at the
    hub position (``at="hub"``) or at each prompt's non-hub control position (``at="non-hub"``,
    :func:`non_hub_positions`, drawn per prompt by ``seed``), by ``mode`` (``"noise"`` or
    ``"mean"``: :func:`patch_positions`; a recorded source is data, not a declaration). Plain data,
    so its rows are stored, keyed and shipped to replicas like any unit's."""

    name: str
    layer: int
    at: str
    hub: int
    mode: str = "noise"
    seed: int = 0

    heads = ()  # the whole residual stream, no head
    method = "patch"
    phase = "all"
    selection = "patch"
    draw = None

    def __post_init__(self) -> None:
        if self.at not in ("hub", "non-hub"):
            raise ValueError(f"Patch {self.name!r}: at={self.at!r}: use 'hub' or 'non-hub'")
        if self.mode not in ("noise", "mean"):
            raise ValueError(f"Patch {self.name!r}: mode={self.mode!r}: a declared patch is 'noise' or 'mean' "
                             "('source' patches recorded activations: use patch_positions directly)")

    @property
    def params(self) -> tuple:
        return ("patch", self.layer, self.at, self.hub, self.mode, self.seed)

    def columns(self) -> dict[str, Any]:
        return {"selection": self.selection, "k": 0, "draw": None, "method": self.method, "phase": self.phase}

    def positions(self, sample: Sample) -> list[int]:
        if self.at == "hub":
            return [self.hub]
        return non_hub_positions([sample], self.hub, seed=self.seed)[sample.id]

    def open(self, model: Any) -> contextlib.AbstractContextManager:
        return patch_positions(model, self.layer, self.positions, mode=self.mode, seed=self.seed)


# ============================================================================ attention override


class _Override(AttentionIntervention):
    """Forces query heads ``heads`` to a pattern after the kernel ran; see :func:`override_attention`."""

    def __init__(self, heads: Sequence[int], pattern: Any, hub: int | None, fraction: float, rest: str):
        self.heads, self.pattern, self.hub, self.fraction, self.rest = list(heads), pattern, hub, fraction, rest

    def after(self, module, output, weights, query, key, value, attention_mask, scaling):
        b, n_heads, q_len, _ = query.shape
        kv_len = value.shape[2]
        groups = n_heads // value.shape[1]
        idx = self.heads
        v = value.index_select(1, torch.tensor([h // groups for h in idx], device=value.device)).float()
        offset = kv_len - q_len  # key index of query 0
        pads = _row_pads(attention_mask, b, q_len, kv_len).to(value.device)
        qpos = torch.arange(q_len, device=value.device) + offset  # key index of each query
        new_w = None
        if isinstance(self.pattern, torch.Tensor) or self.pattern == "uniform":
            if self.pattern == "uniform":
                out, new_w = uniform_attention(query, value, attention_mask, idx, with_weights=weights is not None)
            else:
                w = self.pattern.to(value.device, torch.float32)
                if w.shape != (q_len, kv_len):
                    raise ValueError(f"the override pattern is {tuple(w.shape)} but this forward has {q_len} queries "
                                     f"and {kv_len} keys: give a [{q_len}, {kv_len}] matrix")
                new_w = w[None, None].expand(b, len(idx), q_len, kv_len)
                out = (new_w @ v).transpose(1, 2)
        elif self.pattern == "sequential":
            prev = qpos[None, :] - 1
            prev = torch.where(prev < pads[:, None], qpos[None, :], prev)  # the first real token attends to itself
            gather = prev[:, None, :, None].expand(b, len(idx), q_len, v.shape[-1])
            out = v.gather(2, gather).transpose(1, 2)
            if weights is not None:
                new_w = torch.zeros(b, len(idx), q_len, weights.shape[-1], device=value.device)
                new_w.scatter_(3, prev[:, None, :, None].expand(b, len(idx), q_len, 1), 1.0)
        else:  # hub
            batch = current_batch()  # each row's prompt length where the batch is known, else its real tokens
            limit = ([sm.length for sm in batch.samples] if batch is not None and len(batch.samples) == b
                     else (kv_len - pads).tolist())
            if any(self.hub >= n for n in limit):
                raise ValueError(f"hub={self.hub} is outside the prompt ({min(limit)} tokens): give a prompt position")
            col = pads + int(self.hub)  # [b]
            v_hub = v[torch.arange(b, device=v.device), :, col]  # [b, n, d]
            if self.rest == "uniform":
                base, base_w = uniform_attention(query, value, attention_mask, idx, with_weights=weights is not None)
            else:
                base = output[:, :, idx].float()
                base_w = weights[:, idx].float() if weights is not None else None
            out = self.fraction * v_hub[:, None] + (1 - self.fraction) * base
            sees = qpos[None, :] >= col[:, None]  # [b, q]: causality: queries before the hub keep their own attention
            out = torch.where(sees[:, :, None, None], out, output[:, :, idx].float())
            if weights is not None:
                one = torch.zeros(b, len(idx), q_len, weights.shape[-1], device=value.device)
                one[torch.arange(b), :, :, col] = 1.0
                mixed = self.fraction * one + (1 - self.fraction) * _pad_keys(base_w, weights.shape[-1])
                new_w = torch.where(sees[:, None, :, None], mixed, weights[:, idx].float())
        output = output.clone()
        output[:, :, idx] = out.to(output.dtype)
        if weights is not None and new_w is not None:
            weights = weights.clone()
            weights[:, idx] = _pad_keys(new_w, weights.shape[-1]).to(weights.dtype)
        return output, weights


def _pad_keys(w: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(w, (0, width - w.shape[-1])) if w.shape[-1] < width else w


def check_causal_pattern(pattern: torch.Tensor) -> None:
    """A given attention pattern must be ``[queries, keys]``, non-negative, with rows summing to 1
    and no weight on a key after its query; raise a ValueError saying which rule it breaks."""
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 2:
        raise ValueError("an attention pattern must be a 2-D tensor [queries, keys]")
    q, k = pattern.shape
    if k < q:
        raise ValueError(f"the pattern has {q} queries but only {k} keys: every query needs at least itself to attend to")
    w = pattern.float()
    if (w < 0).any():
        raise ValueError("the pattern has negative attention weights; attention is a probability distribution")
    if not torch.allclose(w.sum(-1), torch.ones(q), atol=1e-4):
        raise ValueError("the pattern's rows do not sum to 1; normalise each query's weights")
    future = torch.arange(k)[None, :] > (torch.arange(q) + (k - q))[:, None]
    bad = (w > 0) & future
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"the pattern breaks causality: query {i} puts weight on key {j}, which comes after it; "
                         "a causal model's token may attend only to itself and earlier tokens")


@contextlib.contextmanager
def override_attention(model: LoadedModel, heads: Iterable[Head | str], pattern: str | torch.Tensor = "uniform", *,
                       hub: int = 0, fraction: float = 0.8, rest: str = "original") -> Iterator[list[Head]]:
    """Within the block, ``heads`` attend by ``pattern`` instead of their own scores (seed 004 §1.3).

    - ``"uniform"``: equal weight on every visible key (what zeroing the logits gives);
    - ``"sequential"``: token i attends only to token i-1 (the first token to itself);
    - ``"hub"``: ``fraction`` of the mass on prompt position ``hub``, the rest as the head's own
      attention (``rest="original"``, rescaled) or uniform (``rest="uniform"``); tokens before the
      hub cannot see it and keep their own attention;
    - a ``[queries, keys]`` tensor: that causal pattern, for a forward of exactly that shape.

    Runs inside rh's registered attention function (so under sdpa, eager and flash); under eager
    the returned attention weights are the forced ones. Yields the parsed heads.
    """
    if isinstance(pattern, torch.Tensor):
        check_causal_pattern(pattern)
    elif pattern not in PATTERNS:
        raise ValueError(f"unknown pattern={pattern!r}: use one of {', '.join(repr(p) for p in PATTERNS)} "
                         "or a [queries, keys] tensor")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: the hub's share of attention must lie in [0, 1]")
    if rest not in ("original", "uniform"):
        raise ValueError(f"rest={rest!r}: use 'original' (the head's own attention) or 'uniform'")
    if pattern == "hub" and (not isinstance(hub, (int, np.integer)) or hub < 0):
        raise ValueError(f"hub={hub!r} must be a prompt position (an integer >= 0)")
    heads = validate_heads(heads, model.shape)
    modules = attention_modules(model)
    by_layer = heads_by_layer(heads)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rh_attention_active(model))
        for layer, idx in sorted(by_layer.items()):
            stack.callback(add_intervention(modules[layer], _Override(sorted(idx), pattern, hub, fraction, rest)))
        yield heads


@dataclass(frozen=True)
class Override:
    """IV-3's attention override declared as a condition: ``heads`` forced to ``pattern``
    (``"hub"``, ``"uniform"`` or ``"sequential"``; :func:`override_attention`) with the hub's
    ``fraction`` and ``rest``. Plain data, so its rows are stored, keyed and shipped like any unit's."""

    name: str
    heads: tuple[Head, ...]
    pattern: str
    hub: int = 0
    fraction: float = 0.8
    rest: str = "original"

    method = "override"
    phase = "all"
    selection = "heads"
    draw = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(parse_heads(self.heads)))
        if self.pattern not in PATTERNS:
            raise ValueError(f"Override {self.name!r}: pattern={self.pattern!r}: use one of "
                             f"{', '.join(repr(p) for p in PATTERNS)} (a tensor pattern is data: use override_attention)")

    @property
    def params(self) -> tuple:
        return ("override", self.pattern, self.hub, float(self.fraction), self.rest)

    def columns(self) -> dict[str, Any]:
        return {"selection": self.selection, "k": len(self.heads), "draw": None, "method": self.method,
                "phase": self.phase}

    def open(self, model: Any) -> contextlib.AbstractContextManager:
        return override_attention(model, self.heads, self.pattern, hub=self.hub, fraction=self.fraction,
                                  rest=self.rest)


# ============================================================================ head transplant


def _shape_from_model(model: Any) -> tuple[HeadShape, int]:
    if isinstance(model, DonorHeads):
        return model.shape, model.hidden
    hf = hf_model(model)
    return head_shape(hf), int(hf.config.hidden_size)


def shape_difference(recipient: Any, donor: Any) -> str | None:
    """How the donor's shape differs from the recipient's (layers, heads, KV heads, head size, hidden
    size), both named, or None when they are one shape. Reads the configs only: no forward pass."""
    (a, ha), (b, hb) = _shape_from_model(recipient), _shape_from_model(donor)
    if a == b and ha == hb:
        return None
    return (f"the donor's shape ({b.n_layers} layers x {b.n_heads} heads, {b.n_kv_heads} KV heads, head_dim "
            f"{b.head_dim}, hidden {hb}) differs from the recipient's ({a.n_layers} x {a.n_heads}, {a.n_kv_heads} KV, "
            f"head_dim {a.head_dim}, hidden {ha})")


def check_same_shape(recipient: Any, donor: Any) -> HeadShape:
    """Both models must have the same layers, heads, KV heads, head size and hidden size; a
    ValueError names the difference (no projection between shapes is attempted)."""
    diff = shape_difference(recipient, donor)
    if diff:
        raise ValueError(
            f"{diff}: a head moves only between models of one shape (e.g. a base model and its instruct variant); "
            "a projection between shapes would be a new head, not a transplant"
        )
    return _shape_from_model(recipient)[0]


def _plain_linear(lin: torch.nn.Module, where: str) -> torch.nn.Linear:
    if type(lin) is not torch.nn.Linear:
        raise ValueError(f"{where} is a {type(lin).__name__}: a transplant needs unquantized weights; "
                         "load both models in bf16/fp32 (no --quant)")
    from rh.dry import is_dry

    if lin.weight.device.type == "meta" and not is_dry():  # a dry run's models are all on the meta device
        raise ValueError(f"{where}'s weights are offloaded (meta device): load the model fully onto devices")
    return lin


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _projections(attn: torch.nn.Module, layer: int, who: str) -> dict[str, torch.nn.Linear]:
    """One layer's separate, unquantized q/k/v/o projections (``who``: "recipient" or "donor"), or a
    ValueError naming what a transplant cannot move."""
    missing = [n for n in _PROJECTIONS if not hasattr(attn, n)]
    if missing:
        raise ValueError(
            f"layer {layer}'s attention ({type(attn).__name__}) has no {', '.join(missing)}: a transplant "
            "moves a head's rows of separate q/k/v projections; a fused qkv_proj (Phi-3) is not supported")
    return {n: _plain_linear(getattr(attn, n), f"{who} layer {layer} {n}") for n in _PROJECTIONS}


@dataclass(frozen=True, eq=False)
class DonorHeads:
    """The donor's weights for the heads a transplant moves, taken out of the donor model
    (:func:`take_donor_heads`): per (layer, donor head), its rows of ``q_proj`` (and bias), its columns of
    ``o_proj`` and its KV head's rows of ``k_proj``/``v_proj`` (and biases), on the CPU. A value
    that travels (a Ray replica transplants them into its own copy of the recipient,
    :class:`TransplantTask`) where the whole donor model would not: a few heads' slices, not its
    weights. :func:`transplant_heads` takes it in place of the donor model."""

    key: str  # the donor model's key, named in the report
    shape: HeadShape
    hidden: int
    parts: dict[tuple[int, int], dict[str, torch.Tensor | None]]  # (layer, head) -> "q", "q_bias", "o", "k", ...

    def part(self, layer: int, head: int) -> dict[str, torch.Tensor | None]:
        try:
            return self.parts[(layer, head)]
        except KeyError:
            raise ValueError(f"the donor's weights for L{layer}H{head} were not taken (take_donor_heads names the "
                             "heads a transplant moves)") from None


def _taken(t: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU (a dry run's meta tensor as it is: it holds no numbers to copy)."""
    return t if t.is_meta else t.cpu().clone()


def take_donor_heads(donor: Any, heads: Iterable[Head | str]) -> DonorHeads:
    """The donor's weights for ``heads`` (:class:`DonorHeads`), checked as a transplant needs them:
    separate, unquantized q/k/v/o projections held on a device (not offloaded)."""
    if isinstance(donor, DonorHeads):
        return donor
    shape, hidden = _shape_from_model(donor)
    d, group = shape.head_dim, shape.group_size
    mods = attention_modules(donor)
    parts: dict[tuple[int, int], dict[str, torch.Tensor | None]] = {}
    with torch.no_grad():
        for h in validate_heads(heads, shape):
            sl = _projections(mods[h.layer], h.layer, "donor")
            q, kv = slice(h.head * d, (h.head + 1) * d), slice((h.head // group) * d, (h.head // group + 1) * d)

            def rows(n: str, at: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
                b = sl[n].bias
                return _taken(sl[n].weight.detach()[at]), (None if b is None else _taken(b.detach()[at]))

            part: dict[str, torch.Tensor | None] = {}
            for n, at in (("q", q), ("k", kv), ("v", kv)):
                part[n], part[f"{n}_bias"] = rows(f"{n}_proj", at)
            part["o"] = _taken(sl["o_proj"].weight.detach()[:, q])
            parts[(h.layer, h.head)] = part
    return DonorHeads(str(getattr(donor, "key", "donor")), shape, hidden, parts)


@contextlib.contextmanager
def transplant_heads(recipient: LoadedModel, donor: Any, heads: Iterable[Head | str],
                     donor_heads: Iterable[Head | str] | None = None, *, kv: str = "own") -> Iterator[list[Head]]:
    """Within the block, each of the recipient's ``heads`` computes with the donor's weights for
    that head (or for the matching entry of ``donor_heads``): its rows of ``q_proj``, its columns of
    ``o_proj`` and its KV head's rows of ``k_proj``/``v_proj``. The recipient's weights are restored
    in ``finally``. ``donor``: the donor model, or its heads' weights taken out of it
    (:class:`DonorHeads`).

    Grouped-query attention: ``kv="own"`` (default) appends the donor's KV head as an extra KV head
    used by the transplanted query head alone, so exactly that head changes (the layer then runs
    through rh's attention function, which maps query heads to KV heads); ``kv="group"`` overwrites
    the recipient's KV head in place, which changes every query head of its group. The models must
    have one shape (:func:`check_same_shape`).
    """
    if kv not in ("own", "group"):
        raise ValueError(f"kv={kv!r}: use 'own' (the head gets its own KV head) or 'group' (overwrite the group's)")
    shape = check_same_shape(recipient, donor)
    heads = validate_heads(heads, shape)
    donor_list = validate_heads(donor_heads, shape) if donor_heads is not None else list(heads)
    if len(donor_list) != len(heads):
        raise ValueError(f"{len(heads)} heads but {len(donor_list)} donor heads: give one donor head per head")
    if any(h.layer != g.layer for h, g in zip(heads, donor_list)):
        raise ValueError("a head moves within its layer: each donor head must be in the same layer as its recipient head")
    d, group = shape.head_dim, shape.group_size
    rec_mods = attention_modules(recipient)
    saved: list[Callable[[], None]] = []
    needs_index = False
    try:
        with torch.no_grad():
            by_layer: dict[int, list[tuple[int, int]]] = {}
            for h, g in zip(heads, donor_list):
                by_layer.setdefault(h.layer, []).append((h.head, g.head))
            rls: dict[int, dict[str, torch.nn.Linear]] = {}
            for layer in sorted(by_layer):
                r = rec_mods[layer]
                if getattr(r, "rh_kept_heads", None) is not None or getattr(r, "rh_kv_heads", None) is not None:
                    raise ValueError(f"layer {layer} of the recipient is pruned or already transplanted: transplant "
                                     "into the unpruned model, all heads in one block")
                rls[layer] = _projections(r, layer, "recipient")
                wide = [n for n in ("q_norm", "k_norm") if getattr(getattr(r, n, None), "weight", None) is not None
                        and getattr(r, n).weight.numel() != d]
                if wide:
                    raise ValueError(
                        f"layer {layer}'s {' and '.join(wide)} normalise all heads together ({type(r).__name__}, "
                        "OLMo-2's QK-norm): a head's projection rows cannot move without the others'; a transplant "
                        "is not supported for this family")
            taken = take_donor_heads(donor, [Head(h.layer, g.head) for h, g in zip(heads, donor_list)])
            for layer, pairs in sorted(by_layer.items()):
                r, rl = rec_mods[layer], rls[layer]
                originals = {n: (rl[n].weight, rl[n].bias, rl[n].out_features, rl[n].in_features) for n in _PROJECTIONS}
                prev_groups = r.num_key_value_groups

                def restore(r=r, rl=rl, originals=originals, prev_groups=prev_groups):
                    for n, (w, bias, out_f, in_f) in originals.items():
                        rl[n].weight, rl[n].bias = w, bias
                        rl[n].out_features, rl[n].in_features = out_f, in_f
                    r.num_key_value_groups = prev_groups
                    if "rh_kv_heads" in r._buffers:
                        del r._buffers["rh_kv_heads"]

                saved.append(restore)
                new = {n: rl[n].weight.detach().clone() for n in _PROJECTIONS}
                new_bias = {n: (rl[n].bias.detach().clone() if rl[n].bias is not None else None) for n in _PROJECTIONS}

                def put(n: str, rows_to: slice, part: dict[str, torch.Tensor | None], what: str) -> None:
                    new[n][rows_to] = part[what].to(new[n].device, new[n].dtype)
                    if new_bias[n] is not None and part[f"{what}_bias"] is not None:
                        new_bias[n][rows_to] = part[f"{what}_bias"].to(new_bias[n].device, new_bias[n].dtype)

                kv_map = [q // group for q in range(shape.n_heads)]
                extra_k, extra_v, extra_kb, extra_vb = [], [], [], []
                for hr, hd_ in pairs:
                    part = taken.part(layer, hd_)
                    put("q_proj", slice(hr * d, (hr + 1) * d), part, "q")
                    new["o_proj"][:, hr * d:(hr + 1) * d] = part["o"].to(new["o_proj"].device, new["o_proj"].dtype)
                    if kv == "group" or group == 1:
                        kv_dst = slice((hr // group) * d, (hr // group + 1) * d)
                        put("k_proj", kv_dst, part, "k")
                        put("v_proj", kv_dst, part, "v")
                    else:
                        kv_map[hr] = shape.n_kv_heads + len(extra_k)
                        extra_k.append(part["k"].to(new["k_proj"].device, new["k_proj"].dtype))
                        extra_v.append(part["v"].to(new["v_proj"].device, new["v_proj"].dtype))
                        for lst, n, what in ((extra_kb, "k_proj", "k_bias"), (extra_vb, "v_proj", "v_bias")):
                            if rl[n].bias is not None:
                                lst.append(part[what].to(new_bias[n].device, new_bias[n].dtype))
                if extra_k:
                    new["k_proj"] = torch.cat([new["k_proj"], *extra_k])
                    new["v_proj"] = torch.cat([new["v_proj"], *extra_v])
                    if extra_kb:
                        new_bias["k_proj"] = torch.cat([new_bias["k_proj"], *extra_kb])
                        new_bias["v_proj"] = torch.cat([new_bias["v_proj"], *extra_vb])
                for n in _PROJECTIONS:
                    lin = rl[n]
                    lin.weight = torch.nn.Parameter(new[n], requires_grad=False)
                    if new_bias[n] is not None:
                        lin.bias = torch.nn.Parameter(new_bias[n], requires_grad=False)
                    lin.out_features, lin.in_features = new[n].shape
                if extra_k:
                    r.num_key_value_groups = 1  # K/V arrive expanded to one KV head per query head
                    r.register_buffer("rh_kv_heads", torch.tensor(kv_map, device=new["q_proj"].device),
                                      persistent=False)
                    needs_index = True
        with contextlib.ExitStack() as stack:
            if needs_index:
                stack.enter_context(rh_attention_active(recipient))
            yield heads
    finally:
        for restore in reversed(saved):
            restore()


@dataclass(frozen=True, eq=False)
class TransplantTask:
    """IV-4's transplanted pass as a :class:`rh.runner.Task`: the donor's heads' weights
    (:class:`DonorHeads`) travel to where the recipient is (a Ray replica), are transplanted into it
    for the pass and taken out after; the rows' correctness, in ``sample_ids``' order, comes back."""

    sample_ids: tuple[str, ...]
    heads: tuple[Head, ...]
    donor: DonorHeads
    batch_size: int = 8

    def run(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> np.ndarray:
        samples = [by_id[i] for i in self.sample_ids]
        with transplant_heads(model, self.donor, self.heads):
            df = teacher_forced(model, samples, condition="transplanted", batch_size=self.batch_size)
        return _correct(df, list(self.sample_ids))

    def dry(self, model: LoadedModel, by_id: Mapping[str, Sample]) -> tuple[np.ndarray, int]:
        """A dry run's (:mod:`rh.dry`): every row correct, and the teacher-forced batches' token-layers."""
        from rh.dry import batch_tokens

        samples = [by_id[i] for i in self.sample_ids]
        tokens = sum(batch_tokens(samples, self.batch_size, with_answer=True))
        return np.ones(len(samples)), tokens * model.shape.n_layers


# ============================================================================ claims


def _correct(df: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
    return df.set_index("id").loc[list(ids), "correct"].to_numpy(dtype=float)


def _floor_reason(base: np.ndarray, floor: float) -> str | None:
    if base.mean() < floor:
        return f"baseline accuracy {base.mean():.2f} is below the floor {floor:.2f}: there is no retrieval to lose"
    return None


def incremental_ablation(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], baseline: pd.DataFrame,
                         *, levels: Sequence[int] = (1, 2, 3), min_drop: float = 0.10, alpha: float = 0.05,
                         baseline_floor: float = 0.5, batch_size: int = 8, full: Sequence[int] | None = None,
                         seed: int = 0, stop_early: bool | None = None,
                         ) -> tuple[dict[int, Verdict], dict[int, pd.DataFrame]]:
    """IV-1: ablating the top 1, 2, 3 critical heads (zero ablation) drops accuracy by more than
    ``min_drop`` (:func:`rh.rules.claims.incremental`). Returns the verdicts and each level's
    per-sample frame. The levels in ``full`` (default: every level) are evaluated on every prompt
    (IV-7 reuses the top level's frame); the others are curtailed (:mod:`rh.curtail`), and their
    frames hold the prompts read."""
    from rh.curtail import Arm, curtailed, paired_decider
    from rh.rules.claims import incremental, incremental_bounds
    from rh.seeds import derive_seed

    ids = [s.id for s in samples]
    base = _correct(baseline, ids)
    for n in levels:
        if n > len(heads):
            raise ValueError(f"level {n} needs {n} critical heads but only {len(heads)} were given")
    full = set(levels if full is None else full)
    frames: dict[int, list[pd.DataFrame]] = {n: [] for n in levels}

    def ablating(n: int):
        def evaluate(part: list[Sample]) -> np.ndarray:
            df = run_one(model, part, Ablation(f"top{n}", tuple(heads[:n])), batch_size=batch_size)
            frames[n].append(df)
            return _correct(df, [s.id for s in part])
        return evaluate

    arms = {}
    for n in levels:
        if n in full:
            arms[n] = Arm(samples, base, known=ablating(n)(list(samples)))
        else:
            arms[n] = Arm(samples, base, evaluate=ablating(n))
    decide = paired_decider(bounds=incremental_bounds(min_drop), alpha=alpha, baseline_floor=baseline_floor)
    after = curtailed(model, arms, decide, seed=derive_seed(seed, "IV-1"), batch_size=batch_size,
                      stop_early=stop_early, what="IV-1 items")
    out = incremental(base, after, [str(h) for h in heads], min_drop=min_drop, alpha=alpha,
                      baseline_floor=baseline_floor)
    return out, {n: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame() for n, fs in frames.items()}


def position_patching(model: LoadedModel, samples: Sequence[Sample], baseline: pd.DataFrame, *, layer: int, hub: int,
                      mode: str = "noise", hub_min: float = 0.10, nonhub_max: float = 0.05, alpha: float = 0.05,
                      baseline_floor: float = 0.5, batch_size: int = 8, seed: int = 0,
                      stop_early: bool | None = None) -> Verdict:
    """IV-2: patching the hub position at ``layer`` hurts by more than ``hub_min`` while patching a
    non-hub context position hurts by less than ``nonhub_max``, and the hub hurts more than the
    non-hub (exact paired tests; an intersection-union test: supported when all three reject, p =
    their maximum). Samples whose needle covers the hub are left out. The two patched arms are
    curtailed together (:mod:`rh.curtail`, :func:`rh.rules.claims.position_decided`;
    ``stop_early=False`` reads every item)."""
    from rh.curtail import Arm, curtailed
    from rh.rules.claims import position, position_decided

    params = {"mode": mode}
    test = (f"intersection-union of exact paired tests: hub drop > {hub_min}, non-hub drop < {nonhub_max}, "
            "hub-patched worse than non-hub-patched (McNemar)")
    kept = [s for s in samples if not s.needle_span[0] <= hub < s.needle_span[1]]
    ids = [s.id for s in kept]
    if len(kept) < len(samples):
        log.info("IV-2: %d samples have the needle on the hub position %d and are left out", len(samples) - len(kept), hub)
    if not kept:
        return inconclusive("IV-2", params, f"every sample's needle covers the hub position {hub}", test, alpha)
    base = _correct(baseline, ids)
    others = non_hub_positions(kept, hub, seed=seed)
    if mode == "source":
        raise ValueError("position_patching patches by 'noise' or 'mean' (a recorded source is not a declared "
                         "condition: use patch_positions directly)")
    arms = {"hub": Arm(kept, base, Patch("hub patched", layer, "hub", hub, mode, seed)),
            "other": Arm(kept, base, Patch("non-hub patched", layer, "non-hub", hub, mode, seed))}

    def decide(groups):
        st = position_decided(base, groups["hub"][1], groups["other"][1], hub_min=hub_min, nonhub_max=nonhub_max,
                              alpha=alpha, baseline_floor=baseline_floor)
        return {"hub": st, "other": st}

    after = curtailed(model, arms, decide, seed=derive_seed(seed, "IV-2"), batch_size=batch_size,
                      stop_early=stop_early, what="IV-2 items")
    hub_c, other_c = after["hub"], after["other"]
    return position(base, hub_c, other_c, hub_min=hub_min, nonhub_max=nonhub_max, alpha=alpha,
                    baseline_floor=baseline_floor, params=params, describe=f"{mode} at layer {layer}: ",
                    details={"layer": layer, "hub": hub,
                             "non_hub_positions": {k: v[0] for k, v in list(others.items())[:20]}})


def attention_override(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Head], baseline: pd.DataFrame,
                       *, hub: int, patterns: Sequence[str] = PATTERNS, fraction: float = 0.8, keep: float = 0.9,
                       min_drop: float = 0.10, alpha: float = 0.05, baseline_floor: float = 0.5, batch_size: int = 8,
                       seed: int = 0, stop_early: bool | None = None) -> dict[str, Verdict]:
    """IV-3: forcing the critical heads to uniform or sequential attention lowers accuracy (exact
    one-sided McNemar); forcing the hub pattern keeps at least ``keep`` of the baseline accuracy
    (non-inferiority with margin ``(1 - keep) x baseline``); Holm across patterns. The overrides
    are curtailed (:mod:`rh.curtail`; ``stop_early=False`` reads every item)."""
    from rh.curtail import Arm, curtailed, paired_decider
    from rh.rules.claims import override, override_bounds
    from rh.seeds import derive_seed

    ids = [s.id for s in samples]
    base = _correct(baseline, ids)

    def forcing(pat: str):
        def evaluate(part: list[Sample]) -> np.ndarray:
            cond = Override(f"{pat} attention", tuple(heads), pat, hub=hub, fraction=fraction)
            return _correct(run_one(model, part, cond, batch_size=batch_size), [s.id for s in part])
        return evaluate

    arms = {pat: Arm(samples, base, evaluate=forcing(pat)) for pat in patterns}
    decide = paired_decider(bounds=override_bounds(patterns, base, keep=keep, min_drop=min_drop), alpha=alpha,
                            baseline_floor=baseline_floor)
    forced = curtailed(model, arms, decide, seed=derive_seed(seed, "IV-3"), batch_size=batch_size,
                       stop_early=stop_early, what="IV-3 items")
    info = {"heads": [str(h) for h in heads], "hub": hub, "fraction": fraction}
    return override(base, forced, keep=keep, min_drop=min_drop, alpha=alpha, baseline_floor=baseline_floor,
                    details={p: info for p in patterns})


def transplant_function(recipient: LoadedModel, donor: LoadedModel | None, samples: Sequence[Sample],
                        heads: Sequence[Head], baseline: pd.DataFrame, *, keep: float = 0.8, alpha: float = 0.05,
                        baseline_floor: float = 0.5, batch_size: int = 8) -> Verdict:
    """IV-4: the critical heads transplanted from ``donor`` keep at least ``keep`` of their function
    in the recipient. Their function is the accuracy they carry (baseline - with them zero-ablated);
    the transplant keeps it when accuracy with the donor's heads is non-inferior to the baseline with
    margin ``(1 - keep) x function``. Inconclusive without a donor, with a donor of another shape
    (decided from the configs, before any forward pass: the recipient is left as it was), or when
    ablating the heads does not measurably hurt (there is no function to keep)."""
    params = {"heads": len(heads)}
    test = "exact non-inferiority with margin (1 - keep) x (baseline - ablated)"
    if donor is None:
        return inconclusive("IV-4", params, "no donor model of the same shape: pass --compare-model (e.g. the base "
                             "variant of an instruct model)", test, alpha,
                            power=Power.none("no donor model: nothing was transplanted or tested"))
    diff = shape_difference(recipient, donor)
    if diff:
        return inconclusive("IV-4", params, f"{diff}: the transplant needs a donor of the same shape (a head moves "
                            "only between models of one shape, e.g. a base model and its instruct variant); pass "
                            "such a model as --compare-model", test, alpha,
                            details={"heads": [str(h) for h in heads], "donor": getattr(donor, "key", "donor")},
                            power=Power.none("the donor's shape differs: nothing was transplanted or tested"))
    ids = [s.id for s in samples]
    base = _correct(baseline, ids)
    from rh.runner import call

    abl = _correct(run_one(recipient, samples, Ablation("ablated", tuple(heads)), batch_size=batch_size), ids)
    # the donor's heads travel to the recipient's passes (on Ray, a replica): the controller needs no recipient weights
    (tr,) = call(recipient, samples, [TransplantTask(tuple(ids), tuple(validate_heads(heads, recipient.shape)),
                                                     take_donor_heads(donor, heads), batch_size)])
    from rh.rules.claims import transplant

    return transplant(base, abl, tr, keep=keep, alpha=alpha, baseline_floor=baseline_floor, params=params,
                      details={"heads": [str(h) for h in heads], "donor": getattr(donor, "key", "donor")})


def difficulty_strata(baseline: pd.DataFrame, ablated: pd.DataFrame, *, min_effect: float = 0.5, alpha: float = 0.05,
                      baseline_floor: float = 0.5, seed: int = 0) -> Verdict:
    """IV-7: ablation hurts hard items more than easy ones, as an interaction on the answer's
    log-odds among items correct at baseline (:func:`rh.rules.claims.difficulty`)."""
    from rh.rules.claims import difficulty

    df = baseline[["id", "correct", "logprob"]].merge(ablated[["id", "correct", "logprob"]], on="id",
                                                      suffixes=("", "_abl"))
    return difficulty(df["correct"].to_numpy(float), df["logprob"].to_numpy(float), df["logprob_abl"].to_numpy(float),
                      min_effect=min_effect, alpha=alpha, baseline_floor=baseline_floor)
