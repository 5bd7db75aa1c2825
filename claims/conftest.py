"""Fixtures shared by the claim modules: rankings on the identification split (``ca_identify``, a
plugin fixture)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sum_identification(identify_ranking, ca_identify):
    """Sum-attention ranking and per-sample scores on the CA tasks' identification split."""
    r, _, _, scored = identify_ranking(ca_identify, "sum_attention", with_scores=True)
    return r, scored


@pytest.fixture(scope="session")
def wu24_identification(identify_ranking, ca_identify):
    """Wu24 retrieval-score ranking and per-trial scores on the same split; ``(None, reason)`` when
    no trial passes the ROUGE filter (a model that does not retrieve has no retrieval score)."""
    try:
        r, _, _, scored = identify_ranking(ca_identify, "wu24", with_scores=True)
    except ValueError as exc:
        if "no sample passed" not in str(exc):
            raise
        return None, str(exc)
    return r, scored


@pytest.fixture(scope="session")
def task_rankings(identify_ranking, niah_split, profile):
    """One sum-attention ranking per task (seed 000 §1.5)."""
    return {t: identify_ranking([s for s in niah_split[0] if s.task == t])[0] for t in profile.id_tasks}


@pytest.fixture(scope="session")
def task_validation(rh_model, profile):
    """Fresh prompts of each identification task (``task_n`` per depth, a seed the identification
    never saw) on which ID-5 tests the candidate general heads and CA-4 ablates them."""
    fresh = profile.fresh_samples(rh_model, "tasks", profile.task_n, profile.id_tasks)
    return {t: [s for s in fresh if s.task == t] for t in profile.id_tasks}


@pytest.fixture(scope="session")
def task_baselines(rh_model, task_validation, task_rankings, profile):
    """Each task's unablated outcomes on its validation prompts: the floor of ID-5 and CA-4. The
    same forwards read the needle mass of ID-5's candidate heads (``.needle_mass``), so ID-5 runs
    no pass of its own (rh.id_claims.task_baselines). The passes keep the residual stream where
    CA-4's general heads start, so CA-4's ablated passes run only the layers from there on
    (rh.prefix)."""
    from rh.id_claims import task_baselines
    from rh.prefix import first_layers, hinting
    from rh.scoring import general_heads

    with hinting(rh_model, first_layers([general_heads(task_rankings, profile.general_k)])):
        return task_baselines(rh_model, task_validation, task_rankings, k=profile.general_k,
                              batch_size=profile.batch_size)


@pytest.fixture(scope="session")
def keep_samples(rh_model, profile):
    """Fresh prompts (``inverse_n`` per depth, a seed no identification used) for the claims that
    an intervention *keeps* accuracy within a margin: CA-3 and CA-8 (non-inferiority needs about 80)."""
    return profile.fresh_samples(rh_model, "inverse", profile.inverse_n)


@pytest.fixture(scope="session")
def keep_baseline(rh_model, keep_samples, ranking, profile):
    """The unablated outcomes on :func:`keep_samples`, shared by CA-3 and CA-8. The passes keep the
    residual stream where CA-3's bottom K and CA-8's top K start, so those passes run only the
    layers from there on (rh.prefix)."""
    from rh.causal import evaluate_baseline
    from rh.prefix import first_layers, hinting
    from rh.published import HeadSetHasNoOrder

    sets = []
    for pick, levels in ((ranking.bottom, profile.inverse_levels), (ranking.top, profile.compress_levels)):
        for k in levels:
            try:
                sets.append(pick(k))
            except HeadSetHasNoOrder:  # a head set has no bottom, and only its own size
                pass
    with hinting(rh_model, first_layers(sets)):
        return evaluate_baseline(rh_model, keep_samples, batch_size=profile.batch_size)
