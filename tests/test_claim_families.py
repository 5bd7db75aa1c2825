"""The registry of claim families (rh.claim_families) and rh's own catalogue in it (rh.catalogue):
what a family may register, what the report draws from it, what calibration and parametrization
read from it."""

from __future__ import annotations

import logging

import pytest

import rh.catalogue  # noqa: F401 - rh's own families
from rh import claim_families as cf
from rh.claim_families import Calibration, ClaimFamily, Figure, Parameter

pytestmark = pytest.mark.unit


@pytest.fixture
def registry():
    with cf.registry_snapshot():
        yield


def _png(rows, meta):
    return b"\x89PNG" + str(len(rows)).encode()


def test_rh_registers_every_claim_of_the_catalogue_once():
    """Every claim id the catalogue's tests mark is decided by exactly one registered family (a claim
    left out would draw no figure; two families of one claim would make its figure depend on the
    import order)."""
    import ast
    from pathlib import Path

    marked = set()
    for path in (Path(__file__).resolve().parents[1] / "claims").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "claim" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                marked.add(node.args[0].value)
    assert len(marked) >= 22
    owners = {c: [f.id for f in cf.families() if c in f.claims] for c in marked}
    assert all(len(o) == 1 for o in owners.values()), {c: o for c, o in owners.items() if len(o) != 1}
    assert cf.family_of("ID-4").id == "ID-3/ID-4" and cf.family_of("XX-1") is None


def test_a_second_family_under_a_taken_id_or_claim_is_refused_and_a_reloaded_one_replaces(registry):
    """Catches a team's family silently replacing rh's own (another module, same id), one claim in
    two families, and a conftest imported anew (same module) being refused on its second load."""
    with pytest.raises(ValueError, match="'CA-1' is registered already"):
        cf.register_family(ClaimFamily("CA-1", figures=(Figure("CA-1: mine", _png),)))
    with pytest.raises(ValueError, match="claim CA-7 belongs to the registered family 'CA-7'"):
        cf.register_family(ClaimFamily("LAB-2", claims=("LAB-2", "CA-7")))
    with pytest.raises(ValueError, match="fixture 'ablation_k' is parametrized by family 'CA-1'"):
        cf.register_family(ClaimFamily("LAB-3", parameters=(Parameter("ablation_k", "ablation_levels"),)))
    with pytest.raises(ValueError, match="'lab one' is not a claim id"):
        ClaimFamily("lab one")
    with pytest.raises(TypeError, match="rh.claim_families.Figure"):
        ClaimFamily("LAB-4", figures=(_png,))
    first = cf.register_family(ClaimFamily("LAB-5", "first", figures=(Figure("LAB-5: a", _png),)))
    second = cf.register_family(ClaimFamily("LAB-5", "second", figures=(Figure("LAB-5: b", lambda r, m: None),)))
    assert cf.family("LAB-5") is second and first is not second  # the same module's new definition
    with pytest.raises(ValueError, match="unknown claim family 'LAB-9'"):
        cf.family("LAB-9")
    cf.unregister_family("LAB-5")
    assert cf.family_of("LAB-5") is None


def test_the_snapshot_restores_the_registry(registry):
    ids = [f.id for f in cf.families()]
    with cf.registry_snapshot():
        cf.register_family(ClaimFamily("LAB-6"))
        cf.unregister_family("CA-1")
    assert [f.id for f in cf.families()] == ids


def test_figures_are_drawn_per_family_from_its_own_rows_and_a_failing_one_costs_nothing(registry, caplog):
    """draw_figures hands each figure the rows of its family's claims only (a figure handed every
    row would draw another claim's data), skips families without rows, and logs a figure that
    raises instead of losing the report."""
    seen = {}

    def record(rows, meta):
        seen["rows"] = [r["claim"] for r in rows]
        seen["meta"] = meta
        return b"\x89PNG"

    def broken(rows, meta):
        raise KeyError("top_accuracy")

    fams = [ClaimFamily("LAB-7", claims=("LAB-7", "LAB-8"), figures=(Figure("LAB-7: ok", record),
                                                                      Figure("LAB-7: broken", broken))),
            ClaimFamily("LAB-9", figures=(Figure("LAB-9: never", record),))]
    rows = [{"claim": "LAB-8", "details": {"a": 1}}, {"claim": "CA-1", "details": {"a": 1}},
            {"claim": "LAB-7", "details": {"a": 2}}, {"claim": "LAB-7", "details": {}}]
    with caplog.at_level(logging.WARNING, logger="rh.claim_families"):
        out = cf.draw_figures(rows, {"model": "m"}, fams)
    assert out == {"LAB-7: ok": b"\x89PNG"}
    assert seen == {"rows": ["LAB-8", "LAB-7"], "meta": {"model": "m"}}
    assert "LAB-7: broken not drawn: KeyError" in caplog.text


def test_rh_report_draws_the_registered_families_figures(registry):
    """report_figures draws a newly registered family's figure beside rh's (the report reads the
    registry, not a list of rh's claims)."""
    from rh.report import report_figures

    cf.register_family(ClaimFamily("LAB-10", figures=(Figure("LAB-10: bars", _png),)))
    figs = report_figures([{"claim": "LAB-10", "details": {"x": 1}}], {})
    assert figs == {"LAB-10: bars": b"\x89PNG1"}


def _sim(profile, sizes, rng, effect):
    from rh.rules.claims import drop_family

    n = sizes["n_val"]
    before = (rng.random(n) < 0.9).astype(float)
    after = before * (rng.random(n) >= effect / 0.9)
    return list(drop_family("LAB-11", {"g": (before, after)}, param="g", n_heads=1, min_drop=0.2,
                            alpha=profile.alpha).values())


def test_calibration_simulates_a_registered_family_with_its_own_seed(registry):
    """A registered family is calibrated from its own Calibration, seeded by its id: adding another
    family changes no family's rates (rates once seeded by position in a list moved when one was
    added), and rh's families keep the seeds their published rates were measured with."""
    from rh.calibration import calibrate
    from rh.heads import HeadShape
    from rh.profiles import get_profile

    prof = get_profile("quick", HeadShape(30, 9, 3, 64))
    cf.register_family(ClaimFamily("LAB-11", calibration=lambda p, s: Calibration(_sim, 0.0, 0.2, 0.4, 0.0)))
    a = calibrate("LAB-11", prof, reps=30)
    cf.register_family(ClaimFamily("LAB-12", calibration=lambda p, s: Calibration(_sim, 0.0, 0.2, 0.4, 0.0)))
    assert calibrate("LAB-11", prof, reps=30) == a
    assert a.power_support > 0.5 and a.false_support <= 0.2
    assert cf.family("LAB-12").seed != cf.family("LAB-11").seed
    with pytest.raises(ValueError, match="'CA-5' has no calibration"):
        calibrate("CA-5", prof, reps=1)
    seeds = {f: cf.family(f).calibration(prof, {"tasks": 5, "task": 40, "depths": 5, "depth_n": 8}).seed
             for f in cf.calibrated() if f.startswith(("CA-4", "CA-6", "ID-3", "IV-7"))}
    assert seeds == {"CA-4": 3, "CA-6": 4, "ID-3/ID-4": 13, "IV-7": 8}  # their index in the old list


def test_parametrization_reads_the_registry(registry, pytester):
    """A family's Parameter parametrizes a claim over a profile field, in pytest itself (the plugin
    reads the registry, so a team's parameter works as rh's own)."""
    cf.register_family(ClaimFamily("LAB-13", parameters=(
        Parameter("lab_depth", "depths", lambda d: f"d{d:g}"),
        Parameter("lab_twice", lambda p: [2 * k for k in p.ablation_levels]),)))
    pytester.makepyfile(test_lab="""
        import pytest

        @pytest.mark.claim("LAB-13")
        def test_depth(lab_depth, lab_twice):
            pass
        """)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in res.stdout.lines if "test_depth[" in line]
    from rh.models import REGISTRY
    from rh.profiles import get_profile

    prof = get_profile("quick", REGISTRY["tiny-llama"].shape)
    assert len(ids) == len(prof.depths) * len(prof.ablation_levels), res.stdout.str()
    assert any(f"d{prof.depths[-1]:g}-{2 * prof.ablation_levels[0]}" in i for i in ids), ids


def test_a_row_without_a_verdict_keeps_the_parameter_that_sets_it_apart():
    """A claim a head set cannot take gets a row pytest writes itself (no verdict): its params come
    from the parametrization, under the names the family's verdicts use, so CA-3's three K levels
    stay three rows (they collided as ``CA-3[]`` before) and match the keys of real verdicts."""
    from types import SimpleNamespace

    from rh.pytest_plugin import _parametrized

    item = SimpleNamespace(callspec=SimpleNamespace(params={"inverse_k": 50, "unrelated": 1}))
    assert _parametrized(item) == {"k": 50}
    item = SimpleNamespace(callspec=SimpleNamespace(params={"claim_depth": 0.25}))
    assert _parametrized(item) == {"depth": 0.25}
    assert _parametrized(SimpleNamespace()) == {}  # not parametrized
    names = {p.fixture: p.param for p in cf.parameters().values()}
    assert names["iv_level"] == "n_heads" and names["id_method"] == "method" and names["id_task"] == "task"


