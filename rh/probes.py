"""Linear probes on the residual stream (claim IV-5: "the answer becomes linearly decodable at or
after the critical heads' layers").

:func:`last_token_residuals` reads the residual stream at the last prompt token after every
decoder layer, :func:`layer_probes` fits a cross-validated linear probe per residual index that
predicts the first answer token, and :func:`decodable_after_heads` turns the per-layer accuracies
into a :class:`~rh.rules.verdict.Verdict` by comparing the first decodable index with the critical heads'
layers.

Residual indices: index 0 is the input of layer 0 (the token embeddings), index ``l + 1`` the
residual after decoder layer ``l``. A head in layer ``L`` first writes into index ``L + 1``.
Every index is the *un-normed* residual: transformers' ``output_hidden_states`` replaces its last
entry by the final norm's output (``capture_outputs(tie_last_hidden_states=True)`` in
transformers 5), so the residuals are read with hooks on the decoder layers instead, which also
keeps only the last column rather than every position of every layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rh.models import LoadedModel, decoder_layers, hf_model
from rh.niah import Sample
from rh.recording import reading, recording, resid_post, resid_pre
from rh.rules.verdict import Power, Verdict
from rh.stats import holm, min_attainable_p_binomial

log = logging.getLogger(__name__)

CLAIM = "IV-5"
TEST_NAME = ("cross-validated linear probe per residual index (StandardScaler + L2 logistic regression), exact "
             "one-sided binomial test of its hits against the majority-class rate, Holm across indices")


# ---------------------------------------------------------------------------- residuals


def last_token_residuals(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8,
                         progress: bool = True) -> np.ndarray:
    """The residual stream at each sample's last prompt token, before layer 0 and after every layer.

    Returns ``[n_samples, n_layers + 1, hidden]`` float32 in the order of ``samples``: index 0 is
    the input of layer 0 (the embeddings), index ``l + 1`` the output of decoder layer ``l``,
    none of them passed through the final norm (unlike ``output_hidden_states``' last entry).
    Samples are left-padded per batch (:func:`rh.batching.make_batches`), so the last prompt
    token is the last column; only the prompt is run (no answer tokens), ``logits_to_keep=1``.
    """
    from rh.batching import make_batches

    samples = list(samples)
    if not samples:
        raise ValueError("last_token_residuals: samples is empty; pass at least one Sample")
    n_layers = len(decoder_layers(model))
    hidden = int(hf_model(model).config.hidden_size)
    out = np.zeros((len(samples), n_layers + 1, hidden), dtype=np.float32)
    # rows of a batch back to positions in `samples` (make_batches reorders by length)
    slots: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        slots.setdefault(id(s), []).append(i)

    sites = [resid_pre(0), *(resid_post(layer) for layer in range(n_layers))]  # index i: the input of layer i
    n_batches = math.ceil(len(samples) / batch_size)
    bar = tqdm(make_batches(samples, batch_size, model.tokenizer.pad_token_id), total=n_batches,
               desc="residuals", unit="batch", disable=not progress, leave=False)
    with recording(model, sites, keep=lambda x: x[:, -1].float().cpu()) as seen:
        for batch in bar:
            seen.clear()
            with torch.no_grad():
                hf_model(model)(**batch.model_inputs(model.device), logits_to_keep=1, use_cache=False)
            stack = torch.stack([seen[s] for s in sites], dim=1).numpy()  # [b, n_layers+1, hidden]
            for row, s in enumerate(batch.samples):
                out[slots[id(s)].pop(0)] = stack[row]
    return out


@contextlib.contextmanager
def residual_reading(model: LoadedModel) -> Iterator[dict[str, np.ndarray]]:
    """Within the block, every batch forward run inside :func:`rh.batching.running` (a clean
    prompt-only packet, :func:`rh.units.run_prompts`, or a teacher-forced one: prompt + answer but
    its last token, rows left-padded to end together) records, per prompt, the residual stream at
    its last prompt token before layer 0 and after every layer: ``{sample id: [(n_layers + 1) *
    hidden]}`` float32, what :func:`last_token_residuals` gives for that prompt, flattened.

    The position read is ``pad + len(input_ids) - 1`` of the prompt's batch row: under causal
    attention any answer tokens after it change nothing at it, and left padding gives every real
    token its own position (``rh.batching``)."""
    from rh.batching import last_prompt_positions, running_batch

    n_layers = len(decoder_layers(model))
    hidden = int(hf_model(model).config.hidden_size)
    sites = [resid_pre(0), *(resid_post(layer) for layer in range(n_layers))]  # index i: the input of layer i
    out: dict[str, np.ndarray] = {}

    def read_at(index: int):
        def fn(x: torch.Tensor) -> None:
            batch = running_batch(x.shape[1], "residual_reading")
            pos = torch.tensor(last_prompt_positions(x.shape[1], "residual_reading"), device=x.device)
            rows = x.detach()[torch.arange(x.shape[0], device=x.device), pos].float().cpu().numpy()
            for r, s in enumerate(batch.samples):
                row = out.setdefault(s.id, np.full((n_layers + 1) * hidden, np.nan, dtype=np.float32))
                row[index * hidden:(index + 1) * hidden] = rows[r]
        return fn

    with reading(model, {site: read_at(i) for i, site in enumerate(sites)}):
        yield out


@dataclass(frozen=True)
class ResidualReading:
    """IV-5's residual streams as a :class:`rh.runner.Reading`: the value that travels to a
    replica with a baseline's packets and opens :func:`residual_reading` there. ``(n_layers + 1) *
    hidden`` numbers a prompt (17,856 on SmolLM2-135M, 663,552 on a 70B Llama) are too many to keep
    in the results store (``stored = False``): a resumed run reads them again with their rows."""

    n_layers: int
    hidden: int
    #: bump when what a row's values mean changes
    version: int = 1
    stored = False

    @classmethod
    def of(cls, model: LoadedModel) -> ResidualReading:
        return cls(len(decoder_layers(model)), int(hf_model(model).config.hidden_size))

    @property
    def width(self) -> int:
        return (self.n_layers + 1) * self.hidden

    def key(self) -> str:
        return f"residual_last_prompt_token/v{self.version}:{self.n_layers}x{self.hidden}"

    def stacked(self, got: Mapping[str, Any], samples: Sequence[Sample]) -> np.ndarray:
        """The values read, ``{id: [(n_layers + 1) * hidden]}``, as :func:`last_token_residuals`
        returns them: ``[len(samples), n_layers + 1, hidden]`` float32, in the order of ``samples``."""
        return np.stack([np.asarray(got[s.id], dtype=np.float32).reshape(self.n_layers + 1, self.hidden)
                         for s in samples])

    def open(self, model: LoadedModel) -> contextlib.AbstractContextManager[dict[str, np.ndarray]]:
        got = ResidualReading.of(model)
        if (got.n_layers, got.hidden) != (self.n_layers, self.hidden):
            raise ValueError(f"a residual reading of {self.n_layers} layers x {self.hidden} opened on a model of "
                             f"{got.n_layers} x {got.hidden}")
        return residual_reading(model)


def read_residuals(model: LoadedModel, samples: Sequence[Sample], *, batch_size: int = 8) -> np.ndarray:
    """What :func:`last_token_residuals` returns, ``[n_samples, n_layers + 1, hidden]`` float32,
    read (:class:`ResidualReading`) in the same clean prompt-only forwards, run as work units by the
    model's runner (:func:`rh.runner.read_prompts`): on Ray replicas they run there."""
    from rh.runner import read_prompts

    samples = list(samples)
    if not samples:
        raise ValueError("read_residuals: samples is empty; pass at least one Sample")
    rd = ResidualReading.of(model)
    return rd.stacked(read_prompts(model, samples, rd, batch_size=batch_size), samples)


def baseline_residuals(model: LoadedModel, samples: Sequence[Sample], *,
                       batch_size: int = 8) -> tuple[pd.DataFrame, np.ndarray]:
    """The unablated outcomes of ``samples`` (the baseline unit: the forwards
    :func:`rh.causal.evaluate_baseline` runs, in its batches) and, read in those very forwards
    (:class:`ResidualReading` at the last prompt token of each teacher-forced row), what
    :func:`read_residuals` gives: ``[n_samples, n_layers + 1, hidden]`` float32, with no pass of its
    own. The residuals are not kept in the store (``ResidualReading.stored``), so the rows are
    computed even where the store has them: call it where the baseline is computed."""
    from rh.ablation import Ablation
    from rh.runner import read_one

    samples = list(samples)
    if not samples:
        raise ValueError("baseline_residuals: samples is empty; pass at least one Sample")
    rd = ResidualReading.of(model)
    frame, got = read_one(model, samples, Ablation.baseline(), rd, batch_size=batch_size)
    return frame, rd.stacked(got, samples)


def answer_labels(samples: Sequence[Sample]) -> np.ndarray:
    """The first gold answer token id of every sample, ``[n_samples]`` int64: the probe's target."""
    empty = [s.id for s in samples if not s.answer_ids]
    if empty:
        raise ValueError(f"answer_labels: samples {empty[:5]} have no answer tokens; build them with rh.niah")
    return np.array([int(s.answer_ids[0]) for s in samples], dtype=np.int64)


# ---------------------------------------------------------------------------- probes


def _probe(C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def layer_probes(features: Any, labels: Any, *, folds: int = 5, seed: int = 0, C: float = 1.0,
                 max_iter: int = 5000, progress: bool = True) -> pd.DataFrame:
    """A cross-validated linear probe per residual index: can ``features[:, i]`` predict ``labels``?

    ``features`` is ``[n_samples, n_indices, hidden]`` (from :func:`last_token_residuals`),
    ``labels`` ``[n_samples]`` (from :func:`answer_labels`). Classes with a single member cannot
    be both trained on and tested, so they are dropped (with a logged warning); ``folds`` is
    lowered to the smallest remaining class count, and at least 2 folds are used. The probe is
    ``StandardScaler`` then L2 logistic regression (``C``), fit in float64 on stratified, shuffled
    (``seed``) folds; every kept sample is predicted once, by the probe not trained on it.

    One row per residual index: ``layer`` (the index), ``accuracy``, ``n``, ``n_correct``,
    ``chance`` (the majority-class frequency, what a constant predictor gets), ``p_value`` (exact
    one-sided binomial test of ``n_correct`` out of ``n`` against ``chance``), ``n_classes`` and
    ``folds``. With fewer than two classes of two or more members nothing can be probed: the rows
    have NaN accuracy and p = 1 (and :func:`decodable_after_heads` says inconclusive).
    """
    from scipy.stats import binomtest
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X = np.asarray(features)
    y = np.asarray(labels)
    if X.ndim != 3:
        raise ValueError(f"layer_probes: features must be [n_samples, n_indices, hidden], got shape {X.shape}; "
                         "pass the output of last_token_residuals")
    if y.ndim != 1:
        raise ValueError(f"layer_probes: labels must be 1-D [n_samples], got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"layer_probes: features has {len(X)} samples but labels has {len(y)}; pass one label "
                         "per sample, in the same order (answer_labels(samples) for last_token_residuals(model, "
                         "samples))")
    if folds < 2:
        raise ValueError(f"layer_probes: folds={folds}; cross-validation needs at least 2")
    if not np.isfinite(X).all():
        raise ValueError("layer_probes: features contain NaN or inf; check the model's dtype (fp16 overflow?)")

    classes, counts = np.unique(y, return_counts=True)
    singles = classes[counts < 2]
    if len(singles):
        log.warning("layer_probes: dropping %d sample(s) whose label occurs once (%s): a class needs 2 members "
                    "to be both trained on and tested", len(singles), ", ".join(map(str, singles[:10])))
    keep = ~np.isin(y, singles)
    X, y = X[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True)
    n = len(y)
    n_idx = X.shape[1]
    if len(classes) < 2:
        log.warning("layer_probes: %d class(es) with 2+ members after dropping singletons; nothing to probe",
                    len(classes))
        chance = 1.0 if n else float("nan")
        return pd.DataFrame({"layer": np.arange(n_idx), "accuracy": np.nan, "n": n, "n_correct": 0,
                             "chance": chance, "p_value": 1.0, "n_classes": len(classes), "folds": 0})
    k = max(2, min(int(folds), int(counts.min())))
    if k < folds:
        log.info("layer_probes: %d folds instead of %d (the smallest class has %d members)", k, folds, counts.min())
    chance = float(counts.max() / n)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    rows = []
    unconverged = 0
    for i in tqdm(range(n_idx), desc="probes", unit="layer", disable=not progress, leave=False):
        Xi = X[:, i].astype(np.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            pred = cross_val_predict(_probe(C, max_iter, seed), Xi, y, cv=cv)
        unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        n_correct = int((pred == y).sum())
        p = float(binomtest(n_correct, n, chance, alternative="greater").pvalue)
        rows.append({"layer": i, "accuracy": n_correct / n, "n": n, "n_correct": n_correct, "chance": chance,
                     "p_value": min(1.0, p), "n_classes": len(classes), "folds": k})
    if unconverged:
        log.warning("layer_probes: %d probe fit(s) did not converge in max_iter=%d; raise max_iter", unconverged,
                    max_iter)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- verdict


def layer_indices(critical_layers: Any) -> list[int]:
    """Layer indices of ``critical_layers``: layer numbers or the critical Heads themselves."""
    out = []
    for x in critical_layers:
        layer = getattr(x, "layer", x)  # a Head or a layer index
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"critical_layers: {x!r} is neither a layer index nor a Head; pass e.g. [14, 16] or "
                             "the critical Heads themselves")
        out.append(int(layer))
    return out


def probe_power(n: int, chance: float, margin: float, *, early: int, late: int, alpha: float) -> Power:
    """IV-5's power, exact for independent indices (binomial): P(supported) with every early index at
    chance and every late one at chance + 2δ (each early index shown below chance + δ at α, and the
    best late one above chance at α / late, Holm's first step); P(refuted) with every early index at
    chance + 2δ (one shown above chance + δ at α / early). Indices that share prompts are positively
    correlated, which raises the support side's intersection (the calibration's worst shapes are in
    ``python -m rh calibrate``, family IV-5)."""
    from scipy.stats import binom

    bound, alt = chance + margin, min(1.0, chance + 2 * margin)
    ks = np.arange(n + 1)
    below = ks[binom.cdf(ks, n, bound) < alpha]  # hits that show an early index below chance + δ
    p_early = float(binom.cdf(below.max(), n, chance)) ** early if below.size else (1.0 if early == 0 else 0.0)
    p_late = 0.0
    if late:
        over = ks[binom.sf(ks - 1, n, chance) < alpha / late]  # hits that show a late index above chance
        p_one = float(binom.sf(over.min() - 1, n, alt)) if over.size else 0.0
        p_late = 1.0 - (1.0 - p_one) ** late
    p_ref = 0.0
    if early:
        over = ks[binom.sf(ks - 1, n, bound) < alpha / early]  # hits that show an early index above chance + δ
        p_one = float(binom.sf(over.min() - 1, n, alt)) if over.size else 0.0
        p_ref = 1.0 - (1.0 - p_one) ** early
    return Power(p_early * p_late, 0.0, p_ref, 2 * margin, "exact binomial (indices independent)",
                 f"support: the {early} early indices at chance {chance:.2f}, the {late} late ones at chance + "
                 f"{2 * margin:g}; refute: every early index at chance + {2 * margin:g} (effects in accuracy above "
                 "chance)")


def decodable_after_heads(df: pd.DataFrame, critical_layers: Sequence[int], *, alpha: float = 0.05,
                          margin: float = 0.1, params: dict | None = None) -> Verdict:
    """IV-5: the answer becomes linearly decodable at or after the critical heads' layers, and not
    before them.

    ``df`` is :func:`layer_probes`' table (rows = residual indices 0..n_layers), ``critical_layers``
    the layers of the critical heads (ints, or Heads). A head in layer L first writes into index
    L + 1, so the indices split into *early* ones (before the first critical head writes) and
    *late* ones. With ``margin`` = δ, the accuracy above chance that counts as decodable, and exact
    binomial tests of each index's held-out accuracy:

    * supported: some late index decodes above chance (Holm across the late indices) **and** every
      early index is shown below chance + δ (an intersection-union test: each at α, p = the
      largest). Not finding early decoding is not enough: the early layers must be shown not to
      decode, so few samples give *inconclusive*, never a silent support;
    * refuted: some early index decodes above chance + δ (Holm across the early indices): the
      answer was decodable before any critical head wrote to the residual stream;
    * inconclusive otherwise, with the reason (nothing decodes after the first write, or the early
      layers could be shown neither below nor above chance + δ, or too few samples for any test).

    Effect = onset - (min critical layer + 1), where the onset is the first index decoding above
    chance (Holm across all indices): >= 0 is as claimed, negative points the other way.
    """
    need = {"layer", "accuracy", "n", "n_correct", "chance", "p_value"}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"decodable_after_heads: df lacks columns {sorted(missing)}; pass layer_probes' output")
    if len(df) < 2:
        raise ValueError(f"decodable_after_heads: df has {len(df)} row(s); need one per residual index (n_layers + 1)")
    df = df.sort_values("layer").reset_index(drop=True)
    idx = df["layer"].to_numpy(int)
    if not np.array_equal(idx, np.arange(len(df))):
        raise ValueError(f"decodable_after_heads: df's layer column must be 0..{len(df) - 1} once each, got "
                         f"{idx.tolist()}")
    n_layers = len(df) - 1
    crit = sorted(set(layer_indices(critical_layers)))
    if not crit:
        raise ValueError("decodable_after_heads: critical_layers is empty; pass the layers of the critical heads")
    bad = [c for c in crit if not 0 <= c < n_layers]
    if bad:
        raise ValueError(f"decodable_after_heads: critical layers {bad} are outside the model's layers "
                         f"0..{n_layers - 1} (df has {n_layers + 1} residual indices)")
    first_write = crit[0] + 1
    acc = df["accuracy"].to_numpy(float)
    chance = float(df["chance"].iloc[0])
    n = int(df["n"].iloc[0])
    m = len(df)
    base_params = dict(params or {})  # the critical layers depend on the ranking: they go in details
    details = {"accuracy": [None if math.isnan(a) else round(float(a), 4) for a in acc], "chance": chance,
               "onset": None, "critical_layers": crit, "first_write_index": first_write, "n_indices": m}

    power = Power.none("no probe decodes anything (fewer than two answer tokens with two samples each)")

    def _inconclusive(reason: str, p_adj: list[float] | None = None) -> Verdict:
        if p_adj is not None:
            details["p_adjusted"] = [float(p) for p in p_adj]
        from rh.rules.claims import inconclusive

        return inconclusive(CLAIM, base_params, reason, TEST_NAME, alpha, n, details, min_effect=margin,
                            effect_name="onset index - (min critical layer + 1)", power=power)

    if np.isnan(acc).all():
        return _inconclusive("the labels have fewer than two answer tokens with two or more samples each: "
                             "there is nothing for a probe to decode")
    if 0.0 < margin < 1.0 - chance:
        power = probe_power(n, chance, margin, early=first_write, late=m - first_write, alpha=alpha)
    min_p = min_attainable_p_binomial(n, chance, "greater") if 0 < chance < 1 else 1.0
    if min_p >= alpha / m:
        return _inconclusive(f"{n} samples at chance {chance:.3f} cannot reach p < alpha/{m} = {alpha / m:.2g} with "
                             f"an exact binomial test even at 100% accuracy (smallest p {min_p:.2g}); use more samples")
    if not 0.0 < margin < 1.0 - chance:
        raise ValueError(f"decodable_after_heads: margin={margin!r} must lie in (0, 1 - chance = {1 - chance:.3f})")
    from scipy.stats import binom

    hits = df["n_correct"].to_numpy(float)
    p_raw = df["p_value"].to_numpy(float)  # H0: accuracy <= chance
    p_adj = holm(p_raw.tolist())
    bound = chance + margin
    # per index, the exact binomial tests against chance + δ: below it (H0 >= bound) and above it (H0 <= bound)
    p_below = [float(binom.cdf(k, n, bound)) if np.isfinite(k) else 1.0 for k in hits]
    p_over = [float(binom.sf(k - 1, n, bound)) if np.isfinite(k) else 1.0 for k in hits]
    early, late = list(range(first_write)), list(range(first_write, m))
    late_adj = dict(zip(late, holm([float(p_raw[i]) for i in late]))) if late else {}
    early_over = dict(zip(early, holm([p_over[i] for i in early]))) if early else {}
    sig = [i for i in range(m) if p_adj[i] < alpha]
    onset = sig[0] if sig else None
    details.update({"onset": onset, "p_adjusted": [float(p) for p in p_adj], "significant_indices": sig,
                    "margin": margin, "p_below_margin": [round(p, 6) for p in p_below],
                    "early_indices": len(early)})
    common = dict(claim=CLAIM, params=base_params, test=TEST_NAME + f"; early indices against chance + {margin:g}",
                  ci=None, n=n, alpha=alpha, details=details, min_effect=margin, power=power,
                  statistic=float(onset) if onset is not None else None,
                  effect=float(onset - first_write) if onset is not None else None,
                  effect_name="onset index - (min critical layer + 1); >= 0 as claimed")
    refuting = [i for i in early if early_over[i] < alpha]
    if refuting:
        i = refuting[0]
        return Verdict(status="refuted", p_value=p_over[i], p_adjusted=early_over[i], reason=(
            f"the answer is decodable at residual index {i} (after layer {i - 1}), before index {first_write} where "
            f"the first critical head (layer {crit[0]}) writes: accuracy {acc[i]:.2f}, above chance {chance:.2f} + "
            f"{margin:g} (adjusted p {early_over[i]:.3g})"), **common)
    decodes = [i for i in late if late_adj[i] < alpha]
    if not decodes:
        best = int(np.nanargmax(acc))
        return _inconclusive(
            f"no residual index from {first_write} on decodes the answer above chance after Holm (best of all: "
            f"index {best}, accuracy {acc[best]:.2f} vs chance {chance:.2f}, adjusted p {p_adj[best]:.3g}): the "
            "claim cannot be tested", p_adj)
    worst = max(early, key=lambda i: p_below[i]) if early else None
    p_early = p_below[worst] if worst is not None else 0.0
    j = decodes[0]
    p_sup = max(late_adj[j], p_early)
    where = (f"decodable from residual index {j} on (accuracy {acc[j]:.2f} vs chance {chance:.2f}, adjusted p "
             f"{late_adj[j]:.3g})")
    if p_early < alpha:
        shown = (f"and every index before {first_write} is shown below chance + {margin:g} (largest p {p_early:.3g}, "
                 f"index {worst})" if early else f"and no index precedes the first write at {first_write}")
        return Verdict(status="supported", p_value=p_sup, p_adjusted=p_sup,
                       reason=f"{where}, {shown}: the critical heads (first at layer {crit[0]}) come first", **common)
    return _inconclusive(
        f"{where}, but index {worst} (before the first critical head writes at {first_write}) cannot be shown below "
        f"chance + {margin:g}: accuracy {acc[worst]:.2f}, p {p_early:.3g} with {n} samples; not finding decoding "
        "there is not showing its absence (more samples would)", p_adj)
