"""Identification claims (CLAIMS.md, ID-*): where retrieval heads are, and whether methods,
settings, tasks and model variants agree on them."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.claim("ID-1", source="Wu24 paper")
def test_retrieval_heads_are_sparse(wu24_identification, profile, record_verdict):
    """Retrieval heads are sparse: fewer than 5% of heads have a Wu24 retrieval score above 0.1."""
    from rh.id_claims import inconclusive, sparsity

    ranking, scored = wu24_identification
    if ranking is None:
        return record_verdict(inconclusive("ID-1", {}, scored, "bootstrap CI of a fraction", profile.alpha))
    record_verdict(sparsity(scored, threshold=profile.sparsity_threshold, max_fraction=profile.sparsity_max_fraction,
                            alpha=profile.alpha, n_boot=profile.n_boot))


@pytest.mark.claim("ID-2", source="seed 000 §1.4")
def test_top_heads_spike_on_the_needle(rh_model, ranking, validation, baseline, profile, record_verdict):
    """The top heads' last-token attention spikes on the needle: the top-K heads put at least 10x
    more mass per token on the needle span than uniform attention would (Δ: the same 10x)."""
    from rh.id_claims import needle_spike, read_needle_mass

    # read in the baseline's forwards (the baseline fixture read it; kept in the results store)
    _, per_head = read_needle_mass(rh_model, validation, ranking.top(profile.id_k), batch_size=profile.batch_size)
    ratios = per_head.mean(axis=1)
    record_verdict(needle_spike(ratios, k=profile.id_k, min_ratio=profile.spike_ratio, alpha=profile.alpha,
                                baseline_accuracy=float(baseline["correct"].mean()),
                                baseline_floor=profile.baseline_floor))


@pytest.fixture(scope="session")
def stability_verdicts(rh_model, sum_identification, ca_identify, identify_ranking, baseline, profile):
    """ID-3's per-prompt scores: shallow vs deep needles (the same sweep's prompts split by depth),
    and the profile's first length vs ``stability_length`` (a second sweep of the same design)."""
    from dataclasses import replace

    from rh.id_claims import stability
    from rh.niah import build_samples, split_samples

    _, scored = sum_identification
    pairs = {}
    depth = np.array([s.depth for s in ca_identify])
    shallow, deep = depth <= 0.25, depth >= 0.75
    if shallow.any() and deep.any():
        pairs["depth"] = (scored.scores[shallow], scored.scores[deep], "needles at depth <= 0.25",
                          "needles at depth >= 0.75")
    sweep = replace(profile.sweep(), lengths=(profile.stability_length,), tasks=profile.tasks)
    long_samples = build_samples(rh_model.tokenizer, sweep, chat=rh_model.instruct, max_positions=rh_model.max_positions)
    long_ident = split_samples(long_samples, frac=profile.identify_frac, seed=profile.split_seed)[0]
    long_scored = identify_ranking(long_ident, "sum_attention", sweep, with_scores=True)[3]
    pairs["length"] = (scored.scores, long_scored.scores, f"{profile.lengths[0]} tokens",
                       f"{profile.stability_length} tokens")
    return stability(pairs, k=profile.id_k, min_effect=profile.agree_min_effect * profile.id_k, alpha=profile.alpha,
                     baseline_accuracy=float(baseline["correct"].mean()), baseline_floor=profile.baseline_floor,
                     seed=profile.draw_seed)


@pytest.mark.claim("ID-3", source="seed 003 findings")
@pytest.mark.parametrize("axis", ["depth", "length"])
def test_rankings_are_stable_across_settings(axis, stability_verdicts, record_verdict):
    """Rankings are stable across context lengths and needle depths: the top-K heads of one setting
    overlap those of another as much as each setting's overlap with itself, within Δ heads."""
    if axis not in stability_verdicts:
        pytest.skip(f"the profile has no {axis} contrast")
    record_verdict(stability_verdicts[axis])


@pytest.mark.claim("ID-4", source="seeds 001 vs 003")
def test_sum_attention_and_wu24_find_the_same_heads(sum_identification, wu24_identification, baseline, profile,
                                                     record_verdict):
    """Sum-attention and Wu24 scoring find the same heads: their top-K sets overlap as much as each
    method's top K overlaps itself on other prompts, within Δ heads."""
    from rh.id_claims import inconclusive, methods_agree

    wu24, scored = wu24_identification
    if wu24 is None:
        return record_verdict(inconclusive("ID-4", {"k": profile.id_k}, scored, "split-half agreement",
                                           profile.alpha, min_effect=profile.agree_min_effect * profile.id_k))
    record_verdict(methods_agree(sum_identification[1].scores, scored.scores, scored.counted, k=profile.id_k,
                                 min_effect=profile.agree_min_effect * profile.id_k, alpha=profile.alpha,
                                 baseline_accuracy=float(baseline["correct"].mean()),
                                 baseline_floor=profile.baseline_floor, seed=profile.draw_seed))


@pytest.mark.claim("ID-5", source="seed 000 §1.5")
def test_general_retrieval_heads_exist(rh_model, task_rankings, task_validation, task_baselines, profile,
                                       record_verdict):
    """General retrieval heads exist: some head in every task's top K puts more than 10x the uniform
    mass per token on the needle in every task, on fresh prompts (per-head tests across tasks). The
    attention mass is read beside the task baselines' forwards (no pass of its own)."""
    from rh.id_claims import general_heads_exist

    acc = {t: float(df["correct"].mean()) for t, df in task_baselines.items()}
    record_verdict(general_heads_exist(rh_model, task_rankings, task_validation, k=profile.general_k,
                                       ratio=profile.spike_ratio, alpha=profile.alpha, accuracy=acc,
                                       baseline_floor=profile.baseline_floor, batch_size=profile.batch_size,
                                       needle_mass=getattr(task_baselines, "needle_mass", None)))


@pytest.fixture(scope="session")
def compare_ranking(compare_model, profile, identify_ranking):
    """The ranking of --compare-model on its own prompts of the same design, or None."""
    if compare_model is None:
        return None
    from rh.niah import build_samples, split_samples

    other = compare_model
    sweep = profile.sweep()
    samples = build_samples(other.tokenizer, sweep, chat=other.instruct, max_positions=other.max_positions)
    ident = [s for s in split_samples(samples, frac=profile.identify_frac, seed=profile.split_seed)[0]
             if s.task in profile.tasks]
    return identify_ranking(ident, "sum_attention", sweep, model=other)[0]


@pytest.mark.claim("ID-6", source="Wu24 paper (intrinsic)")
def test_base_and_instruct_share_retrieval_heads(ranking, compare_ranking, rh_model, pytestconfig, profile,
                                                 record_verdict):
    """Base and instruct variants share retrieval heads: their top-K sets overlap beyond chance."""
    from rh.id_claims import variants_share_heads

    names = (rh_model.key, pytestconfig.getoption("--compare-model") or "none")
    record_verdict(variants_share_heads(ranking, compare_ranking, k=profile.id_k, alpha=profile.alpha, names=names))
