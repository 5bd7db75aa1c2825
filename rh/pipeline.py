"""Step 1 of seed 000 as one call: identify heads on a split, through the provenance-keyed cache.

The pytest plugin and ``python -m rh identify`` both go through :func:`cached_identification`,
so a ranking computed by one is found by the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rh.models import LoadedModel
from rh.niah import PROMPT_VERSION, Sample, Sweep
from rh.rankings import Ranking, cache_path, cached_ranking
from rh.scoring import METHODS, Wu24Options, identify

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "fixtures" / "rankings"


def ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def ranking_provenance(
    model: LoadedModel,
    sweep: Sweep,
    method: str,
    identify_samples: Sequence[Sample],
    *,
    identify_frac: float,
    split_seed: int,
    options: Wu24Options | None = None,
) -> dict[str, Any]:
    """Everything that determines a ranking's content: the cache key is derived from it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    tasks = sorted({s.task for s in identify_samples}) if identify_samples else list(sweep.tasks)
    prov: dict[str, Any] = {
        "model_id": model.provenance["model_id"], "revision": model.provenance["revision"],
        "dtype": model.provenance["dtype"], "quant": model.provenance["quant"],
        "shape": model.shape.as_dict(), "method": method, "tasks": tasks, "prompt_version": PROMPT_VERSION,
        "lengths": list(sweep.lengths), "depths": list(sweep.depths), "n_per_setting": sweep.n_per_setting,
        "identify_frac": identify_frac, "split_seed": split_seed, "sample_seed": sweep.seed,
        "chat": model.instruct, "identify_ids_hash": ids_hash([s.id for s in identify_samples]),
    }
    if method == "wu24":
        prov["wu24"] = asdict(options or Wu24Options())
    return prov


def cached_identification(
    model: LoadedModel,
    identify_samples: Sequence[Sample],
    provenance: dict[str, Any],
    *,
    cache_dir: str | Path = DEFAULT_CACHE,
    recompute: bool = False,
    options: Wu24Options | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Ranking, Path, bool]:
    """The ranking for ``provenance``: loaded from the cache, or computed (checkpointed beside the
    cache file, so a killed run resumes) and stored. Returns ``(ranking, path, hit)``."""
    checkpoint = cache_path(cache_dir, provenance).with_suffix(".partial.json")
    return cached_ranking(
        cache_dir, provenance,
        lambda: identify(model, identify_samples, provenance["method"], options=options, provenance=provenance,
                         batch_size=batch_size, checkpoint=checkpoint, progress=progress),
        shape=model.shape, recompute=recompute,
    )
