"""Reference computations shared by test modules: what rh computes, computed another way."""

from __future__ import annotations

import numpy as np
import torch


def eager_needle_attention(eager_model, sample) -> np.ndarray:
    """``[layers, heads]``: the last position's attention on the needle's tokens, summed, from
    transformers' own eager attention weights (``output_attentions=True``) of one sample alone."""
    with torch.no_grad():
        att = eager_model.model(input_ids=torch.tensor([sample.input_ids]), output_attentions=True).attentions
    a, b = sample.needle_span
    return np.stack([layer[0, :, -1, a:b].sum(-1).double().numpy() for layer in att])
