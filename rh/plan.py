"""What a run of claims will cost, before any weights load: ``pytest claims/ --plan``.

The plan is a dry run (:mod:`rh.dry`): every collected claim runs its own code on the model loaded
without its weights, and the runner every claim hands its passes to counts the token-layers of
each work unit and task (one token through one decoder layer, what
:class:`rh.budget.TokenLayerCounter` counts in a run) instead of computing it. So the plan counts
the prompts, conditions, batches and padding the claims really build, with the real tokenizer, and
a team's own claim is planned as rh's are, with nothing to declare: its passes go through the same
runner. A task of its own (a pass that gives something other than rows) declares what it would run
with a ``dry(model, by_id)`` method (:class:`rh.runner.Task`).

The count is the *plain* one, an upper bound: a dry run is plain (made-up outcomes must not stop
anything early), while a real run saves by prefix reuse (:mod:`rh.prefix`), the early stopping of
CA-1's random head sets and curtailment (:mod:`rh.curtail`). A ranking in the ranking cache costs
nothing, as in a run (the dry run reads a copy of the cache, and keeps the rankings it makes up to
itself); one that is not cached is counted as its identification would run, and the passes that
follow it are counted with a ranking made up from made-up scores: the same number of passes, but
which layers an ablation starts from, or which rows another claim already put in the results
store, can differ from the real run's.

Each claim pays for the fixtures first set up for it and for its own body, as a run bills it. A
claim whose passes cannot be counted (a pass run on the model outside the runner, which needs
weights; a task without ``dry``) is shown *unknown* with the reason, never 0.

Wall time: :func:`calibrate_config` times a forward of ``batch_size x lengths[0]`` random tokens
through a randomly initialised model of the same architecture, built from the model's config with
two decoder layers, in the dtype and on the device the run would use (:func:`rh.budget.calibrate`;
the embedding and one-position output head are shared by two layers instead of all, so the figure
is a little high). Model loading is not in the estimate.
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rh.profiles import Profile

__all__ = ["PlanLine", "ClaimPlan", "Plan", "Calibration", "claim_label", "format_plan", "calibrate_config",
           "calibrate_run", "model_config", "recorded_for"]


# --------------------------------------------------------------------------- what each claim ran, dry


@dataclass(frozen=True)
class PlanLine:
    """What one fixture (or a claim's body) ran in the dry run: its token-layers, its rows by
    condition name and its tasks by kind (:class:`rh.dry.Tally`)."""

    name: str
    token_layers: int
    rows: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)

    @property
    def passes(self) -> int:
        """Prompts run through the model: a row, or a task's prompt (a batch of b prompts is b passes)."""
        return sum(self.rows.values()) + sum(self.tasks.values())

    def describe(self) -> str:
        groups: dict[str, list[int]] = {}  # random10#0..#48: one entry, "random10#* (49 conditions)"
        for name, n in self.rows.items():
            groups.setdefault(re.sub(r"([#@])\d+$", r"\1*", name), []).append(n)
        parts = [f"{name} x {ns[0]}" if len(ns) == 1 else f"{name} ({len(ns)} conditions) x {sum(ns)}"
                 for name, ns in groups.items()]
        parts += [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in self.tasks.items()]
        what = f" ({', '.join(parts)})" if parts else ""
        return f"{self.name}: {self.token_layers:,} token-layers{what}"


@dataclass
class ClaimPlan:
    """One collected claim: what it paid for in the dry run (the fixtures first set up for it, and
    its body), or why that could not be counted."""

    nodeid: str
    label: str
    lines: list[PlanLine] = field(default_factory=list)
    unknown: str | None = None  # why this claim's passes could not be counted
    recorded_tl: int | None = None  # what --expected recorded for the same share
    recorded_s: float | None = None

    @property
    def token_layers(self) -> int | None:
        return None if self.unknown else sum(r.token_layers for r in self.lines)

    @property
    def passes(self) -> int:
        return sum(r.passes for r in self.lines)

    @property
    def conditions(self) -> int:
        return sum(len(r.rows) for r in self.lines)


@dataclass
class Plan:
    claims: list[ClaimPlan]
    per_tl: float | None = None  # seconds per token-layer (None: not calibrated)
    calibration: str = ""
    recorded_from: str | None = None

    @property
    def token_layers(self) -> int:
        return sum(c.token_layers or 0 for c in self.claims)

    @property
    def passes(self) -> int:
        return sum(c.passes for c in self.claims)

    @property
    def unknown(self) -> list[ClaimPlan]:
        return [c for c in self.claims if c.unknown]


def claim_label(item: Any) -> str:
    """A claim's row label: its id and parameters, e.g. ``CA-6[depth=0,phase=decode]``."""
    marker = item.get_closest_marker("claim")
    claim = str(marker.args[0]) if marker is not None and marker.args else None
    callspec = getattr(item, "callspec", None)
    fixed = marker.kwargs.get("params") or {} if marker is not None else {}  # e.g. {"phase": "decode"}
    parts = ([callspec.id] if callspec is not None else []) + [f"{k}={v}" for k, v in sorted(fixed.items())]
    params = f"[{','.join(parts)}]" if parts else ""
    return f"{claim}{params}" if claim else item.name


# --------------------------------------------------------------------------- the table


def format_plan(plan: Plan, *, heading: str = "", detail: bool = True) -> list[str]:
    """The plan as lines: one row per claim (its conditions, passes, token-layers and estimated
    time, and what --expected recorded for it), what it ran beneath it, a total, the calibration."""
    from rh.budget import format_duration

    per = plan.per_tl
    rec = plan.recorded_from is not None

    def secs(tl: int | None) -> str:
        return "?" if tl is None or per is None else format_duration(tl * per)

    n_unknown = len(plan.unknown)
    total_label = f"total ({len(plan.claims)} claims" + (f", {n_unknown} unknown" if n_unknown else "") + ")"
    width = max([len(c.label) for c in plan.claims] + [len(total_label)])
    head = f"{'claim'.ljust(width)}  {'conditions':>10}  {'passes':>9}  {'token-layers':>14}  {'est. time':>9}"
    if rec:
        head += f"  {'recorded':>14}  {'rec. time':>9}"
    lines = [heading] if heading else []
    lines.append(head)
    for c in plan.claims:
        tl = c.token_layers
        est = secs(tl) if tl is not None or c.recorded_tl is None or per is None else "~" + secs(c.recorded_tl)
        line = (f"{c.label.ljust(width)}  {c.conditions:>10,}  {c.passes:>9,}  "
                f"{('unknown' if tl is None else f'{tl:,}'):>14}  {est:>9}")
        if rec:
            line += (f"  {('-' if c.recorded_tl is None else f'{c.recorded_tl:,}'):>14}"
                     f"  {('-' if c.recorded_s is None else format_duration(c.recorded_s)):>9}")
        lines.append(line)
        if detail:
            lines += [f"    {r.describe()}" for r in c.lines]
            if c.unknown:
                lines.append(f"    unknown cost: {c.unknown}")
    total = plan.token_layers
    line = (f"{total_label.ljust(width)}  {sum(c.conditions for c in plan.claims):>10,}  {plan.passes:>9,}  "
            f"{total:>14,}  {secs(total):>9}")
    if rec:
        rtl = [c.recorded_tl for c in plan.claims if c.recorded_tl is not None]
        rs = [c.recorded_s for c in plan.claims if c.recorded_s is not None]
        line += f"  {(f'{sum(rtl):,}' if rtl else '-'):>14}  {(format_duration(sum(rs)) if rs else '-'):>9}"
    lines.append(line)
    lines.append("token-layers: the plain passes, counted by a dry run, an upper bound (prefix reuse, early stopping "
                 "and curtailment lower them; model loading is not included in the time)")
    if rec:
        lines.append(f"recorded: token-layers and seconds of the same share in {plan.recorded_from} "
                     "(as that run executed them, its savings included; its machine's times)")
    if plan.calibration:
        lines.append(f"this machine: {plan.calibration}")
    return lines


# --------------------------------------------------------------------------- the model's config, and timing


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar key-value pairs of a GGUF file's header (arrays skipped): what its config needs,
    read in milliseconds (the ``gguf`` reader parses the whole vocabulary, seconds)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    out: dict[str, Any] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        pos = 8
        _, n_kv = struct.unpack_from("<QQ", mm, pos)
        pos += 16

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, p)
            return mm[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

        def skip(t: int, p: int) -> tuple[Any, int]:
            if t in scalar:
                return struct.unpack_from(scalar[t], mm, p)[0], p + struct.calcsize(scalar[t])
            if t == 8:
                return string(p)
            if t == 9:
                et, n = struct.unpack_from("<IQ", mm, p)
                p += 12
                if et in scalar:
                    return ("array", n), p + n * struct.calcsize(scalar[et])
                for _ in range(n):
                    _, p = skip(et, p)
                return ("array", n), p
            raise ValueError(f"{path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (t,) = struct.unpack_from("<I", mm, pos)
            value, pos = skip(t, pos + 4)
            out[key] = value
    return out


def _gguf_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # pragma: no cover - an older transformers
        GGUF_CONFIG_MAPPING = {}
    meta = gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    mapping = GGUF_CONFIG_MAPPING.get(arch)
    if not mapping:  # an architecture this shortcut does not know: transformers' own reader (seconds)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    kwargs = {}
    for key, attr in mapping.items():
        value = meta.get(f"{arch}.{key}")
        if value is not None and attr and not isinstance(value, tuple):
            kwargs[attr] = value
    if "vocab_size" not in kwargs and isinstance(meta.get("tokenizer.ggml.tokens"), tuple):
        kwargs["vocab_size"] = int(meta["tokenizer.ggml.tokens"][1])
    if "hidden_size" in kwargs and "num_attention_heads" in kwargs:  # rope's dimensions are not always head_dim
        kwargs["head_dim"] = int(meta.get(f"{arch}.attention.key_length")
                                 or kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return AutoConfig.for_model(arch, **kwargs)


@functools.lru_cache(maxsize=8)
def model_config(name: str) -> Any:
    """The transformers config of a model, without its weights: the bundled GGUF's header, the tiny
    random Llama's config, or config.json (a local folder, or the hub's, cached). Cached per
    process: treat it as read-only (:func:`calibrate_config` works on a copy)."""
    from rh.models import _hub_kwargs, bundled_gguf_path, hub_access, resolve_spec

    spec = resolve_spec(name)
    if spec.kind == "bundled-gguf":
        return _gguf_config(bundled_gguf_path(spec))
    if spec.key in ("planted", "planted-twin"):  # built by hand in rh.planted
        from rh.planted import planted_config

        return planted_config()
    if spec.kind == "random" and spec.key != "tiny-llama":  # tiny-<family>: that family's own config
        from rh.models import tiny_config

        s = spec.shape
        return tiny_config(spec.key.removeprefix("tiny-"), n_layers=s.n_layers, n_heads=s.n_heads,
                           n_kv_heads=s.n_kv_heads, head_dim=s.head_dim)
    if spec.kind == "random":
        from transformers import LlamaConfig

        s = spec.shape  # rh.models.tiny_llama's defaults
        return LlamaConfig(vocab_size=49152, hidden_size=s.n_heads * s.head_dim,
                           intermediate_size=4 * s.n_heads * s.head_dim, num_hidden_layers=s.n_layers,
                           num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
                           max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    from transformers import AutoConfig

    with hub_access(spec) as token:
        return AutoConfig.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))


def run_device_dtype(name: str, device: str | None, dtype: str | None) -> tuple[str, Any]:
    """The device and :class:`rh.models.DtypeChoice` a run of ``name`` would use (as
    :func:`rh.models.load_model` chooses them)."""
    import torch

    from rh.models import DtypeChoice, resolve_dtype, resolve_spec

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_spec(name).kind == "random" and dtype in (None, "auto"):
        return device, DtypeChoice(torch.float32, "tiny random model: float32")
    return device, resolve_dtype(dtype, device)


@dataclass(frozen=True)
class Calibration:
    """Seconds per token-layer on this machine, and how they were measured."""

    seconds_per_token_layer: float
    how: str
    machine: str
    dtype: str
    device: str

    def line(self) -> str:
        return f"{self.machine}, {self.dtype}: {self.how}"


def machine_description(device: str) -> str:
    """The GPU's name, or the CPU's model and bf16 flags with torch's thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(idx)} (cuda)"
    from rh.models import cpu_description

    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def calibrate_config(config: Any, *, batch_size: int, length: int, device: str = "cpu", dtype: Any = None,
                     n_layers: int = 2, repeats: int = 2) -> tuple[float, str]:
    """Seconds per token-layer of ``config``'s architecture on ``device`` in ``dtype``, measured on
    a randomly initialised copy with ``n_layers`` decoder layers and a small vocabulary (the
    output head runs one position, as rh's passes do): :func:`rh.budget.calibrate` on it. No
    weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from rh.budget import calibrate

    cfg = config.__class__.from_dict(config.to_dict())
    text = getattr(cfg, "text_config", None) or cfg
    text.num_hidden_layers = max(1, min(n_layers, int(text.num_hidden_layers)))
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[: text.num_hidden_layers]
    text.vocab_size = min(int(text.vocab_size), 1024)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(text, attr):
            setattr(text, attr, None)
    dtype = dtype or torch.float32
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    try:
        per, how = calibrate(model, batch_size=batch_size, length=length, repeats=repeats)
    finally:
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return per, how.replace("took", "of random weights took")


def calibrate_run(name: str, profile: Profile, *, device: str | None = None, dtype: str | None = None,
                  quant: str | None = None) -> Calibration:
    """This machine's seconds per token-layer for a run of ``name`` in ``profile``, without its
    weights (:func:`calibrate_config` on the model's config, in the dtype the run would choose)."""
    dev, choice = run_device_dtype(name, device, dtype)
    per, how = calibrate_config(model_config(name), batch_size=profile.batch_size, length=profile.lengths[0],
                                device=dev, dtype=choice.dtype)
    if quant:
        how += f" (--quant {quant}: timed unquantized)"
    if not (per > 0 and math.isfinite(per)):
        raise ValueError(f"the calibration measured {per} s per token-layer")
    return Calibration(per, how, machine_description(dev), choice.name, dev)



def recorded_for(path: str | Path | None, model: str, profile: str) -> Any:
    """The expected-verdicts file at ``path`` when it exists and is for this model and profile."""
    if path is None or not Path(path).is_file():
        return None
    from rh.expected import load_expected

    try:
        exp = load_expected(path)
    except (ValueError, OSError):
        return None
    if exp.model not in (None, model) or exp.profile not in (None, profile):
        return None
    return exp
