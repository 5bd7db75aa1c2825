"""The rh pytest plugin: command-line options, session fixtures (model, prompts, split, ranking),
verdict collection, and the report written at the end of every run of ``pytest claims/``."""

from __future__ import annotations

import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent
RANKING_CACHE = ROOT / "fixtures" / "rankings"
_VERDICT = "rh_verdict"
_META = "rh_meta"
_CLAIM = "rh_claim"
_STATE = pytest.StashKey[dict]()

log = logging.getLogger("rh")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("rh", "retrieval-head claims")
    g.addoption("--model", default="smollm2-135m",
                help="registry key (smollm2-135m, tiny-llama, llama8b, llama8b-base, llama70b), HF repo id or local dir")
    g.addoption("--profile", default="quick", choices=("quick", "full"), help="how much evidence to gather")
    g.addoption("--alpha", type=float, default=None, help="significance level (default: the profile's, 0.05)")
    g.addoption("--quant", default=None, choices=("4bit", "8bit"), help="bitsandbytes quantization (CUDA only)")
    g.addoption("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.addoption("--dtype", default="auto", choices=("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16"),
                help="weights and activations: auto (default) = bf16 on CUDA and on CPUs with native bf16 matmul "
                     "(amx_bf16/avx512_bf16), float32 on other CPUs, where bf16 is emulated and several times slower")
    g.addoption("--max-memory", default=None, metavar="SPEC",
                help="cap per device for device_map='auto' across the GPUs: '70GiB' (each GPU), "
                     "'70GiB,cpu=100GiB' or '0=70GiB,1=70GiB,cpu=100GiB'")
    g.addoption("--rankings", default=None, metavar="PATH", help="use this ranking file instead of the cache")
    g.addoption("--recompute", action="store_true", help="recompute the ranking even if it is cached")
    g.addoption("--method", default="sum_attention", choices=("sum_attention", "wu24"),
                help="how heads are identified (default: sum attention, seed 003)")
    g.addoption("--compare-model", default=None,
                help="a second variant of the model (e.g. llama8b-base for llama8b) for ID-6")
    g.addoption("--expected", default=None, metavar="PATH",
                help="compare every verdict with this file (fixtures/expected/<model>.json): the run passes "
                     "exactly when no verdict changed, whatever the verdicts are")
    g.addoption("--update-expected", action="store_true", help="with --expected: rewrite the file from this run")
    g.addoption("--report-dir", default=str(ROOT / "reports"), help="where the HTML and JSON reports go")
    g.addoption("--ranking-cache", default=str(RANKING_CACHE), help="folder of cached rankings")


def pytest_configure(config: pytest.Config) -> None:
    from rh.models import resolve_spec

    try:  # a bad --model is a usage error, reported before anything is collected
        resolve_spec(config.getoption("--model"))
    except (ValueError, FileNotFoundError) as exc:
        raise pytest.UsageError(f"--model: {exc}") from None
    config.stash[_STATE] = {"verdicts": [], "meta": {}, "claims_run": 0, "started": datetime.now(timezone.utc),
                            "t0": time.perf_counter()}


# --------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def rh_model(pytestconfig):
    """The model under test, loaded once per session."""
    from rh.models import load_model

    return load_model(pytestconfig.getoption("--model"), quant=pytestconfig.getoption("--quant"),
                      device=pytestconfig.getoption("--device"), max_memory=pytestconfig.getoption("--max-memory"),
                      dtype=pytestconfig.getoption("--dtype"))


@pytest.fixture(scope="session")
def profile(pytestconfig, rh_model):
    from rh.profiles import get_profile

    return get_profile(pytestconfig.getoption("--profile"), rh_model.shape, alpha=pytestconfig.getoption("--alpha"))


@pytest.fixture(scope="session")
def niah_samples(rh_model, profile):
    """Prompts over the profile's tasks x lengths x depths."""
    from rh.niah import build_samples

    return build_samples(rh_model.tokenizer, profile.sweep(), chat=rh_model.instruct,
                         max_positions=rh_model.max_positions)


@pytest.fixture(scope="session")
def niah_split(niah_samples, profile):
    """(identify, validate): the seeded 80/20 split by sample id."""
    from rh.niah import split_samples

    return split_samples(niah_samples, frac=profile.identify_frac, seed=profile.split_seed)


@pytest.fixture(scope="session")
def validation(niah_split, profile):
    """CA-1's validation prompts: the 20% side, on the profile's CA tasks."""
    return [s for s in niah_split[1] if s.task in profile.tasks]


@pytest.fixture(scope="session")
def identify_ranking(pytestconfig, rh_model, profile):
    """A function: (identification samples, method, sweep) -> (ranking, cache path), via the cache."""
    from rh.pipeline import cached_identification, ranking_provenance

    from rh.pipeline import load_sample_scores

    def get(samples, method: str = "sum_attention", sweep=None, *, model=None, with_scores: bool = False):
        m = model or rh_model
        prov = ranking_provenance(m, sweep or profile.sweep(), method, samples,
                                  identify_frac=profile.identify_frac, split_seed=profile.split_seed)
        kwargs = dict(cache_dir=pytestconfig.getoption("--ranking-cache"), batch_size=profile.batch_size)
        r, where, hit = cached_identification(m, samples, prov, recompute=pytestconfig.getoption("--recompute"),
                                              **kwargs)
        if not with_scores:
            return r, where, hit
        scored = load_sample_scores(where)
        if scored is None:  # cached before per-sample scores were kept: compute them once
            r, where, hit = cached_identification(m, samples, prov, recompute=True, **kwargs)
            scored = load_sample_scores(where)
        return r, where, hit, scored

    return get


@pytest.fixture(scope="session")
def ranking(pytestconfig, rh_model, profile, niah_split, identify_ranking):
    """The ranking on the identification split (--method): from --rankings, the cache, or computed."""
    from rh.rankings import load_ranking

    path = pytestconfig.getoption("--rankings")
    if path:
        r = load_ranking(path, shape=rh_model.shape)
        where, cache = path, "external"
    else:
        identify = [s for s in niah_split[0] if s.task in profile.tasks]
        r, where, hit = identify_ranking(identify, pytestconfig.getoption("--method"))
        cache = "hit" if hit else "computed"
    _session_meta(pytestconfig)["ranking"] = {"path": str(where), "cache": cache, "provenance": r.provenance,
                                              "top10": [str(h) for h in r.top(min(10, rh_model.shape.n_total))]}
    _attention_example(pytestconfig, rh_model, r, [s for s in niah_split[1] if s.task in profile.tasks])
    return r


def _attention_example(config, model, ranking, validation) -> None:
    """The top heads' last-token attention on one validation prompt, for the report's heatmap."""
    from rh.scoring import last_token_attention

    if not validation:
        return
    sample = validation[0]
    heads = ranking.top(min(5, model.shape.n_total))
    rows = last_token_attention(model, sample, heads)
    _session_meta(config)["attention_example"] = {
        "sample": sample.id, "heads": [str(h) for h in heads], "needle_span": list(sample.needle_span),
        "answer_span": list(sample.answer_span), "rows": [[round(float(x), 5) for x in row] for row in rows],
    }


@pytest.fixture(scope="session")
def baseline(pytestconfig, rh_model, validation, profile):
    """Teacher-forced outcomes on the validation split with no intervention."""
    from rh.causal import evaluate_baseline

    df = evaluate_baseline(rh_model, validation, batch_size=profile.batch_size)
    by_depth = df.groupby("depth")["correct"].mean()
    _session_meta(pytestconfig)["baseline"] = {
        "accuracy": float(df["correct"].mean()), "n": len(df),
        "accuracy_by_depth": {f"{d:g}": float(a) for d, a in by_depth.items()},
    }
    return df


@pytest.fixture
def record_verdict(request, pytestconfig):
    """Call with a ``Verdict``: attaches it to the test report (xdist-safe), then passes,
    fails (refuted) or skips (inconclusive) the test accordingly. Under ``--expected`` the test
    instead passes exactly when the verdict is the expected one (``--update-expected``: always)."""

    marker = request.node.get_closest_marker("claim")
    expected = _expected_verdicts(pytestconfig)
    doc = " ".join((getattr(request.node, "function", None).__doc__ or "").split())

    def record(verdict) -> None:
        entry = verdict.to_dict()
        entry["statement"] = doc
        entry["source"] = marker.kwargs.get("source", "") if marker else ""
        request.node.user_properties.append((_VERDICT, entry))
        request.node.user_properties.append((_META, _session_meta(pytestconfig)))
        if expected is not None and pytestconfig.getoption("--update-expected"):
            return
        if expected is not None:
            key = _verdict_key(entry)
            want = expected.get(key, "absent from the expected file")
            assert verdict.status == want, (
                f"{key}: expected {want}, got {verdict.status} -- if the science changed, rerun with "
                f"--update-expected and commit the file\n" + verdict.explain())
            return
        if verdict.inconclusive:
            pytest.skip(f"inconclusive: {verdict.reason}")
        assert verdict.supported, "claim refuted:\n" + verdict.explain()

    return record


def _expected_verdicts(config: pytest.Config) -> dict[str, str] | None:
    """The expected statuses under --expected, else None."""
    path = config.getoption("--expected")
    if not path:
        return None
    if config.getoption("--update-expected"):
        return {}  # the file is rewritten from this run: any verdict will do
    import json

    p = Path(path)
    return json.loads(p.read_text())["verdicts"] if p.exists() else {}


def _session_meta(config: pytest.Config) -> dict[str, Any]:
    return config.stash[_STATE]["meta"]


# --------------------------------------------------------------------------- collection of verdicts


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _config.stash[_STATE] if _config else None
    if state is None or "claim" not in report.keywords:
        return
    props = dict(report.user_properties)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        state["claims_run"] += 1
        if _META in props:
            _merge(state["meta"], props[_META])
        if _VERDICT in props:
            v = dict(props[_VERDICT])
            v["nodeid"] = report.nodeid
            v["outcome"] = report.outcome
            state["verdicts"].append(v)
        elif report.failed:
            state["verdicts"].append({
                "nodeid": report.nodeid, "claim": props.get(_CLAIM, report.nodeid), "status": "error",
                "outcome": "error",
                "reason": _short_error(report),
            })


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Carry each claim's id (``@pytest.mark.claim("CA-1")``) to its reports, for the error rows."""
    for item in items:
        marker = item.get_closest_marker("claim")
        if marker is not None and marker.args:
            item.user_properties.append((_CLAIM, str(marker.args[0])))


def _short_error(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(report.longrepr)[-2000:]


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _config
    _config = session.config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # xdist worker: the controller writes the report
        return
    state = config.stash[_STATE]
    if not state["claims_run"]:
        return
    expected = config.getoption("--expected")
    if expected:
        session.exitstatus = _check_expected(config, state, Path(expected), int(exitstatus))
    try:
        paths = _write_report(config, state)
    except Exception as exc:  # a report failure must not hide the test results
        log.exception("could not write the rh report")
        config._rh_report_error = str(exc)  # type: ignore[attr-defined]
        return
    config._rh_report_paths = paths  # type: ignore[attr-defined]


def _write_report(config: pytest.Config, state: dict) -> tuple[Path, Path]:
    import torch
    import transformers

    import rh
    from rh.plots import report_figures
    from rh.report import report_stem, write_report

    finished = datetime.now(timezone.utc)
    meta = dict(state["meta"])
    meta.update({
        "model": config.getoption("--model"), "profile": config.getoption("--profile"),
        "rh_version": rh.__version__, "started": state["started"].isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "runtime_s": round(time.perf_counter() - state["t0"], 1),
        "command": "pytest " + " ".join(config.invocation_params.args),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "hardware": _hardware(),
    })
    figures = report_figures(state["verdicts"], meta)
    stem = report_stem(config.getoption("--model"), state["started"])
    return write_report(state["verdicts"], meta, config.getoption("--report-dir"), stem, figures)


def _verdict_key(v: dict) -> str:
    params = ",".join(f"{k}={v2}" for k, v2 in sorted((v.get("params") or {}).items()) if k != "heads")
    return f"{v.get('claim')}[{params}]"


def _check_expected(config: pytest.Config, state: dict, path: Path, exitstatus: int) -> int:
    """Compare statuses with the expected file (or rewrite it); the run passes iff nothing changed."""
    from rh.io import atomic_write_json

    got = {_verdict_key(v): v["status"] for v in state["verdicts"]}
    if config.getoption("--update-expected"):
        atomic_write_json(path, {"model": config.getoption("--model"), "profile": config.getoption("--profile"),
                                 "verdicts": dict(sorted(got.items()))})
        state["expected_diff"] = [f"wrote {len(got)} expected verdicts to {path}"]
        return 0 if "error" not in got.values() else 1
    if not path.exists():
        state["expected_diff"] = [f"{path} does not exist: create it with --expected {path} --update-expected"]
        return 1
    import json

    want = json.loads(path.read_text())["verdicts"]
    diff = [f"{k}: expected {want.get(k, 'absent')}, got {got.get(k, 'absent')}"
            for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    state["expected_diff"] = diff or [f"all {len(got)} verdicts as expected in {path}"]
    return 1 if diff else (0 if exitstatus in (0, 1) else exitstatus)


def _hardware() -> dict[str, Any]:
    import os

    import torch

    hw: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    verdicts = sorted(config.stash[_STATE]["verdicts"], key=lambda v: v.get("nodeid", ""))
    if verdicts:
        from rh.report import format_matrix

        terminalreporter.write_sep("=", "rh claim matrix")
        for line in format_matrix(verdicts, color=terminalreporter.hasmarkup,
                                  width=terminalreporter._tw.fullwidth).splitlines():
            terminalreporter.write_line(line)
    paths = getattr(config, "_rh_report_paths", None)
    if paths:
        terminalreporter.write_sep("-", "rh report")
        for p in paths:
            terminalreporter.write_line(str(p))
    for line in config.stash[_STATE].get("expected_diff", []):
        terminalreporter.write_line(f"rh expected verdicts: {line}")
    err = getattr(config, "_rh_report_error", None)
    if err:
        terminalreporter.write_line(f"rh report could not be written: {err}", red=True)


_PARAMETRIZED = {  # fixture name -> (profile field, test id)
    "ablation_k": ("ablation_levels", lambda k: f"K={k}"),
    "inverse_k": ("inverse_levels", lambda k: f"K={k}"),
    "id_task": ("id_tasks", str),
    "claim_depth": ("depths", lambda d: f"depth={d:g}"),
    "iv_level": ("incremental_levels", lambda n: f"top{n}"),
    "iv_pattern": ("override_patterns", str),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize claims over the profile's K levels, tasks and depths (known from the model's
    shape, which the registry or the model's config gives without loading weights)."""
    wanted = [name for name in _PARAMETRIZED if name in metafunc.fixturenames]
    if not wanted or metafunc.definition.get_closest_marker("claim") is None:
        return
    prof = _collection_profile(metafunc.config)
    for name in wanted:
        field, ids = _PARAMETRIZED[name]
        metafunc.parametrize(name, getattr(prof, field), ids=ids)


def _collection_profile(config: pytest.Config):
    from rh.models import expected_shape
    from rh.profiles import get_profile

    shape = expected_shape(config.getoption("--model"))
    return get_profile(config.getoption("--profile"), shape, alpha=config.getoption("--alpha"))
