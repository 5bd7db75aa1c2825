"""Step 1 of seed 000 as one call: identify heads on a split, through the provenance-keyed cache.

The pytest plugin and ``python -m rh identify`` both go through :func:`cached_identification`,
so a ranking computed by one is found by the other.
"""

from __future__ import annotations

import hashlib
import json
import io
import zipfile
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rh.io import atomic_write_bytes, atomic_write_json
from rh.models import LoadedModel
from rh.niah import PROMPT_VERSION, Sample, Sweep
from rh.rankings import Ranking, cache_path, cached_ranking
from rh.scoring import METHODS, QRHeadOptions, SampleScores, Wu24Options, aggregate, score_samples

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "fixtures" / "rankings"


def ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def identification_dtype(model: LoadedModel) -> str:
    """The dtype rankings are computed in: float32 for an unquantized model on the CPU, whatever dtype
    the session runs in, so that a ranking (and so every verdict built on it) does not depend on
    whether this CPU multiplies bf16 natively; elsewhere (CUDA, quantized) the model's own dtype."""
    prov = model.provenance
    if prov.get("quant", "none") == "none" and model.device.type in ("cpu", "meta"):
        return "float32"
    return str(prov["dtype"])


def identification_model(model: LoadedModel, dtype: str) -> LoadedModel:
    """``model`` itself when it runs in ``dtype``, else the same weights loaded again in ``dtype``
    (once per session: kept on ``model``). Only a cache miss on a bf16 CPU session needs this."""
    from rh.dry import is_dry

    if model.provenance["dtype"] == dtype or is_dry():  # a dry run counts the passes, in any dtype the same
        return model
    return _loaded_again(model, dtype, f"identification runs in {dtype}", dtype=dtype, device="cpu")


def _loaded_again(model: LoadedModel, key: str, why: str, **load: Any) -> LoadedModel:
    """The weights of ``model`` loaded again with ``load`` (kept as ``model.twins[key]``), the same
    revision, with every counter of ``model`` attached: its passes are this session's (billed, and
    the progress lines go on)."""
    twin = model.twins.get(key)
    if twin is None:
        from rh.models import load_model

        source = model.spec.source if model.spec.kind in ("hub", "local") else model.key
        log.info("%s: loading %s again (%s)", why, model.key, ", ".join(f"{k}={v}" for k, v in load.items()))
        twin = load_model(source, **load)
        if twin.provenance["revision"] != model.provenance["revision"]:
            raise RuntimeError(f"{model.key} loaded again ({why}) has revision {twin.provenance['revision']}, "
                               f"not {model.provenance['revision']}: the weights changed during the session")
        model.twins[key] = twin
    from rh.budget import counters_of

    for counter in counters_of(model.model):
        if counter not in counters_of(twin.model):
            counter.attach(twin.model)
    return twin


def ranking_provenance(
    model: LoadedModel,
    sweep: Sweep,
    method: str,
    identify_samples: Sequence[Sample],
    *,
    identify_frac: float,
    split_seed: int,
    options: Wu24Options | QRHeadOptions | None = None,
) -> dict[str, Any]:
    """Everything that determines a ranking's content: the cache key is derived from it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    tasks = sorted({s.task for s in identify_samples}) if identify_samples else list(sweep.tasks)
    prov: dict[str, Any] = {
        "model_id": model.provenance["model_id"], "revision": model.provenance["revision"],
        "dtype": identification_dtype(model), "quant": model.provenance["quant"],
        "shape": model.shape.as_dict(), "method": method, "tasks": tasks, "prompt_version": PROMPT_VERSION,
        "lengths": list(sweep.lengths), "depths": list(sweep.depths), "n_per_setting": sweep.n_per_setting,
        "identify_frac": identify_frac, "split_seed": split_seed, "sample_seed": sweep.seed,
        "chat": model.instruct, "identify_ids_hash": ids_hash([s.id for s in identify_samples]),
    }
    if method == "wu24":
        prov["wu24"] = asdict(options or Wu24Options())
        from rh.models import attention_features

        cfg = getattr(getattr(model, "model", None), "config", None)
        if cfg is not None and any(f.startswith("sliding window") for f in attention_features(cfg)["features"]):
            # a sliding layer's top-1 is read at the window's own prompt position since 1e2d339: Wu24
            # rankings of such models cached before it credited the wrong heads, and are keyed apart
            prov["wu24_sliding_positions"] = 2
    if method == "qrhead":  # its options change what it scores: part of the cache key
        prov["qrhead"] = asdict(options if isinstance(options, QRHeadOptions) else QRHeadOptions())
    return prov


def cached_identification(
    model: LoadedModel,
    identify_samples: Sequence[Sample],
    provenance: dict[str, Any],
    *,
    cache_dir: str | Path = DEFAULT_CACHE,
    recompute: bool = False,
    options: Wu24Options | QRHeadOptions | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Ranking, Path, bool]:
    """The ranking for ``provenance``: loaded from the cache, or computed (checkpointed beside the
    cache file, so a killed run resumes) and stored. Returns ``(ranking, path, hit)``."""
    path = cache_path(cache_dir, provenance)
    checkpoint = path.with_suffix(".partial.json")
    refused = path.with_suffix(".refused.json")  # these prompts gave no ranking: remembered, not rescored
    if refused.exists() and not recompute:
        try:
            reason = json.loads(refused.read_text())["reason"]
        except (ValueError, KeyError, TypeError, OSError):
            reason = None
        if reason:
            raise ValueError(f"{reason} (found in {refused.name}; --recompute scores the samples again)")

    def compute() -> Ranking:
        t0 = time.perf_counter()
        scorer = identification_model(model, provenance["dtype"])
        scored = score_samples(scorer, identify_samples, provenance["method"], options=options,
                               batch_size=batch_size, checkpoint=checkpoint, progress=progress)
        try:
            ranking = aggregate(model.shape, identify_samples, scored, provenance=provenance)
        except ValueError as exc:  # e.g. Wu24 on a model that retrieves nothing: no scores file, the refusal kept
            atomic_write_json(refused, {"reason": str(exc), "provenance": provenance})
            raise
        refused.unlink(missing_ok=True)
        save_sample_scores(samples_path(path), scored)
        ranking.provenance["runtime_s"] = round(time.perf_counter() - t0, 2)
        return ranking

    return cached_ranking(cache_dir, provenance, compute, shape=model.shape, recompute=recompute)


def with_sample_scores(get, recompute: bool = False) -> tuple[Ranking, Path, bool, SampleScores]:
    """``get(recompute)`` (a cached ranking: ``(ranking, path, hit)``) with the per-sample scores
    stored beside it; an entry cached without them (before they were kept, or with the file lost) is
    computed once more so that they are."""
    r, path, hit = get(recompute)
    scored = load_sample_scores(path)
    if scored is None:
        r, path, hit = get(True)
        scored = load_sample_scores(path)
    return r, path, hit, scored


def samples_path(ranking_path: str | Path) -> Path:
    """Where a cached ranking's per-sample scores live (beside it, ``.samples.npz``)."""
    return Path(ranking_path).with_suffix(".samples.npz")


def save_sample_scores(path: str | Path, scored: SampleScores) -> Path:
    """Per-sample head scores as a compressed ``.npz`` (ids, scores, counted), written atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, method=np.array(scored.method), ids=np.array(scored.ids), scores=scored.scores,
                        counted=scored.counted)
    return atomic_write_bytes(path, buf.getvalue())


def load_sample_scores(ranking_path: str | Path) -> SampleScores | None:
    """The per-sample scores stored beside a cached ranking, or None (e.g. an external ranking)."""
    path = samples_path(ranking_path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return SampleScores(str(z["method"]), [str(x) for x in z["ids"]], z["scores"], z["counted"],
                                [{} for _ in z["ids"]])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"the per-sample scores {str(path)!r} are unreadable ({type(exc).__name__}: {exc}): rerun "
                         "with --recompute (or delete the file) to score the samples again") from None
