"""Memory on the accelerator: a batch size that fits, and an out-of-memory error that says what to lower.

:func:`oom_guard` wraps the forward passes of evaluation (``rh.evaluate.teacher_forced``) and
identification (``rh.scoring.score_samples``): a CUDA out-of-memory error there becomes a
``RuntimeError`` naming the batch, the prompt length and the fixes (a smaller batch size through
the profile, shorter prompts, ``--quant 4bit``, more GPUs). :func:`auto_batch_size` estimates how
many prompts of a given length fit in the free memory of every device that holds layers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from rh.models import head_shape, hf_model

GiB = 1024**3


def peak_memory() -> dict[str, Any]:
    """This process's peak memory so far: ``rss_peak_bytes``, its peak resident set (``VmHWM`` of
    ``/proc/self/status``; ``getrusage``'s ``ru_maxrss`` where that file is missing), and on CUDA
    ``cuda_peak_bytes``, the most each GPU held in tensors (``torch.cuda.max_memory_allocated``),
    keyed by device name. A field that cannot be read is left out."""
    out: dict[str, Any] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["rss_peak_bytes"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if "rss_peak_bytes" not in out:
        try:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["rss_peak_bytes"] = int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
        except (ImportError, OSError, ValueError):
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i))
                                  for i in range(torch.cuda.device_count())}
    return out


def process_memory(prefix_cache: Any = None) -> dict[str, Any]:
    """:func:`peak_memory` with a prefix cache's peak and cap (:meth:`rh.prefix.PrefixCache.memory`),
    where the process reuses prefixes: what the report's memory line gives for each process."""
    return {**peak_memory(), **(prefix_cache.memory() if prefix_cache is not None else {})}


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (``torch.cuda.OutOfMemoryError``, or a
    RuntimeError from a kernel or an extension that says so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(what: str, *, batch_size: int | None = None, length: int | None = None,
                detail: str = "") -> str:
    """What ran out of memory and what to lower, most effective first."""
    size = []
    if batch_size is not None:
        size.append(f"a batch of {batch_size} prompt{'s' if batch_size != 1 else ''}")
    if length is not None:
        size.append(f"{length} tokens each")
    free = _free_text()
    lines = [
        f"out of accelerator memory during {what}" + (f" ({', '.join(size)})" if size else "") + (f"; {free}" if free else ""),
        "lower one of these and rerun:",
        "  - the batch size: the profile's batch_size (get_profile(..., batch_size=1); batch_size= in rh calls, "
        "--batch-size for python -m rh identify); rh.memory.auto_batch_size(model, length) estimates one that fits",
        "  - the prompt length: the profile's lengths (memory grows with batch x length)",
        "  - the weights' memory: load in 4-bit (--quant 4bit, or 8bit), or spread the model over more GPUs "
        "(device_map='auto' uses every visible GPU; --max-memory caps each one, leaving room for activations)",
    ]
    if detail:
        lines.append(f"(original error: {detail.splitlines()[0][:300]})")
    return "\n".join(lines)


def _free_text() -> str:
    if not torch.cuda.is_available():
        return ""
    try:
        parts = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            parts.append(f"cuda:{i} {free / GiB:.1f} of {total / GiB:.1f} GiB free")
        return ", ".join(parts)
    except Exception:  # the device may be in a bad state right after an OOM
        return ""


@contextlib.contextmanager
def oom_guard(what: str, *, batch_size: int | None = None, length: int | None = None) -> Iterator[None]:
    """Within the block, an out-of-memory error is re-raised as a ``RuntimeError`` whose message
    says what to lower (see :func:`oom_message`); the original is its ``__cause__``. Any other
    error passes through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise RuntimeError(oom_message(what, batch_size=batch_size, length=length, detail=str(exc))) from exc


# --------------------------------------------------------------------------- batch size


def kv_bytes_per_token(model: Any, *, layers: int | None = None) -> int:
    """Bytes of KV cache one token takes in ``layers`` layers (default: all): keys and values of
    every KV head, in the model's compute dtype (bf16: 2 bytes)."""
    shape = head_shape(model)
    n_layers = shape.n_layers if layers is None else layers
    return 2 * n_layers * shape.n_kv_heads * shape.head_dim * _compute_bytes(model)


def activation_bytes_per_token(model: Any) -> int:
    """Bytes one token's transient activations take in one decoder layer at a time: the residual
    stream, q/k/v and attention output, the MLP's gate, up and product, and fp32 copies for the
    norms and the captured attention row (a generous count; only one layer is live at once)."""
    cfg = hf_model(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden))
    shape = head_shape(model)
    b = _compute_bytes(model)
    return b * (4 * hidden + 2 * shape.n_heads * shape.head_dim + 3 * inter) + 4 * 2 * hidden


def _compute_bytes(model: Any) -> int:
    hf = hf_model(model)
    dtype = getattr(hf, "dtype", None) or torch.bfloat16
    if not dtype.is_floating_point:  # quantized weights compute in bf16 (bitsandbytes' compute dtype)
        dtype = torch.bfloat16
    return torch.finfo(dtype).bits // 8


def _layers_per_device(model: Any) -> dict[str, int]:
    """How many decoder layers each device holds: from ``hf_device_map`` when the model is
    dispatched, else every layer on the device of its input embeddings."""
    hf = hf_model(model)
    n_layers = int((getattr(hf.config, "text_config", None) or hf.config).num_hidden_layers)
    dmap = getattr(hf, "hf_device_map", None)
    if not dmap or len(set(dmap.values())) == 1:
        dev = next(iter(dmap.values())) if dmap else hf.get_input_embeddings().weight.device
        return {_device_name(dev): n_layers}
    where: dict[int, str] = {}  # layer index -> device (a layer split into parts counts once, where it starts)
    for name, dev in dmap.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        if m:
            where.setdefault(int(m.group(1)), _device_name(dev))
    counts: dict[str, int] = {}
    for dev in where.values():
        if dev != "disk":  # offloaded layers run on the main device, one at a time
            counts[dev] = counts.get(dev, 0) + 1
    return counts or {"cpu": n_layers}


def _device_name(dev: Any) -> str:
    if isinstance(dev, int):
        return f"cuda:{dev}"
    dev = str(dev)
    return "cuda:0" if dev == "cuda" else dev


def free_memory(device: str) -> int:
    """Free bytes on ``device`` ("cuda:N": from the driver; "cpu": the kernel's MemAvailable)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def auto_batch_size(model: Any, length: int, *, free: dict[str, int] | int | None = None, fraction: float = 0.8,
                    max_batch: int = 64, new_tokens: int = 64) -> int:
    """The largest batch of ``length``-token prompts whose memory fits ``fraction`` of the free
    memory on every device that holds layers (at least 1, at most ``max_batch``).

    Per prompt and device: the KV cache of the layers it holds for ``length + new_tokens`` tokens
    (what generation keeps; a teacher-forced pass holds less) plus one layer's activations for
    ``length`` tokens, and on the device of the last layer the logits rows rh keeps. ``free``
    overrides the measured free bytes (one number for every device, or per device name). The
    estimate ignores allocator fragmentation; :func:`oom_guard` says what to lower if it is wrong.
    """
    if length < 1:
        raise ValueError(f"length={length}: a prompt has at least one token")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: use a share of the free memory in (0, 1]")
    layers = _layers_per_device(model)
    cfg = hf_model(model).config
    vocab = int((getattr(cfg, "text_config", None) or cfg).vocab_size)
    act = activation_bytes_per_token(model) * length
    best = max_batch
    for i, (dev, n) in enumerate(layers.items()):
        budget = free.get(dev, 0) if isinstance(free, dict) else (free if free is not None else free_memory(dev))
        per_prompt = kv_bytes_per_token(model, layers=n) * (length + new_tokens) + act
        if i == len(layers) - 1:
            per_prompt += 4 * vocab * new_tokens  # fp32 logits of the positions rh keeps
        best = min(best, int(budget * fraction // per_prompt))
    return max(1, best)
