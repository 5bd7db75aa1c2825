"""Claims the field relies on beyond the seeds (CLAIMS.md, "Beyond the seeds"): ID-7, ID-8, CA-7, CA-8."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------ ID-7

@pytest.fixture(scope="session")
def method_scores(rh_model, ca_identify, profile, identify_ranking, pytestconfig):
    """Per-input head scores of each further identification method: QRHead's query-focused score on
    the identification prompts, the echo and induction scores on random repeated tokens (one pass
    for both). They go through the ranking cache, identified in float32 on the CPU as the rankings
    are (--recompute computes them again)."""
    from rh.field import identification_scores
    from rh.pytest_plugin import ranking_cache

    return identification_scores(rh_model, ca_identify, profile, cache_dir=ranking_cache(pytestconfig),
                                 recompute=pytestconfig.getoption("--recompute"), identify=identify_ranking)


@pytest.fixture(scope="session")
def id7_verdicts(rh_model, sum_identification, method_scores, baseline, profile, request):
    """ID-7 for every method of the profile, Holm across the methods. On a model whose retrieval
    heads are known by construction (rh.planted), each verdict also says how well sum attention,
    Wu24's score and its own method recover them (recall and precision of the top |planted|)."""
    from rh.planted import planted_heads, ranked_by_scores, recovery_by_method
    from rh.rules.field import methods_agreement

    others = {m: (sc.scores, sc.counted.astype(float), m == "qrhead") for m, sc in method_scores.items()}
    out = methods_agreement(
        sum_identification[1].scores, others,
        k=profile.id_k, min_effect=profile.agree_min_effect * profile.id_k, alpha=profile.alpha,
        seed=profile.draw_seed, baseline_accuracy=float(baseline["correct"].mean()),
        baseline_floor=profile.baseline_floor)
    planted = planted_heads(rh_model)
    if not planted:
        return out
    shape = rh_model.shape
    ranked = {"sum_attention": ranked_by_scores(sum_identification[1].scores, shape)}
    wu24 = request.getfixturevalue("wu24_identification")[0]
    if wu24 is not None:
        ranked["wu24"] = wu24.heads
    for m, (sc, w, _) in others.items():
        ranked[m] = ranked_by_scores(sc, shape, w)
    rec = recovery_by_method(ranked, planted)
    return {m: replace(v, details={**v.details, "planted_recovery": {
        name: rec[name] for name in ("sum_attention", "wu24", m) if name in rec}}) for m, v in out.items()}


@pytest.mark.claim("ID-7", source="QRHead (princeton-pli), RazorAttention vs Wu24")
def test_identification_methods_agree(id_method, id7_verdicts, record_verdict):
    """Identification methods agree: another method's top-K heads overlap sum attention's as much as
    each method's top K overlaps itself on other inputs, within Δ heads (Holm across the methods)."""
    record_verdict(id7_verdicts[id_method])


# ------------------------------------------------------------------------------------------ ID-8

@pytest.mark.claim("ID-8", source="DuoAttention issue 15")
def test_retrieval_heads_gather_in_kv_groups(rh_model, ranking, ranking_uncertainty, baseline, profile,
                                            record_verdict):
    """Retrieval heads gather in some KV groups more than chance: among pairs of top-K heads in one
    layer, more share a KV head than a placement keeping each layer's count would give, by Δ."""
    from rh.field import flat_index
    from rh.rules.field import kv_clustering

    shape = rh_model.shape
    k = profile.group_k
    unc = ranking_uncertainty.get(k)
    record_verdict(kv_clustering(
        flat_index(ranking.top(k), shape), None if unc is None else unc.boot_tops, n_layers=shape.n_layers,
        n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, min_effect=profile.group_min_effect,
        alpha=profile.alpha, k=k, baseline_accuracy=float(baseline["correct"].mean()),
        baseline_floor=profile.baseline_floor))


# ------------------------------------------------------------------------------------------ CA-7

@pytest.fixture(scope="session")
def ca7_verdicts(rh_model, ranking, profile):
    """The top K ablated on fresh prompts with distractor needles, against random K-sets."""
    from rh.field import distractor_verdicts

    return distractor_verdicts(rh_model, ranking, profile)


@pytest.mark.claim("CA-7", source="RULER multi-key")
@pytest.mark.parametrize("part", ["accuracy", "distractor_rate"])
def test_ablating_the_top_heads_hurts_among_distractors(part, ca7_verdicts, record_verdict):
    """With distractor needles present, ablating the top-K heads drops accuracy more than ablating K
    random heads, and raises the rate of answering with a distractor's value by more than Δ."""
    record_verdict(ca7_verdicts[part])


# ------------------------------------------------------------------------------------------ CA-8

@pytest.fixture(scope="session")
def ca8_verdicts(rh_model, keep_samples, keep_baseline, ranking, profile):
    """Every head outside the top K, then the top K, restricted to a sink plus a recent window, on
    CA-3's fresh prompts (non-inferiority needs about 80) against their one baseline."""
    from rh.field import compression_verdicts

    return compression_verdicts(rh_model, keep_samples, keep_baseline, ranking, profile)


@pytest.mark.claim("CA-8", source="DuoAttention, KV-compression work")
@pytest.mark.parametrize("arm", ["others", "top"])
def test_compression_keeps_accuracy_only_with_the_top_heads_whole(arm, compress_k, ca8_verdicts, record_verdict):
    """Compression safety: restricting every head outside the top K to a sink plus a recent window
    keeps accuracy within Δ of the baseline, while the same restriction on the top K does not."""
    record_verdict(ca8_verdicts[(arm, compress_k)])

