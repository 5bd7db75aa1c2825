"""The pytest plugin end to end on the tiny random model: claims run, verdicts land in a report.

The end-to-end runs are subprocesses of ``pytest claims/ --model tiny-llama`` and sit in the slow
tier; one run of the whole catalogue (:func:`tiny_catalogue`) is shared by every test that only
reads a run's report and expected file. The plugin's own behaviour on small claim files runs
in-process (pytester) in the unit tier.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


CA1 = "claims/test_causal.py::test_top_k_heads_are_necessary_for_retrieval"


def _run_claims(tmp_path, *extra, target=CA1, env=None):
    import os

    cmd = [sys.executable, "-m", "pytest", target, "--model", "tiny-llama", "-p", "no:cacheprovider", "-q",
           "--report-dir", str(tmp_path / "reports"), "--ranking-cache", str(tmp_path / "rankings"),
           "--journal", str(tmp_path / "journal"), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@dataclass(frozen=True)
class Catalogue:
    """One finished ``pytest claims/ --model tiny-llama --update-expected`` run."""

    proc: subprocess.CompletedProcess
    folder: Path  # its reports/ and rankings/
    expected: Path  # the expected file it wrote
    report: dict  # its JSON report

    def ca1_only(self, into: Path) -> Path:
        """A copy of the run's ranking cache and of its expected file cut to CA-1's keys and nodes
        under ``into``: what a run of CA-1 alone recorded."""
        shutil.copytree(self.folder / "rankings", into / "rankings")
        data = json.loads(self.expected.read_text())
        data["verdicts"] = {k: v for k, v in data["verdicts"].items() if k.startswith("CA-1[") and "phase=" not in k}
        data["nodes"] = {n: r for n, r in data["nodes"].items() if n.startswith(CA1 + "[")}
        out = into / "expected.json"
        out.write_text(json.dumps(data))
        return out


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory) -> Catalogue:
    """The whole catalogue on the tiny random model, run once for every test that only reads it."""
    folder = tmp_path_factory.mktemp("tiny-catalogue")
    expected = folder / "expected.json"
    proc = _run_claims(folder, "--expected", str(expected), "--update-expected", target="claims/")
    reports = sorted((folder / "reports").glob("tiny-llama-*.json"))
    assert proc.returncode == 0 and len(reports) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Catalogue(proc, folder, expected, json.loads(reports[0].read_text()))


@pytest.mark.slow
def test_claims_on_the_tiny_model_write_a_report_with_a_verdict_per_k(tiny_catalogue, tmp_path):
    data = tiny_catalogue.report
    assert len(list((tiny_catalogue.folder / "reports").glob("tiny-llama-*.html"))) == 1
    ca1 = [v for v in data["verdicts"] if v["claim"] == "CA-1" and "phase" not in v["params"]]
    decode = [v for v in data["verdicts"] if v["claim"] == "CA-1" and v["params"].get("phase") == "decode"]
    assert sorted(v["params"]["k"] for v in ca1) == [2, 4]  # the tiny quick profile's K levels
    assert sorted(v["params"]["k"] for v in decode) == [2, 4]  # and again under Wu24's decode-only protocol
    # a random model cannot retrieve a passkey: the claim is inconclusive (skipped), never supported
    assert {v["status"] for v in ca1} == {"inconclusive"}
    assert all("baseline accuracy" in v["reason"] for v in ca1)
    assert data["meta"]["baseline"]["accuracy"] < 0.5
    assert data["meta"]["ranking"]["cache"] == "computed"
    assert len(list((tiny_catalogue.folder / "rankings").glob("tiny-llama-sum_attention-*.json"))) >= 1
    # under --update-expected every verdict is as expected: the run passed (the fixture checks its exit code)
    recorded = json.loads(tiny_catalogue.expected.read_text())["verdicts"]
    assert {k: v for k, v in recorded.items() if k.startswith("CA-1[")} == {
        "CA-1[k=2]": "inconclusive", "CA-1[k=4]": "inconclusive",
        "CA-1[k=2,phase=decode]": "inconclusive", "CA-1[k=4,phase=decode]": "inconclusive"}
    assert len(recorded) == len(data["verdicts"]) and set(recorded.values()) <= {"supported", "refuted", "inconclusive"}
    assert "rh claim matrix" in tiny_catalogue.proc.stdout

    # a second run (CA-1 alone) loads the cached ranking, and its verdicts match the expected file
    expected = tiny_catalogue.ca1_only(tmp_path)
    again = _run_claims(tmp_path, "--expected", str(expected))
    assert again.returncode == 0, again.stdout[-2000:]
    assert "all 2 verdicts checked are as expected" in again.stdout
    newest = max((tmp_path / "reports").glob("tiny-llama-*.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["meta"]["ranking"]["cache"] == "hit"

    # a verdict that differs from the expected file fails the run, naming the claim
    data = json.loads(expected.read_text())
    data["verdicts"]["CA-1[k=4]"] = "supported"
    expected.write_text(json.dumps(data))
    changed = _run_claims(tmp_path, "--expected", str(expected))
    assert changed.returncode == 1
    assert "CA-1[k=4]: expected supported, got inconclusive" in changed.stdout


def test_a_bad_ranking_file_is_a_usage_error_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "rh.ranking/1", "heads": [')
    proc = _run_claims(tmp_path, "--rankings", str(bad))
    assert proc.returncode == 4, proc.stdout[-2000:]  # pytest's usage error: nothing was collected or loaded
    assert "--rankings:" in proc.stderr and str(bad) in proc.stderr and "not valid JSON" in proc.stderr
    assert "loaded tiny-llama" not in proc.stdout and not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_a_budget_checks_what_fits_and_lists_what_it_left_out(tiny_catalogue, tmp_path):
    """--budget plans from the token-layers the expected file recorded: a claim recorded as too
    costly for the budget is left out and named, the others are compared, the run passes."""
    assert "token-layers" in tiny_catalogue.proc.stdout
    full = json.loads(tiny_catalogue.expected.read_text())
    assert full["fixture_token_layers"]["baseline"] > 0  # the baseline evaluation was counted
    # recorded under the run's numerics (the tiny random model loads in float32)
    assert sum(full["fixture_token_layers"].values()) > 0 and full["numerics"].startswith("float32 on CPU")
    assert list(full["recorded"]) == [full["numerics"]]
    assert tiny_catalogue.report["meta"]["cost"]["total"] >= sum(full["fixture_token_layers"].values())
    # every pass is some claim's, with its fixtures, but the calibration (--update-expected), which no bill carries
    assert (sum(v["token_layers_with_fixtures"] for v in tiny_catalogue.report["verdicts"])
            == tiny_catalogue.report["meta"]["cost"]["total"])
    expected = tiny_catalogue.ca1_only(tmp_path)
    data = json.loads(expected.read_text())
    nodes = data["nodes"]
    assert set(nodes) == {f"{CA1}[K=2]", f"{CA1}[K=4]"}

    nodes[f"{CA1}[K=4]"]["token_layers"] = 10**15  # far beyond any budget on any machine
    expected.write_text(json.dumps(data))
    proc = _run_claims(tmp_path, "--expected", str(expected), "--budget", "10", env={"RH_PROGRESS_SECONDS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # progress through the terminal reporter, although pytest captures output (here: every pass)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("rh [")]
    assert any("loaded tiny-llama in float32" in line for line in progress)
    assert any("running baseline" in line and "token-layers of" in line and "of the budget left" in line
               for line in progress), progress[:5]
    assert "1 of 2 claims planned" in proc.stdout
    assert f"left out: {CA1}[K=4] (over budget" in proc.stdout
    assert "all 1 verdicts checked are as expected" in proc.stdout
    assert "CA-1[k=4] (over budget" in proc.stdout

    nodes[f"{CA1}[K=2]"]["token_layers"] = 10**15
    expected.write_text(json.dumps(data))
    # the first run left K=4 out, so its journal kept K=2: the same inputs again replay it, at no cost
    again = _run_claims(tmp_path, "--expected", str(expected), "--budget", "10")
    assert again.returncode == 0 and "1 claim(s) resumed" in again.stdout, again.stdout[-3000:]
    none = _run_claims(tmp_path, "--expected", str(expected), "--budget", "10", "--fresh")
    assert none.returncode == 1 and "no claim was checked" in none.stdout


def test_a_claim_stopped_by_the_budget_is_left_out_not_an_error(warm_imports, pytester):
    """The deadline's exception inside a claim turns into a named skip, and the comparison lists it
    instead of failing the run."""
    pytester.makepyfile(test_claims="""
        import pytest
        from rh.budget import BudgetExhausted
        from rh.rules.verdict import Verdict

        @pytest.mark.claim("X-1")
        def test_slow(record_verdict):
            raise BudgetExhausted("the --budget of 1 min ran out")

        @pytest.mark.claim("X-2")
        def test_quick(record_verdict):
            record_verdict(Verdict(claim="X-2", status="supported", test="t", statistic=1.0, p_value=0.01,
                                   p_adjusted=0.01, effect=0.5, ci=(0.1, 0.9), n=10, reason="", params={}))
        """)
    (pytester.path / "exp.json").write_text(json.dumps({
        "model": "tiny-llama", "profile": "quick", "verdicts": {"X-1[]": "supported", "X-2[]": "supported"},
        "nodes": {"test_claims.py::test_slow": {"key": "X-1[]", "token_layers": 1000},
                  "test_claims.py::test_quick": {"key": "X-2[]", "token_layers": 1000}}}))
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "--expected", "exp.json", "--report-dir", "reports",
                                        "--budget", "60", "-rs")  # the budget's own plugin handles its deadline
    out = res.stdout.str()
    assert res.ret == 0, out
    assert "left out: the budget ran out while it ran" in out
    assert "all 1 verdicts checked are as expected" in out and "X-1[] (the budget ran out while it ran)" in out


@pytest.mark.slow
@pytest.mark.parametrize("floor", ["profile", "off"])
def test_a_random_model_supports_no_claim_but_the_mechanical_identity(tmp_path, floor, request):
    """``pytest claims/ --model tiny-llama``: a random model has no retrieval heads, so no claim but
    CA-5 (an exact identity of the ablation mechanisms) may be supported. With the baseline floor
    switched off the rules themselves must still not support anything on its outcomes."""
    import os

    env = {}
    extra = []
    if floor == "off":
        (tmp_path / "floor_off.py").write_text(
            "import dataclasses\nimport rh.profiles as P\nq, f = P._TABLE['tiny']\n"
            "P._TABLE['tiny'] = (dataclasses.replace(q, baseline_floor=0.0), f)\n")
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        extra = ["-p", "floor_off"]
    if floor == "profile":  # the shared run is this very run
        run = request.getfixturevalue("tiny_catalogue")
        proc, verdicts = run.proc, run.report["verdicts"]
    else:
        proc = _run_claims(tmp_path, *extra, target="claims/", env=env)
        reports = sorted((tmp_path / "reports").glob("tiny-llama-*.json"))
        assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
        verdicts = json.loads(reports[-1].read_text())["verdicts"]
    assert not [v for v in verdicts if v["status"] == "error"], proc.stdout[-3000:]
    supported = sorted({v["claim"] for v in verdicts if v["status"] == "supported"})
    assert supported == ["CA-5"], [(v["claim"], v["params"], v["reason"]) for v in verdicts if v["status"] == "supported"]
    assert len({v["claim"] for v in verdicts}) >= 18  # every claim ran
    for v in verdicts:
        assert "min_effect" in v and "power" in v, v["claim"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"])
def test_the_catalogue_runs_on_every_familys_tiny_model_and_supports_only_the_identity(tmp_path, family):
    """``pytest claims/ --model tiny-<family>``: every claim runs to a verdict (no error row) on a
    random model of each family, and none but CA-5's mechanical identity is supported. (This run
    found IV-3's hub override indexing past the keys under Mistral's sliding window.)"""
    cmd = [sys.executable, "-m", "pytest", "claims/", "--model", f"tiny-{family}", "-p", "no:cacheprovider", "-q",
           "--report-dir", str(tmp_path / "reports"), "--ranking-cache", str(tmp_path / "rankings"),
           "--journal", str(tmp_path / "journal")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    reports = sorted((tmp_path / "reports").glob(f"tiny-{family}-*.json"))
    assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = json.loads(reports[-1].read_text())["verdicts"]
    assert not [(v["key"], v.get("reason")) for v in verdicts if v["status"] == "error"]
    assert sorted({v["claim"] for v in verdicts if v["status"] == "supported"}) == ["CA-5"]
    assert len({v["claim"] for v in verdicts}) >= 18  # every claim ran


def _guide_examples() -> dict[str, str]:
    """The worked examples of docs/writing-claims.md: file name -> code."""
    import re

    text = (ROOT / "docs" / "writing-claims.md").read_text()
    found = dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S))
    assert "test_lab.py" in found, "docs/writing-claims.md lost its worked example"
    return found


def _guide_example() -> tuple[str, str]:
    """The guide's example claim: (file name, code)."""
    return "test_lab.py", _guide_examples()["test_lab.py"]


def test_the_guides_example_runs_in_an_outside_project_and_lands_in_the_report(warm_imports, pytester):
    """An empty folder elsewhere with one claim file: the installed plugin gives it the fixtures,
    the claim matrix and the report (nothing from this repository's conftest)."""
    name, code = _guide_example()
    pytester.path.joinpath(name).write_text(code)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider", "-rs")
    out = res.stdout.str()
    assert res.ret == 0, out  # inconclusive skips
    assert "rh claim matrix" in out and "LAB-1" in out
    reports = sorted((pytester.path / "reports").glob("tiny-llama-*.json"))  # the default rh_report_dir
    assert len(reports) == 1 and reports[0].with_suffix(".html").exists()
    [v] = json.loads(reports[0].read_text())["verdicts"]
    assert v["claim"] == "LAB-1" and v["source"].startswith("our notebook")
    assert v["statement"].startswith("Ablating the ranking's top 3 heads")
    # a random model: the floor makes it inconclusive, never supported
    assert v["status"] == "inconclusive" and "below the floor" in v["reason"], v
    assert v["params"] == {"set": "top3", "heads": 3} and v["min_effect"] == 0.2
    assert list((pytester.path / ".rh" / "rankings").glob("tiny-llama-sum_attention-*.json"))  # the default cache


def test_the_guides_claim_family_gets_its_figure_in_the_report_and_a_row_in_calibrate(warm_imports, pytester):
    """The guide's conftest (a team's own claim family) beside its example claim, in an empty
    folder: the report shows the family's figure in LAB-1's section, ``python -m rh calibrate
    --plugin conftest.py`` gives LAB-1 a row of rates, and after the session the registry holds
    rh's own families only. Catches a hook that is not called, a family figure the report does not
    draw (or files outside its claim), and a conftest's family leaking into the next session."""
    import base64
    import re

    from rh.claim_families import families

    before = [f.id for f in families()]
    examples = _guide_examples()
    assert "conftest.py" in examples, "docs/writing-claims.md lost its claim-family example"
    for name in ("test_lab.py", "conftest.py"):
        pytester.path.joinpath(name).write_text(examples[name])
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider")
    assert res.ret == 0, res.stdout.str()
    assert [f.id for f in families()] == before  # the conftest's family left with its session
    [html] = sorted((pytester.path / "reports").glob("tiny-llama-*.html"))
    page = html.read_text()
    start = page.index('id="claim-LAB-1"')
    section = page[start:page.index("</section>", start)]  # LAB-1's section of the claims
    assert "accuracy before and after ablating the top 3" in section
    m = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", section)
    assert m and base64.b64decode(m.group(1)).startswith(b"\x89PNG")
    proc = subprocess.run([sys.executable, "-m", "rh", "calibrate", "--plugin", "conftest.py", "--family", "LAB-1",
                           "--family", "CA-4", "--reps", "40"], cwd=pytester.path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:5] for line in proc.stdout.splitlines() if line[:5] in ("LAB-1", "CA-4 ")}
    assert set(rows) == {"LAB-1", "CA-4"}, proc.stdout
    fs, fr, ps, pr = map(float, rows["LAB-1"])
    assert 0 <= fs <= 0.2 and 0 <= fr <= 0.2 and ps > 0.5 and pr > 0.5, rows  # 40 runs: rates of a working rule
    proc = subprocess.run([sys.executable, "-m", "rh", "calibrate", "--plugin", "missing.py"], cwd=pytester.path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--plugin missing.py: no such file" in proc.stderr


def test_without_the_plugin_there_are_no_rh_options_or_fixtures(warm_imports, pytester):
    pytester.makepyfile(test_ours="""
        def test_uses_the_model(rh_model):
            pass
        """)
    res = pytester.runpytest_inprocess("-p", "no:rh", "--model", "tiny-llama")
    assert res.ret == 4  # usage error
    assert "unrecognized arguments: --model" in res.stderr.str()
    res = pytester.runpytest_inprocess("-p", "no:rh")
    assert res.ret == 1
    assert "fixture 'rh_model' not found" in res.stdout.str()
    # with the plugin (the default once rh is installed) the fixture exists
    assert "rh_model" in pytester.runpytest_inprocess("--fixtures").stdout.str()


@pytest.mark.slow
def test_a_head_set_is_tested_at_its_own_size_and_claims_needing_an_order_say_so(tmp_path):
    """--heads: CA-1 runs at K = the set's size only; CA-2 (top K at several K) is inconclusive,
    named as not applicable, instead of inventing an order."""
    proc = _run_claims(tmp_path, "--heads", "L0H1,L1H2,L3H7", "-k", "necessary or grows",
                       target="claims/test_causal.py", )
    reports = sorted((tmp_path / "reports").glob("tiny-llama-*.json"))
    assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(reports[-1].read_text())
    by = {(v["claim"], v["params"].get("phase", "all")): v for v in data["verdicts"]}
    # at K = 3 only, at every position and under Wu24's decode-only protocol
    assert sorted((v["params"]["k"], v["params"].get("phase", "all")) for v in data["verdicts"]
                  if v["claim"] == "CA-1") == [(3, "all"), (3, "decode")]
    for phase in ("all", "decode"):
        assert by["CA-1", phase]["status"] == "inconclusive"  # a random model: the floor
        assert by["CA-2", phase]["status"] == "inconclusive"
        assert "not applicable to a head set" in by["CA-2", phase]["reason"] and "K=3" in by["CA-2", phase]["reason"]
    assert data["meta"]["ranking"]["head_set"] == ["L0H1", "L1H2", "L3H7"]
    assert data["meta"]["ranking"]["cache"] == "external"


def test_a_long_claim_prints_progress_without_s_and_estimates_the_time_left(warm_imports, pytester, monkeypatch):
    """pytest captures tqdm: the plugin's progress lines (what runs, the loop's position, token-layers
    of those an expected file recorded, time left) reach the terminal without ``-s``."""
    pytester.makepyfile(test_long="""
        import pytest
        import torch
        from rh.progress import track
        from rh.rules.claims import inconclusive

        @pytest.mark.claim("P-1")
        def test_long(rh_model, record_verdict):
            for _ in track(range(3), "conditions", unit="condition"):
                rh_model.model(torch.ones(1, 16, dtype=torch.long))
            record_verdict(inconclusive("P-1", {}, "a test of the progress lines", "none"))
        """)
    pytester.makeini("[pytest]\nrh_expected_dir = expected\n")
    # the tiny model has 4 layers: 3 passes of 16 tokens are 192 token-layers; the file says 384
    (pytester.path / "expected").mkdir()
    (pytester.path / "expected" / "tiny-llama.json").write_text(json.dumps({
        "model": "tiny-llama", "verdicts": {"P-1[]": "inconclusive"},
        "nodes": {"test_long.py::test_long": {"key": "P-1[]", "token_layers": 384}}}))
    monkeypatch.setenv("RH_PROGRESS_SECONDS", "0")  # a line at every forward pass, not once a minute
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider")
    out = res.stdout.str()
    assert res.ret == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("rh [")]
    assert any("running test_long.py::test_long, conditions 2 of 3" in ln for ln in lines), lines
    assert any("192 token-layers of 384 expected (50%)" in ln and "left at this pace" in ln for ln in lines), lines
    # --plain runs every pass in full: the file's count (a run with its savings) is not what it will run
    plain = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider", "--plain").stdout.str()
    lines = [ln for ln in plain.splitlines() if ln.startswith("rh [")]
    assert any("conditions 2 of 3" in ln for ln in lines) and not any("expected" in ln for ln in lines), lines


def _node_costs(report: dict) -> dict[str, int]:
    return {v["nodeid"]: v.get("token_layers") for v in report["verdicts"]}


@pytest.mark.slow
def test_iv4_with_a_donor_gives_the_same_verdict_and_passes_on_ray_replicas(tiny_catalogue, tmp_path):
    """IV-4 with --compare-model (a second random Llama of the tiny's shape, saved to a folder) in
    one process and on a Ray replica: the same verdict (status, accuracies, p-values) and
    token-layers. On Ray the controller holds no weights of the model under test and loads none
    (the donor's heads travel to the replica with the transplant task)."""
    from rh.models import tiny_llama

    donor = tiny_llama(seed=1)
    donor.model.save_pretrained(tmp_path / "donor")
    donor.tokenizer.save_pretrained(tmp_path / "donor")
    shutil.copytree(tiny_catalogue.folder / "rankings", tmp_path / "rankings")
    common = ("--ranking-cache", str(tmp_path / "rankings"), "--compare-model", str(tmp_path / "donor"),
              "-k", "transplanted", "-o", "log_cli=true", "--log-cli-level", "INFO")
    runs = {"local": _run_claims(tmp_path / "local", *common, target="claims/test_interventions.py"),
            "ray": _run_claims(tmp_path / "ray", *common, "--ray", "local", "--replicas", "1",
                               "--threads-per-replica", "1", target="claims/test_interventions.py")}
    reports = {}
    for name, proc in runs.items():
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[name] = json.loads(next((tmp_path / name / "reports").glob("*.json")).read_text())
    (here,), (there,) = ([v for v in reports[n]["verdicts"] if v["claim"] == "IV-4"] for n in ("local", "ray"))
    assert "transplanted_accuracy" in here["details"]  # the transplant ran: a donor of the same shape
    assert (there["status"], there["details"], there.get("p_value")) == \
        (here["status"], here["details"], here.get("p_value"))
    assert _node_costs(reports["ray"]) == _node_costs(reports["local"])
    assert reports["ray"]["meta"]["layout"]["controller_weights"] is False
    assert "loading tiny-llama again" not in runs["ray"].stdout + runs["ray"].stderr


@pytest.mark.slow
def test_the_catalogue_on_two_ray_replicas_gives_the_local_verdicts_and_token_layers(tiny_catalogue, tmp_path):
    """``--ray local --replicas 2``: every verdict the local run recorded, and each claim's
    token-layers equal to a local run's with the same (cached) rankings."""
    shutil.copytree(tiny_catalogue.folder / "rankings", tmp_path / "rankings")
    local = _run_claims(tmp_path / "local", "--ranking-cache", str(tmp_path / "rankings"), target="claims/")
    ray = _run_claims(tmp_path / "ray", "--ranking-cache", str(tmp_path / "rankings"), "--expected",
                      str(tiny_catalogue.expected), "--ray", "local", "--replicas", "2", "--threads-per-replica", "1",
                      target="claims/")
    assert ray.returncode == 0, ray.stdout[-3000:] + ray.stderr[-3000:]
    assert "verdicts checked are as expected" in ray.stdout
    reports = [json.loads(next((tmp_path / w / "reports").glob("*.json")).read_text()) for w in ("local", "ray")]
    assert _node_costs(reports[0]) == _node_costs(reports[1])
    assert reports[0]["meta"]["cost"]["by"] == reports[1]["meta"]["cost"]["by"]
    assert reports[1]["meta"]["layout"]["executor"] == "ray" and reports[1]["meta"]["layout"]["replicas"] == 2
    # the controller held the architecture alone: every pass ran on the replicas
    assert reports[1]["meta"]["layout"]["controller_weights"] is False
    assert reports[0]["meta"]["layout"]["controller_weights"] is True
    assert reports[1]["meta"]["units"]["rows_computed"] == reports[0]["meta"]["units"]["rows_computed"] > 0
    assert "rows computed on 2 Ray replica(s)" in ray.stdout
    memory = reports[1]["meta"]["memory"]  # each replica's own peak, beside the controller's
    assert len(memory["replicas"]) == 2 and all(m["rss_peak_bytes"] > 0 for m in memory["replicas"])
    assert len({m["pid"] for m in memory["replicas"]}) == 2
    assert "replicas" not in reports[0]["meta"]["memory"] and reports[0]["meta"]["memory"]["process"]["rss_peak_bytes"]
    assert "memory: peak in this process:" in ray.stdout and "replica 1:" in ray.stdout


@pytest.mark.slow
def test_under_pytest_n_the_workers_passes_are_billed_on_the_controller(tiny_catalogue, tmp_path):
    """``-n``: each worker counts its own passes and sends them with its claims' reports. With one
    worker (the claims in the serial order, one model, one prefix cache) every claim's bill, every
    fixture's and the total equal the serial run's; with two, the verdicts are the serial run's, every
    claim that ran a pass is billed for it, and the total is the sum of the labels' bills (the
    workers' own fixtures included), not the controller's zero."""
    shutil.copytree(tiny_catalogue.folder / "rankings", tmp_path / "rankings")
    runs = {}
    for name, extra in (("serial", ()), ("n1", ("-n", "1")), ("n2", ("-n", "2"))):
        proc = _run_claims(tmp_path / name, "--ranking-cache", str(tmp_path / "rankings"), *extra, target="claims/")
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = json.loads(next((tmp_path / name / "reports").glob("*.json")).read_text())
    serial, n1, n2 = runs["serial"], runs["n1"], runs["n2"]
    assert serial["meta"]["cost"]["total"] > 0
    assert _node_costs(n1) == _node_costs(serial)
    assert n1["meta"]["cost"]["by"] == serial["meta"]["cost"]["by"]
    assert n1["meta"]["cost"]["total"] == serial["meta"]["cost"]["total"]
    assert n1["meta"]["cost"]["saved"] == serial["meta"]["cost"]["saved"]
    assert n1["meta"]["cost"]["plain_by_claim"] == serial["meta"]["cost"]["plain_by_claim"]
    plain, saved = serial["meta"]["cost"]["plain_by_claim"], serial["meta"]["cost"]["saved"]
    assert sum(plain.values()) - sum(serial["meta"]["cost"]["by_claim"].values()) <= sum(saved.values())
    assert n1["meta"]["units"]["rows_computed"] == serial["meta"]["units"]["rows_computed"]
    status = {r: {v["key"]: v["status"] for v in runs[r]["verdicts"]} for r in runs}
    assert status["n2"] == status["serial"] == status["n1"]
    assert n2["meta"]["cost"]["total"] == sum(n2["meta"]["cost"]["by"].values())
    billed = {n for n, tl in _node_costs(serial).items() if tl}
    assert billed and billed == {n for n, tl in _node_costs(n2).items() if tl}
    assert n2["meta"]["units"]["rows_computed"] >= serial["meta"]["units"]["rows_computed"]


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_from_its_store_computing_only_the_missing_rows(tiny_catalogue, tmp_path):
    import os
    import signal
    import time

    folder = tmp_path
    exp = tiny_catalogue.ca1_only(folder)
    store = folder / "rows.jsonl"
    # --plain: the tiny random model is below the floor, where CA-1 reads no random set (6 rows in
    # all, written before a kill could land); in full, its 49 random sets give a store worth resuming
    full = _run_claims(folder / "full", "--ranking-cache", str(folder / "rankings"), "--store", str(folder / "all.jsonl"),
                       "--plain")
    assert full.returncode == 0, full.stdout[-2000:]
    total = json.loads(next((folder / "full" / "reports").glob("*.json")).read_text())["meta"]["units"]["rows_computed"]
    cmd = [sys.executable, "-m", "pytest", CA1, "--model", "tiny-llama", "-p", "no:cacheprovider", "-q",
           "--report-dir", str(folder / "killed"), "--ranking-cache", str(folder / "rankings"), "--store", str(store),
           "--journal", str(folder / "journal"), "--plain"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not store.exists() or len(store.read_text().splitlines()) < total // 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # whole row lines (a reading's values, such as ID-2's needle mass beside the baseline, are lines of their own)
    kept = len([ln for ln in store.read_text().splitlines() if ln.endswith("}") and '"row"' in ln])
    assert 0 < kept < total, (kept, total)
    again = _run_claims(folder / "again", "--ranking-cache", str(folder / "rankings"), "--store", str(store),
                        "--expected", str(exp), "--plain")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "verdicts checked are as expected" in again.stdout
    units = json.loads(next((folder / "again" / "reports").glob("*.json")).read_text())["meta"]["units"]
    assert units["store_loaded"] == kept
    assert units["rows_computed"] == total - kept  # only what was missing


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_run_ended_by_a_signal_writes_its_finished_verdicts_and_says_what_did_not_run(tmp_path, sig):
    """SIGTERM (a scheduler's time limit) ends the run as Ctrl-C does: the claim running stops, the
    report is written with the verdict that finished, marked interrupted in the terminal, the JSON
    and the HTML, with the claims not run named; the exit status is pytest's 'interrupted'."""
    import os
    import signal
    import time

    marker = tmp_path / "b-started"
    (tmp_path / "test_claims.py").write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path

        import pytest
        from rh.rules.verdict import Verdict

        def _v(claim):
            return Verdict(claim=claim, status="supported", test="t", statistic=1.0, p_value=0.01, p_adjusted=0.01,
                           effect=0.5, ci=(0.1, 0.9), n=10, reason="", params={{}})

        @pytest.mark.claim("X-1")
        def test_a(record_verdict):
            record_verdict(_v("X-1"))

        @pytest.mark.claim("X-2")
        def test_b(record_verdict):
            Path({str(marker)!r}).write_text("started")
            time.sleep(120)
            record_verdict(_v("X-2"))

        @pytest.mark.claim("X-3")
        def test_c(record_verdict):
            record_verdict(_v("X-3"))
        """))
    # as a terminal's Ctrl-C finds it: a run started in the background by a non-interactive shell (CI,
    # nohup ... &) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "test_claims.py", "--model", "tiny-llama", "-p",
                             "no:cacheprovider", "--report-dir", "reports"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[0][-3000:]
        os.kill(proc.pid, getattr(signal, sig))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it did not stop: no process of the test outlives it
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out[-3000:]
    assert f"rh: interrupted by {sig}" in out and "not run: test_claims.py::test_b" in out
    [report] = list((tmp_path / "reports").glob("*.json"))
    data = json.loads(report.read_text())
    assert [v["claim"] for v in data["verdicts"]] == ["X-1"]
    stop = data["meta"]["interrupted"]
    assert stop["by"].startswith(sig) and stop["finished"] == 1 and stop["collected"] == 3
    assert stop["not_run"] == ["test_claims.py::test_b", "test_claims.py::test_c"]
    html = report.with_suffix(".html").read_text()
    assert "<strong>Interrupted</strong> by " + sig in html and "test_claims.py::test_c" in html


_RESUMABLE = """
    from pathlib import Path

    import pytest
    from rh.rules.verdict import Verdict

    def _v(claim, status="supported"):
        return Verdict(claim=claim, status=status, test="t", statistic=1.0, p_value=0.01, p_adjusted=0.01,
                       effect=0.5, ci=(0.1, 0.9), n=10, reason="why" if status != "supported" else "",
                       params={{}}, details={{"d": [1, 2]}})

    def _ran(name):
        with open({calls!r}, "a") as fh:
            fh.write(name + "\\n")

    @pytest.mark.claim("X-1")
    def test_a(record_verdict):
        _ran("a")
        record_verdict(_v("X-1"))

    @pytest.mark.claim("X-2")
    def test_b(record_verdict):
        _ran("b")
        block = Path({block!r})
        if block.with_name("crash").exists():
            raise RuntimeError("a claim that errors")
        if block.exists():
            Path({marker!r}).write_text("started")
            import time
            time.sleep(120)
        record_verdict(_v("X-2", "refuted"))

    @pytest.mark.claim("X-3")
    def test_c(record_verdict):
        _ran("c")
        record_verdict(_v("X-3", "inconclusive"))
    """


def _resumable(folder: Path) -> tuple[Path, Path, Path]:
    calls, block, marker = folder / "calls.txt", folder / "block", folder / "b-started"
    (folder / "test_claims.py").write_text(textwrap.dedent(_RESUMABLE.format(calls=str(calls), block=str(block),
                                                                              marker=str(marker))))
    return calls, block, marker


def test_a_run_killed_by_sigterm_resumes_computing_only_the_claims_that_had_not_finished(tmp_path):
    """SIGTERM during the second of three claims, then the same command again: the first claim is
    replayed from the journal (its body does not run again), the other two are computed, the
    report holds all three verdicts (outcomes as computed: passed, failed, skipped) and says which
    it resumed; the journal is then removed, so a third run computes everything afresh."""
    import os
    import signal
    import time

    calls, block, marker = _resumable(tmp_path)
    block.write_text("")
    cmd = [sys.executable, "-m", "pytest", "test_claims.py", "--model", "tiny-llama", "-p", "no:cacheprovider",
           "--report-dir", "reports", "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[0][-3000:]
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out[-3000:]
    journal = list((tmp_path / ".rh" / "journal").glob("*.jsonl"))
    assert len(journal) == 1 and "the same command run again resumes: the 1 finished claims" in out, out[-3000:]
    assert calls.read_text().split() == ["a", "b"]
    block.unlink()
    calls.write_text("")
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stdout[-3000:]  # X-2 is refuted: a failed test, as computed
    assert calls.read_text().split() == ["b", "c"]  # the finished claim was not computed again
    assert "1 claim(s) resumed from" in again.stdout and "1 failed, 1 passed, 1 skipped" in again.stdout, again.stdout[-3000:]
    second = max((tmp_path / "reports").glob("*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(second.read_text())
    got = {v["claim"]: (v["status"], v["outcome"], bool(v.get("resumed"))) for v in data["verdicts"]}
    assert got == {"X-1": ("supported", "passed", True), "X-2": ("refuted", "failed", False),
                   "X-3": ("inconclusive", "skipped", False)}
    first = next(v for v in data["verdicts"] if v["claim"] == "X-1")
    assert first["details"] == {"d": [1, 2]} and first["ci"] == [0.1, 0.9]  # the verdict as recorded
    assert data["meta"]["resumed"]["claims"] == ["test_claims.py::test_a"] and data["meta"]["resumed"]["computed"] == 2
    assert "<strong>Resumed</strong>" in second.with_suffix(".html").read_text()
    assert not list((tmp_path / ".rh" / "journal").glob("*.jsonl"))  # every claim finished: no journal left
    calls.write_text("")
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert calls.read_text().split() == ["a", "b", "c"], third.stdout[-2000:]


def test_a_journal_is_replayed_only_for_the_same_inputs(warm_imports, pytester):
    """A claim kept by an unfinished run (here another claim errors, so the journal stays) is
    computed again when its inputs changed: another --alpha, an edited test file, --fresh; it is
    replayed (and passes or fails against --expected as a computed verdict would) when nothing
    changed. A torn last line costs only its claim; a claim in error is always computed again."""
    calls, block, marker = _resumable(pytester.path)
    (pytester.path / "crash").write_text("")
    args = ("--model", "tiny-llama", "-p", "no:cacheprovider")

    def ran(*extra):
        calls.write_text("")
        res = pytester.runpytest_inprocess(*args, *extra)
        return calls.read_text().split(), res

    journal = pytester.path / ".rh" / "journal"
    assert ran()[0] == ["a", "b", "c"]
    assert len(list(journal.glob("*.jsonl"))) == 1  # b is in error: the run is unfinished, its journal stays
    got, res = ran()
    assert got == ["b"]  # a and c replayed
    res.assert_outcomes(passed=1, failed=1, skipped=1)
    assert ran("--alpha", "0.045")[0] == ["a", "b", "c"]  # another level: other inputs, a journal of its own
    assert ran("--alpha", "0.045")[0] == ["b"]
    assert ran("--fresh")[0] == ["a", "b", "c"]
    src = pytester.path / "test_claims.py"
    src.write_text(src.read_text() + "\n# edited\n")
    assert ran()[0] == ["a", "b", "c"]  # the test file changed
    for p in journal.glob("*.jsonl"):  # tear the last line (test_c's record) of every journal
        text = p.read_text()
        p.write_text(text[: len(text) - 20])
    assert ran()[0] == ["b", "c"]
    exp = pytester.path / "exp.json"
    exp.write_text(json.dumps({"model": "tiny-llama", "profile": "quick",
                               "verdicts": {"X-1[]": "refuted", "X-2[]": "refuted", "X-3[]": "inconclusive"}}))
    got, res = ran("--expected", str(exp))
    assert got == ["b"]
    res.assert_outcomes(passed=1, failed=2)  # X-1 replayed as supported, not what the file expects; X-2 errs


def test_a_claim_that_declares_its_data_is_computed_again_when_the_data_change(warm_imports, pytester):
    """``@pytest.mark.claim(..., inputs=[...])``: a journal keeps the claim only for the content of
    the files it names (another claim errs, so the journal stays between the runs)."""
    calls = pytester.path / "calls.txt"
    (pytester.path / "data.txt").write_text("one")
    pytester.makepyfile(test_claims=f"""
        import pytest
        from rh.rules.verdict import Verdict

        @pytest.mark.claim("X-1", inputs=["data.txt"])
        def test_a(record_verdict):
            open({str(calls)!r}, "a").write("a\\n")
            record_verdict(Verdict(claim="X-1", status="supported", test="t", statistic=1.0, p_value=0.01,
                                   p_adjusted=0.01, effect=0.5, ci=(0.1, 0.9), n=10, reason="", params={{}}))

        @pytest.mark.claim("X-2")
        def test_b(record_verdict):
            raise RuntimeError("errs")
        """)

    def ran():
        calls.write_text("")
        pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider")
        return calls.read_text().split()

    assert ran() == ["a"]
    assert ran() == []
    (pytester.path / "data.txt").write_text("two")
    assert ran() == ["a"]


def test_a_claim_without_a_verdict_or_with_two_is_an_error_row(warm_imports, pytester):
    """A claim test that passes or skips without recording a verdict, or records two different
    ones, is an error row in the matrix and the report, never dropped; one recorded twice is one."""
    pytester.makepyfile(test_claims="""
        import pytest
        from rh.rules.verdict import Verdict

        def _v(claim, effect=0.5):
            return Verdict(claim=claim, status="supported", test="t", statistic=1.0, p_value=0.01, p_adjusted=0.01,
                           effect=effect, ci=(0.1, 0.9), n=10, reason="", params={})

        @pytest.mark.claim("X-1")
        def test_forgot(record_verdict):
            pass

        @pytest.mark.claim("X-2")
        def test_skips(record_verdict):
            pytest.skip("needs a GPU")

        @pytest.mark.claim("X-3")
        def test_twice(record_verdict):
            record_verdict(_v("X-3", 0.5))
            record_verdict(_v("X-3", 0.7))

        @pytest.mark.claim("X-4")
        def test_same_twice(record_verdict):
            record_verdict(_v("X-4"))
            record_verdict(_v("X-4"))
        """)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "--report-dir", "reports", "-p", "no:cacheprovider")
    out = res.stdout.str()
    data = json.loads(next((pytester.path / "reports").glob("*.json")).read_text())
    rows = {v["claim"]: v for v in data["verdicts"]}
    assert len(data["verdicts"]) == 4
    assert rows["X-1"]["status"] == "error" and "without recording a verdict" in rows["X-1"]["reason"]
    assert rows["X-2"]["status"] == "error" and "it skipped: " in rows["X-2"]["reason"]
    assert "needs a GPU" in rows["X-2"]["reason"]
    assert rows["X-3"]["status"] == "error" and "2 different verdicts" in rows["X-3"]["reason"]
    assert rows["X-4"]["status"] == "supported"
    assert "without recording a verdict" in out


def test_the_budget_and_plan_plugins_are_registered_only_with_their_options(warm_imports, pytester):
    """Catches an option's plugin that is always registered (its hooks then run, and test their
    option, in every session) or never registered (the option silently does nothing)."""
    from rh.pytest_plugin import BudgetScheduler, PlanPrinter

    (pytester.path / "exp.json").write_text(json.dumps({
        "model": "tiny-llama", "profile": "quick", "verdicts": {"X-1[]": "supported"},
        "nodes": {"test_x.py::test_x": {"key": "X-1[]", "token_layers": 10}}}))
    plain = pytester.parseconfigure("--model", "tiny-llama")
    assert plain.pluginmanager.get_plugin("rh-budget") is None and plain.pluginmanager.get_plugin("rh-plan") is None
    planned = pytester.parseconfigure("--model", "tiny-llama", "--plan")
    assert isinstance(planned.pluginmanager.get_plugin("rh-plan"), PlanPrinter)
    assert planned.pluginmanager.get_plugin("rh-budget") is None
    budget = pytester.parseconfigure("--model", "tiny-llama", "--budget", "5", "--expected", "exp.json")
    sched = budget.pluginmanager.get_plugin("rh-budget")
    assert isinstance(sched, BudgetScheduler) and sched.minutes == 5 and sched.plan is None
    assert budget.pluginmanager.get_plugin("rh-plan") is None


def test_the_expected_check_is_registered_only_with_its_option(warm_imports, pytester):
    """Catches the --expected plugin registered in every session (then a run without the option would
    compare with nothing, or write a file) or never (the option silently does nothing), and the
    budget planning from another file than the one the check compares with."""
    from rh.pytest_plugin import ExpectedCheck

    (pytester.path / "exp.json").write_text(json.dumps({
        "model": "tiny-llama", "profile": "quick", "verdicts": {"X-1[]": "supported"},
        "nodes": {"test_x.py::test_x": {"key": "X-1[]", "token_layers": 10}}}))
    plain = pytester.parseconfigure("--model", "tiny-llama")
    assert plain.pluginmanager.get_plugin("rh-expected") is None
    checked = pytester.parseconfigure("--model", "tiny-llama", "--expected", "exp.json")
    check = checked.pluginmanager.get_plugin("rh-expected")
    assert isinstance(check, ExpectedCheck) and not check.update
    assert check.expected.verdicts == {"X-1[]": "supported"} and check.expected.path == Path("exp.json")
    writing = pytester.parseconfigure("--model", "tiny-llama", "--expected", "new.json", "--update-expected")
    assert writing.pluginmanager.get_plugin("rh-expected").update
    budget = pytester.parseconfigure("--model", "tiny-llama", "--budget", "5", "--expected", "exp.json")
    assert budget.pluginmanager.get_plugin("rh-budget").expected is budget.pluginmanager.get_plugin("rh-expected").expected


_EXPECTED_CLAIMS = """
    from pathlib import Path

    import pytest
    from rh.rules.verdict import Verdict

    def _v(claim, status):
        return Verdict(claim=claim, status=status, test="t", statistic=1.0, p_value=0.01, p_adjusted=0.01,
                       effect=0.5, ci=(0.1, 0.9), n=10, reason="why" if status != "supported" else "", params={})

    @pytest.mark.claim("X-1")
    def test_a(record_verdict):
        record_verdict(_v("X-1", "supported"))

    @pytest.mark.claim("X-2")
    def test_b(record_verdict):
        record_verdict(_v("X-2", "refuted"))

    @pytest.mark.claim("X-3")
    def test_c(record_verdict):
        record_verdict(_v("X-3", "inconclusive"))

    @pytest.mark.claim("X-4")
    def test_d(record_verdict):
        if Path("crash").exists():
            raise RuntimeError("a claim that errors")
        record_verdict(_v("X-4", "supported"))
    """


def test_expected_is_written_then_compared_and_a_changed_verdict_fails_the_run(warm_imports, pytester):
    """--update-expected writes the statuses the claims recorded (never an error's), --expected then
    passes exactly when every status is the file's, whatever the statuses are, lists a claim left
    out (deselected) instead of failing it, and fails the run on a changed or unrecorded verdict. The file
    and the verdicts are those this test wrote. Catches the comparison or the writing lost or
    inverted when the check moves between plugin objects: a run that passes with a changed verdict,
    an error written into the file, a missing ``rh expected verdicts:`` line or report entry."""
    pytester.makepyfile(test_claims=_EXPECTED_CLAIMS)
    exp = pytester.path / "exp.json"
    args = ("--model", "tiny-llama", "-p", "no:cacheprovider", "--fresh", "--report-dir", "reports",
            "--expected", str(exp))

    def ran(*extra):
        for old in (pytester.path / "reports").glob("*.json"):
            old.unlink()
        res = pytester.runpytest_inprocess(*args, *extra)
        report = next((pytester.path / "reports").glob("*.json"), None)
        return res, res.stdout.str(), json.loads(report.read_text())["meta"] if report else None

    (pytester.path / "crash").write_text("")
    res, out, _ = ran("--update-expected")
    assert res.ret == 1, out  # an error fails the run, and is not written
    written = json.loads(exp.read_text())
    assert written["verdicts"] == {"X-1[]": "supported", "X-2[]": "refuted", "X-3[]": "inconclusive"}
    assert written["model"] == "tiny-llama" and written["profile"] == "quick"
    assert "rh expected verdicts: wrote 3 verdicts to" in out and "rh expected verdicts: not written, in error: X-4[" in out
    (pytester.path / "crash").unlink()
    res, out, meta = ran()
    assert res.ret == 1 and "rh expected verdicts: X-4[]: got supported, absent from" in out, out
    assert meta["expected"]["ok"] is False and meta["expected"]["checked"] == 4
    res, out, _ = ran("--update-expected")
    assert res.ret == 0, out
    assert json.loads(exp.read_text())["verdicts"]["X-4[]"] == "supported"
    assert set(json.loads(exp.read_text())["nodes"]) == {f"test_claims.py::test_{x}" for x in "abcd"}
    res, out, meta = ran()
    assert res.ret == 0, out
    res.assert_outcomes(passed=4)  # refuted and inconclusive pass: they are what the file expects
    assert f"rh expected verdicts: all 4 verdicts checked are as expected in {exp}" in out
    assert meta["expected"] == {"path": str(exp), "ok": True, "checked": 4, "left_out": [],
                                "lines": [f"all 4 verdicts checked are as expected in {exp}"]}
    res, out, meta = ran("--deselect", "test_claims.py::test_c")
    assert res.ret == 0 and "left out (1, not compared): X-3[] (deselected)" in out, out
    assert meta["expected"]["left_out"] == ["X-3[]"] and meta["expected"]["checked"] == 3
    data = json.loads(exp.read_text())
    data["verdicts"]["X-2[]"] = "supported"
    exp.write_text(json.dumps(data))
    res, out, meta = ran()
    assert res.ret == 1, out
    res.assert_outcomes(passed=3, failed=1)
    assert "rh expected verdicts: X-2[]: expected supported, got refuted" in out
    assert meta["expected"]["ok"] is False


def test_expected_statuses_recorded_for_this_machines_numerics_are_the_ones_checked(warm_imports, pytester):
    """The file's statuses are its numerics'; a status recorded for this run's numerics (the dtype and
    the kernels, in the report) is the one its claims must meet, and --update-expected here writes
    only what differs from the file's. Catches the per-numerics record ignored by the claims' own
    pass/fail or by the run's comparison, and another machine's run rewriting the file's verdicts."""
    pytester.makepyfile(test_claims="""
        import pytest
        from rh.rules.verdict import Verdict

        @pytest.mark.claim("X-1")
        def test_a(rh_model, record_verdict):
            record_verdict(Verdict(claim="X-1", status="supported", test="t", statistic=1.0, p_value=0.01,
                                   p_adjusted=0.01, effect=0.5, ci=(0.1, 0.9), n=10, reason="", params={}))
    """)
    exp = pytester.path / "exp.json"
    args = ("--model", "tiny-llama", "-p", "no:cacheprovider", "--fresh", "--report-dir", "reports",
            "--expected", str(exp))
    res = pytester.runpytest_inprocess(*args, "--update-expected")
    assert res.ret == 0, res.stdout.str()
    written = json.loads(exp.read_text())
    report = json.loads(next((pytester.path / "reports").glob("*.json")).read_text())
    here = report["meta"]["numerics"]
    assert written["numerics"] == here and here.startswith(report["meta"]["dtype"] + " on CPU ")
    elsewhere = "float64 on an abacus"
    exp.write_text(json.dumps({**written, "numerics": elsewhere, "verdicts": {"X-1[]": "refuted"},
                               "differences": {here: {"X-1[]": "supported"}}}))
    res = pytester.runpytest_inprocess(*args)
    assert res.ret == 0 and "all 1 verdicts checked are as expected" in res.stdout.str(), res.stdout.str()
    exp.write_text(json.dumps({**written, "numerics": elsewhere, "verdicts": {"X-1[]": "refuted"}}))
    res = pytester.runpytest_inprocess(*args)
    out = res.stdout.str()
    assert res.ret == 1 and "X-1[]: expected refuted, got supported" in out and f"({here}) are not the file's" in out
    res = pytester.runpytest_inprocess(*args, "--update-expected")
    assert res.ret == 0 and f"recorded 1 verdicts on {here}" in res.stdout.str()
    again = json.loads(exp.read_text())
    assert again["verdicts"] == {"X-1[]": "refuted"} and again["differences"] == {here: {"X-1[]": "supported"}}


def test_the_report_keeps_what_the_session_fixtures_computed(warm_imports, pytester):
    """The report's ranking, attention example, baseline and ranking-uncertainty entries are those of
    the values the claim received (written out by the claim itself), and the ranking's cache state is
    ``computed`` on the first run and ``hit`` on the next. Catches the report's entries lost or taken
    from another value when the fixtures only return what they compute."""
    pytester.makepyfile(test_meta="""
        import json
        from pathlib import Path

        import pytest
        from rh.rules.claims import inconclusive

        @pytest.mark.claim("M-1")
        def test_m(ranking, baseline, ranking_uncertainty, profile, validation, record_verdict):
            Path("seen.json").write_text(json.dumps({
                "top10": [str(h) for h in ranking.top(10)], "top5": [str(h) for h in ranking.top(5)],
                "n": len(baseline), "accuracy": float(baseline["correct"].mean()),
                "uncertainty": ranking_uncertainty[profile.id_k].to_json(), "sample": validation[0].id,
                "provenance": ranking.provenance}, default=str))
            record_verdict(inconclusive("M-1", {}, "a test of the report's session entries", "none"))
        """)
    args = ("--model", "tiny-llama", "-p", "no:cacheprovider", "--fresh", "--report-dir", "reports")

    def ran():
        for old in (pytester.path / "reports").glob("*.json"):
            old.unlink()
        res = pytester.runpytest_inprocess(*args)
        assert res.ret == 0, res.stdout.str()
        report = next((pytester.path / "reports").glob("*.json"))
        return json.loads(report.read_text())["meta"], json.loads((pytester.path / "seen.json").read_text())

    meta, seen = ran()
    assert meta["ranking"]["cache"] == "computed" and meta["ranking"]["top10"] == seen["top10"]
    assert Path(meta["ranking"]["path"]).is_file() and meta["ranking"]["provenance"] == seen["provenance"]
    assert meta["baseline"]["n"] == seen["n"] and meta["baseline"]["accuracy"] == seen["accuracy"]
    assert meta["ranking_uncertainty"] == seen["uncertainty"]
    example = meta["attention_example"]
    assert example["sample"] == seen["sample"] and example["heads"] == seen["top5"] and len(example["rows"]) == 5
    again, seen = ran()
    assert again["ranking"]["cache"] == "hit" and again["ranking"]["path"] == meta["ranking"]["path"]
    assert again["ranking"]["top10"] == seen["top10"]
