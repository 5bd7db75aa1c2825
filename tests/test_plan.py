"""``pytest claims/ --plan`` (rh.plan, rh.dry): a dry run of the claims' own code, its token-layers
held equal, claim by claim, to what runs with every pass in full counted (on tiny-llama, and as a
recorded run of the bundled model counted), before any weight loads and writing nothing; a team's
own claim planned with nothing declared; and the calibration on a random copy of the architecture."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "data" / "smollm2-135m-plain-token-layers.json"  # a run with every pass in full

#: a plugin that writes what --plan planned (rh.pytest_plugin.PlanPrinter.claims) as JSON: node id ->
#: {"label", "unknown", "lines": {fixture or "body": token-layers}}
_DUMP = """
import json, os

def pytest_unconfigure(config):
    plan = config.pluginmanager.getplugin("rh-plan")
    if plan is None:
        return
    out = {c.nodeid: {"label": c.label, "unknown": c.unknown, "lines": {l.name: l.token_layers for l in c.lines}}
           for c in plan.claims}
    with open(os.environ["RH_PLAN_DUMP"], "w") as fh:
        json.dump(out, fh)
"""


def _plan(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[dict, str]:
    """--plan in a subprocess: what it planned per claim (``_DUMP``) and its output."""
    (tmp_path / "plandump.py").write_text(_DUMP)
    dump = tmp_path / "plan.json"
    env = {**os.environ, "RH_PLAN_DUMP": str(dump), "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "claims/", "--plan", "-q", "-p", "plandump", "-p",
                           "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(dump.read_text()), proc.stdout


def _by_claim(planned: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in planned.values():
        assert c["unknown"] is None, c
        claim = re.match(r"[A-Z]+-\d+", c["label"]).group(0)
        out[claim] = out.get(claim, 0) + sum(c["lines"].values())
    return out


@pytest.mark.slow  # the bundled catalogue run dry in a subprocess (about 30 s)
def test_the_quick_plan_is_the_token_layers_a_plain_smollm2_run_counted(tmp_path):
    """The bundled model's quick catalogue, run dry with the committed rankings: every fixture and
    claim body a run with every pass in full counted (tests/data, recorded at ab462c1) is planned
    at its count exactly, the prompts tokenized as the run tokenized them. Where the code changed
    since that recording, as stated: the hub's capture and the attention example run through the
    deepest head they read only (the recording ran every layer); ID-2's and ID-5's masses are read
    in the baselines' forwards (0 of their own); CA-5's output zeroing is CA-1's top-10 rows, from
    the results store; IV-6's recording stopped at its first prompt off completeness, and the plan
    is the bound of all ig_n prompts. The identifications are cached: 0."""
    from rh.models import REGISTRY
    from rh.profiles import get_profile

    prof = get_profile("quick", REGISTRY["smollm2-135m"].shape)
    planned, out = _plan(tmp_path)
    data = json.loads(RECORDED.read_text())
    fixtures: dict[str, int] = {}
    for c in planned.values():
        for name, tl in c["lines"].items():
            if name != "body":
                fixtures[name] = fixtures.get(name, 0) + tl
    for name, recorded in data["fixture_token_layers"].items():
        if name in ("hub", "ranking"):  # through the deepest head read (the recording: every layer)
            assert fixtures[name] < recorded and fixtures[name] % (512 if name == "ranking" else 64 * 512) == 0, name
            continue
        if name == "ca6_verdicts":  # its baselines are depth_baselines' (IV-5's prompts among them)
            assert fixtures[name] + fixtures["depth_baselines"] == recorded, name
            continue
        if name == "iv_baseline":  # the IV claims' prompts are CA-3's and CA-8's: keep_baseline's rows
            assert fixtures.get(name, 0) == 0 and fixtures["keep_baseline"] == recorded, name
            continue
        assert fixtures.get(name) == recorded, name
    assert fixtures["hub"] == 720_896 and fixtures["ranking"] == 12_800  # as a --plain run at ab462c1 counted
    checked = 0
    for nodeid, node in data["nodes"].items():
        if nodeid not in planned:
            continue
        body = planned[nodeid]["lines"].get("body", 0)
        name = nodeid.split("::")[1].split("[")[0]
        if "attribution" in name:
            assert body == prof.ig_n * node["token_layers"], name
        elif ("spike_on_the_needle" in name or name.startswith("test_needle_mass")
              or "decodable_after_the_critical_heads" in name):
            assert body == 0, name
        elif "query_and_logit_zeroing" in name:
            assert body == node["token_layers"] - 16 * 515 * 30, name
        else:
            assert body == node["token_layers"], name
        checked += 1
    assert checked >= 30
    assert all(v == 0 for k, v in _by_claim(planned).items() if k.startswith("ID-")), "the committed rankings are cached"
    assert "smollm2-135m, quick profile: 55 claims run dry" in out and "recorded" in out


@pytest.mark.slow  # the tiny catalogue plain, and run dry twice, in subprocesses (about 1 min)
def test_the_plan_is_a_plain_run_of_the_tiny_catalogue_claim_by_claim(tmp_path):
    """--plan before a run from an empty ranking cache, then the run with --plain (every pass in
    full) on tiny-llama: per claim id, the planned token-layers are the counted ones, identifications
    included (Wu24's generation, QRHead's calibration pass, the content-free sequences), but for
    the claims whose passes depend on which heads the ranking holds (the plan's ranking is made up):
    IV-2's and IV-6's layers stop at the deepest critical head, CA-10's rows are CA-9's where the
    heads agree. Planned again with the rankings the run cached, those are exact too. The first plan
    wrote nothing into the ranking cache."""
    common = ["--model", "tiny-llama", "--ranking-cache", str(tmp_path / "rk")]
    before, _ = _plan(tmp_path, *common)
    assert not (tmp_path / "rk").exists()  # the dry run's made-up rankings stayed in its own copy
    run = subprocess.run([sys.executable, "-m", "pytest", "claims/", *common, "--plain", "-q", "-p", "no:cacheprovider",
                          "-W", "ignore::pytest.PytestAssertRewriteWarning", "--report-dir", str(tmp_path / "rep")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]
    (report,) = (tmp_path / "rep").glob("*.json")
    counted = json.loads(report.read_text())["meta"]["cost"]["by_claim"]
    planned = _by_claim(before)
    assert set(planned) == set(counted)
    by_ranking = ("CA-10", "IV-2", "IV-6")
    assert {c: planned[c] for c in counted if c not in by_ranking} == {c: counted[c] for c in counted if c not in by_ranking}
    assert all(planned[c] > 0 for c in ("ID-1", "ID-3", "ID-7"))  # identifications computed, as the run computed them
    again = _by_claim(_plan(tmp_path, *common)[0])
    assert {c: again[c] for c in by_ranking} == {c: counted[c] for c in by_ranking}
    assert sum(counted.values()) > 0


_DRIVER = """
import sys
import rh.models

load = rh.models.load_model

def no_weights(*a, **k):  # a random model is built small and its weights dropped (rh.models._weightless)
    if k.get("weights", True) and rh.models.resolve_spec(a[0]).kind != "random":
        raise AssertionError("--plan loaded weights")
    return load(*a, **k)

rh.models.load_model = no_weights
import pytest
common = ["claims/", "--plan", "--model", "tiny-llama", "-p", "no:cacheprovider", "--ranking-cache", sys.argv[1],
          "--report-dir", sys.argv[2], "--journal", sys.argv[3], "--store", sys.argv[4],
          "-W", "ignore::pytest.PytestAssertRewriteWarning"]
rc = pytest.main(common)
print("RC-ALL", rc, flush=True)
rc = pytest.main(common + ["-k", "necessary"])
print("RC-K", rc, flush=True)
"""


@pytest.mark.slow  # the whole catalogue's plan in a subprocess
def test_plan_of_the_catalogue_prints_a_row_per_claim_and_loads_no_weights_and_writes_nothing(tmp_path):
    """--plan on claims/ with tiny-llama: one row per claim and a total, the calibration line, exit
    0, no claim verdict shown, and no weights loaded (load_model raises on a load with weights in
    this process, but for the random model's own small build that the weightless load drops); no ranking, report, journal or results store is written; with -k only the
    selected claims are planned."""
    paths = [tmp_path / "rankings", tmp_path / "reports", tmp_path / "journal.jsonl", tmp_path / "rows.jsonl"]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *map(str, paths)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "RC-ALL 0" in out and "RC-K 0" in out, out[-3000:]  # exit 0 both times
    full, selected = out.split("RC-ALL 0")
    assert "rh plan" in full and "loaded weights" not in out and "without its weights: a dry run" in full
    assert "rh claim matrix" not in out and "supported" not in out and "refuted" not in out  # no made-up verdict shown
    n = int(re.search(r"collected (\d+) items", full).group(1))
    rows = [line.split()[0] for line in full.splitlines() if line[:3] in ("CA-", "ID-", "IV-")]
    assert n > 20 and len(rows) == len(set(rows)) == n, rows
    assert f"total ({n} claims)" in full and "this machine:" in full and "us per token-layer" in full
    assert "ranking: " in full and "clean prompt read (sum_attention" in full  # an empty cache: identified
    total = next(line for line in full.splitlines() if line.startswith("total"))
    assert "unknown" not in total  # every catalogue claim is counted
    k_rows = [line.split()[0] for line in selected.splitlines() if line[:3] in ("CA-", "ID-", "IV-")]
    # CA-1 at every position and under Wu24's decode-only protocol, labelled apart
    assert k_rows == ["CA-1[K=2]", "CA-1[K=4]", "CA-1[K=2,phase=decode]", "CA-1[K=4,phase=decode]"], selected[-2000:]
    assert "total (4 claims)" in selected
    assert not any(p.exists() for p in paths), [p for p in paths if p.exists()]


def test_a_teams_own_claim_is_planned_as_it_runs_and_a_pass_outside_the_runner_is_unknown(warm_imports, pytester):
    """A team's conftest fixture and claim that hand their passes to the runner (rh.runner.run_one)
    are planned with nothing declared, at what a plain run of them counts. A claim that runs the
    model directly, outside the runner, runs on the meta device: counted where it reads no value
    (3 tokens x 4 layers), unknown with the error where it does (never 0)."""
    pytester.makeconftest(textwrap.dedent("""
        import pytest
        from rh.ablation import Ablation
        from rh.heads import Head
        from rh.runner import run_one

        @pytest.fixture(scope="session")
        def lab_outcomes(rh_model, validation):
            return run_one(rh_model, validation, Ablation("top3", (Head(0, 1), Head(2, 3), Head(3, 0))))
    """))
    pytester.makepyfile(test_lab=textwrap.dedent("""
        import pytest
        import torch
        from rh.rules.claims import inconclusive

        @pytest.mark.claim("LAB-1")
        def test_runner(lab_outcomes, rh_model, validation, record_verdict):
            base = __import__("rh.runner", fromlist=["run_one"]).run_one(
                rh_model, validation[:3], __import__("rh.ablation", fromlist=["Ablation"]).Ablation.baseline())
            record_verdict(inconclusive("LAB-1", {}, f"{len(base)} rows", "none", 0.05, min_effect=0.0))

        @pytest.mark.claim("LAB-2")
        def test_direct_shapes(rh_model, record_verdict):
            rh_model.model(input_ids=torch.tensor([[1, 2, 3]]))
            record_verdict(inconclusive("LAB-2", {}, "direct", "none", 0.05, min_effect=0.0))

        @pytest.mark.claim("LAB-3")
        def test_direct_values(rh_model, record_verdict):
            top = int(rh_model.model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1].argmax())
            record_verdict(inconclusive("LAB-3", {}, f"token {top}", "none", 0.05, min_effect=0.0))
    """))
    common = ["--model", "tiny-llama", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    res = pytester.runpytest_inprocess("--plan", *common)
    assert res.ret == 0, res.stdout.str()[-3000:]
    out = res.stdout.str()
    lab1 = next(line for line in out.splitlines() if line.startswith("LAB-1"))
    lab2 = next(line for line in out.splitlines() if line.startswith("LAB-2"))
    lab3 = next(line for line in out.splitlines() if line.startswith("LAB-3"))
    pytester.runpytest_inprocess("--plain", "-k", "test_runner", "--report-dir", "rep", *common)
    (report,) = (pytester.path / "rep").glob("*.json")
    counted = json.loads(report.read_text())["meta"]["cost"]["by_claim"]["LAB-1"]
    assert counted > 0 and lab1.split()[3] == f"{counted:,}", (lab1, counted)
    assert "lab_outcomes: 1,048 token-layers (3 heads zeroed x 2)" in out and "body: 1,048 token-layers (clean x 2)" in out
    assert lab2.split()[3] == "12"
    assert lab3.split()[3] == "unknown" and "unknown cost: " in out and "meta" in out and "1 unknown" in out
    res.assert_outcomes(passed=2, skipped=1)


def test_a_local_model_folder_is_planned_from_its_config_and_tokenizer_alone(warm_imports, pytester, tiny_dir,
                                                                          monkeypatch):
    """``--plan --model ./folder`` (the path a hub model takes, from its config.json and tokenizer):
    no weights are read (transformers' from_pretrained of the causal LM raises here), the claim's
    passes are counted as for the registry's tiny-llama of the same shape and prompts."""
    from transformers import AutoModelForCausalLM

    def no_weights(*a, **k):
        raise AssertionError("--plan read the folder's weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    pytester.makepyfile(test_lab=textwrap.dedent("""
        import pytest
        from rh.ablation import Ablation
        from rh.heads import Head
        from rh.rules.claims import inconclusive
        from rh.runner import run_one

        @pytest.mark.claim("LAB-1")
        def test_runner(rh_model, validation, record_verdict):
            run_one(rh_model, validation, Ablation("top2", (Head(0, 1), Head(2, 3))))
            record_verdict(inconclusive("LAB-1", {}, "a lab claim", "none", 0.05, min_effect=0.0))
    """))
    common = ["-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", "--dtype", "float32"]
    res = pytester.runpytest_inprocess("--plan", "--model", str(tiny_dir), *common)
    out = res.stdout.str()
    assert res.ret == 0 and "without its weights: a dry run" in out, out[-3000:]
    row = next(line for line in out.splitlines() if line.startswith("LAB-1"))
    ref = pytester.runpytest_inprocess("--plan", "--model", "tiny-llama", *common).stdout.str()
    assert row.split()[3] != "unknown" and row.split()[1:4] == next(
        line for line in ref.splitlines() if line.startswith("LAB-1")).split()[1:4]


@pytest.mark.slow  # the claim planned twice and run once, in subprocesses (about 40 s)
def test_iv4_is_planned_with_a_donor_of_the_same_shape_and_without_passes_for_another(tmp_path):
    """IV-4 with --compare-model: the donor loads without its weights too, and the transplanted
    passes are counted as a plain run counts them; a donor of another shape (the planted model)
    makes IV-4 inconclusive before any pass: it pays for its fixtures alone."""
    common = ["claims/", "-k", "transplanted", "--model", "tiny-llama", "-p", "no:cacheprovider", "--ranking-cache",
              str(tmp_path / "rk"), "-W", "ignore::pytest.PytestAssertRewriteWarning"]

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "pytest", *common, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    def row(out: str) -> tuple[str, list[str]]:
        """IV-4's row, and the lines beneath it (what it paid for)."""
        lines = out.splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith("IV-4"))
        below = [line.strip() for line in lines[i + 1:] if line.startswith("    ")][:10]
        return lines[i], below

    same, _ = row(run("--plan", "--compare-model", "tiny-llama"))
    other, paid = row(run("--plan", "--compare-model", "planted"))
    run("--plain", "--compare-model", "tiny-llama", "--report-dir", str(tmp_path / "rep"))
    (report,) = (tmp_path / "rep").glob("*.json")
    counted = json.loads(report.read_text())["meta"]["cost"]["by_claim"]["IV-4"]
    assert counted > 0 and same.split()[3] == f"{counted:,}", (same, counted)
    assert not any(line.startswith("body:") for line in paid) and any(line.startswith("iv_baseline:") for line in paid)
    assert other.split()[3] == f"{sum(int(line.split()[1].replace(',', '')) for line in paid if ':' in line):,}"


@pytest.mark.slow  # two dry runs of ID-7 in subprocesses (about 30 s)
def test_the_plan_asks_for_wu24_on_a_planted_model_only(tmp_path):
    """ID-7's plan: the planted model's ID-7 runs Wu24's identification (its recovery), the twin's
    does not: the dry run takes the path the claim's own code takes for each model. Bug caught: a
    plan knowing the planted model by its key only."""
    for name, wants in (("planted", True), ("planted-twin", False)):
        proc = subprocess.run([sys.executable, "-m", "pytest", "claims/", "--plan", "--model", name, "-q", "-k",
                               "identification_methods_agree and qrhead", "-p", "no:cacheprovider", "--ranking-cache", str(tmp_path / name)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ("wu24_identification:" in proc.stdout) == wants, (name, proc.stdout[-3000:])
        assert "method_scores:" in proc.stdout


def test_the_calibration_times_a_random_copy_of_the_architecture():
    from rh.plan import calibrate_config, model_config

    cfg = model_config("tiny-llama")
    per, how = calibrate_config(cfg, batch_size=2, length=32, device="cpu")
    assert per > 0 and math.isfinite(per) and "2 layers" in how
    assert cfg.num_hidden_layers == 4  # the model's own config is left as it was


def test_the_bundled_models_config_comes_from_the_gguf_header_without_the_weights():
    from rh.models import REGISTRY, bundled_gguf_path
    from rh.plan import gguf_metadata, model_config

    meta = gguf_metadata(bundled_gguf_path(REGISTRY["smollm2-135m"]))
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    cfg = model_config("smollm2-135m")
    s = REGISTRY["smollm2-135m"].shape
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim)


def test_a_tiny_model_of_another_family_is_planned_with_its_own_config():
    """``--plan --model tiny-gemma2``: the config the plan times is the tiny Gemma 2's (soft-capping,
    sliding layers), not a Llama of the same shape."""
    from rh.models import tiny_model
    from rh.plan import model_config

    cfg = model_config("tiny-gemma2")
    built = tiny_model("gemma2", vocab_size=300).model.config
    assert type(cfg).__name__ == "Gemma2Config"
    for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
              "attn_logit_softcapping", "layer_types"):
        assert getattr(cfg, k) == getattr(built, k), k


@pytest.mark.slow  # two plans of the catalogue in subprocesses
def test_the_smoke_profile_plans_the_catalogue_at_a_fraction_of_quick():
    """``--profile smoke`` is accepted and collects the catalogue, planned (no weights) at a small
    fraction of the quick profile's passes on the bundled model."""
    totals = {}
    for prof in ("smoke", "quick"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "claims/", "--plan", "--profile", prof, "-q",
                               "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("total ("))
        totals[prof] = int(line.split()[5].replace(",", ""))
    assert 0 < totals["smoke"] < totals["quick"] / 4, totals


