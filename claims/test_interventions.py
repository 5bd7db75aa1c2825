"""Seed 004's interventions on the critical heads (CLAIMS.md, IV-*). The critical heads are the
top of the session's ranking; every claim runs on fresh prompts the identification never saw."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def iv1(rh_model, iv_samples, iv_baseline, critical, profile):
    from rh.interventions import incremental_ablation

    return incremental_ablation(rh_model, iv_samples, critical, iv_baseline, levels=profile.incremental_levels,
                                min_drop=profile.iv_min_drop, alpha=profile.alpha,
                                baseline_floor=profile.baseline_floor, batch_size=profile.batch_size,
                                full=[profile.critical_k], seed=profile.draw_seed)


@pytest.fixture(scope="session")
def hub(rh_model, ca_identify, ranking, profile):
    """The position the critical heads attend to most, found on the identification split."""
    from rh.interventions import hub_position

    ident = [s for s in ca_identify if s.length == profile.lengths[0]]
    return hub_position(rh_model, ident, ranking.top(profile.critical_k))[0]


@pytest.mark.claim("IV-1", source="seed 004 §1.1")
def test_ablating_the_top_critical_heads_drops_accuracy(iv_level, iv1, record_verdict):
    """Ablating the 1, 2, 3 most critical heads drops retrieval accuracy by more than 10 points."""
    record_verdict(iv1[0][iv_level])


@pytest.mark.claim("IV-2", source="seed 004 §1.2")
def test_the_hub_position_is_a_bottleneck(rh_model, iv_samples, iv_baseline, ranking, hub, profile, record_verdict):
    """Noising the hub position (the critical heads' most-attended token) at the first critical layer
    drops accuracy by more than 10 points, noising a non-hub context token by less than 5."""
    from rh.interventions import position_patching

    layer = min(h.layer for h in ranking.top(profile.critical_k))
    record_verdict(position_patching(rh_model, iv_samples, iv_baseline, layer=layer, hub=hub, mode=profile.patch_mode,
                                     hub_min=profile.iv_min_drop, nonhub_max=profile.iv_nonhub_max,
                                     alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                                     batch_size=profile.batch_size, seed=profile.draw_seed))


@pytest.fixture(scope="session")
def iv3(rh_model, iv_samples, iv_baseline, ranking, hub, profile):
    from rh.interventions import attention_override

    return attention_override(rh_model, iv_samples, ranking.top(profile.critical_k), iv_baseline, hub=hub,
                              patterns=profile.override_patterns, fraction=profile.hub_fraction,
                              keep=profile.hub_keep, min_drop=profile.iv_min_drop, alpha=profile.alpha,
                              baseline_floor=profile.baseline_floor, batch_size=profile.batch_size)


@pytest.mark.claim("IV-3", source="seed 004 §1.3")
def test_forcing_attention_patterns_in_the_critical_heads(iv_pattern, iv3, record_verdict):
    """Forcing uniform or sequential attention in the critical heads drops accuracy; forcing the hub
    pattern (80% of the mass on the hub) keeps at least 90% of it."""
    record_verdict(iv3[iv_pattern])


@pytest.mark.claim("IV-4", source="seed 004 §2.1")
def test_a_transplanted_critical_head_keeps_its_function(rh_model, compare_model, iv_samples, iv_baseline, ranking,
                                                         profile, record_verdict):
    """The critical heads transplanted from a model of the same shape (--compare-model) keep at
    least 80% of their function; inconclusive without such a model."""
    from rh.interventions import transplant_function

    record_verdict(transplant_function(rh_model, compare_model, iv_samples, ranking.top(profile.critical_k),
                                       iv_baseline, keep=profile.transplant_keep, alpha=profile.alpha,
                                       baseline_floor=profile.baseline_floor, batch_size=profile.batch_size))


@pytest.mark.claim("IV-5", source="seed 004 §3.1")
def test_the_answer_becomes_decodable_after_the_critical_heads(rh_model, ranking, iv_baseline, depth_samples, profile,
                                                               request, record_verdict):
    """Linear probes on the last token's residual stream decode the answer's first token only at or
    after the layers of the critical heads."""
    from rh.probes import answer_labels, decodable_after_heads, layer_probes
    from rh.rules.claims import floor_reason, inconclusive

    floor = floor_reason(float(iv_baseline["correct"].mean()), profile.baseline_floor)
    if floor:  # a model that does not retrieve has no critical heads to locate the answer after
        return record_verdict(inconclusive("IV-5", {}, floor, "layer probes", profile.alpha, min_effect=0.0))

    # the first probe_n prompts of each depth of CA-6's: their residuals are read in the baselines'
    # forwards (depth_baselines; on Ray, on the replicas), so the probes run no pass of their own
    samples = [s for group in depth_samples.values() for s in group[: profile.probe_n]]
    residuals = request.getfixturevalue("depth_baselines").residuals
    feats = np.stack([residuals[s.id] for s in samples])
    df = layer_probes(feats, answer_labels(samples), seed=profile.draw_seed)
    v = decodable_after_heads(df, [h.layer for h in ranking.top(profile.critical_k)], alpha=profile.alpha,
                              margin=profile.probe_margin)
    record_verdict(replace(v, details={**v.details, "layers": df.to_dict("list")}))  # columns: compact in the report


@pytest.mark.claim("IV-6", source="seed 004 §3.2")
def test_attribution_of_the_critical_heads_concentrates_on_the_needle(rh_model, iv_samples, iv_baseline, ranking,
                                                                      profile, record_verdict):
    """Integrated-gradients attribution of the critical heads' contribution to the answer puts more
    mass on the needle's tokens than their share of the prompt (refuted below Δ = 2x)."""
    from rh.attribution import attribute, attribution_concentrates, needle_mass_ratio
    from rh.budget import stops_early
    from rh.rules.claims import floor_reason, inconclusive

    floor = floor_reason(float(iv_baseline["correct"].mean()), profile.baseline_floor)
    plain = not stops_early(None)  # --plain: every attribution, even where the verdict is already known
    below = inconclusive("IV-6", {"tolerance": profile.ig_tolerance}, floor, "IG attribution", profile.alpha,
                         min_effect=profile.ig_min_ratio) if floor else None
    if below is not None and not plain:
        return record_verdict(below)

    step = max(1, len(iv_samples) // profile.ig_n)
    chosen = iv_samples[::step][: profile.ig_n]
    heads = ranking.top(profile.critical_k)
    # one sample off completeness makes the verdict inconclusive: stop there (but --plain); the
    # attributions are tasks of the runner (on Ray, on the replicas: one at a time while a stop is possible)
    off_completeness = None if plain else (lambda a: not a.completeness_error <= profile.ig_tolerance)
    # the integration path a batch of path points at a time: the memory of a batch of prompts, not of ig_steps
    attrs = attribute(rh_model, chosen, heads, n_steps=profile.ig_steps, until=off_completeness,
                      internal_batch_size=profile.batch_size)
    if below is not None:
        return record_verdict(below)
    off = [i for i, a in enumerate(attrs) if not a.completeness_error <= profile.ig_tolerance]
    attrs = attrs[: off[0] + 1] if off else attrs  # the rule reads what it reads without --plain
    chosen = chosen[: len(attrs)]
    ratios = [needle_mass_ratio(a.token_attr, s.needle_span) for a, s in zip(attrs, chosen)]
    v = attribution_concentrates(ratios, alpha=profile.alpha, completeness_errors=[a.completeness_error for a in attrs],
                                 tolerance=profile.ig_tolerance, sample_ids=[s.id for s in chosen],
                                 min_ratio=profile.ig_min_ratio)
    example = {"sample": chosen[0].id, "needle_span": list(chosen[0].needle_span),
               "token_attr": [round(float(x), 6) for x in attrs[0].token_attr]}
    record_verdict(replace(v, details={**v.details, "example": example, "ratios": [float(r) for r in ratios]}))


@pytest.mark.claim("IV-7", source="seed 004 §4.1")
def test_ablation_hurts_hard_items_more(iv_baseline, iv1, profile, record_verdict):
    """Ablating the critical heads hurts low-confidence (hard) items more than high-confidence (easy)
    ones: among items right at baseline, the answer's log-odds drops more for the less confident half."""
    from rh.interventions import difficulty_strata

    record_verdict(difficulty_strata(iv_baseline, iv1[1][profile.critical_k], min_effect=profile.iv7_min_effect,
                                     alpha=profile.alpha, baseline_floor=profile.baseline_floor))
