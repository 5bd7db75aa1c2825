"""The one mechanism that captures attention rows while the model runs (design decision 1).

``capture_attention(model, reduce)`` registers, with transformers' ``AttentionInterface``, an
attention function that calls the model's own implementation (sdpa, eager, flash) for the output
and, beside it, computes only the last query row's attention probabilities from the very
``query``/``key`` tensors the model used (after RoPE, with grouped KV heads expanded). At prefill
that row is the last prompt token; while decoding it is the current token. The mask function is
registered under the same name, or the causal mask would silently disappear. Nothing is forked,
no projection is recomputed, and no N x N matrix is built: the cost is O(L) per head.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from rh.models import hf_model

_PREFIX = "rh_capture__"
_active: ContextVar[AttentionCapture | None] = ContextVar("rh_attention_capture", default=None)

Reducer = Callable[[int, torch.Tensor], Any]


@dataclass
class AttentionCapture:
    """What a capture block recorded: ``steps[t][layer]`` is ``reduce(layer, probs)`` for call ``t``.

    ``probs`` is float32 of shape ``[batch, n_heads, kv_len]``: the attention of the last query
    position of each forward call. Call 0 is the prefill; later calls are decoding steps.
    """

    reduce: Reducer
    n_layers: int
    steps: list[dict[int, Any]] = field(default_factory=list)
    _model_id: int = 0

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


def last_row_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of the last query position: ``[batch, n_heads, kv_len]`` in float32.

    ``query`` is ``[b, n_heads, q_len, d]`` and ``key`` ``[b, n_kv_heads, kv_len, d]`` as the
    attention function receives them; query head ``h`` reads KV head ``h // (n_heads // n_kv)``,
    the grouping ``repeat_kv`` uses. The mask row is honoured whether it is absent (causal: the
    last query sees every key), boolean (True = attend), additive float, or a 2-D padding mask.
    """
    b, n_heads, q_len, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    if attention_mask is None and q_len > 1 and kv_len > q_len:
        key = key[:, :, :q_len]  # sdpa's crop for a prefill into an empty static cache
        kv_len = q_len
    q = query[:, :, -1, :].float().reshape(b, n_kv, groups, d)
    scores = torch.einsum("bkgd,bkld->bkgl", q, key.float()).reshape(b, n_heads, kv_len) * scaling
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
    return torch.softmax(scores, dim=-1)


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
        out = _base_function(base, module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        cap = _active.get()
        if cap is not None and cap._model_id == id(getattr(module, "config", None)):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            with torch.no_grad():
                probs = last_row_probs(query.detach(), key.detach(), attention_mask, scale)
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


def keep_rows(layer: int, probs: torch.Tensor) -> torch.Tensor:
    """Default reducer: keep the whole last-token row of every head, on the CPU."""
    return probs.cpu()


@contextlib.contextmanager
def capture_attention(model: Any, reduce: Reducer = keep_rows) -> Iterator[AttentionCapture]:
    """Within the block, every forward of ``model`` (a ``LoadedModel`` or transformers model) records ``reduce(layer, probs)`` per layer.

    The model's attention implementation is swapped for the capture wrapper of the same base and
    restored in ``finally``, also when the block raises. Outputs are those of the base
    implementation, unchanged.
    """
    hf = hf_model(model)
    config = hf.config
    base = config._attn_implementation
    if base.startswith(_PREFIX):
        raise RuntimeError("capture_attention blocks on the same model cannot be nested")
    cap = AttentionCapture(reduce=reduce, n_layers=int(config.num_hidden_layers), _model_id=id(config))
    name = _register(base)
    token = _active.set(cap)
    hf.set_attn_implementation(name)
    try:
        yield cap
    finally:
        hf.set_attn_implementation(base)
        _active.reset(token)
