"""Causal validation claims (CLAIMS.md, CA-*)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _ca1_outcomes(rh_model, validation, ranking, baseline, profile, phase):
    from rh.causal import necessity_outcomes

    return [
        necessity_outcomes(rh_model, validation, ranking, k, draws=profile.random_draws, seed=profile.draw_seed,
                           baseline=baseline, batch_size=profile.batch_size, matched_draws=profile.matched_draws,
                           phase=phase, baseline_floor=profile.baseline_floor)
        for k in profile.ablation_levels
    ]


def _ca1_verdicts(outcomes, profile, phase):
    from rh.causal import necessity_verdicts

    return necessity_verdicts(outcomes, alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                              min_gap=profile.ca1_min_gap, n_boot=profile.n_boot, seed=profile.draw_seed,
                              control=profile.ca1_control, phase=phase)


@pytest.fixture(scope="session")
def ca1_outcomes(rh_model, validation, ranking, baseline, profile):
    """Per-sample outcomes with no ablation, the top K ablated and random K-sets ablated, per K."""
    return _ca1_outcomes(rh_model, validation, ranking, baseline, profile, "all")


@pytest.fixture(scope="session")
def ca1_verdicts(ca1_outcomes, profile):
    """CA-1 for every K of the profile, decided as one Holm-corrected family."""
    return _ca1_verdicts(ca1_outcomes, profile, "all")


@pytest.mark.claim("CA-1", source="seeds 000 §2.4, 001, 002")
def test_top_k_heads_are_necessary_for_retrieval(ablation_k, ca1_verdicts, record_verdict):
    """Ablating the top-K retrieval heads drops needle retrieval accuracy more than ablating K
    random heads drawn from outside the top K (one-sided, Holm across K)."""
    record_verdict(ca1_verdicts[ablation_k])


@pytest.mark.claim("CA-2", source="seed 001 (Figure 8)")
def test_the_drop_grows_with_k(rh_model, validation, ranking, baseline, ca1_outcomes, ca1_verdicts, profile,
                               record_verdict):
    """Dose-response: the top-K drop in the answer's log-probability grows with K (by at least Δ nats
    from the smallest to the largest K) and the top-vs-random gap of CA-1 holds at every K."""
    from rh.causal import dose_response, top_logprobs

    ids = [s.id for s in validation]
    base = baseline.set_index("id").loc[ids]
    tops = top_logprobs(rh_model, validation, ranking, profile.dose_levels, ca1_outcomes, batch_size=profile.batch_size)
    record_verdict(dose_response(base["logprob"].to_numpy(float), tops, ca1_verdicts, alpha=profile.alpha,
                                 min_growth=profile.dose_min_growth, baseline_floor=profile.baseline_floor,
                                 baseline_accuracy=float(base["correct"].mean())))


@pytest.fixture(scope="session")
def ca1_decode_outcomes(rh_model, validation, ranking, baseline, profile):
    """CA-1's conditions under Wu24's masking protocol: every head set ablated while decoding only
    (from the prompt's last token on), each condition from the clean prompt's cache."""
    return _ca1_outcomes(rh_model, validation, ranking, baseline, profile, "decode")


@pytest.fixture(scope="session")
def ca1_decode_verdicts(ca1_decode_outcomes, profile):
    """CA-1 under Wu24's protocol for every K, one Holm-corrected family of its own."""
    return _ca1_verdicts(ca1_decode_outcomes, profile, "decode")


@pytest.mark.claim("CA-1", source="seed 001 (Wu24's masking experiment: heads masked while decoding)",
                  params={"phase": "decode"})
def test_top_k_heads_are_necessary_while_decoding(ablation_k, ca1_decode_verdicts, record_verdict):
    """Under Wu24's protocol (the heads ablated while decoding only, the prompt prefilled intact),
    ablating the top-K retrieval heads drops needle retrieval accuracy more than ablating K random
    heads from outside the top K (one-sided, Holm across K)."""
    record_verdict(ca1_decode_verdicts[ablation_k])


@pytest.mark.claim("CA-2", source="seed 001 (Figure 8; Wu24's masking protocol)", params={"phase": "decode"})
def test_the_drop_while_decoding_grows_with_k(rh_model, validation, ranking, baseline, ca1_decode_outcomes,
                                              ca1_decode_verdicts, profile, record_verdict):
    """Under Wu24's protocol (decode-only ablation), the top-K drop in the answer's log-probability
    grows with K (by at least Δ nats from the smallest to the largest K) and the top-vs-random gap
    of CA-1 holds at every K."""
    from rh.causal import dose_response, top_logprobs

    ids = [s.id for s in validation]
    base = baseline.set_index("id").loc[ids]
    tops = top_logprobs(rh_model, validation, ranking, profile.dose_levels, ca1_decode_outcomes,
                        batch_size=profile.batch_size, phase="decode")
    record_verdict(dose_response(base["logprob"].to_numpy(float), tops, ca1_decode_verdicts, alpha=profile.alpha,
                                 min_growth=profile.dose_min_growth, baseline_floor=profile.baseline_floor,
                                 baseline_accuracy=float(base["correct"].mean()), phase="decode"))


@pytest.fixture(scope="session")
def ca3_verdicts(rh_model, ranking, keep_samples, keep_baseline, profile):
    """Fresh prompts (``inverse_n`` per depth): non-inferiority at margin 0.1 needs about 80 items."""
    from rh.causal import inverse_ablation

    return inverse_ablation(rh_model, keep_samples, ranking, profile.inverse_levels, keep_baseline,
                            margin=profile.ni_margin, alpha=profile.alpha, batch_size=profile.batch_size,
                            n_boot=profile.n_boot, baseline_floor=profile.baseline_floor)


@pytest.mark.claim("CA-3", source="seed 000 §2.5")
def test_ablating_the_lowest_scoring_heads_keeps_accuracy(inverse_k, ca3_verdicts, record_verdict):
    """Inverse ablation: ablating the K lowest-scoring heads keeps accuracy within a margin of the baseline."""
    record_verdict(ca3_verdicts[inverse_k])


@pytest.fixture(scope="session")
def ca4_verdicts(rh_model, task_validation, task_baselines, profile, task_rankings):
    """Ablate the general heads (intersection of the per-task top-K) on every task's validation prompts."""
    import pandas as pd

    from rh.causal import ablation_hurts
    from rh.scoring import general_heads

    heads = general_heads(task_rankings, profile.general_k)
    return ablation_hurts("CA-4", rh_model, task_validation, heads, pd.concat(task_baselines.values()), param="task",
                          alpha=profile.alpha, baseline_floor=profile.baseline_floor, min_drop=profile.min_drop,
                          batch_size=profile.batch_size, n_boot=profile.n_boot)


@pytest.mark.claim("CA-4", source="seed 000 §1.5 + §2.4")
def test_ablating_general_heads_hurts_every_task(id_task, ca4_verdicts, record_verdict):
    """Ablating the general (intersection) heads lowers retrieval accuracy on every task."""
    record_verdict(ca4_verdicts[id_task])


def _ca6_verdicts(rh_model, ranking, depth_samples, depth_baselines, profile, phase):
    from rh.causal import ablation_hurts
    from rh.published import heads_under_test

    groups = {d: group[: profile.depth_n] for d, group in depth_samples.items()}
    return ablation_hurts("CA-6", rh_model, groups, heads_under_test(ranking, profile.id_k), depth_baselines.frame,
                          param="depth", alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                          min_drop=profile.min_drop, batch_size=profile.batch_size, n_boot=profile.n_boot, phase=phase)


@pytest.fixture(scope="session")
def ca6_verdicts(rh_model, ranking, depth_samples, depth_baselines, profile):
    """Fresh prompts (a seed the identification never saw), ``depth_n`` per depth: baseline vs top-K ablated."""
    return _ca6_verdicts(rh_model, ranking, depth_samples, depth_baselines, profile, "all")


@pytest.mark.claim("CA-6", source="seed 000 §2.2-2.4")
def test_the_drop_appears_at_every_depth(claim_depth, ca6_verdicts, record_verdict):
    """Ablating the top-K heads lowers retrieval accuracy at every needle depth."""
    record_verdict(ca6_verdicts[claim_depth])


@pytest.fixture(scope="session")
def ca6_decode_verdicts(rh_model, ranking, depth_samples, depth_baselines, profile):
    """CA-6's prompts and heads under Wu24's protocol: the top K ablated while decoding only."""
    return _ca6_verdicts(rh_model, ranking, depth_samples, depth_baselines, profile, "decode")


@pytest.mark.claim("CA-6", source="seed 000 §2.2-2.4 (Wu24's masking protocol)", params={"phase": "decode"})
def test_the_drop_while_decoding_appears_at_every_depth(claim_depth, ca6_decode_verdicts, record_verdict):
    """Under Wu24's protocol (decode-only ablation), ablating the top-K heads lowers retrieval
    accuracy at every needle depth."""
    record_verdict(ca6_decode_verdicts[claim_depth])


@pytest.fixture(scope="session")
def sweep_prompts(depth_samples, profile):
    """CA-9's and CA-10's prompts: the first ``sweep_n`` per depth of CA-6's fresh prompts (their
    baselines are CA-6's rows in the results store)."""
    return [s for group in depth_samples.values() for s in group[: profile.sweep_n]]


@pytest.fixture(scope="session")
def sweep_baseline(rh_model, sweep_prompts, profile):
    from rh.causal import evaluate_baseline

    return evaluate_baseline(rh_model, sweep_prompts, batch_size=profile.batch_size)


@pytest.mark.claim("CA-9", source="MIB's faithfulness curves (CPR/CMD)")
def test_the_top_k_drop_exceeds_random_over_the_whole_sweep(rh_model, ranking, sweep_prompts, sweep_baseline, profile,
                                                            record_verdict):
    """Over the whole sweep of K (1% ... 50% of the heads), ablating the top-K heads drops accuracy
    more than ablating K random heads from outside the top K: the area between the two accuracy
    curves is above 0 (three-way against Δ for the mean gap over the sweep)."""
    from rh.causal import curve_outcomes, in_phase
    from rh.rules.claims import inconclusive
    from rh.rules.sweep import CURVE_TEST, ablation_curve, curve_levels

    ks = curve_levels(rh_model.shape.n_total, profile.curve_fractions)
    try:
        ranking.top(max(ks))
    except ValueError as exc:
        record_verdict(in_phase(inconclusive("CA-9", {}, f"the sweep needs a ranking of every head: {exc}", CURVE_TEST,
                                             profile.alpha, min_effect=profile.curve_min_area), profile.sweep_phase))
        return
    out = curve_outcomes(rh_model, sweep_prompts, ranking, ks, baseline=sweep_baseline, seed=profile.draw_seed,
                         batch_size=profile.batch_size, phase=profile.sweep_phase,
                         baseline_floor=profile.baseline_floor)
    record_verdict(in_phase(ablation_curve(out.base, out.top, out.rand, ks, min_area=profile.curve_min_area,
                                           alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                                           seed=profile.draw_seed, n_boot=profile.n_boot), profile.sweep_phase))


@pytest.mark.claim("CA-10", source="circuit hypothesis testing (minimality)")
def test_every_top_head_is_needed(rh_model, ranking, sweep_prompts, sweep_baseline, profile, record_verdict):
    """Minimality: every head of the top-K set is needed: dropping it from the ablated set recovers
    accuracy (three-way against δ per head; the verdict names the heads shown not needed)."""
    from rh.causal import in_phase, minimality_outcomes
    from rh.published import heads_under_test
    from rh.rules.sweep import minimality

    heads = heads_under_test(ranking, profile.id_k)
    base = sweep_baseline.set_index("id").loc[[s.id for s in sweep_prompts], "correct"].to_numpy(float)
    top, dropped = minimality_outcomes(rh_model, sweep_prompts, heads, batch_size=profile.batch_size,
                                       phase=profile.sweep_phase, baseline_correct=base,
                                       baseline_floor=profile.baseline_floor)
    record_verdict(in_phase(minimality(top, dropped, base, min_recovery=profile.minimal_min_recovery,
                                       alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                                       params={"k": len(heads)}), profile.sweep_phase))


@pytest.mark.claim("CA-5", source="seed 001's comparison table")
def test_query_and_logit_zeroing_are_uniform_attention_not_output_zeroing(rh_model, validation, ranking,
                                                                          baseline, profile, record_verdict):
    """The ablation mechanism matters: zeroing a head's query equals zeroing its pre-softmax logits
    (uniform attention, the mean of V), and neither is output zeroing."""
    from rh.causal import mechanism_comparison
    from rh.published import heads_under_test

    record_verdict(mechanism_comparison(rh_model, validation, heads_under_test(ranking, profile.id_k), baseline,
                                       alpha=profile.alpha, batch_size=profile.batch_size))
