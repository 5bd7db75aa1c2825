"""The model options, declared once for every entry point: the pytest plugin (``pytest claims/``),
``python -m rh identify`` and ``python -m rh audit``. Each passes its own ``add`` (pytest's
``group.addoption`` or argparse's ``add_argument``: they take the same arguments), so the names,
choices, defaults and help are the same everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")
QUANTS = ("4bit", "8bit")


def add_model_options(add: Callable[..., Any]) -> None:
    """``--model``, ``--quant``, ``--device``, ``--dtype`` and ``--max-memory``: what
    :func:`rh.models.load_model` takes."""
    add("--model", default="smollm2-135m",
        help="registry key (smollm2-135m, tiny-llama, llama8b, llama8b-base, llama70b, llama3.1-8b, mistral7b-v0.2, "
             "qwen2.5-7b, qwen3-8b, gemma3-4b, tiny-<family> for a random Mistral, Qwen2/3, Gemma 2/3, Phi-3 or "
             "OLMo-2), HF repo id or local dir")
    add("--quant", default=None, choices=QUANTS, help="bitsandbytes quantization (CUDA only)")
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--dtype", default="auto", choices=DTYPES,
        help="weights and activations: auto (default) = bf16 on CUDA and on CPUs with native bf16 matmul "
             "(amx_bf16/avx512_bf16), float32 on other CPUs, where bf16 is emulated and several times slower")
    add("--max-memory", default=None, metavar="SPEC",
        help="cap per device for device_map='auto' across the GPUs: '70GiB' (each GPU), "
             "'70GiB,cpu=100GiB' or '0=70GiB,1=70GiB,cpu=100GiB'")


def model_kwargs(options: Any) -> dict[str, Any]:
    """:func:`rh.models.load_model`'s keyword arguments from parsed options (an argparse namespace)."""
    return {"quant": options.quant, "device": options.device, "dtype": options.dtype,
            "max_memory": options.max_memory}
