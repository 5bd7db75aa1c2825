"""Integrated-gradients attribution of the critical heads' direct effect on the answer (claim
IV-6: "integrated-gradients attribution of the critical heads concentrates on the needle tokens").

The target of the attribution, for a set of heads H, is their *direct logit attribution* to the
first answer token at the last prompt position::

    F(x) = sum_{h in H} u . (W_O[:, h] @ o_h(x)[-1]),    u = W_U[a] * g / rms_clean

with ``o_h`` the head's slice of its layer's ``o_proj`` input, ``W_O[:, h]`` the matching columns
of ``o_proj.weight``, ``W_U[a]`` the unembedding row of the answer token ``a``, ``g`` the final
norm's weight and ``rms_clean`` the final norm's RMS of the clean run's last-position residual,
held constant (the norm scale is frozen, as in standard direct logit attribution). ``heads=None``
attributes the answer token's full logit instead (norm not frozen). Attribution is computed by
captum's :class:`~captum.attr.IntegratedGradients` over ``inputs_embeds``: per token, the
attributions are summed over the embedding dimensions.

Precision: IG's completeness (attributions sum to F(x) - F(baseline)) holds up to the quadrature
error of the path integral and the rounding of every forward and backward. The model is used in
the dtype it was loaded in (a 70B model cannot be copied to fp32); the embeddings handed to captum,
its path sums and F itself are float32, cast to the model's dtype at the model's input. In bf16 the
per-step gradients carry ~3 significant digits, so completeness is looser than in fp32: for a tight
check load the model with ``dtype="fp32"`` (``rh.models.load_model``); :func:`attribution_concentrates`
takes the completeness errors and calls the claim inconclusive when any exceeds its tolerance.
The quadrature error can dominate: on SmolLM2-135M (a 512-token passkey prompt, its top five Wu24
heads, fp32) F is far from smooth along the straight path for every baseline tried (pad, mean row,
' the': total variation 7-9 on an 81-point grid against a net change of 2.1), and the completeness
error was 1.54 / 0.30 / 1.46 at 16 / 32 / 128 Gauss-Legendre steps (bf16: 1.50 / 1.49 at 16 / 32).
On the tiny random Llama (fp32, token baseline) it is below 1e-6 at 16 steps.

Baseline: the default is the pad token's embedding at every position, not all-zero embeddings.
At zero embeddings a pre-norm decoder is singular: every RMSNorm divides a vanishing residual by
``sqrt(mean(x^2) + eps) ~ sqrt(eps)``, amplifying it layer after layer, so F(alpha * x) does not
tend to F(0) as alpha -> 0 (on SmolLM2-135M in fp32, F(1e-30 x) = 1.55 and F(1e-12 x) = -0.65
against F(0) = 0 and F(x) = 1.95). The path integral then misses a jump at the baseline and
completeness fails at any number of steps. A token's embedding (the pad token, the mean row, or
any token id) keeps every point of the path at a normal scale. An all-zero pad row (a
``padding_idx`` embedding, untrained reserved tokens) is as singular as 'zeros'; a warning says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rh.heads import Head, validate_heads
from rh.models import LoadedModel, attention_modules, final_norm, hf_model
from rh.niah import Sample
from rh.recording import attn_z, head_slice, recording, resid_post
from rh.rules.verdict import Verdict

log = logging.getLogger(__name__)

CLAIM = "IV-6"
TEST_NAME = ("one-sided exact sign tests of the median needle mass ratio (needle share of |IG attribution| over the "
             "needle's share of tokens)")


@dataclass
class Attribution:
    """Integrated gradients of one sample: ``token_attr[i]`` is token i's attribution (summed over
    the embedding dimensions), ``delta`` captum's convergence delta, ``f_input`` / ``f_baseline``
    the target at the input and at the baseline, and ``completeness_error`` =
    ``|sum(token_attr) - (f_input - f_baseline)| / max(|f_input - f_baseline|, 1e-6)``."""

    token_attr: np.ndarray
    delta: float
    f_input: float
    f_baseline: float
    completeness_error: float
    sample_id: str = ""
    heads: list[Head] | None = None
    n_steps: int = 0
    dtype: str = ""
    needle_span: tuple[int, int] = (0, 0)
    meta: dict = field(default_factory=dict)

    @property
    def needle_mass_ratio(self) -> float:
        return needle_mass_ratio(self.token_attr, self.needle_span)


def _check_sample(model: LoadedModel, sample: Sample) -> None:
    n = len(sample.input_ids)
    if n == 0:
        raise ValueError(f"sample {sample.id!r} has no input tokens")
    if not sample.answer_ids:
        raise ValueError(f"sample {sample.id!r} has no answer tokens: the target is the first answer token's logit; "
                         "build samples with rh.niah")
    s, e = sample.needle_span
    if not (0 <= s < e <= n):
        raise ValueError(f"sample {sample.id!r}: needle_span {sample.needle_span} is outside its {n} tokens; "
                         "need 0 <= start < end <= len(input_ids)")
    if n > model.max_positions:
        raise ValueError(f"sample {sample.id!r} has {n} tokens, more than the model's {model.max_positions} positions")


def _check_heads(model: LoadedModel, heads: Sequence[Any] | None) -> list[Head] | None:
    if heads is None:
        return None
    heads = list(heads)
    if not heads:
        raise ValueError("heads is empty: pass the critical heads, e.g. ['L14H3'], or heads=None for the full logit")
    try:
        return validate_heads(heads, model.shape)
    except ValueError as exc:
        raise ValueError(f"heads: {exc}") from None


def final_rms(model: LoadedModel, input_ids: Sequence[int]) -> float:
    """The final norm's RMS, ``sqrt(mean(x^2) + eps)``, of the last-position residual (the last
    decoder layer's output, before the norm) on the clean prompt."""
    hf = hf_model(model)
    norm = final_norm(hf)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    last = resid_post(model.shape.n_layers - 1)  # what the final norm reads
    with torch.no_grad(), recording(model, [last], keep=lambda x: x[:, -1].float()) as seen:
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
        hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    x = seen[last][0]
    return float(torch.sqrt(x.pow(2).mean() + eps))


def head_readouts(model: LoadedModel, heads: Sequence[Head], answer_id: int, rms: float) -> dict[Head, torch.Tensor]:
    """Per head, ``w_h = W_O[:, h]^T u`` (float32, ``[head_dim]``), so a head's direct logit
    contribution is ``o_h . w_h``, with ``u = W_U[answer_id] * g / rms``."""
    hf = hf_model(model)
    norm = final_norm(hf)
    mods = attention_modules(model)
    d = model.shape.head_dim
    w_u = hf.get_output_embeddings().weight[answer_id].detach().float()
    u = w_u * norm.weight.detach().float().to(w_u.device) / float(rms)
    out = {}
    for h in heads:
        w_o = mods[h.layer].o_proj.weight.detach()
        cols = w_o[:, h.head * d:(h.head + 1) * d].float()  # [hidden, head_dim]
        out[h] = cols.T @ u.to(cols.device)
    return out


def _target_fn(model: LoadedModel, heads: list[Head] | None, answer_id: int, rms: float | None):
    """F(inputs_embeds) -> [batch] float32, for captum (embeddings are cast to the model's dtype)."""
    hf = hf_model(model)
    dtype = hf.get_input_embeddings().weight.dtype
    if heads is None:
        def full_logit(emb: torch.Tensor) -> torch.Tensor:
            out = hf(inputs_embeds=emb.to(dtype), use_cache=False, logits_to_keep=1)
            return out.logits[:, -1, answer_id].float()
        return full_logit

    readout = head_readouts(model, heads, answer_id, rms)
    d = model.shape.head_dim
    sites = [attn_z(layer) for layer in sorted({h.layer for h in heads})]

    def direct_logit(emb: torch.Tensor) -> torch.Tensor:
        # the last position's o_proj inputs, graph kept; the forward stops after the last heads' layer
        with recording(model, sites, keep=lambda x: x[:, -1], detach=False, stop_after=True) as seen:
            hf(inputs_embeds=emb.to(dtype), use_cache=False, logits_to_keep=1)
        total = torch.zeros(emb.shape[0], dtype=torch.float32, device=emb.device)
        for h in heads:
            o = head_slice(seen[attn_z(h.layer)], h.head, d).float()
            w = readout[h]
            total = total + (o @ w.to(o.device)).to(total.device)
        return total

    return direct_logit


def target_value(model: LoadedModel, sample: Sample, heads: Sequence[Any] | None) -> float:
    """F at the sample's own embeddings: the heads' direct logit attribution to the first answer
    token at the last prompt position (``heads=None``: the answer token's logit)."""
    _check_sample(model, sample)
    hs = _check_heads(model, heads)
    answer = int(sample.answer_ids[0])
    rms = final_rms(model, sample.input_ids) if hs is not None else None
    f = _target_fn(model, hs, answer, rms)
    emb = _embeddings(model, sample)
    with torch.no_grad():
        return float(f(emb)[0])


def _embeddings(model: LoadedModel, sample: Sample) -> torch.Tensor:
    hf = hf_model(model)
    ids = torch.tensor([list(sample.input_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        return hf.get_input_embeddings()(ids).float()  # [1, L, hidden]


def _baseline(model: LoadedModel, emb: torch.Tensor, baseline: Any) -> torch.Tensor:
    """The baseline embeddings ``[1, L, hidden]`` float32; warns when a position's baseline is
    (nearly) the zero vector, where completeness cannot hold (see the module docstring)."""
    table = hf_model(model).get_input_embeddings().weight
    if isinstance(baseline, bool):
        raise ValueError(f"baseline={baseline!r}: use 'pad', 'mean', 'zeros', a token id or a tensor")
    if isinstance(baseline, (int, np.integer)):
        if not 0 <= int(baseline) < table.shape[0]:
            raise ValueError(f"baseline={baseline}: not a token id of this model (0..{table.shape[0] - 1})")
        b = table[int(baseline)].detach().float().expand_as(emb).clone()
    elif isinstance(baseline, str):
        if baseline == "zeros":
            b = torch.zeros_like(emb)
        elif baseline == "pad":
            pad = model.tokenizer.pad_token_id
            if pad is None:
                raise ValueError("baseline='pad': the tokenizer has no pad token; pass a token id (e.g. the id "
                                 "of ' the') or baseline='mean'")
            b = table[int(pad)].detach().float().expand_as(emb).clone()
        elif baseline == "mean":
            b = table.detach().float().mean(dim=0).expand_as(emb).clone()
        else:
            raise ValueError(f"baseline={baseline!r}: use 'pad', 'mean', 'zeros', a token id or a tensor of the "
                             "embeddings' shape [seq_len, hidden]")
    else:
        b = torch.as_tensor(baseline, dtype=torch.float32, device=emb.device)
        if b.dim() == 2:
            b = b.unsqueeze(0)
        if b.shape != emb.shape:
            raise ValueError(f"baseline has shape {tuple(b.shape)}, but the sample's embeddings are "
                             f"{tuple(emb.shape[1:])}: pass [seq_len, hidden] or [1, seq_len, hidden]")
    typical = float(emb[0].norm(dim=-1).median())
    weakest = float(b[0].norm(dim=-1).min())
    if weakest < 1e-2 * typical:
        what = baseline if isinstance(baseline, (str, int, np.integer)) else "tensor"
        log.warning("integrated_gradients: the baseline (%s) is (nearly) the zero vector at some position (norm "
                    "%.2g vs a typical token's %.2g): every RMSNorm rescales a vanishing residual, so F jumps at the "
                    "baseline and IG's completeness cannot hold; use a token's embedding as the baseline",
                    what, weakest, typical)
    return b


def integrated_gradients(model: LoadedModel, sample: Sample, heads: Sequence[Any] | None, *, n_steps: int = 32,
                         baseline: Any = "pad", internal_batch_size: int | None = None,
                         method: str = "gausslegendre") -> Attribution:
    """Integrated gradients of F (see the module docstring) w.r.t. the sample's input embeddings.

    ``heads``: Heads or specs ('L14H3', (14, 3)); None attributes the answer token's full logit.
    ``baseline``: 'pad' (the pad token's embedding at every position), 'mean' (the mean embedding
    row), a token id (that token's embedding everywhere), 'zeros' (all-zero embeddings: see the
    module docstring for why completeness fails there) or a ``[seq_len, hidden]`` tensor.
    ``internal_batch_size`` bounds how many of the ``n_steps`` path points run in one
    forward/backward (None: all at once; memory grows with it, with the sequence length and with
    the depth of the deepest head, since later layers are not run). ``method`` is captum's
    quadrature ('gausslegendre', 'riemann_trapezoid', ...).

    Runs in the model's dtype with float32 inputs and sums. IG wants fp32 (see the module
    docstring): bf16 rounding adds to the quadrature error; always read ``completeness_error``.
    """
    from captum.attr import IntegratedGradients

    _check_sample(model, sample)
    hs = _check_heads(model, heads)
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps}: integrated gradients needs at least one step (32 or more is usual)")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise ValueError(f"internal_batch_size={internal_batch_size}: use None (all steps at once) or >= 1")
    dtype = hf_model(model).get_input_embeddings().weight.dtype
    if dtype != torch.float32:
        log.info("integrated_gradients on a %s model: completeness is only approximate; load fp32 for a tight check",
                 str(dtype).removeprefix("torch."))
    answer = int(sample.answer_ids[0])
    rms = final_rms(model, sample.input_ids) if hs is not None else None
    f = _target_fn(model, hs, answer, rms)
    emb = _embeddings(model, sample)
    base = _baseline(model, emb, baseline)
    with torch.no_grad():
        f_in = float(f(emb)[0])
        f_base = float(f(base)[0])
    ig = IntegratedGradients(f)
    attr, delta = ig.attribute(emb, baselines=base, n_steps=n_steps, method=method,
                               internal_batch_size=internal_batch_size, return_convergence_delta=True)
    token_attr = attr[0].detach().double().sum(dim=-1).cpu().numpy()
    diff = f_in - f_base
    err = abs(float(token_attr.sum()) - diff) / max(abs(diff), 1e-6)
    return Attribution(token_attr, float(delta.reshape(-1)[0]), f_in, f_base, float(err), sample.id, hs, n_steps,
                       str(dtype).removeprefix("torch."), tuple(sample.needle_span),
                       {"baseline": baseline if isinstance(baseline, (str, int, np.integer)) else "tensor",
                        "method": method, "rms_clean": rms, "answer_id": answer})


@dataclass(frozen=True)
class AttributionTask:
    """:func:`integrated_gradients` of one prompt as a :class:`rh.runner.Task`: a value that travels
    to a replica, runs there (a backward pass: not a row) and sends the :class:`Attribution` back."""

    sample_id: str
    heads: tuple[Head, ...] | None  # None: the answer token's full logit
    n_steps: int
    internal_batch_size: int | None = None  # path points a forward/backward (None: all at once)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        return (self.sample_id,)

    def run(self, model: LoadedModel, by_id: Any) -> Attribution:
        heads = list(self.heads) if self.heads is not None else None
        return integrated_gradients(model, by_id[self.sample_id], heads, n_steps=self.n_steps,
                                    internal_batch_size=self.internal_batch_size)

    def dry(self, model: LoadedModel, by_id: Any) -> tuple[Attribution, int]:
        """A dry run's (:mod:`rh.dry`): a made-up attribution that is complete (so an ``until`` on
        completeness never stops early: the bound), and the token-layers of the passes: the clean
        prompt through every layer for the final norm's scale (with heads), then F at the input and
        the baseline, at the ``n_steps`` path points and twice for captum's convergence delta, each
        through the deepest head's layer (without heads: every layer)."""
        from rh.dry import made_up_array

        sample = by_id[self.sample_id]
        n, layers = len(sample.input_ids), model.shape.n_layers
        if self.heads is None:
            tl = (self.n_steps + 4) * n * layers
        else:
            tl = n * layers + (self.n_steps + 4) * n * (max(h.layer for h in self.heads) + 1)
        attr = made_up_array((n,), self.sample_id, self.n_steps)
        total = float(attr.sum())
        return Attribution(attr, 0.0, total, 0.0, 0.0, sample.id, list(self.heads) if self.heads is not None else None,
                           self.n_steps, "dry run", tuple(sample.needle_span), {"dry": True}), tl


def attribute(model: LoadedModel, samples: Sequence[Sample], heads: Sequence[Any], *, n_steps: int = 32,
              until: Any = None, internal_batch_size: int | None = None) -> list[Attribution]:
    """:func:`integrated_gradients` of each of ``samples``, in order, run by the model's runner
    (:func:`rh.runner.call`): on Ray, on the replicas, as many prompts at a time as replicas. With
    ``until`` (a predicate on an Attribution), no prompt after the first one where it holds is
    attributed (IV-6 stops at the first prompt off completeness): the prompts then run one at a
    time, on Ray as here, so that no executor attributes a prompt another would not (the same
    forwards, the same token-layers). ``internal_batch_size`` bounds the path points run in one
    forward/backward, so the memory (the same token-layers; the gradients summed in other chunks)."""
    from rh.runner import runner_for

    checked = _check_heads(model, heads)
    hs = tuple(checked) if checked is not None else None
    runner = runner_for(model)
    wave = 1 if until is not None else max(1, int(runner.layout.replicas or 1))
    out: list[Attribution] = []
    for c in range(0, len(samples), wave):
        part = list(samples[c:c + wave])
        out += runner.call(part, [AttributionTask(s.id, hs, n_steps, internal_batch_size) for s in part])
        if until is not None and any(until(a) for a in out[c:]):
            break
    return out


# ---------------------------------------------------------------------------- concentration


def needle_mass_ratio(token_attr: Any, needle_span: tuple[int, int]) -> float:
    """Share of the absolute attribution on the needle tokens over the needle's share of tokens:
    ``(sum |attr[s:e]| / sum |attr|) / ((e - s) / len(attr))``. 1 = no concentration."""
    a = np.abs(np.asarray(token_attr, dtype=float))
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"needle_mass_ratio: token_attr must be a non-empty 1-D array (one value per token), "
                         f"got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("needle_mass_ratio: token_attr contains NaN or inf; check the attribution run")
    try:
        s, e = (int(x) for x in needle_span)
    except (TypeError, ValueError):
        raise ValueError(f"needle_mass_ratio: needle_span must be a (start, end) pair, got {needle_span!r}") from None
    n = a.size
    if not (0 <= s < e <= n):
        raise ValueError(f"needle_mass_ratio: needle_span {(s, e)} is outside the sequence of {n} tokens; need "
                         f"0 <= start < end <= {n} (the span of the same sample the attributions belong to)")
    total = a.sum()
    if total == 0:
        raise ValueError("needle_mass_ratio: every attribution is zero, so no share can be computed; check that the "
                         "target depends on the input (heads in the model, F(input) != F(baseline))")
    return float((a[s:e].sum() / total) / ((e - s) / n))


def attribution_concentrates(ratios: Any, *, alpha: float = 0.05, completeness_errors: Any = None,
                             tolerance: float = 0.05, sample_ids: Sequence[str] | None = None,
                             params: dict | None = None, n_boot: int = 10_000, seed: int = 0,
                             min_ratio: float = 2.0) -> Verdict:
    """IV-6: the critical heads' IG attribution concentrates on the needle (needle mass ratio > 1;
    refuted when the ratio is shown below ``min_ratio``, the smallest concentration of interest).

    ``ratios`` holds one :func:`needle_mass_ratio` per sample. Test: one-sided exact sign tests of
    the median ratio (:func:`rh.rules.claims.ratio_rule`, thresholds 1 and ``min_ratio``). Effect =
    log(median ratio) (> 0 as claimed), with a percentile bootstrap CI of the log median over
    samples. Inconclusive when any sample's IG completeness error exceeds ``tolerance`` (the
    attributions do not account for F, so their distribution is not trusted), or when there are
    too few samples for the test to reach ``alpha``. Ratios of exactly 0 (no attribution at all
    on the needle) are floored at 1e-12 before the log, which keeps their rank.
    """
    r = np.asarray(ratios, dtype=float).ravel()
    n = r.size
    ids = list(sample_ids) if sample_ids is not None else [f"#{i}" for i in range(n)]
    if len(ids) != n:
        raise ValueError(f"attribution_concentrates: {len(ids)} sample_ids for {n} ratios; pass one id per ratio")
    if n == 0:
        raise ValueError("attribution_concentrates: ratios is empty; pass one needle_mass_ratio per sample")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError("attribution_concentrates: ratios must be finite and >= 0 (needle_mass_ratio's output)")
    base_params = {"tolerance": tolerance, **(params or {})}
    eff_name = "log(median needle mass ratio); > 0 as claimed"
    details: dict[str, Any] = {"ratios": [round(float(x), 4) for x in r]}
    if completeness_errors is not None:
        ce = np.asarray(completeness_errors, dtype=float).ravel()
        if ce.size != n:
            raise ValueError(f"attribution_concentrates: {ce.size} completeness_errors for {n} ratios; pass one per "
                             "sample (Attribution.completeness_error), in the same order")
        details["completeness_errors"] = [float(x) for x in ce]
        bad = [i for i in range(n) if not (ce[i] <= tolerance)]
        if bad:
            worst = max(bad, key=lambda i: ce[i] if math.isfinite(ce[i]) else math.inf)
            listed = ", ".join(f"{ids[i]} ({ce[i]:.3g})" for i in bad[:10])
            from rh.rules.claims import inconclusive, ratio_power

            return inconclusive(
                CLAIM, base_params,
                f"IG completeness fails on {len(bad)} of {n} samples beyond tolerance {tolerance:g}: {listed}"
                f"{' ...' if len(bad) > 10 else ''}; worst {ids[worst]} off by {ce[worst]:.3g} of F(x) - F(baseline)."
                " Use more n_steps or an fp32 model", TEST_NAME, alpha, n, {**details, "failed": [ids[i] for i in bad]},
                min_effect=min_ratio, effect_name=eff_name,
                power=ratio_power(r, support_ratio=1.0, refute_ratio=min_ratio, alpha=alpha))
    from rh.rules.claims import ratio_rule

    return ratio_rule(CLAIM, r, support_ratio=1.0, refute_ratio=min_ratio, alpha=alpha, params=base_params,
                      test=TEST_NAME + f"; refuted when shown below {min_ratio:g}x", effect_name=eff_name,
                      describe="the heads' |IG attribution| per needle token over its uniform share",
                      details=details)
