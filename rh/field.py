"""The mechanisms behind the claims the field relies on beyond the seeds (CLAIMS.md): the forward
passes that gather ID-7's, CA-7's and CA-8's outcomes, for :mod:`rh.rules.field` to decide.

Each function takes the loaded model, the session's ranking and the profile, and is what
``claims/test_field.py`` calls, so a team can run the same checks in its own repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rh.heads import Head, HeadShape
from rh.models import LoadedModel
from rh.niah import Sample
from rh.seeds import prompt_seed

__all__ = ["flat_index", "identification_scores", "distractor_samples", "distractor_answers", "distractor_verdicts",
           "compression_verdicts"]


def flat_index(heads: Sequence[Head], shape: HeadShape) -> np.ndarray:
    """Heads as flat indices ``layer * n_heads + head`` (the order of a flattened score grid)."""
    return np.array([h.layer * shape.n_heads + h.head for h in heads], dtype=int)


def content_free_settings(profile: Any) -> dict[str, Any]:
    """The random sequences ID-7's echo and induction scores are read on: their number, their block
    length and their seed (the run and ``--plan``'s cache lookup take them from here)."""
    return {"n_sequences": profile.content_free_n, "seq_len": profile.content_free_len,
            "seed": prompt_seed(profile.sample_seed, "content_free")}


def identification_scores(model: LoadedModel, samples: Sequence[Sample], profile: Any, *, cache_dir: Any = None,
                          recompute: bool = False, identify: Any = None) -> dict[str, Any]:
    """Per-input head scores (:class:`rh.scoring.SampleScores`) of each method in
    ``profile.id_methods``: ``qrhead`` on ``samples`` (the identification prompts sum attention
    ranked on), ``echo`` and ``induction`` on random repeated tokens (one capture gives both).

    With ``cache_dir`` they go through the ranking cache as the rankings do, identified in the same
    dtype (float32 on the CPU): ``identify(samples, method, with_scores=True)`` (the plugin's
    ``identify_ranking``) for qrhead, :func:`rh.content_free.cached_content_free_scores` for the
    content-free scores. Without it they are computed on ``model`` as it is."""
    from rh.content_free import cached_content_free_scores, content_free_scores
    from rh.scoring import score_samples

    methods = tuple(profile.id_methods)
    unknown = [m for m in methods if m not in ("qrhead", "echo", "induction")]
    if unknown:
        raise ValueError(f"id_methods={methods}: unknown method(s) {unknown}; use qrhead, echo, induction")
    out: dict[str, Any] = {}
    if "qrhead" in methods:
        if identify is not None:
            out["qrhead"] = identify(samples, "qrhead", with_scores=True)[3]
        else:
            out["qrhead"] = score_samples(model, samples, "qrhead", batch_size=profile.batch_size, progress=False)
    free = tuple(m for m in methods if m in ("echo", "induction"))
    if free:
        kwargs = dict(content_free_settings(profile), batch_size=profile.batch_size)
        if cache_dir is not None:
            out.update(cached_content_free_scores(model, free, cache_dir=cache_dir, recompute=recompute, **kwargs))
        else:
            out.update(content_free_scores(model, free, **kwargs))
    return out


def distractor_samples(model: LoadedModel, profile: Any) -> list[Sample]:
    """CA-7's prompts: the passkey needle among ``distractor_needles - 1`` needles of the same format
    and another key (:mod:`rh.multi_needle`, kind ``distractor``), ``distractor_n`` per depth."""
    from rh.multi_needle import MultiSweep, build_multi_samples

    sweep = MultiSweep("distractor", profile.lengths[:1], profile.depths, profile.distractor_n,
                       n_needles=profile.distractor_needles, seed=prompt_seed(profile.sample_seed, "distractor"))
    return build_multi_samples(model.tokenizer, sweep, chat=model.instruct, max_positions=model.max_positions)


def distractor_answers(frame, samples: Sequence[Sample]) -> np.ndarray:
    """Per sample (in order), 1.0 when the teacher-forced pass's first answer token is the first token
    of a distractor's value: the model would start answering with a distractor."""
    by_id = frame.set_index("id")["first_argmax"]
    return np.array([float(int(by_id[s.id]) in set(s.meta["distractor_first_ids"])) for s in samples])


def distractor_verdicts(model: LoadedModel, ranking: Any, profile: Any) -> dict[str, Any]:
    """CA-7: the top ``id_k`` heads (a head set's own heads) and random K-sets ablated on prompts with
    distractor needles (CA-1's machinery, early stopping included), and the distractor answers with
    no ablation and with the top K ablated."""
    from rh.causal import evaluate_baseline, necessity_outcomes
    from rh.prefix import first_layers, hinting
    from rh.published import heads_under_test
    from rh.rules.field import distractor_necessity

    top = heads_under_test(ranking, profile.id_k)
    k = len(top)
    samples = distractor_samples(model, profile)
    with hinting(model, first_layers([top])):
        base = evaluate_baseline(model, samples, batch_size=profile.batch_size)
    out = necessity_outcomes(model, samples, ranking, k, draws=profile.random_draws, seed=profile.draw_seed,
                             baseline=base, batch_size=profile.batch_size, baseline_floor=profile.baseline_floor)
    top_frame = out.frame[out.frame["condition"] == f"top{k}"]
    return distractor_necessity(out, distractor_answers(base, samples), distractor_answers(top_frame, samples),
                                alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                                min_gap=profile.ca1_min_gap, min_rise=profile.distractor_min_rise,
                                n_boot=profile.n_boot, seed=profile.draw_seed,
                                n_distractors=profile.distractor_needles - 1)


def compression_verdicts(model: LoadedModel, samples: Sequence[Sample], baseline, ranking: Any,
                         profile: Any, *, stop_early: bool | None = None) -> dict:
    """CA-8 at every K of ``profile.compress_levels``: the samples evaluated with every head outside
    the top K restricted to a sink plus a recent window, and with the top K restricted; the KV
    cache such a policy would save at these prompts' length, and how many needles already lie in
    the recent window (where a restricted head still sees them). The restrictions are curtailed
    (:mod:`rh.curtail`; ``stop_early=False`` reads every item)."""
    from rh.compression import Restriction, kv_cache_bytes
    from rh.curtail import Arm, curtailed, paired_decider
    from rh.rules.field import compression_bounds, compression_safety
    from rh.seeds import derive_seed

    shape = model.shape
    sink, window = profile.compress_sink, profile.compress_window
    base = baseline.set_index("id").loc[[s.id for s in samples], "correct"].to_numpy(dtype=float)
    length = max(s.length for s in samples)
    in_window = float(np.mean([s.needle_span[0] >= s.length - window or s.needle_span[1] <= sink for s in samples]))
    value_bytes = next(model.model.parameters()).element_size()
    arms = {}
    for k in profile.compress_levels:
        top = ranking.top(k)
        keep = set(top)
        rest = [h for h in shape.all_heads() if h not in keep]
        arms[("others", k)] = Arm(samples, base, Restriction(f"window-others-top{k}", rest, sink, window,
                                                             selection="others"))
        arms[("top", k)] = Arm(samples, base, Restriction(f"window-top{k}", top, sink, window, selection="top"))
    decide = paired_decider(bounds=compression_bounds(profile.compress_levels, margin=profile.compress_margin,
                                                      min_drop=profile.min_drop),
                            alpha=profile.alpha, baseline_floor=profile.baseline_floor)
    after = curtailed(model, arms, decide, seed=derive_seed(profile.draw_seed, "CA-8"), batch_size=profile.batch_size,
                      stop_early=stop_early, what="CA-8 items")
    others, tops, kv = {}, {}, {}
    for k in profile.compress_levels:
        others[k], tops[k] = after[("others", k)], after[("top", k)]
        top = ranking.top(k)
        kv[k] = {**kv_cache_bytes(shape, shape.head_dim, full_heads=top, length=length, sink=sink, window=window,
                                  bytes_per_value=value_bytes),
                 "needles_within_window": in_window}
    return compression_safety(base, others, tops, margin=profile.compress_margin, min_drop=profile.min_drop,
                              alpha=profile.alpha, baseline_floor=profile.baseline_floor, sink=sink, window=window,
                              kv_bytes=kv)
