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


def _first_per_depth(samples, n):
    """The first ``n`` prompts of each depth, in the order given (depth by depth)."""
    out, seen = [], {}
    for s in samples:
        seen[s.depth] = seen.get(s.depth, 0) + 1
        if seen[s.depth] <= n:
            out.append(s)
    return out


@pytest.fixture(scope="session")
def fresh_validation(rh_model, profile):
    """Fresh prompts (a seed no identification used), ``max(inverse_n, iv_n)`` per depth, for the
    claims that intervene on a held-out set of one-needle prompts: CA-3 and CA-8 take the first
    ``inverse_n`` of each depth (:func:`keep_samples`), the IV claims the first ``iv_n``
    (:func:`iv_samples`): one set, and one baseline, where the two sizes agree (quick)."""
    return profile.fresh_samples(rh_model, "interventions", max(profile.inverse_n, profile.iv_n))


@pytest.fixture(scope="session")
def keep_samples(fresh_validation, profile):
    """The prompts of the claims that an intervention *keeps* accuracy within a margin: CA-3 and
    CA-8 (non-inferiority needs about 80), ``inverse_n`` per depth."""
    return _first_per_depth(fresh_validation, profile.inverse_n)


@pytest.fixture(scope="session")
def iv_samples(fresh_validation, profile):
    """The IV claims' prompts (IV-1, IV-2, IV-3, IV-4, IV-6, IV-7), ``iv_n`` per depth."""
    return _first_per_depth(fresh_validation, profile.iv_n)


def _keep_sets(ranking, profile) -> list:
    """The head sets CA-3 (the bottom K) and CA-8 (the top K) intervene on."""
    from rh.published import HeadSetHasNoOrder

    sets = []
    for pick, levels in ((ranking.bottom, profile.inverse_levels), (ranking.top, profile.compress_levels)):
        for k in levels:
            try:
                sets.append(pick(k))
            except HeadSetHasNoOrder:  # a head set has no bottom, and only its own size
                pass
    return sets


def _critical(ranking, profile) -> list:
    return ranking.top(max(profile.critical_k, *profile.incremental_levels))


@pytest.fixture(scope="session")
def critical(ranking, profile):
    """The critical heads: the ranking's top ``critical_k`` (at least as many as IV-1's levels)."""
    return _critical(ranking, profile)


def _iv_sets(ranking, profile) -> list:
    """The head sets the IV claims intervene on: IV-1's top 1, 2, 3 and the critical heads (IV-2's
    and IV-3's first critical layer)."""
    try:
        critical = _critical(ranking, profile)
    except ValueError:  # a head set smaller than the critical heads: the IV claims say so themselves
        return []
    return [critical[:n] for n in profile.incremental_levels] + [critical[: profile.critical_k]]


@pytest.fixture(scope="session")
def validation_hints(keep_samples, iv_samples, ranking, profile):
    """The head sets whose first layers each baseline of :func:`fresh_validation` keeps the residual
    stream of (rh.prefix), ``{"keep": ..., "iv": ...}``: CA-3's and CA-8's, the IV claims'; both
    for both where the two use the same prompts, since the baseline that runs first serves both."""
    keep, iv = _keep_sets(ranking, profile), _iv_sets(ranking, profile)
    if [s.id for s in iv_samples] == [s.id for s in keep_samples]:
        keep = iv = keep + iv
    return {"keep": keep, "iv": iv}


def _validation_baseline(rh_model, samples, sets, profile):
    from rh.causal import evaluate_baseline
    from rh.prefix import first_layers, hinting

    with hinting(rh_model, first_layers(sets)):
        return evaluate_baseline(rh_model, samples, batch_size=profile.batch_size)


@pytest.fixture(scope="session")
def keep_baseline(rh_model, keep_samples, validation_hints, profile):
    """The unablated outcomes on :func:`keep_samples`, shared by CA-3 and CA-8 (and by the IV
    claims where their prompts are the same). The passes keep the residual stream where CA-3's
    bottom K and CA-8's top K start (and the IV claims' heads, where they share the prompts), so
    those passes run only the layers from there on (rh.prefix)."""
    return _validation_baseline(rh_model, keep_samples, validation_hints["keep"], profile)


@pytest.fixture(scope="session")
def iv_baseline(rh_model, iv_samples, validation_hints, profile):
    """The unablated outcomes on the IV prompts: :func:`keep_baseline`'s rows (from the results
    store) where the prompts are the same. The passes keep the residual stream where each
    intervention on the critical heads starts (IV-1's top 1, 2, 3; IV-2's and IV-3's first critical
    layer), and CA-3's and CA-8's where they share the prompts, so those passes run only the layers
    from there on (rh.prefix)."""
    return _validation_baseline(rh_model, iv_samples, validation_hints["iv"], profile)


@pytest.fixture(scope="session")
def depth_samples(rh_model, profile):
    """Fresh prompts per depth (a seed no identification used), shared by the claims that test the
    retrieval of one needle at every depth: CA-6 takes the first ``depth_n`` of each depth, IV-5's
    probes the first ``probe_n``, CA-9 and CA-10 the first ``sweep_n``. ``{depth: prompts}``."""
    n = max(profile.depth_n, profile.probe_n, profile.sweep_n)
    fresh = profile.fresh_samples(rh_model, "depth", n)
    return {d: [s for s in fresh if s.depth == d] for d in profile.depths}


@pytest.fixture(scope="session")
def depth_baselines(rh_model, depth_samples, ranking, profile, request):
    """The unablated outcomes of :func:`depth_samples` (``.frame``) and, where IV-5 is among the
    claims collected, read in those very forwards, the residual stream at each prompt's last token
    after every layer (``.residuals``: ``{id: [n_layers + 1, hidden]}``), IV-5's probe features:
    IV-5 runs no pass of its own. CA-6's prompts run depth by depth, as CA-6's curtailment reads
    them, and keep the residual stream where its top K start, so its ablated passes run only the
    layers from there on (rh.prefix); prompts past ``depth_n`` (IV-5's, where ``probe_n`` is
    larger) run after them."""
    from types import SimpleNamespace

    import pandas as pd

    from rh.causal import evaluate_baseline
    from rh.prefix import first_layers, hinting
    from rh.probes import baseline_residuals
    from rh.published import heads_under_test

    probes = any(m.args[:1] == ("IV-5",) for it in request.session.items for m in it.iter_markers("claim"))
    frames, residuals = [], {}

    def read(samples, hints):
        if not samples:
            return
        with hinting(rh_model, hints):
            if probes:
                frame, feats = baseline_residuals(rh_model, samples, batch_size=profile.batch_size)
                residuals.update(zip((s.id for s in samples), feats))
            else:  # the same forwards, nothing read in them
                frame = evaluate_baseline(rh_model, samples, batch_size=profile.batch_size)
        frames.append(frame)

    hints = first_layers([heads_under_test(ranking, profile.id_k)])
    for group in depth_samples.values():
        read(group[: profile.depth_n], hints)
    for group in depth_samples.values():
        read(group[profile.depth_n:] if probes else [], ())
    return SimpleNamespace(frame=pd.concat(frames, ignore_index=True), residuals=residuals)
