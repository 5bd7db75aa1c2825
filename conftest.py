"""The rh pytest plugin: command-line options, session fixtures (model, prompts, split, ranking),
verdict collection, and the report written at the end of every run of ``pytest claims/``."""

from __future__ import annotations

import contextlib
import logging
import os
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
    g.addoption("--update-expected", action="store_true",
                help="with --expected: write this run's verdicts and token-layers into the file (a run of some "
                     "claims merges into it, saying which it kept; errors are never written)")
    g.addoption("--budget", type=float, default=None, metavar="MINUTES",
                help="wall-clock minutes for this run (model loading included): the claims are planned from the "
                     "token-layers recorded in --expected and this machine's measured seconds per token-layer; "
                     "those that do not fit are left out and listed, and a claim still running when the time is "
                     "up is stopped and left out")
    g.addoption("--report-dir", default=str(ROOT / "reports"), help="where the HTML and JSON reports go")
    g.addoption("--ranking-cache", default=str(RANKING_CACHE), help="folder of cached rankings")


def pytest_configure(config: pytest.Config) -> None:
    from rh.budget import TokenLayerCounter
    from rh.expected import load_expected
    from rh.models import resolve_spec

    try:  # a bad --model is a usage error, reported before anything is collected
        resolve_spec(config.getoption("--model"))
    except (ValueError, FileNotFoundError) as exc:
        raise pytest.UsageError(f"--model: {exc}") from None
    budget = config.getoption("--budget")
    if budget is not None and not budget > 0:
        raise pytest.UsageError(f"--budget {budget:g}: give the minutes this run may take, a positive number")
    expected = None
    path = config.getoption("--expected")
    if config.getoption("--update-expected") and not path:
        raise pytest.UsageError("--update-expected needs --expected PATH: the file to write")
    if path:
        try:  # a bad file is found now, not after the model has loaded
            expected = load_expected(path, missing_ok=bool(config.getoption("--update-expected")))
        except (ValueError, FileNotFoundError) as exc:
            raise pytest.UsageError(str(exc)) from None
    if budget is not None:
        if expected is None or not expected.nodes:
            raise pytest.UsageError("--budget plans from the token-layers recorded in an expected-verdicts file: pass "
                                    "--expected PATH of a file written by --update-expected")
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--budget plans one process: drop -n")
    config.stash[_STATE] = {"verdicts": [], "meta": {}, "claims_run": 0, "started": datetime.now(timezone.utc),
                            "t0": time.perf_counter(), "counter": TokenLayerCounter(), "expected": expected,
                            "model": None, "left_out": {}, "deselected": set(), "budget": None,
                            "last_progress": time.perf_counter(), "paid": set(), "timing": [0.0, 0.0]}


# --------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def rh_model(pytestconfig):
    """The model under test, loaded once per session (its forward passes are counted)."""
    return _session_model(pytestconfig)


def _session_model(config: pytest.Config):
    """Load the model once (the fixture, or the budget's calibration before the first claim)."""
    state = config.stash[_STATE]
    if state["model"] is None:
        from rh.models import load_model

        model = load_model(config.getoption("--model"), quant=config.getoption("--quant"),
                           device=config.getoption("--device"), max_memory=config.getoption("--max-memory"),
                           dtype=config.getoption("--dtype"))
        state["counter"].attach(model.model)
        state["counter"].on_count = lambda: _progress(config)
        state["meta"].update({"dtype": model.provenance["dtype"], "dtype_reason": model.provenance.get("dtype_reason")})
        _progress(config, f"loaded {model.key} in {model.provenance['dtype']} "
                          f"({model.provenance.get('dtype_reason', '')})", force=True)
        if config.getoption("--budget") is not None or config.getoption("--update-expected"):
            from rh.budget import calibrate

            prof = _collection_profile(config)
            with state["counter"].charged_to("calibration"):
                per_tl, how = calibrate(model, batch_size=prof.batch_size, length=prof.lengths[0])
            state["per_tl"] = (per_tl, how)
            state["meta"].setdefault("cost", {}).update(seconds_per_token_layer=per_tl, calibration=how)
            _progress(config, f"this machine: {how}", force=True)
        state["model"] = model
    return state["model"]


PROGRESS_EVERY_S = float(os.environ.get("RH_PROGRESS_SECONDS", "60"))  # at most this long between progress lines


def _progress(config: pytest.Config, message: str | None = None, *, force: bool = False) -> None:
    """A line on the terminal at least once a minute while claims run (pytest captures tqdm):
    elapsed time, what is running, token-layers done (of those planned, with a budget)."""
    state = config.stash[_STATE]
    now = time.perf_counter()
    if not force and now - state["last_progress"] < PROGRESS_EVERY_S:
        return
    state["last_progress"] = now
    tr = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if tr is None or hasattr(config, "workerinput"):
        return
    from rh.budget import format_duration

    counter = state["counter"]
    total = counter.total - counter.counts.get("calibration", 0)
    done = f"{total:,} token-layers"
    plan = state["budget"]
    if plan is not None and plan["planned_tl"]:
        done += f" of {plan['planned_tl']:,} planned ({total / plan['planned_tl']:.0%})"
    text = message or f"running {counter.label.removeprefix('fixture:')}"
    line = f"rh [{format_duration(now - state['t0'])}] {text}; {done}"
    if plan is not None:
        line += f"; {format_duration(max(plan['deadline'] - now, 0))} of the budget left"
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        tr.ensure_newline()
        tr.write(line + "\n", flush=True)  # flushed: stdout is block-buffered when CI sends it to a file


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
    exp = pytestconfig.stash[_STATE]["expected"]
    expected = None if exp is None else ({} if pytestconfig.getoption("--update-expected") else exp.verdicts)
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
        if report.nodeid in state["left_out"]:
            return
        cost = state["counter"].counts.get(report.nodeid, 0)
        seconds = state["counter"].seconds.get(report.nodeid)
        if _VERDICT in props:
            v = dict(props[_VERDICT])
            v["nodeid"] = report.nodeid
            v["outcome"] = report.outcome
            v["key"] = _verdict_key(v)
            v["token_layers"] = cost
            v["seconds"] = seconds
            state["verdicts"].append(v)
        elif report.failed:
            exp = state["expected"]
            claim = props.get(_CLAIM, report.nodeid)
            state["verdicts"].append({
                "nodeid": report.nodeid, "claim": claim, "status": "error", "outcome": "error",
                "key": (exp.key_of(report.nodeid) if exp is not None else None) or f"{claim}[{report.nodeid}]",
                "reason": _short_error(report), "token_layers": cost,
            })


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """Carry each claim's id (``@pytest.mark.claim("CA-1")``) to its reports, for the error rows."""
    marker = item.get_closest_marker("claim")
    if marker is not None and marker.args:
        item.user_properties.append((_CLAIM, str(marker.args[0])))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Forward passes run while a fixture is set up are charged to it (session fixtures run once)."""
    state = request.config.stash.get(_STATE, None)
    if state is None:
        return (yield)
    with state["counter"].charged_to(f"fixture:{fixturedef.argname}"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    state = item.config.stash.get(_STATE, None)
    if state is None:
        return (yield)
    with state["counter"].charged_to(item.nodeid):
        return (yield)


def pytest_deselected(items) -> None:
    for item in items:
        state = item.config.stash.get(_STATE, None)
        if state is not None:
            state["deselected"].add(item.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --budget: measure this machine, plan the claims that fit, deselect the others."""
    state = config.stash[_STATE]
    budget = config.getoption("--budget")
    claims = [it for it in items if it.get_closest_marker("claim") is not None]
    if budget is None or not claims:
        return
    import signal

    from rh.budget import format_duration, plan_budget

    from rh.expected import estimated_seconds

    exp = state["expected"]
    _session_model(config)
    per_tl = state["per_tl"][0]
    now = time.perf_counter()
    reserve = 30.0 + 0.03 * budget * 60  # the report, the comparison, a margin for noise
    deadline = state["t0"] + budget * 60 - reserve
    costs = {nid: estimated_seconds(node.get("token_layers"), node, per_tl) for nid, node in exp.nodes.items()}
    fixture_costs = {f: estimated_seconds(tl, exp.fixture_seconds.get(f), per_tl)
                     for f, tl in exp.fixture_token_layers.items()}
    plan = plan_budget([(it.nodeid, it.fixturenames) for it in claims], costs, fixture_costs,
                       max(deadline - now, 0), unit="estimated seconds")
    # Claims without a recorded cost cannot be planned: deselected. The others run cheapest first;
    # those beyond the first plan still run if the claims before them prove the estimate high
    # (each is checked against the time left when it starts: pytest_runtest_setup).
    keep = set(plan.chosen)
    runnable = set(plan.order)
    dropped = [it for it in claims if it.nodeid not in runnable]
    state["left_out"].update({n: why for n, why in plan.left_out.items() if n not in runnable})
    rank = {nid: i for i, nid in enumerate(plan.order)}
    others = [it for it in items if it.get_closest_marker("claim") is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = others + sorted((it for it in claims if it.nodeid in runnable), key=lambda it: rank[it.nodeid])
    planned_tl = sum(int(exp.nodes[n].get("token_layers") or 0) for n in plan.chosen) + sum(
        exp.fixture_token_layers.get(f, 0) for f in {f for it in claims if it.nodeid in keep for f in it.fixturenames})
    summary = (f"{budget:g} min: {len(plan.chosen)} of {len(claims)} claims planned, {planned_tl:,} token-layers, "
               f"about {format_duration(plan.cost)} of the {format_duration(max(deadline - now, 0))} left, at "
               f"{per_tl * 1e6:.2f} us per token-layer as measured now; {len(plan.order) - len(plan.chosen)} more "
               f"run, cheapest first, if the time left allows when each would start")
    state["budget"] = {"plan": plan, "planned_tl": planned_tl, "deadline": deadline, "per_tl": per_tl,
                       "summary": summary, "fixture_costs": fixture_costs, "costs": costs}
    state["meta"]["budget"] = {"minutes": budget, "summary": summary, "chosen": list(plan.chosen),
                               "left_out": dict(plan.left_out)}
    state["meta"].setdefault("cost", {})["seconds_per_token_layer"] = per_tl
    _progress(config, f"budget {summary}", force=True)
    if hasattr(signal, "setitimer") and deadline > now:
        def _out_of_time(signum, frame):
            from rh.budget import BudgetExhausted

            raise BudgetExhausted(f"the --budget of {budget:g} min ran out")

        state["old_alarm"] = signal.signal(signal.SIGALRM, _out_of_time)
        signal.setitimer(signal.ITIMER_REAL, deadline - now)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """With --budget: a claim that no longer fits the time left (re-estimated from how the claims
    so far compared with their plan) is left out rather than started."""
    state = item.config.stash.get(_STATE, None)
    if state is None or state["budget"] is None or item.get_closest_marker("claim") is None:
        return
    b = state["budget"]
    planned_s = (b["costs"].get(item.nodeid) or 0.0) + sum(
        b["fixture_costs"].get(f) or 0.0 for f in set(item.fixturenames) - state["paid"])
    actual, planned = state["timing"]
    ratio = actual / planned if planned > 60 else 1.0
    est_s = planned_s * max(ratio, 0.5)
    left = b["deadline"] - time.perf_counter()
    if est_s > left:
        from rh.budget import format_duration

        why = f"over budget: needs about {format_duration(est_s)}, {format_duration(max(left, 0))} left"
        state["left_out"][item.nodeid] = why
        pytest.skip(f"left out: {why}")
    state["paid"] |= set(item.fixturenames)
    state["started_item"] = (time.perf_counter(), planned_s)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """A claim stopped by the budget's deadline is left out (skipped, named), not an error."""
    rep = yield
    from rh.budget import BudgetExhausted

    state = item.config.stash.get(_STATE, None)
    if state is not None and call.excinfo is not None and call.excinfo.errisinstance(BudgetExhausted):
        why = "the budget ran out while it ran"
        state["left_out"][item.nodeid] = why
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"left out: {why}")
    if state is not None and call.when == "teardown" and state.get("started_item"):
        t0, est = state.pop("started_item")
        if item.nodeid not in state["left_out"]:
            state["timing"][0] += time.perf_counter() - t0
            state["timing"][1] += est
    return rep


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
    _stop_alarm(state)
    if not state["claims_run"] and not state["left_out"]:
        return
    counter = state["counter"]
    cost = state["meta"].setdefault("cost", {})
    cost.update({"total": counter.total - counter.counts.get("calibration", 0),
                 "by": {k: v for k, v in sorted(counter.counts.items()) if k != "calibration"}})
    status = int(exitstatus)
    if state["expected"] is not None:
        try:
            status = _check_expected(config, state, status)
        except Exception as exc:  # a comparison that fails must not lose the report
            log.exception("could not compare with the expected verdicts")
            state["expected_diff"] = [f"could not compare with {state['expected'].path}: {exc}"]
            status = status or 1
    try:
        paths = _write_report(config, state)
    except Exception as exc:  # a report failure must not hide the test results
        log.exception("could not write the rh report")
        state["report_error"] = str(exc)
        session.exitstatus = status or 1
        return
    state["report_paths"] = paths
    session.exitstatus = status


def _stop_alarm(state: dict) -> None:
    import signal

    if "old_alarm" in state:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, state.pop("old_alarm"))


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


def _check_expected(config: pytest.Config, state: dict, exitstatus: int) -> int:
    """Compare statuses with the expected file (or write it); the run passes iff no verdict it
    checked changed. Claims deliberately not run (--budget, -k) are listed, not compared."""
    from rh.expected import compare, update
    from rh.io import atomic_write_json

    exp = state["expected"]
    rows = [v for v in state["verdicts"] if v.get("nodeid") not in state["left_out"]]
    left_out = dict(state["left_out"])
    left_out.update({n: "deselected" for n in state["deselected"] if n not in left_out})
    if config.getoption("--update-expected"):
        run = {r["nodeid"] for r in rows}
        complete = not left_out and set(exp.nodes) <= run
        model = state["model"]
        dtype = model.provenance["dtype"] if model is not None else "unknown"
        hw = _hardware()
        recorded = (f"{state['started'].date().isoformat()}, {hw.get('cpu', '')}, {dtype}, "
                    f"{len(rows)} claims, `pytest {' '.join(config.invocation_params.args)}`")
        counter = state["counter"]
        fixture_cost = {k.removeprefix("fixture:"): v for k, v in counter.counts.items() if k.startswith("fixture:")}
        fixture_s = {k.removeprefix("fixture:"): v for k, v in counter.seconds.items() if k.startswith("fixture:")}
        per_tl = state.get("per_tl", (None, ""))[0]
        new, lines = update(exp, rows, model=config.getoption("--model"), profile=config.getoption("--profile"),
                            dtype=dtype, recorded=recorded, fixture_token_layers=fixture_cost, complete=complete,
                            fixture_seconds=fixture_s, seconds_per_token_layer=per_tl)
        atomic_write_json(exp.path, new.as_json())
        state["expected_diff"] = lines
        return 1 if any(r["status"] == "error" for r in rows) else 0
    result = compare(exp, rows, left_out=left_out)
    state["expected_diff"] = result.lines
    state["meta"]["expected"] = {"path": str(exp.path), "ok": result.ok, "checked": result.checked,
                                 "left_out": result.left_out, "lines": result.lines}
    if result.checked == 0:
        state["expected_diff"].append("no claim was checked against the file: the run proves nothing")
        return 1
    return 1 if not result.ok else (0 if exitstatus in (0, 1) else exitstatus)


def _hardware() -> dict[str, Any]:
    import os

    import torch

    from rh.models import cpu_description

    hw: dict[str, Any] = {"cpu": cpu_description(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if hasattr(os, "getloadavg"):
        hw["load_average"] = [round(x, 2) for x in os.getloadavg()]
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
    state = config.stash[_STATE]
    if state["budget"] is not None:
        terminalreporter.write_sep("-", "rh budget")
        terminalreporter.write_line(state["budget"]["summary"])
        for nid, why in sorted(state["left_out"].items()):
            terminalreporter.write_line(f"left out: {nid} ({why})")
    total = state["meta"].get("cost", {}).get("total")
    if total is not None:
        terminalreporter.write_line(f"rh forward passes: {total:,} token-layers (tokens x decoder layers executed)")
    paths = state.get("report_paths")
    if paths:
        terminalreporter.write_sep("-", "rh report")
        for p in paths:
            terminalreporter.write_line(str(p))
    for line in state.get("expected_diff", []):
        terminalreporter.write_line(f"rh expected verdicts: {line}")
    err = state.get("report_error")
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
