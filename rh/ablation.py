"""Head ablation: ``ablate(model, heads)`` zeroes chosen query heads at the input of ``o_proj``.

This is design decision 2: a head's contribution to the residual stream is its slice of the
``o_proj`` input, so zeroing that slice removes exactly that head and nothing else. Hooks are
removed in ``finally``; nested blocks compose (the union of their heads is ablated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rh.heads import Head, HeadShape, validate_heads
from rh.models import hf_model


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    hf = hf_model(model)
    layers = getattr(getattr(hf, "model", hf), "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf).__name__} has no decoder layers at .model.layers; rh supports Llama-style models")
    return [layer.self_attn for layer in layers]


def _head_mask(n_heads: int, head_dim: int, heads: Iterable[int], device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n_heads, head_dim, dtype=torch.bool, device=device)
    mask[list(heads)] = True
    return mask.reshape(-1)


@contextlib.contextmanager
def ablate(model: Any, heads: Iterable[Head | str | tuple[int, int]], shape: HeadShape | None = None) -> Iterator[list[Head]]:
    """Zero the outputs of ``heads`` (at the ``o_proj`` input) for every forward inside the block.

    ``model`` is a ``LoadedModel`` (whose shape validates the heads) or a transformers model with
    ``shape`` given. The model's weights are never touched; every hook goes in ``finally``.
    """
    shape = shape or getattr(model, "shape", None)
    if shape is None:
        raise ValueError("ablate needs the model's HeadShape: pass a LoadedModel or shape=")
    heads = validate_heads(heads, shape)
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        by_layer.setdefault(h.layer, []).append(h.head)
    modules = attention_modules(model)
    handles = []
    try:
        for layer, idx in sorted(by_layer.items()):
            o_proj = modules[layer].o_proj
            mask = _head_mask(shape.n_heads, shape.head_dim, idx, o_proj.weight.device)

            def pre_hook(module, args, kwargs, _mask=mask):
                x = args[0]
                return (x.masked_fill(_mask.to(x.device), 0.0), *args[1:]), kwargs

            handles.append(o_proj.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield heads
    finally:
        for h in handles:
            h.remove()
