"""Real head pruning (seed 000 §2.5's efficiency claim): remove query heads from the weights, so
the compute and memory they cost go too, which zero-ablation can never show.

``prune_heads(model, heads)`` returns a new model in which each chosen query head's rows of
``q_proj`` and columns of ``o_proj`` are gone, and a KV head's rows of ``k_proj``/``v_proj`` are
gone once every query head of its group is. Its outputs equal ``ablate(model, heads, "zero")``
up to float rounding: a head's whole contribution to the residual stream is its ``o_proj``
column block times its output, and nothing else reads its query.

Grouped-query attention: a layer keeps every KV head that still has a query head. When the
remaining groups are equally large, the layer's ``num_key_value_groups`` is set to that size and
the model's own attention runs unchanged. When they are not (e.g. 4 + 2 query heads on 2 KV
heads), ``repeat_kv`` cannot map query heads to KV heads, so the layer gets ``rh_kv_heads`` (the
KV head of each remaining query head) and the model runs rh's registered attention function,
which expands K/V by that index before calling the model's own implementation (sdpa, eager or
flash) with one KV head per query head. The KV cache keeps only the remaining KV heads.

:func:`efficiency_report` compares two models: parameters, FLOPs and KV-cache bytes per token
(counted from the weights), and measured latency and cache size.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from rh.ablation import active_ablations
from rh.attention import install_rh_attention, interventions
from rh.heads import Head, HeadShape, validate_heads
from rh.models import LoadedModel, attention_modules, cache_bytes, cache_kwarg, hf_model, output_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What pruning keeps in one layer, in the original head numbering."""

    layer: int
    kept_heads: tuple[int, ...]  # query heads that remain, ascending
    kept_kv: tuple[int, ...]  # KV heads that remain, ascending
    kv_of_head: tuple[int, ...]  # for each remaining query head, the position of its KV head in kept_kv

    @property
    def uniform_groups(self) -> int | None:
        """The group size if every remaining KV head serves as many query heads, else ``None``."""
        sizes = set(Counter(self.kv_of_head).values())
        return sizes.pop() if len(sizes) == 1 else None


def plan_pruning(shape: HeadShape, heads: Iterable[Head | str | tuple[int, int]]) -> dict[int, LayerPlan]:
    """The per-layer plan for removing ``heads``; refuses to empty a layer."""
    heads = validate_heads(heads, shape)
    by_layer: dict[int, set[int]] = {}
    for h in heads:
        by_layer.setdefault(h.layer, set()).add(h.head)
    group = shape.group_size
    plans = {}
    for layer, removed in sorted(by_layer.items()):
        kept = tuple(h for h in range(shape.n_heads) if h not in removed)
        if not kept:
            raise ValueError(
                f"pruning would remove every query head of layer {layer} ({shape.n_heads} heads): a layer "
                "needs at least one; keep one of its heads (or zero-ablate them all with rh.ablation.ablate)"
            )
        kept_kv = tuple(sorted({h // group for h in kept}))
        plans[layer] = LayerPlan(layer, kept, kept_kv, tuple(kept_kv.index(h // group) for h in kept))
    return plans


def _rows(indices: Iterable[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(i * head_dim, (i + 1) * head_dim) for i in indices])


def _slice_linear(lin: torch.nn.Module, *, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None,
                  where: str) -> None:
    """Keep rows ``out_idx`` / columns ``in_idx`` of a Linear's weight (and bias rows), in place."""
    if type(lin) is not torch.nn.Linear:
        raise ValueError(
            f"{where} is a {type(lin).__name__}, not a plain torch.nn.Linear: pruning needs unquantized "
            "weights; load the model in bf16/fp32 (no --quant)"
        )
    w = lin.weight
    if w.device.type == "meta":
        raise ValueError(f"{where}'s weights are offloaded (on the meta device): load the model fully onto devices to prune it")
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(lin.bias.index_select(0, out_idx.to(w.device)).contiguous(), requires_grad=False)
        lin.out_features = w.shape[0]
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
        lin.in_features = w.shape[1]
    lin.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)


def prune_heads(model: LoadedModel, heads: Iterable[Head | str | tuple[int, int]], *, inplace: bool = False) -> LoadedModel:
    """A model with ``heads`` removed from its weights (a deep copy unless ``inplace``; the original
    stays intact). Head indices stay those of the unpruned model: ``shape`` is unchanged and
    ``provenance["pruned_heads"]`` lists what went. Its logits equal zero-ablation of ``heads``.

    A layer cannot lose every head (ValueError). The pruned model works with the dynamic KV cache
    (the default of ``generate``); a static cache sized from the config does not fit it, nor does
    ``save_pretrained``/reloading (the config still describes the full model).
    """
    if not isinstance(model, LoadedModel):
        raise ValueError("prune_heads needs a LoadedModel (rh.models.load_model), whose shape numbers the heads")
    shape = model.shape
    plans = plan_pruning(shape, heads)
    if active_ablations(model):
        raise ValueError("prune_heads was called inside an ablate block: its hooks would be copied; prune outside it")
    src = attention_modules(model)
    for attn in src:
        if getattr(attn, "rh_kept_heads", None) is not None:
            raise ValueError("this model is already pruned: prune the original model with the union of the heads")
        if interventions(attn):
            raise ValueError("an attention intervention is attached to the model: prune outside ablate/capture blocks")
    hf = hf_model(model) if inplace else copy.deepcopy(hf_model(model))
    modules = attention_modules(hf)
    d = shape.head_dim
    needs_index = False
    for layer, plan in plans.items():
        attn = modules[layer]
        where = f"layer {layer}"
        q_rows = _rows(plan.kept_heads, d)
        kv_rows = _rows(plan.kept_kv, d)
        _slice_linear(attn.q_proj, out_idx=q_rows, where=f"{where} q_proj")
        _slice_linear(attn.o_proj, in_idx=q_rows, where=f"{where} o_proj")
        if len(plan.kept_kv) < shape.n_kv_heads:
            _slice_linear(attn.k_proj, out_idx=kv_rows, where=f"{where} k_proj")
            _slice_linear(attn.v_proj, out_idx=kv_rows, where=f"{where} v_proj")
        uniform = plan.uniform_groups
        if uniform is not None:
            attn.num_key_value_groups = uniform
        else:
            attn.num_key_value_groups = 1  # K/V arrive expanded to one KV head per query head
            index = torch.tensor(plan.kv_of_head, dtype=torch.long, device=attn.q_proj.weight.device)
            attn.register_buffer("rh_kv_heads", index, persistent=False)
            needs_index = True
        attn.rh_kept_heads = plan.kept_heads
        attn.num_heads = len(plan.kept_heads)
        attn.num_key_value_heads = len(plan.kept_kv)
    if needs_index:
        install_rh_attention(hf)
    pruned = sorted({Head(l, h) for l, p in plans.items() for h in range(shape.n_heads) if h not in p.kept_heads})
    prov = {**model.provenance, "pruned_heads": [str(h) for h in pruned],
            "attn_implementation": hf.config._attn_implementation}
    log.info("pruned %d heads in %d layers (%s)", len(pruned), len(plans),
             "uneven groups: rh attention installed" if needs_index else "groups stay even")
    return LoadedModel(model.key, hf, model.tokenizer, shape, model.spec, prov)


# ---------------------------------------------------------------------------- costs


def _unique_params(module: torch.nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


def layer_heads(model: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, head_dim) of every layer, read from the weights."""
    out = []
    for attn in attention_modules(model):
        d = int(getattr(attn, "head_dim"))
        out.append((attn.q_proj.out_features // d, attn.k_proj.out_features // d, d))
    return out


def model_costs(model: Any, *, context_length: int) -> dict[str, float]:
    """Costs counted from the weights: parameters (tied weights once) and their bytes, query and
    KV heads, FLOPs per token at ``context_length`` (2 per multiply-add of every Linear, lm_head
    included, plus QK^T and AV over ``context_length`` keys), and KV-cache bytes per token."""
    hf = hf_model(model)
    params = _unique_params(hf)
    lin_flops = sum(2 * m.in_features * m.out_features for m in hf.modules() if isinstance(m, torch.nn.Linear))
    heads = layer_heads(hf)
    attn_flops = sum(4 * q * d * context_length for q, _, d in heads)
    dtype_bytes = next(p for p in params if p.is_floating_point()).element_size()
    return {
        "parameters": float(sum(p.numel() for p in params)),
        "parameter_bytes": float(sum(p.numel() * p.element_size() for p in params)),
        "query_heads": float(sum(q for q, _, _ in heads)),
        "kv_heads": float(sum(k for _, k, _ in heads)),
        "flops_per_token": float(lin_flops + attn_flops),
        "kv_cache_bytes_per_token": float(sum(2 * k * d * dtype_bytes for _, k, d in heads)),
    }


def _time_model(model: Any, ids: torch.Tensor, decode_steps: int) -> tuple[float, float, int]:
    """Seconds of a prefill over ``ids``, seconds per decoding step after it, and the cache bytes."""
    hf = hf_model(model)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - t0
        cache = output_cache(out)
        n_bytes = cache_bytes(cache)
        nxt = out.logits[:, -1:].argmax(-1)
        past = cache_kwarg(hf, cache)  # the cache grows in place: one keyword for every step
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            out = hf(input_ids=nxt, **past, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync()
        decode = (time.perf_counter() - t0) / max(1, decode_steps)
    return prefill, decode, n_bytes


def measure_latency(models: dict[str, Any], *, context_length: int = 512, batch_size: int = 1, repeats: int = 3,
                    decode_steps: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` prefill seconds, seconds per decoding step, and measured KV-cache bytes
    per token of each model on the same random prompt. Runs interleave (A B A B ...) so drift hits
    every model alike, and the minimum is kept: on a shared machine other load only adds time."""
    vocab = min(int(hf_model(m).config.vocab_size) for m in models.values())
    ids = torch.randint(0, vocab, (batch_size, context_length), generator=torch.Generator().manual_seed(seed))
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in models}
    for name, m in models.items():  # warm-up
        _time_model(m, ids.to(hf_model(m).get_input_embeddings().weight.device), min(decode_steps, 2))
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(_time_model(m, ids.to(hf_model(m).get_input_embeddings().weight.device), decode_steps))
    return {
        name: {
            "prefill_s": min(r[0] for r in rs),
            "decode_s_per_token": min(r[1] for r in rs),
            "kv_cache_bytes_per_token_measured": rs[0][2] / (batch_size * context_length),
        }
        for name, rs in runs.items()
    }


def efficiency_report(model_before: Any, model_after: Any, *, context_length: int = 512, batch_size: int = 1,
                      repeats: int = 3, decode_steps: int = 16, measure: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per metric with ``before``, ``after`` and ``ratio`` (after / before): parameters,
    parameter bytes, query and KV heads, FLOPs and KV-cache bytes per token at ``context_length``
    (counted), and, if ``measure``, prefill and per-token decoding latency (best of ``repeats``)
    and the KV-cache bytes per token found in the cache after a real prefill."""
    before = model_costs(model_before, context_length=context_length)
    after = model_costs(model_after, context_length=context_length)
    if measure:
        timed = measure_latency({"before": model_before, "after": model_after}, context_length=context_length,
                                batch_size=batch_size, repeats=repeats, decode_steps=decode_steps, seed=seed)
        before.update(timed["before"])
        after.update(timed["after"])
    rows = [{"metric": k, "before": before[k], "after": after[k],
             "ratio": after[k] / before[k] if before[k] else float("nan")} for k in before]
    return pd.DataFrame(rows)
