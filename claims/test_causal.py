"""Causal validation claims (CLAIMS.md, CA-*)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ca1_verdicts(rh_model, validation, ranking, baseline, profile):
    """CA-1 outcomes for every K of the profile, decided as one Holm-corrected family."""
    from rh.causal import necessity_outcomes, necessity_verdicts

    outcomes = [
        necessity_outcomes(rh_model, validation, ranking, k, draws=profile.random_draws, seed=profile.draw_seed,
                           baseline=baseline, batch_size=profile.batch_size)
        for k in profile.ablation_levels
    ]
    return necessity_verdicts(outcomes, alpha=profile.alpha, baseline_floor=profile.baseline_floor,
                              n_boot=profile.n_boot, seed=profile.draw_seed)


@pytest.mark.claim("CA-1", source="seeds 000 §2.4, 001, 002")
def test_top_k_heads_are_necessary_for_retrieval(ablation_k, ca1_verdicts, record_verdict):
    """Ablating the top-K retrieval heads drops needle retrieval accuracy more than ablating K
    random heads drawn from outside the top K (one-sided, Holm across K)."""
    record_verdict(ca1_verdicts[ablation_k])
