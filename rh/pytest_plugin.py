"""The rh pytest plugin, registered through the ``pytest11`` entry point when rh is installed:
command-line options, the session fixtures (model, profile, prompts, split, ranking, baseline,
``record_verdict``), verdict collection, progress lines, and the HTML/JSON report written at the
end of every run that checked a claim. The run's state lives on one registered plugin object,
:class:`RhSession` (``config.stash`` holds it for the fixtures); ``docs/writing-claims.md`` shows
how to write claims in your own repository."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from rh.budget import claim_costs, claim_plain, format_cost  # torch-free
from rh.options import add_model_options, model_kwargs
from rh.profiles import PROFILES  # torch-free

if TYPE_CHECKING:
    from rh.expected import Expected

_VERDICT = "rh_verdict"
_META = "rh_meta"
_CLAIM = "rh_claim"
_COST = "rh_cost"  # under pytest -n: what a worker's passes cost since its last report (see RhSession.ship_cost)
_JOURNAL = "rh_journal"  # a claim's fingerprint (rh.journal.item_fingerprint), for the controller's journal
_RESUMED = "rh_resumed"  # a claim replayed from the journal: its record (the verdict's cost, when it finished)
_OPTION_DESTS: tuple[str, ...] = ()  # every rh option's dest, for the journal's fingerprint of a run's inputs
PLUGIN_NAME = "rh-session"

log = logging.getLogger("rh")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from rh import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


#: id(plugin manager) -> the ids of the claim families its plugins and conftests registered
#: (removed again at the end of that session, so that a second session in one process starts anew)
_HOOKED_FAMILIES: dict[int, list[str]] = {}


def pytest_plugin_registered(plugin, manager) -> None:
    """Register the claim families of a plugin or conftest that implements ``pytest_rh_families``
    as it is loaded (a conftest found during collection too: before its folder's claims are
    parametrized). rh's own families are registered with the first one."""
    hook = getattr(plugin, "pytest_rh_families", None)
    if hook is None or not callable(hook):
        return
    import rh.catalogue  # noqa: F401 - rh's own families first: a team's family may not take their ids
    from rh.claim_families import register_hooked

    where = getattr(plugin, "__file__", None) or getattr(plugin, "__name__", repr(plugin))
    try:
        register_hooked(hook(), _HOOKED_FAMILIES.setdefault(id(manager), []))
    except (TypeError, ValueError) as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("rh", "retrieval-head claims")
    add_model_options(g.addoption)
    g.addoption("--profile", default="quick", choices=PROFILES, help="how much evidence to gather")
    g.addoption("--alpha", type=float, default=None, help="significance level (default: the profile's, 0.05)")
    g.addoption("--rankings", default=None, metavar="PATH", help="use this ranking file instead of the cache")
    g.addoption("--recompute", action="store_true", help="recompute the ranking even if it is cached")
    g.addoption("--method", default="sum_attention", choices=("sum_attention", "wu24"),
                help="how heads are identified (default: sum attention, seed 003)")
    g.addoption("--compare-model", default=None,
                help="a second model, as a registry key, hub id or local folder (e.g. llama8b-base for llama8b): "
                     "ID-6 compares its retrieval heads (over the heads both have where the shapes differ), IV-4 "
                     "transplants heads from it (same shape only)")
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
    g.addoption("--heads", default=None, metavar="L16H1,L14H31",
                help="test this head set instead of a ranking (no order: CA-1 runs at K = its size, claims that "
                     "need the top K of an order say so)")
    g.addoption("--per-layer", type=int, default=None, metavar="M",
                help="with a per-layer {layer: [heads]} file in --rankings: test the first M heads of each layer")
    g.addoption("--plain", action="store_true",
                help="run every forward pass in full: no prefix reuse, no early stopping of CA-1's random head "
                     "sets, no curtailment of the paired families (the reference the savings give identical "
                     "verdicts to, at about four times the token-layers)")
    g.addoption("--plan", action="store_true",
                help="run the collected claims dry (rh.dry): the model without its weights, every pass counted "
                     "and none computed; print each claim's passes, token-layers and estimated time (timed on a "
                     "random 2-layer copy of the architecture; with --expected, the recorded counts beside). No "
                     "verdict, report, journal, store or ranking is kept")
    g.addoption("--ray", default=None, metavar="local|HOST:PORT",
                help="run the claims' forward passes (work units) on model replicas held by Ray actors: 'local' "
                     "starts a cluster on this machine (every Ray process on 127.0.0.1) and stops it at the end; "
                     "HOST:PORT joins a running cluster (`ray start --head`; rh installed on every node)")
    g.addoption("--replicas", type=int, default=None, metavar="N", help="with --ray: model replicas (default 1)")
    g.addoption("--threads-per-replica", type=int, default=None, metavar="T",
                help="with --ray: CPU threads (and Ray CPUs) each replica holds (default 1)")
    g.addoption("--gpus-per-replica", type=float, default=None, metavar="G",
                help="with --ray: GPUs each replica holds, all on one node (default 0; a 70B model in bf16 needs 2 "
                     "H100-80GB)")
    g.addoption("--store", default=None, metavar="PATH",
                help="keep every computed row (one condition on one prompt) in this JSON-lines file as it "
                     "returns; a later run with the same --store and model computes only the rows it lacks "
                     "(a run that died resumes; a shared baseline runs once)")
    g.addoption("--report-dir", default=None, help="where the HTML and JSON reports go (default: the ini value "
                "rh_report_dir, else reports/ under the rootdir)")
    g.addoption("--ranking-cache", default=None, help="folder of cached rankings (default: the ini value "
                "rh_ranking_cache, else .rh/rankings/ under the rootdir)")
    g.addoption("--fresh", action="store_true",
                help="compute every claim, even those an interrupted run of the same inputs finished (kept in "
                     "the --journal folder; without --fresh the same command run again resumes)")
    g.addoption("--journal", default=None, metavar="DIR",
                help="where each finished claim's verdict is kept until the run has finished them all, so the "
                     "same command run again after an interruption resumes (default: the ini value rh_journal, "
                     "else .rh/journal/ under the rootdir)")
    global _OPTION_DESTS
    _OPTION_DESTS = tuple(o.dest for o in g.options)
    parser.addini("rh_report_dir", "where rh writes its reports, relative to the rootdir", default="reports")
    parser.addini("rh_ranking_cache", "rh's ranking cache, relative to the rootdir", default=".rh/rankings")
    parser.addini("rh_journal", "the journal of finished claims (resume after an interruption), relative to the "
                  "rootdir", default=".rh/journal")
    parser.addini("rh_expected_dir", "where expected-verdict files <model>.json live (used for the progress "
                  "lines' estimate of the time left when --expected is not given)", default="")


def _check_runner_options(config: pytest.Config) -> None:
    """--ray and its companions, and --store: usage errors before anything loads."""
    ray = config.getoption("--ray")
    given = [o for o in ("--replicas", "--threads-per-replica", "--gpus-per-replica") if config.getoption(o) is not None]
    if ray is None and given:
        raise pytest.UsageError(f"{', '.join(given)} apply to Ray replicas: add --ray local (or --ray HOST:PORT)")
    for opt in ("--replicas", "--threads-per-replica"):
        v = config.getoption(opt)
        if v is not None and v < 1:
            raise pytest.UsageError(f"{opt} {v}: give a whole number of at least 1")
    g = config.getoption("--gpus-per-replica")
    if g is not None and not g >= 0:
        raise pytest.UsageError(f"--gpus-per-replica {g:g}: give 0 (CPU replicas) or more")
    if ray is not None:
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--ray with -n: the Ray replicas already run the passes side by side, and each "
                                    "pytest -n worker would start replicas of its own; drop -n")
        if ray != "local":
            from rh.ray_executor import reachable

            try:  # an address that does not answer is said now, before any weights load
                reachable(ray)
            except (ValueError, ConnectionError) as exc:
                raise pytest.UsageError(str(exc)) from None
        try:
            import ray as _ray  # noqa: F401
        except ImportError:
            raise pytest.UsageError("--ray needs the ray package: pip install 'ray>=2.40' (scripts/setup.sh "
                                    "installs it)") from None
        if config.getoption("--gpus-per-replica") and config.getoption("--device") == "cpu":
            raise pytest.UsageError("--gpus-per-replica with --device cpu: drop one of them")
        if ray == "local" and (config.getoption("--gpus-per-replica") or 0) > 0:
            import torch

            have = torch.cuda.device_count()
            if config.getoption("--gpus-per-replica") > have:
                raise pytest.UsageError(f"--gpus-per-replica {config.getoption('--gpus-per-replica'):g}: this machine "
                                        f"has {have} GPU(s), and a replica's GPUs must sit on one node")
    store = config.getoption("--store")
    if store:
        from rh.runner import check_store_path

        try:
            check_store_path(store)
        except (IsADirectoryError, FileNotFoundError) as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    import rh.catalogue  # noqa: F401 - rh's claim families: their parameters, figures and calibrations
    from rh.expected import load_expected
    from rh.models import resolve_spec

    from rh.models import ModelAccessError, check_reachable, check_weights, expected_shape

    try:  # a bad --model is a usage error, reported before anything is collected or loaded
        resolve_spec(config.getoption("--model"))
        check_reachable(config.getoption("--model"))  # offline and not cached: say so in seconds
        shape = expected_shape(config.getoption("--model"))  # off the registry: its config.json, once
        if not config.getoption("--plan"):  # a plan needs the config alone; a run, weights
            check_weights(config.getoption("--model"))
    except (ValueError, FileNotFoundError, ModelAccessError) as exc:
        raise pytest.UsageError(f"--model: {exc}") from None
    _check_runner_options(config)
    budget = config.getoption("--budget")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise pytest.UsageError(f"--budget {budget:g}: give the minutes this run may take, a positive number "
                                "(no budget: leave the option out)")
    expected = None
    path = config.getoption("--expected")
    if config.getoption("--update-expected") and not path:
        raise pytest.UsageError("--update-expected needs --expected PATH: the file to write")
    if path:
        try:  # a bad file is found now, not after the model has loaded
            expected = load_expected(path, missing_ok=bool(config.getoption("--update-expected")))
        except (ValueError, FileNotFoundError) as exc:
            raise pytest.UsageError(str(exc)) from None
        model, prof = config.getoption("--model"), config.getoption("--profile")
        if expected.model not in (None, model) or expected.profile not in (None, prof):
            what = "write into" if config.getoption("--update-expected") else "compare with"
            raise pytest.UsageError(f"--expected {path} is for model {expected.model!r}, profile {expected.profile!r}; "
                                    f"this run is {model!r}, {prof!r}: it cannot {what} that file. Give the file of "
                                    "this model and profile")
        if config.getoption("--update-expected"):  # the file is written at the end: refuse an unwritable place now
            from rh.io import unwritable_folder

            target = Path(path)
            blocked = unwritable_folder(target.parent) or (target if target.exists() and not target.is_file() else None)
            if blocked is not None:
                raise pytest.UsageError(f"--update-expected: {path} cannot be written ({blocked} is not a writable "
                                        "folder); choose another path")
    if config.getoption("--plan"):
        if budget is not None:
            raise pytest.UsageError("--plan runs no claim: drop --budget (the plan's estimated times say what fits)")
        if config.getoption("--update-expected"):
            raise pytest.UsageError("--plan computes no verdict to record: drop --update-expected (or --plan)")
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--plan plans in one process: drop -n")
    if budget is not None:
        if expected is None or not expected.nodes:
            raise pytest.UsageError("--budget plans from the token-layers recorded in an expected-verdicts file: pass "
                                    "--expected PATH of a file written by --update-expected")
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--budget plans one process: drop -n")
    external = _external_heads(config, shape)
    config.addinivalue_line("markers", "claim(id, source=..., inputs=[...]): a research claim checked on a model (rh); inputs: data files it reads")
    session = RhSession(config, external=external, shape=shape)
    session.heads_warning = _heads_model_warning(config, external)
    if session.heads_warning:
        session.meta["heads_model_warning"] = session.heads_warning
    config.stash[_SESSION] = session
    config.pluginmanager.register(session, PLUGIN_NAME)
    if expected is not None and not config.getoption("--plan"):  # the options' own plugins, only where given
        session.expected_check = ExpectedCheck(session, expected, update=bool(config.getoption("--update-expected")))
        config.pluginmanager.register(session.expected_check, "rh-expected")
    if budget is not None:
        session.scheduler = BudgetScheduler(session, budget, expected)
        config.pluginmanager.register(session.scheduler, "rh-budget")
    if config.getoption("--plan"):
        folder = config.getini("rh_expected_dir")
        if expected is None and folder:  # the recorded counts beside the plan: the bundled file, where it is this run's
            from rh.plan import recorded_for

            expected = recorded_for(config.rootpath / folder / f"{config.getoption('--model')}.json",
                                    config.getoption("--model"), config.getoption("--profile"))
        config.pluginmanager.register(PlanPrinter(session, expected), "rh-plan")
    # the profile for this model's shape, once: --alpha and --heads are usage errors now, not at collection
    session.collection_profile = _collection_profile(config)
    _check_context(config, session.collection_profile)
    from rh.io import unwritable_folder

    reports = report_dir(config)
    blocked = unwritable_folder(reports)
    if blocked is not None:
        raise pytest.UsageError(f"--report-dir {reports}: {blocked} is not a writable folder; choose another "
                                "(the report would be lost at the end of the run)")
    cache = ranking_cache(config)
    blocked = unwritable_folder(cache)
    if blocked is not None:
        from rh.io import cache_message

        raise pytest.UsageError(cache_message("--ranking-cache", cache, blocked))
    from rh import progress

    session.progress_token = progress.listen(session.on_progress)
    if not hasattr(config, "workerinput"):
        session.catch_sigterm()


def _check_context(config: pytest.Config, prof) -> None:
    """The profile's prompt lengths against the model's context, where the context is known without
    loading weights (:func:`rh.models.known_context`): a prompt the model cannot take is a usage
    error now, not a failure of every claim after the weights load."""
    if prof is None or config.getoption("--plan"):
        return
    from rh.models import known_context

    ctx = known_context(config.getoption("--model"))
    if not ctx:
        return
    longest = {f"length {n}": n for n in prof.lengths}
    longest[f"ID-3's stability length {prof.stability_length}"] = prof.stability_length
    what, n = max(longest.items(), key=lambda kv: kv[1])
    if n + 16 > ctx:  # room for the answer tokens after the prompt
        raise pytest.UsageError(f"--profile {prof.name}: its {what} does not fit {config.getoption('--model')}'s "
                                f"context of {ctx} positions (with the answer after it); use a smaller profile or a "
                                "model with a longer context")


def pytest_unconfigure(config: pytest.Config) -> None:
    from rh.claim_families import unregister_family

    for fam in _HOOKED_FAMILIES.pop(id(config.pluginmanager), []):
        unregister_family(fam)
    session = config.stash.get(_SESSION, None)
    if session is not None:
        session.release_sigterm()
        session.run.close()
    if session is not None and session.progress_token is not None:
        from rh import progress

        progress.unlisten(session.progress_token)
        session.progress_token = None


def _external_heads(config: pytest.Config, shape):
    """``--rankings`` / ``--heads``, loaded and checked against the model's shape before any weights
    load (the registry or the model's config.json gives the shape)."""
    path, spec, per_layer = (config.getoption(o) for o in ("--rankings", "--heads", "--per-layer"))
    if path and spec:
        raise pytest.UsageError("--rankings and --heads both name the heads under test: give one")
    if per_layer is not None and not path:
        raise pytest.UsageError("--per-layer M needs --rankings PATH of a per-layer {layer: [heads]} file")
    if not (path or spec):
        return None
    from rh.published import load_heads, parse_head_set

    try:
        if spec:
            return parse_head_set(spec, shape)
        return load_heads(path, shape=shape, per_layer=per_layer)
    except (ValueError, FileNotFoundError) as exc:
        raise pytest.UsageError(f"--{'heads' if spec else 'rankings'}: {exc}") from None


def _heads_model_warning(config: pytest.Config, external) -> str | None:
    """--rankings PATH that names another model than --model (same shape: another version): the
    name :func:`rh.published.load_heads` read from the file."""
    named = getattr(external, "provenance", {}).get("named_model")
    if not named:
        return None
    from rh.models import resolve_spec
    from rh.published import model_mismatch

    try:
        model = resolve_spec(config.getoption("--model")).model_name
    except (ValueError, FileNotFoundError):
        return None
    return model_mismatch(named, model)


# --------------------------------------------------------------------------- session fixtures


_SESSION = pytest.StashKey["RhSession"]()


def _rh(config: pytest.Config) -> RhSession:
    return config.stash[_SESSION]


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


class RhSession:
    """One run's state, registered as a plugin: the verdicts collected, the session's metadata, the
    forward passes' counter, the budget's plan, and the report written at the end."""

    def __init__(self, config: pytest.Config, *, external=None, shape=None) -> None:
        from rh.run import Run

        self.config = config
        # the model, its counter, the runner, the prefix cache, the verdicts and metadata: rh.run.Run
        kwargs, ray = model_kwargs(config.option), config.getoption("--ray") is not None
        if ray:  # the replicas hold the weights, on their device; this process holds the architecture alone
            kwargs["device"] = "cuda" if config.getoption("--gpus-per-replica") else "cpu"
        self.run = Run(config.getoption("--model"), model_kwargs=kwargs, weights=not ray,
                       dry=bool(config.getoption("--plan")),
                       plain=bool(config.getoption("--plain")), store=config.getoption("--store"),
                       runner=lambda model: _session_runner(config, model), on_load=lambda run, model: _loaded(
                           config, model), on_count=lambda: _progress(config),
                       command="pytest " + " ".join(config.invocation_params.args))
        self.external = external  # a Ranking or HeadSet from --rankings / --heads, or None
        self.shape = shape  # the model's head shape, known before its weights load
        self.collection_profile = None  # the --profile for that shape (set in pytest_configure)
        self.claims_run = 0
        self.left_out: dict[str, str] = {}
        self.deselected: set[str] = set()
        self.scheduler: BudgetScheduler | None = None  # with --budget: what fits, and the deadline
        self.expected_check: ExpectedCheck | None = None  # with --expected: the comparison (or the writing)
        self.last_progress = time.perf_counter()
        self.progress_every_s = progress_every_s()  # read when the session starts, not at import
        self.per_tl: tuple[float | None, str] = (None, "")
        self.report_paths: tuple[Path, Path] | None = None
        self.report_error: str | None = None
        self.progress_token = None
        self.step: tuple[str, int, int | None] | None = None  # the loop running now: (what, done, total)
        self.step_label: str | None = None
        self.estimate: dict[str, Any] | None = None  # planned token-layers for the progress lines
        self.item_start = 0  # the counter's total when the running test started
        self.saved_start = 0  # the run's exact savings' total then
        self.collected: list[str] = []  # the claims' node ids, as collected
        self.interrupted_by: str | None = None  # "SIGTERM" once that signal ended the run
        self.old_sigterm = None
        self.shipped: dict[str, dict[str, int]] = {"by": {}, "saved": {}, "units": {}}  # a worker's costs reported
        self.remote: dict[str, dict[str, int]] = {"by": {}, "saved": {}, "units": {}}  # the workers' costs received
        self._journal: Any = False  # rh.journal.Journal once opened (None: this run keeps none)
        self.item_fps: dict[str, str] = {}  # each claim's fingerprint, by node id
        self.resumed: dict[str, str] = {}  # claims replayed from the journal: node id -> when they finished
        self.journal_error: str | None = None

    # what the Run holds, read where the session's hooks read it
    verdicts = property(lambda self: self.run.verdicts)
    meta = property(lambda self: self.run.meta)
    counter = property(lambda self: self.run.counter)
    model = property(lambda self: self.run.model)
    runner = property(lambda self: self.run.runner)
    prefix = property(lambda self: self.run.prefix)
    started = property(lambda self: self.run.started)
    t0 = property(lambda self: self.run.t0)
    loaded_at = property(lambda self: self.run.loaded_at)

    def journal(self):
        """This run's journal (:mod:`rh.journal`), opened on first use, or None: with --plan (nothing
        runs) or where its inputs cannot be read (said once). With --fresh the journal an earlier
        run left is removed first, so this run's own records start it anew."""
        if self._journal is not False:
            return self._journal
        self._journal = None
        config = self.config
        if config.getoption("--plan"):
            return None
        try:
            from rh import journal as jr

            self._journal = jr.Journal(_path_setting(config, "--journal", "rh_journal"), self.fingerprint())
        except (OSError, ValueError) as exc:
            self.journal_error = f"no journal this run, so an interrupted run would start over: {exc}"
            _progress(config, f"rh: {self.journal_error}", force=True)
            return None
        if config.getoption("--fresh") and not hasattr(config, "workerinput"):
            self._journal.discard()
        return self._journal

    def fingerprint(self) -> str:
        """The digest of this run's inputs (:func:`rh.journal.session_fingerprint`)."""
        import torch

        from rh import journal as jr
        from rh.models import resolve_dtype

        config = self.config
        options = {d: getattr(config.option, d, None) for d in _OPTION_DESTS}
        device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
        files = {}
        if config.getoption("--rankings"):
            files["rankings"] = jr.file_digest(config.getoption("--rankings"))
        models = {"model": jr.model_identity(config.getoption("--model"))}
        if config.getoption("--compare-model"):
            models["compare"] = jr.model_identity(config.getoption("--compare-model"))
        return jr.session_fingerprint(options, model=models, dtype=str(resolve_dtype(config.getoption("--dtype"),
                                                                                      device).dtype), files=files)

    def item_fingerprint(self, item: pytest.Item) -> str | None:
        """A claim's fingerprint (:func:`rh.journal.item_fingerprint`), once per node id."""
        fp = self.item_fps.get(item.nodeid)
        if fp is None and self.journal() is not None:
            from rh import journal as jr

            path = Path(item.path)
            marker = item.get_closest_marker("claim")
            declared = [self.config.rootpath / d for d in ((marker.kwargs.get("inputs") or ()) if marker else ())]
            fp = jr.item_fingerprint(self.journal().fingerprint, item.nodeid,
                                     [*jr.conftests(path, self.config.rootpath), path, *declared])
            self.item_fps[item.nodeid] = fp
        return fp

    def journaled(self, item: pytest.Item) -> dict[str, Any] | None:
        """The record of ``item`` an earlier run with the same inputs finished, if it may be replayed
        (never with --update-expected, which records each claim's cost as it computes it)."""
        if item.get_closest_marker("claim") is None or self.config.getoption("--update-expected") or \
                self.config.getoption("--fresh"):
            return None
        j = self.journal()
        if j is None or not j.records:
            return None
        return j.get(item.nodeid, self.item_fingerprint(item))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        """A claim an earlier run of the same inputs finished is replayed from the journal: its
        verdict is recorded (and passes, fails or skips) as if computed; no fixture is set up, so a
        rerun after an interruption loads the model only if some claim is left to compute."""
        rec = self.journaled(item)
        if rec is None:
            return None
        from rh.rules.verdict import Verdict

        entry = dict(rec["verdict"])
        verdict = Verdict.from_dict({k: v for k, v in entry.items() if k not in ("statement", "source")})
        if self.journal().meta and not self.resumed:  # the earlier run's provenance, under this run's own
            keep = {k: v for k, v in self.journal().meta.items() if k not in _RUN_ONLY_META}
            _merge(keep, self.meta)
            self.meta.clear()
            self.meta.update(keep)

        def call() -> None:
            item.user_properties.append((_RESUMED, {"cost": rec.get("cost") or {}, "finished": rec.get("finished")}))
            _settle(item, self.config, entry, verdict)

        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for when in ("setup", "call", "teardown"):
            info = pytest.CallInfo.from_call(call if when == "call" else (lambda: None), when=when)
            ihook.pytest_runtest_logreport(report=ihook.pytest_runtest_makereport(item=item, call=info))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def catch_sigterm(self) -> None:
        """SIGTERM (a batch scheduler's time limit, ``kill``) ends the run as Ctrl-C does: the claim
        running stops, its fixtures and hooks are released, and the report is written with every
        finished verdict, marked interrupted (:meth:`interruption`)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            self.interrupted_by = "SIGTERM"
            raise KeyboardInterrupt("SIGTERM")

        self.old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def release_sigterm(self) -> None:
        import signal

        if self.old_sigterm is not None:
            signal.signal(signal.SIGTERM, self.old_sigterm)
            self.old_sigterm = None

    def interruption(self, exitstatus: int) -> dict[str, Any] | None:
        """What an interrupted run says of itself: by what, how many claims finished, which did not run."""
        if int(exitstatus) != int(pytest.ExitCode.INTERRUPTED):
            return None
        done = {v.get("nodeid") for v in self.verdicts}
        not_run = [n for n in self.collected if n not in done and n not in self.left_out and n not in self.deselected]
        return {"by": self.interrupted_by or "SIGINT (Ctrl-C)", "finished": len(done),
                "collected": len([n for n in self.collected if n not in self.deselected]), "not_run": not_run}

    def _own_counts(self) -> dict[str, dict[str, int]]:
        """What this process's passes cost so far: token-layers per label (calibration aside), the
        exact savings since the session started, and the runner's rows."""
        return {"by": {k: v for k, v in self.counter.counts.items() if k != "calibration"},
                "saved": self.run.saved(),
                "units": self._units_counts()}

    def _units_counts(self) -> dict[str, int]:
        r = self.runner
        return {} if r is None else {"rows_computed": r.computed, "rows_reused": r.reused,
                                     "prompts_read": r.prompts_read, "prompts_reused": r.prompts_reused,
                                     "store_loaded": r.store.loaded, "store_unreadable": r.store.skipped}

    def ship_cost(self, item: pytest.Item, when: str) -> dict[str, Any]:
        """Under ``pytest -n``, a worker's passes are counted where they run: each claim's reports carry
        what this worker's counter, exact savings and runner added since its last report, and (with
        the call) the claim's own bill, so the controller's totals and per-claim bills are a serial
        run's sums (each worker sets up the session fixtures it needs, and pays for them once)."""
        now = self._own_counts()
        delta = {part: {k: v - self.shipped[part].get(k, 0) for k, v in now[part].items()
                        if v - self.shipped[part].get(k, 0)} for part in now}
        self.shipped = now
        if when == "call" or when == "setup":
            delta["item"] = {"token_layers": self.counter.counts.get(item.nodeid, 0),
                             "token_layers_with_fixtures": self.counter.total - self.item_start,
                             "saved_with_fixtures": self.run.ledger.total() - self.saved_start,
                             "seconds": self.counter.seconds.get(item.nodeid)}
        return delta

    def on_progress(self, what: str, done: int, total: int | None) -> None:
        """rh.progress's listener: remember the loop's position, maybe print a line (only in a session
        that loaded the model under test: unit tests that use rh's loops stay quiet)."""
        if self.model is None:
            return
        self.step = (what, done, total)
        self.step_label = self.counter.label
        _progress(self.config)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "claim" not in report.keywords:
            return
        props = dict(report.user_properties)
        if _COST in props and not hasattr(self.config, "workerinput"):  # a pytest -n worker's passes
            for part in ("by", "saved", "units"):
                self.remote[part] = _add(self.remote[part], props[_COST].get(part, {}))
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.claims_run += 1
            if _META in props:
                _merge(self.meta, props[_META])
            if report.nodeid in self.left_out:
                return
            cost = self.counter.counts.get(report.nodeid, 0)
            seconds = self.counter.seconds.get(report.nodeid)
            with_fixtures = self.counter.total - self.item_start
            saved = self.run.ledger.total() - self.saved_start
            # the claim's bill as another counter gave it: a claim replayed from the journal, the earlier
            # run's (which paid it); one run by a pytest -n worker, that worker's
            resumed = props.get(_RESUMED)
            bill = (resumed.get("cost") or {}) if resumed else (props.get(_COST) or {}).get("item")
            if resumed or bill:
                cost, seconds, with_fixtures, saved = (bill.get("token_layers", 0), bill.get("seconds"),
                                                       bill.get("token_layers_with_fixtures", 0),
                                                       bill.get("saved_with_fixtures", 0))
            recorded = list({json.dumps(val, sort_keys=True, default=str): val
                             for key, val in report.user_properties if key == _VERDICT}.values())
            problem = None
            if len(recorded) > 1:
                problem = (f"the claim test recorded {len(recorded)} different verdicts ("
                           + ", ".join(f"{r.get('claim')} {r.get('status')}" for r in recorded)
                           + "): record one per test, and parametrize the test for more")
            elif not recorded and report.when == "call" and not report.failed:
                problem = "the claim test ended without recording a verdict: call record_verdict(verdict)" + (
                    f" (it skipped: {_short_error(report)})" if report.skipped else "")
            if recorded and problem is None:
                v = dict(recorded[0])
                v["nodeid"] = report.nodeid
                v["outcome"] = report.outcome
                v["key"] = _verdict_key(v)
                v["token_layers"] = cost
                v["token_layers_with_fixtures"] = with_fixtures
                v["saved_with_fixtures"] = saved
                v["seconds"] = seconds
                if resumed:
                    v["resumed"] = resumed.get("finished") or True
                    self.resumed[report.nodeid] = str(resumed.get("finished"))
                elif props.get(_JOURNAL) and report.when == "call":
                    self.keep(report.nodeid, props[_JOURNAL], recorded[0],
                              {"token_layers": cost, "seconds": seconds, "token_layers_with_fixtures": with_fixtures,
                               "saved_with_fixtures": saved})
                self.verdicts.append(v)
            elif report.failed or problem is not None:
                check = self.expected_check
                claim = props.get(_CLAIM, report.nodeid)
                self.verdicts.append({
                    "nodeid": report.nodeid, "claim": claim, "status": "error", "outcome": "error",
                    "key": (check.expected.key_of(report.nodeid) if check is not None else None)
                    or f"{claim}[{report.nodeid}]",
                    "reason": problem or _short_error(report), "token_layers": cost,
                    "token_layers_with_fixtures": with_fixtures,
                })

    def keep(self, nodeid: str, fp: str, entry: dict[str, Any], cost: dict[str, Any]) -> None:
        """Keep a finished claim in the journal (a journal that cannot be written is said once, and
        the run goes on without it)."""
        j = self.journal()
        if j is None:
            return
        try:
            j.add(nodeid, fp, entry, cost, meta={k: v for k, v in self.meta.items() if k not in _RUN_ONLY_META})
        except OSError as exc:
            self.journal_error = f"the journal {j.path} could not be written ({exc}): an interrupted run starts over"
            _progress(self.config, f"rh: {self.journal_error}", force=True)
            j.close()
            self._journal = None

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """Forward passes run while a fixture is set up are charged to it (session fixtures run once);
        what the report says of the session's ranking, baseline and ranking uncertainty is read off
        the values rh's fixtures return (they write nothing into the session)."""
        name = fixturedef.argname
        with self.counter.charged_to(f"fixture:{_BILLED_AS.get(name, name)}"):
            value = yield
        self.meta.update(_report_entries(fixturedef, value, request))
        return value

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        with self.counter.charged_to(item.nodeid):
            return (yield)

    def pytest_deselected(self, items) -> None:
        for item in items:
            self.deselected.add(item.nodeid)

    heads_warning: str | None = None  # --rankings names another model than --model

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return [f"rh warning: {self.heads_warning}"] if self.heads_warning else []

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
        """The claims collected, and (without --budget) the token-layers the progress lines count down."""
        claims = [it for it in items if it.get_closest_marker("claim") is not None]
        self.collected = [it.nodeid for it in claims]
        if self.scheduler is None and claims and not self.run.dry:  # what the progress lines count down
            self.estimate = _estimate(config, self.expected_check.expected if self.expected_check else None,
                                      [it for it in claims if self.journaled(it) is None])

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.item_start = self.counter.total  # a claim's bill: the fixtures first set up for it, then its body
        self.saved_start = self.run.ledger.total()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        """A claim a head set cannot take is inconclusive, not an error; a claim's journal
        fingerprint, and a pytest -n worker's costs, travel with its report."""
        rep = yield
        from rh.published import HeadSetHasNoOrder

        if call.excinfo is not None and call.excinfo.errisinstance(HeadSetHasNoOrder) and rep.failed:
            reason = f"not applicable to a head set: {call.excinfo.value}"
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1] or 0, reason)
            marker = item.get_closest_marker("claim")
            params = dict(marker.kwargs.get("params") or {}) if marker else {}
            params.update(_parametrized(item))
            rep.user_properties.append((_VERDICT, {
                "claim": str(marker.args[0]) if marker and marker.args else item.nodeid, "status": "inconclusive",
                "reason": reason, "params": params, "test": "", "n": 0}))
        if call.when == "call" and item.get_closest_marker("claim") is not None:
            fp = self.item_fingerprint(item)
            if fp is not None:  # the controller keeps the claim's verdict in the journal under it
                rep.user_properties.append((_JOURNAL, fp))
        if hasattr(item.config, "workerinput") and item.get_closest_marker("claim") is not None:
            rep.user_properties.append((_COST, self.ship_cost(item, call.when)))
        return rep

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = session.config
        if hasattr(config, "workerinput"):  # xdist worker: the controller writes the report
            return
        if self.scheduler is not None:
            self.scheduler.stop_alarm()
        interrupted = self.interruption(exitstatus)
        if interrupted is not None:
            self.meta["interrupted"] = interrupted
        if not self.claims_run and not self.left_out and not (interrupted and interrupted["collected"]):
            return
        own, remote = self._own_counts(), self.remote
        units = _add(own["units"], remote["units"])
        if units:  # what the work units cost: rows computed, and served by the store
            store = config.getoption("--store")
            self.meta["units"] = {"rows_computed": 0, "rows_reused": 0, "prompts_read": 0, "prompts_reused": 0,
                                  "store_loaded": 0, "store_unreadable": 0, **units, "store": store and str(Path(store))}
        if not getattr(config.option, "numprocesses", None):  # pytest -n: each worker is a process of its own
            self.meta["memory"] = self.run.memory()
        by = _add(own["by"], remote["by"])
        cost = self.meta.setdefault("cost", {})
        cost.update({"total": sum(by.values()),  # the counter's total is the sum of its labels
                     "by": dict(sorted(by.items())),
                     "by_claim": claim_costs(self.verdicts),
                     "plain_by_claim": claim_plain(self.verdicts),
                     "saved": {k: v for k, v in _add(own["saved"], remote["saved"]).items() if v}})
        if getattr(config.option, "numprocesses", None):
            cost["workers"] = "each pytest -n worker loads the model and sets up the session fixtures it needs"
        if self.run.dry:  # --plan: the counts are the plan (PlanPrinter); no journal, no report, no comparison
            return
        status = int(exitstatus)
        if interrupted is not None:  # the comparison lists the claims not run, as it lists those left out
            for n in interrupted["not_run"]:
                self.left_out.setdefault(n, f"not run: the run was interrupted by {interrupted['by']}")
        self.close_journal(interrupted)
        if self.expected_check is not None:  # before the report, which shows the comparison
            status = self.expected_check.settle_run(status)
        try:
            paths = _write_report(config, self)
        except Exception as exc:  # a report failure must not hide the test results
            log.exception("could not write the rh report")
            self.report_error = str(exc)
            session.exitstatus = status or 1
            return
        self.report_paths = paths
        session.exitstatus = int(pytest.ExitCode.INTERRUPTED) if interrupted is not None else status

    def close_journal(self, interrupted: dict[str, Any] | None) -> None:
        """Say in the metadata which claims were replayed from the journal; remove the journal once
        this run has finished every claim it holds and every claim it collected (nothing
        interrupted, left out or in error), so the next run of the command starts afresh."""
        j = self.journal()
        if self.resumed:
            self.meta["resumed"] = {"journal": str(j.path) if j else None, "claims": sorted(self.resumed),
                                    "computed": len([v for v in self.verdicts if not v.get("resumed")])}
        if j is None or hasattr(self.config, "workerinput"):
            return
        done = {v["nodeid"] for v in self.verdicts if v.get("status") != "error"}
        wanted = [n for n in self.collected if n not in self.deselected]
        if interrupted is None and not self.left_out and set(j.records) <= done and set(wanted) <= done and (
                len(done) == len(self.verdicts)):
            j.discard()
        else:
            j.close()
            if j.records:
                self.meta["journal"] = {"path": str(j.path), "claims": len(j.records)}

    @pytest.hookimpl(wrapper=True)
    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        """The run's summary lines; the option plugins' own (:class:`ExpectedCheck`) follow them, and
        a report that could not be written is said last."""
        self._summary(terminalreporter, config)
        try:
            return (yield)
        finally:
            if self.report_error:
                terminalreporter.write_line(f"rh report could not be written: {self.report_error}", red=True)

    def _summary(self, terminalreporter, config: pytest.Config) -> None:
        if self.run.dry:  # --plan: the plan's table says it all (made-up outcomes have no verdicts to show)
            return
        stop = self.meta.get("interrupted")
        kept = self.meta.get("journal")
        if stop:
            terminalreporter.write_sep("!", f"rh: interrupted by {stop['by']}", red=True)
            terminalreporter.write_line(f"{stop['finished']} of {stop['collected']} claims finished; the report keeps "
                                        f"their verdicts; {len(stop['not_run'])} not run:")
            for n in stop["not_run"]:
                terminalreporter.write_line(f"  not run: {n}")
            if kept:
                terminalreporter.write_line(f"the same command run again resumes: the {kept['claims']} finished claims "
                                            f"are kept in {kept['path']} and are not computed again (--fresh: all)")
            if not config.getoption("--store"):
                terminalreporter.write_line("(with --store PATH every computed row is kept too, so the claims resumed "
                                            "compute only the rows that are missing)")
        resumed = self.meta.get("resumed")
        if resumed:
            terminalreporter.write_line(
                f"rh: {len(resumed['claims'])} claim(s) resumed from {resumed['journal']} (finished by an earlier run "
                f"of the same inputs, not computed again; --fresh computes them), {resumed['computed']} computed")
        if self.journal_error:
            terminalreporter.write_line(f"rh: {self.journal_error}", yellow=True)
        verdicts = sorted(self.verdicts, key=lambda v: v.get("nodeid", ""))
        if verdicts:
            from rh.report import format_matrix

            terminalreporter.write_sep("=", "rh claim matrix")
            for line in format_matrix(verdicts, color=terminalreporter.hasmarkup,
                                      width=terminalreporter._tw.fullwidth).splitlines():
                terminalreporter.write_line(line)
        if self.scheduler is not None and self.scheduler.plan is not None:
            terminalreporter.write_sep("-", "rh budget")
            terminalreporter.write_line(self.scheduler.plan.summary)
            for nid, why in sorted(self.left_out.items()):
                terminalreporter.write_line(f"left out: {nid} ({why})")
        cost = self.meta.get("cost", {})
        if cost.get("total") is not None:
            terminalreporter.write_sep("-", "rh forward passes")
            for line in format_cost(cost).splitlines():
                terminalreporter.write_line(line)
            units, layout = self.meta.get("units"), self.meta.get("layout") or {}
            if units:
                where = (f"on {layout.get('replicas')} Ray replica(s)" if layout.get("executor") == "ray"
                         else "in this process")
                terminalreporter.write_line(
                    f"work units: {units['rows_computed']} rows computed {where}, {units['rows_reused']} served by "
                    f"the store; {units['prompts_read']} prompt-only readings computed, {units['prompts_reused']} "
                    f"served" + (f" ({units['store']}: {units['store_loaded']} rows from earlier runs)"
                                 if units["store"] else ""))
        from rh.report.format import memory_text

        memory = memory_text(self.meta.get("memory"))
        if memory:
            terminalreporter.write_line(f"memory: {memory}")
        paths = self.report_paths
        if paths:
            terminalreporter.write_sep("-", "rh report")
            for p in paths:
                terminalreporter.write_line(str(p))


@dataclass(eq=False)
class ExpectedCheck:
    """``--expected PATH``, registered only with that option: each claim passes exactly when its
    verdict is the file's (``--update-expected``: always), and at the end the run's verdicts are
    compared with the file, or written into it; the terminal summary says how."""

    session: RhSession
    expected: Expected  # the file, as loaded when the session was configured
    update: bool = False  # --update-expected: write this run's verdicts instead of comparing
    lines: list[str] = field(default_factory=list)  # what the summary says (``rh expected verdicts: ...``)

    def settle(self, entry: dict[str, Any], verdict) -> None:
        """A claim's verdict against the file: it passes exactly when the status is the one expected."""
        if self.update:
            return
        key = _verdict_key(entry)
        want = self.expected.want(key, self.session.meta.get("numerics")) or "absent from the expected file"
        assert verdict.status == want, (
            f"{key}: expected {want}, got {verdict.status} -- if the science changed, rerun with "
            f"--update-expected and commit the file\n" + verdict.explain())

    def settle_run(self, exitstatus: int) -> int:
        """The run's exit status once compared with the file (or the file written), called by the
        session before it writes the report; a comparison that fails must not lose the report."""
        try:
            return self._write() if self.update else self._compare(exitstatus)
        except Exception as exc:
            log.exception("could not compare with the expected verdicts")
            self.lines = [f"could not compare with {self.expected.path}: {exc}"]
            return exitstatus or 1

    def _rows(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The verdicts to compare or write, and the claims deliberately not run (--budget, -k), listed."""
        state = self.session
        rows = [v for v in state.verdicts if v.get("nodeid") not in state.left_out]
        left_out = dict(state.left_out)
        left_out.update({n: "deselected" for n in state.deselected if n not in left_out})
        return rows, left_out

    def _compare(self, exitstatus: int) -> int:
        """The run passes iff no verdict it checked changed (and it checked one)."""
        from rh.expected import compare

        rows, left_out = self._rows()
        result = compare(self.expected, rows, left_out=left_out, numerics=self.session.meta.get("numerics"))
        self.lines = result.lines  # the report's lines are these, the note below included
        self.session.meta["expected"] = {"path": str(self.expected.path), "ok": result.ok, "checked": result.checked,
                                         "left_out": result.left_out, "lines": result.lines}
        if result.checked == 0:
            self.lines.append("no claim was checked against the file: the run proves nothing")
            return 1
        return 1 if not result.ok else (0 if exitstatus in (0, 1) else exitstatus)

    def _write(self) -> int:
        """Write this run's verdicts and costs into the file (merged into it for a run of some
        claims); the run fails iff a claim ended in error (never written)."""
        from rh.expected import update
        from rh.io import atomic_write_json
        from rh.run import hardware

        state, config, exp = self.session, self.session.config, self.expected
        rows, left_out = self._rows()
        complete = not left_out and set(exp.nodes) <= {r["nodeid"] for r in rows}
        dtype = state.model.provenance["dtype"] if state.model is not None else "unknown"
        recorded = (f"{state.started.date().isoformat()}, {hardware().get('cpu', '')}, {dtype}, "
                    f"{len(rows)} claims, `pytest {' '.join(config.invocation_params.args)}`")
        counter = state.counter
        fixture_cost = {k.removeprefix("fixture:"): v for k, v in counter.counts.items() if k.startswith("fixture:")}
        fixture_s = {k.removeprefix("fixture:"): v for k, v in counter.seconds.items() if k.startswith("fixture:")}
        new, self.lines = update(exp, rows, model=config.getoption("--model"), profile=config.getoption("--profile"),
                                 dtype=dtype, recorded=recorded, fixture_token_layers=fixture_cost, complete=complete,
                                 fixture_seconds=fixture_s, seconds_per_token_layer=state.per_tl[0],
                                 numerics=state.meta.get("numerics"))
        atomic_write_json(exp.path, new.as_json())
        return 1 if any(r["status"] == "error" for r in rows) else 0

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        for line in self.lines:
            terminalreporter.write_line(f"rh expected verdicts: {line}")


@dataclass(frozen=True)
class BudgetPlan:
    """What ``--budget`` planned (:func:`rh.budget.plan_budget`): the chosen claims' token-layers,
    the deadline (a ``time.perf_counter()`` value), the summary line, and the estimated seconds of
    each claim and fixture."""

    planned_tl: int
    deadline: float
    summary: str
    fixture_costs: dict[str, float]
    costs: dict[str, float]


class BudgetScheduler:
    """``--budget MINUTES``, registered only with that option: measures this machine, plans the
    claims that fit from the token-layers an expected file recorded (cheapest first), deselects the
    others, leaves out a claim that no longer fits when it would start, and stops the one running
    when the deadline passes (an alarm; it is left out, not an error)."""

    def __init__(self, session: RhSession, minutes: float, expected: Expected) -> None:
        self.session = session
        self.minutes = minutes
        self.expected = expected  # the --expected file: the token-layers it recorded plan the run
        self.plan: BudgetPlan | None = None
        self.paid: set[str] = set()  # fixtures set up so far (a later claim does not pay for them)
        self.actual_s = 0.0  # seconds the claims run so far took ...
        self.planned_s = 0.0  # ... and what they were planned to take
        self.started_item: tuple[float, float] | None = None  # (start, planned seconds) of the running claim
        self.old_alarm: Any = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
        claims = [it for it in items if it.get_closest_marker("claim") is not None]
        if not claims:
            return
        import signal

        from rh.budget import format_duration, plan_budget
        from rh.expected import estimated_seconds

        state = self.session
        budget = self.minutes
        exp = self.expected
        _session_model(config)
        per_tl = state.per_tl[0]
        now = time.perf_counter()
        reserve = 30.0 + 0.03 * budget * 60  # the report, the comparison, a margin for noise
        deadline = state.t0 + budget * 60 - reserve
        costs = {nid: estimated_seconds(node.get("token_layers"), node, per_tl) for nid, node in exp.nodes.items()}
        costs.update({it.nodeid: 0.0 for it in claims if state.journaled(it) is not None})  # replayed: free
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
        state.left_out.update({n: why for n, why in plan.left_out.items() if n not in runnable})
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
        self.plan = BudgetPlan(planned_tl, deadline, summary, fixture_costs, costs)
        state.meta["budget"] = {"minutes": budget, "summary": summary, "chosen": list(plan.chosen),
                                "left_out": dict(plan.left_out)}
        state.meta.setdefault("cost", {})["seconds_per_token_layer"] = per_tl
        _progress(config, f"budget {summary}", force=True)
        if hasattr(signal, "setitimer") and deadline > now:
            def _out_of_time(signum, frame):
                from rh.budget import BudgetExhausted

                raise BudgetExhausted(f"the --budget of {budget:g} min ran out")

            self.old_alarm = signal.signal(signal.SIGALRM, _out_of_time)
            signal.setitimer(signal.ITIMER_REAL, deadline - now)

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """With --budget: a claim that no longer fits the time left (re-estimated from how the claims
        so far compared with their plan) is left out rather than started."""
        if self.plan is None or item.get_closest_marker("claim") is None:
            return
        b = self.plan
        planned_s = (b.costs.get(item.nodeid) or 0.0) + sum(
            b.fixture_costs.get(f) or 0.0 for f in set(item.fixturenames) - self.paid)
        ratio = self.actual_s / self.planned_s if self.planned_s > 60 else 1.0
        est_s = planned_s * max(ratio, 0.5)
        left = b.deadline - time.perf_counter()
        if est_s > left:
            from rh.budget import format_duration

            why = f"over budget: needs about {format_duration(est_s)}, {format_duration(max(left, 0))} left"
            self.session.left_out[item.nodeid] = why
            pytest.skip(f"left out: {why}")
        self.paid |= set(item.fixturenames)
        self.started_item = (time.perf_counter(), planned_s)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        """A claim stopped by the budget's deadline is left out (skipped, named), not an error."""
        rep = yield
        from rh.budget import BudgetExhausted

        if call.excinfo is not None and call.excinfo.errisinstance(BudgetExhausted):
            why = "the budget ran out while it ran"
            self.session.left_out[item.nodeid] = why
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1] or 0, f"left out: {why}")
        if call.when == "teardown" and self.started_item:
            t0, est = self.started_item
            self.started_item = None
            if item.nodeid not in self.session.left_out:
                self.actual_s += time.perf_counter() - t0
                self.planned_s += est
        return rep

    def stop_alarm(self) -> None:
        import signal

        if self.old_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_alarm)
            self.old_alarm = None


class PlanPrinter:
    """``--plan``, registered only with that option: a dry run of the collected claims (:mod:`rh.dry`).

    Every claim runs its own code on the model without its weights, and the session's runner counts
    the token-layers of each work unit and task instead of computing it (made-up outcomes keep the
    claim going). What each claim charged (the fixtures first set up for it, and its body) is its
    plan, printed as a table with the time this machine would take (:func:`rh.plan.calibrate_run`) and,
    with an expected-verdicts file, what its recorded run executed. A claim whose passes cannot be
    counted (a pass outside the runner, a task without ``dry``) is shown unknown with the reason,
    never 0. The made-up outcomes never leave the dry run: no verdict is shown or kept, no report,
    journal or store is written, and the ranking cache it reads is a copy (:meth:`cache_copy`)."""

    def __init__(self, session: RhSession, expected: Expected | None = None) -> None:
        self.session = session
        self.expected = expected  # --expected, whose recorded counts are shown beside the plan
        self.claims: list[Any] = []  # rh.plan.ClaimPlan, in run order
        self.unknown: dict[str, str] = {}  # node id -> why its passes could not be counted
        self._copy: tempfile.TemporaryDirectory | None = None
        self._copied: dict[Path, Path] = {}
        self._fixtures: list[str] = []

    def cache_copy(self, folder: Path) -> Path:
        """A copy of the ranking cache ``folder``, made once: the dry run finds the rankings cached
        there (so their identification costs nothing, as in a run) and writes those it makes up from
        made-up scores into the copy, removed at the end."""
        folder = Path(folder)
        if folder not in self._copied:
            if self._copy is None:
                self._copy = tempfile.TemporaryDirectory(prefix="rh-plan-")
            target = Path(self._copy.name) / f"rankings-{len(self._copied)}"
            if folder.is_dir():
                shutil.copytree(folder, target, ignore=shutil.ignore_patterns(".locks"))
            else:
                target.mkdir()
            self._copied[folder] = target
        return self._copied[folder]

    def _tallies(self) -> dict[str, Any]:
        """The dry executor's rows and tasks by label since the running claim started (empty before
        the model loads)."""
        executor = self.session.runner.executor if self.session.runner is not None else None
        return getattr(executor, "tallies", {})

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        """What the claim charged while it ran (its fixtures first set up, and its body): its plan."""
        counts = dict(self.session.counter.counts)
        self._tallies().clear()  # the executor's tallies are this claim's from here
        self._fixtures = []
        try:
            return (yield)
        finally:
            if item.get_closest_marker("claim") is not None:
                self.claims.append(self._planned(item, counts))

    def pytest_fixture_setup(self, fixturedef, request) -> None:
        self._fixtures.append(fixturedef.argname)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        """A claim that raised is not planned: skipped, with the reason kept for the table."""
        rep = yield
        if item.get_closest_marker("claim") is not None and rep.failed:
            why = _short_error(rep)
            self.unknown.setdefault(item.nodeid, why)
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1] or 0, f"not planned: {why}")
        return rep

    def _planned(self, item: pytest.Item, counts: dict[str, int]) -> Any:
        from rh.plan import ClaimPlan, PlanLine, claim_label

        nodeid = item.nodeid
        tallies = self._tallies()
        cp = ClaimPlan(nodeid, claim_label(item), unknown=self.unknown.get(nodeid))
        for label, n in self.session.counter.counts.items():
            spent = n - counts.get(label, 0)
            t = tallies.get(label)
            if spent or (t is not None and (t.rows or t.tasks)):
                name = "body" if label == nodeid else label.removeprefix("fixture:")
                cp.lines.append(PlanLine(name, spent, dict(t.rows) if t else {}, dict(t.tasks) if t else {}))
        exp = self.expected
        node = exp.nodes.get(nodeid) if exp is not None else None
        if node is not None and node.get("token_layers") is not None:
            rec_fx, rec_fs = dict(exp.fixture_token_layers), dict(exp.fixture_seconds)
            fixtures = list(dict.fromkeys(self._fixtures))  # those first set up for this claim
            cp.recorded_tl = int(node["token_layers"]) + sum(int(rec_fx.get(f, 0)) for f in fixtures)
            if node.get("seconds") is not None:
                cp.recorded_s = float(node["seconds"]) + sum((rec_fs.get(f) or {}).get("seconds") or 0.0
                                                             for f in fixtures)
        return cp

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        from rh.plan import Plan, calibrate_run, format_plan

        plan = Plan(self.claims, recorded_from=str(self.expected.path) if self.expected is not None else None)
        opt = config.getoption
        try:
            cal = calibrate_run(opt("--model"), self.session.collection_profile, device=opt("--device"),
                                dtype=opt("--dtype"), quant=opt("--quant"))
            plan.per_tl, plan.calibration = cal.seconds_per_token_layer, cal.line()
        except Exception as exc:  # a plan without times is still a plan
            plan.calibration = f"no calibration ({type(exc).__name__}: {exc}); times unknown"
        terminalreporter.ensure_newline()
        terminalreporter.write_sep("=", "rh plan")
        heading = (f"{opt('--model')}, {opt('--profile')} profile: {len(self.claims)} claims run dry (every pass "
                   "counted, none computed; no verdict)")
        for line in format_plan(plan, heading=heading):
            terminalreporter.write_line(line)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None


@pytest.fixture(scope="session")
def rh_model(pytestconfig):
    """The model under test, loaded once per session (its forward passes are counted)."""
    return _session_model(pytestconfig)


def _session_model(config: pytest.Config):
    """Load the model once (the fixture, or the budget's calibration before the first claim): the
    session's :class:`rh.run.Run` loads it, attaches the counter, then :func:`_loaded`, then prefix
    reuse (or plain passes) and the runner."""
    return _rh(config).run.load()


def _loaded(config: pytest.Config, model) -> None:
    """Said once the model has loaded; with --budget or --update-expected, this machine's seconds
    per token-layer measured (before prefix reuse starts: the calibration is a plain pass). A model
    loaded without its weights (--ray) says so."""
    what = ("" if model.holds_weights else ", without its weights: a dry run (--plan) counts the passes and computes "
            "none" if _rh(config).run.dry else ", without its weights: the Ray replicas hold them")
    _progress(config, f"loaded {model.key} in {model.provenance['dtype']} "
                      f"({model.provenance.get('dtype_reason', '')}){what}", force=True)
    if model.holds_weights:  # else on a replica, once they run (_session_runner)
        _calibrate(config, lambda task: task.run(model, {}))


def _calibrate(config: pytest.Config, run_task) -> None:
    """With --budget or --update-expected: this machine's seconds per token-layer, measured by
    ``run_task(rh.budget.CalibrationTask)`` here or on a replica, kept for the budget and the file."""
    if config.getoption("--budget") is None and not config.getoption("--update-expected"):
        return
    from rh.budget import CalibrationTask

    state = _rh(config)
    prof = state.collection_profile
    before = state.counter.total
    with state.counter.charged_to("calibration"):
        per_tl, how = run_task(CalibrationTask(batch_size=prof.batch_size, length=prof.lengths[0]))
    # not the claim's whose setup loaded the model: out of its bill with fixtures, as out of the total
    state.item_start += state.counter.total - before
    state.per_tl = (per_tl, how)
    state.meta.setdefault("cost", {}).update(seconds_per_token_layer=per_tl, calibration=how)
    _progress(config, f"this machine: {how}", force=True)


def _session_runner(config: pytest.Config, model):
    """The session's runner on ``model`` (rh.runner): local, or Ray replicas with --ray; the
    store in --store's file, else in memory."""
    from rh.runner import Layout, ResultStore, Runner, use_runner

    state = _rh(config)
    store = ResultStore(config.getoption("--store"))
    if store.loaded or store.skipped:
        _progress(config, f"store {config.getoption('--store')}: {store.loaded} rows kept from earlier runs"
                          + (f", {store.skipped} unreadable lines (computed again)" if store.skipped else ""), force=True)
    address = config.getoption("--ray")
    if address is None:
        return use_runner(model, Runner(model, store=store))
    from rh.ray_executor import RayExecutor, ReplicaSpec

    replicas = config.getoption("--replicas") or 1
    threads = config.getoption("--threads-per-replica") or 1
    gpus = config.getoption("--gpus-per-replica") or 0.0
    spec = ReplicaSpec(model=config.getoption("--model"), dtype=model.provenance["dtype"],
                       quant=config.getoption("--quant"), device="cuda" if gpus else "cpu",
                       max_memory=config.getoption("--max-memory"), threads=threads, gpus=gpus,
                       prefix_reuse=not config.getoption("--plain"))
    _progress(config, f"starting {replicas} Ray replica(s) of {model.key} ({threads} thread(s)"
                      + (f", {gpus:g} GPU(s)" if gpus else "") + f" each) at {address}", force=True)
    try:
        executor = RayExecutor(spec, address=address, replicas=replicas)
    except (ConnectionError, ValueError, TimeoutError, ImportError) as exc:
        store.close()
        pytest.exit(f"rh --ray: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    layout = Layout.of(model, executor="ray", replicas=replicas, threads_per_replica=threads,
                       gpus_per_replica=gpus or None)
    _progress(config, f"{replicas} Ray replica(s) ready (pids {', '.join(map(str, executor.pids))})", force=True)
    runner = Runner(model, executor=executor, store=store, layout=layout, charge=state.counter.charge)
    if not model.holds_weights:  # this process has no weights to time: replica 0 is timed
        def on_replica(task):
            per_tl, how = runner.call([], [task])[0]
            return per_tl, f"on Ray replica 0, {how}"

        _calibrate(config, on_replica)
    return use_runner(model, runner)


def progress_every_s() -> float:
    """Seconds between progress lines: ``RH_PROGRESS_SECONDS`` as the session finds it, else 50 (a
    line within every minute, as forwards allow)."""
    return float(os.environ.get("RH_PROGRESS_SECONDS", "50"))


def _progress(config: pytest.Config, message: str | None = None, *, force: bool = False) -> None:
    """A line on the terminal at least once a minute while claims run (pytest captures tqdm):
    elapsed time, the claim or fixture running and the loop it is in (conditions done of planned),
    token-layers done, and the time left: of the budget, or estimated from the token-layers an
    expected-verdicts file recorded for these claims."""
    state = _rh(config)
    now = time.perf_counter()
    if not force and now - state.last_progress < state.progress_every_s:
        return
    state.last_progress = now
    tr = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if tr is None or hasattr(config, "workerinput"):
        return
    from rh.budget import format_duration

    counter = state.counter
    total = counter.total - counter.counts.get("calibration", 0)
    budget = state.scheduler.plan if state.scheduler is not None else None
    planned = budget.planned_tl if budget is not None else (state.estimate or {}).get("planned_tl", 0)
    done = f"{total:,} token-layers"
    if planned:
        done += f" of {planned:,} {'planned' if budget else 'expected'} ({min(total / planned, 1):.0%})"
    label = counter.label.removeprefix("fixture:")
    text = message or f"running {label}"
    if message is None and state.step is not None and state.step[0] and counter.label == state.step_label:
        what, n, of = state.step
        text += f", {what} {n}" + (f" of {of}" if of else "")
    line = f"rh [{format_duration(now - state.t0)}] {text}; {done}"
    if budget is not None:
        line += f"; {format_duration(max(budget.deadline - now, 0))} of the budget left"
    elif planned and state.loaded_at is not None and total > 0:
        rate = (now - state.loaded_at) / total
        line += f"; about {format_duration(max(planned - total, 0) * rate)} left at this pace"
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        tr.ensure_newline()
        tr.write(line + "\n", flush=True)  # flushed: stdout is block-buffered when CI sends it to a file


@pytest.fixture(scope="session")
def profile(pytestconfig, rh_model):
    from rh.profiles import get_profile

    return get_profile(pytestconfig.getoption("--profile"), rh_model.shape, alpha=pytestconfig.getoption("--alpha"),
                       **_head_set_levels(pytestconfig))


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
def ca_identify(niah_split, profile):
    """The identification prompts: the 80% side, on the profile's CA tasks (what ``ranking`` is
    identified on, and any claim that rescores those prompts)."""
    return [s for s in niah_split[0] if s.task in profile.tasks]


@pytest.fixture(scope="session")
def identify_ranking(pytestconfig, rh_model, profile):
    """A function: (identification samples, method, sweep) -> (ranking, cache path), via the cache."""
    from rh.pipeline import cached_identification, ranking_provenance, with_sample_scores

    def get(samples, method: str = "sum_attention", sweep=None, *, model=None, with_scores: bool = False):
        m = model or rh_model
        prov = ranking_provenance(m, sweep or profile.sweep(), method, samples,
                                  identify_frac=profile.identify_frac, split_seed=profile.split_seed)

        def cached(recompute: bool):
            return cached_identification(m, samples, prov, recompute=recompute, cache_dir=ranking_cache(pytestconfig),
                                         batch_size=profile.batch_size)

        recompute = pytestconfig.getoption("--recompute")
        return with_sample_scores(cached, recompute) if with_scores else cached(recompute)

    return get


@dataclass(frozen=True)
class AttentionExample:
    """The top heads' last-token attention on one validation prompt, for the report's heatmap."""

    sample: str  # the prompt's id
    heads: tuple[str, ...]  # the top heads, best first (``L16H1``)
    needle_span: tuple[int, int]
    answer_span: tuple[int, int]
    rows: tuple[tuple[float, ...], ...]  # one per head: its attention over the prompt, rounded

    def to_json(self) -> dict[str, Any]:
        return {"sample": self.sample, "heads": list(self.heads), "needle_span": list(self.needle_span),
                "answer_span": list(self.answer_span), "rows": [list(row) for row in self.rows]}


@dataclass(frozen=True)
class RankingSource:
    """The session's ranking (or head set), where it came from, and the attention example drawn
    from its top heads: what the ``ranking_source`` fixture returns, and the report shows."""

    ranking: Any  # an rh.rankings.Ranking, or an rh.published.HeadSet (--heads, a head-set file)
    path: str  # the file it was read from or cached in; "--heads" for a head set given inline
    cache: str  # "hit" (read from the cache), "computed" (and cached), or "external" (--rankings, --heads)
    attention: AttentionExample | None = None  # none for a head set: it has no top heads by rank

    def report_entries(self) -> dict[str, Any]:
        """The report's ``ranking`` entry (its top 10, or a head set's members) and ``attention_example``."""
        from rh.published import HeadSet

        r = self.ranking
        entry = {"path": self.path, "cache": self.cache, "provenance": r.provenance}
        if isinstance(r, HeadSet):
            entry["head_set"] = [str(h) for h in r.members]
        else:
            entry["top10"] = [str(h) for h in r.top(min(10, r.shape.n_total))]
        return {"ranking": entry, **({"attention_example": self.attention.to_json()} if self.attention else {})}


@pytest.fixture(scope="session")
def ranking_source(pytestconfig, rh_model, ca_identify, validation, identify_ranking) -> RankingSource:
    """The session's ranking on the identification split (--method: from --rankings, the cache, or
    computed) or head set (--heads), with where it came from and its attention example. Claims
    request ``ranking``; this fixture's passes are billed to it (:data:`_BILLED_AS`)."""
    from rh.published import HeadSet

    external = _rh(pytestconfig).external
    if external is not None:
        r = external
        r.check_shape(rh_model.shape)
        where = pytestconfig.getoption("--rankings") or "--heads"
        cache = "external"
        if isinstance(r, HeadSet):  # no top-10 to show, no attention example by rank
            return RankingSource(r, str(where), cache)
    else:
        r, where, hit = identify_ranking(ca_identify, pytestconfig.getoption("--method"))
        cache = "hit" if hit else "computed"
    return RankingSource(r, str(where), cache, _attention_example(rh_model, r, validation))


@pytest.fixture(scope="session")
def ranking(ranking_source):
    """The ranking on the identification split (--method): from --rankings, the cache, or computed.
    With ``--heads`` (or a head-set file) it is a :class:`rh.published.HeadSet`: ``top(k)`` exists
    only for K = its size, and a claim asking for another K fails with a clear reason."""
    return ranking_source.ranking


def _attention_example(model, ranking, validation) -> AttentionExample | None:
    """The top heads' last-token attention on the first validation prompt (none without one)."""
    from rh.scoring import read_last_token_attention

    if not validation:
        return None
    sample = validation[0]
    heads = ranking.top(min(5, model.shape.n_total))
    (rows,) = read_last_token_attention(model, [sample], heads)  # a work unit: on Ray, on a replica
    return AttentionExample(sample.id, tuple(str(h) for h in heads), tuple(sample.needle_span),
                            tuple(sample.answer_span), tuple(tuple(round(float(x), 5) for x in row) for row in rows))


@pytest.fixture(scope="session")
def baseline(rh_model, validation, profile, ranking):
    """Teacher-forced outcomes on the validation split with no intervention. The passes keep the
    residual stream where the top-K sets the claims ablate on these prompts start (CA-1, CA-2,
    CA-5), so those passes run only the layers from there on (rh.prefix). They also read the top
    ``id_k`` heads' needle mass (:func:`rh.id_claims.read_needle_mass`), kept beside the rows in
    the results store: ID-2 reads it from there and runs no pass of its own."""
    from rh.causal import evaluate_baseline
    from rh.id_claims import read_needle_mass
    from rh.prefix import first_layers, hinting
    from rh.published import HeadSetHasNoOrder

    sets = []
    for k in {*profile.ablation_levels, *profile.dose_levels, profile.id_k, *profile.compress_levels}:
        try:
            sets.append(ranking.top(k))
        except HeadSetHasNoOrder:  # a head set has only its own size
            pass
    try:
        top = ranking.top(profile.id_k)
    except HeadSetHasNoOrder:
        top = []
    with hinting(rh_model, first_layers(sets)):
        if not top or not validation:
            return evaluate_baseline(rh_model, validation, batch_size=profile.batch_size)
        return read_needle_mass(rh_model, validation, top, batch_size=profile.batch_size)[0]


def _baseline_entry(df) -> dict[str, Any]:
    """The report's ``baseline`` entry: accuracy in all and by depth, from the baseline's outcomes."""
    by_depth = df.groupby("depth")["correct"].mean()
    return {"accuracy": float(df["correct"].mean()), "n": len(df),
            "accuracy_by_depth": {f"{d:g}": float(a) for d, a in by_depth.items()}}


@pytest.fixture(scope="session")
def ranking_uncertainty(pytestconfig, rh_model, profile, ca_identify, identify_ranking, ranking):
    """The session ranking's uncertainty from resampling its identification prompts by haystack
    window (:mod:`rh.uncertainty`): ``{K: RankingUncertainty}`` for ``id_k`` and ``group_k``, with
    per-head intervals, P(top K), the stable core, how it narrows with the number of prompts, and
    the resampled top-K sets (``boot_tops``, flat head indices). Empty for a ranking given from
    outside (--rankings, --heads): its per-prompt scores are unknown. The ``id_k`` one goes into
    the report (:func:`_report_entries`)."""
    from rh.uncertainty import ranking_uncertainty as resample

    if _rh(pytestconfig).external is not None:
        return {}
    *_, scored = identify_ranking(ca_identify, pytestconfig.getoption("--method"), with_scores=True)
    groups = [s.group for s in ca_identify]
    out = {}
    for k in sorted({profile.id_k, profile.group_k}):
        out[k] = resample(scored, rh_model.shape, k=k, groups=groups, n_boot=profile.uncertainty_boot,
                          seed=profile.draw_seed, return_tops=True)
    return out


@pytest.fixture
def record_verdict(request, pytestconfig):
    """Call with a ``Verdict``: attaches it to the test report (xdist-safe), then passes,
    fails (refuted) or skips (inconclusive) the test accordingly. Under ``--expected`` the test
    instead passes exactly when the verdict is the expected one (``--update-expected``: always)."""

    marker = request.node.get_closest_marker("claim")
    doc = " ".join((getattr(request.node, "function", None).__doc__ or "").split())

    def record(verdict) -> None:
        entry = verdict.to_dict()
        entry["statement"] = doc
        entry["source"] = marker.kwargs.get("source", "") if marker else ""
        _settle(request.node, pytestconfig, entry, verdict)

    return record


#: session metadata that belongs to one run: not carried over from a journal to the run resuming it
_RUN_ONLY_META = frozenset({"cost", "units", "memory", "interrupted", "budget", "resumed", "heads_model_warning"})


def _settle(node: pytest.Item, config: pytest.Config, entry: dict[str, Any], verdict) -> None:
    """Attach a verdict (its dict ``entry``) to the claim's report, then pass, fail or skip as
    :func:`record_verdict` says: what a computed verdict and one replayed from the journal share."""
    node.user_properties.append((_VERDICT, entry))
    node.user_properties.append((_META, _rh(config).meta))  # how a pytest -n worker's metadata reaches the controller
    if _rh(config).run.dry:  # --plan: made-up outcomes decide nothing; the claim's passes were what counted
        return
    check = _rh(config).expected_check
    if check is not None:
        check.settle(entry, verdict)
        return
    if verdict.inconclusive:
        pytest.skip(f"inconclusive: {verdict.reason}")
    assert verdict.supported, "claim refuted:\n" + verdict.explain()


def _path_setting(config: pytest.Config, option: str, ini: str) -> Path:
    value = config.getoption(option)
    if value:
        return Path(value)
    return config.rootpath / config.getini(ini)


def report_dir(config: pytest.Config) -> Path:
    """``--report-dir``, else the ini value ``rh_report_dir`` under the rootdir."""
    return _path_setting(config, "--report-dir", "rh_report_dir")


def ranking_cache(config: pytest.Config) -> Path:
    """``--ranking-cache``, else the ini value ``rh_ranking_cache`` under the rootdir; rankings of a
    random test model (``tiny-llama``) go to ``.rh/rankings`` under the rootdir instead, never into
    a folder of committed rankings. With ``--plan``, a copy of that folder (:class:`PlanPrinter`)."""
    plan = config.pluginmanager.getplugin("rh-plan")
    if plan is not None:  # a dry run reads the rankings cached and keeps those it makes up to itself
        return plan.cache_copy(_ranking_cache(config))
    return _ranking_cache(config)


def _ranking_cache(config: pytest.Config) -> Path:
    from rh.models import resolve_spec

    if not config.getoption("--ranking-cache") and resolve_spec(config.getoption("--model")).kind == "random":
        return config.rootpath / ".rh" / "rankings"
    return _path_setting(config, "--ranking-cache", "rh_ranking_cache")


@pytest.fixture(scope="session")
def compare_model(pytestconfig):
    """The --compare-model (e.g. the base variant of an instruct model), loaded once, or None."""
    name = pytestconfig.getoption("--compare-model")
    if not name:
        return None
    return _rh(pytestconfig).run.load_other(name)


#: a fixture whose passes are billed under another name: the name claims request, and expected files record
_BILLED_AS = {"ranking_source": "ranking"}


def _report_entries(fixturedef: pytest.FixtureDef, value: Any, request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the report says of one of rh's session fixtures, read off the value it returned (none
    for a fixture of that name a conftest defines instead)."""
    if getattr(fixturedef.func, "__module__", None) != __name__:
        return {}
    name = fixturedef.argname
    if name == "ranking_source":
        return value.report_entries()
    if name == "baseline":
        return {"baseline": _baseline_entry(value)}
    if name == "ranking_uncertainty" and value:
        return {"ranking_uncertainty": value[request.getfixturevalue("profile").id_k].to_json()}
    return {}


def _parametrized(item: pytest.Item) -> dict[str, Any]:
    """The values a registered family's parametrization gave this claim, under the names its
    verdicts give them (:class:`rh.claim_families.Parameter`), e.g. ``{"depth": 0.25}``."""
    from rh.claim_families import parameters

    given = getattr(getattr(item, "callspec", None), "params", {}) or {}
    known = parameters()
    return {known[f].param: v for f, v in given.items() if f in known}


# --------------------------------------------------------------------------- collection of verdicts


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """Carry each claim's id (``@pytest.mark.claim("CA-1")``) to its reports, for the error rows."""
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


def _write_report(config: pytest.Config, state: RhSession) -> tuple[Path, Path]:
    from rh.report import report_stem

    meta = {"model": config.getoption("--model"), "profile": config.getoption("--profile")}
    extra: dict[str, bytes] = {}
    for figs in config.hook.pytest_rh_figures(verdicts=state.verdicts, meta={**state.meta, **meta}):
        extra.update(figs or {})
    stem = report_stem(config.getoption("--model"), state.started)
    return state.run.write_report(report_dir(config), stem, figures=extra, meta=meta)


def _verdict_key(v: dict) -> str:
    params = ",".join(f"{k}={v2}" for k, v2 in sorted((v.get("params") or {}).items()) if k != "heads")
    return f"{v.get('claim')}[{params}]"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize claims over the profile's fields that the registered claim families name
    (:class:`rh.claim_families.Parameter`: CA-1's K levels, CA-4's tasks, CA-6's depths...), known
    from the model's shape, which the registry or the model's config gives without loading weights."""
    from rh.claim_families import parameters

    params = parameters()
    wanted = [name for name in params if name in metafunc.fixturenames]
    if not wanted or metafunc.definition.get_closest_marker("claim") is None:
        return
    prof = _rh(metafunc.config).collection_profile
    for name in wanted:
        p = params[name]
        values = p.field(prof) if callable(p.field) else getattr(prof, p.field, None)
        if values is None:
            raise pytest.UsageError(f"the parameter {name!r} of a claim family reads the profile's field {p.field!r}, "
                                    f"which profile {prof.name!r} does not have")
        metafunc.parametrize(name, values, ids=p.ids)


def _collection_profile(config: pytest.Config):
    from rh.profiles import get_profile

    shape = _rh(config).shape
    try:
        return get_profile(config.getoption("--profile"), shape, alpha=config.getoption("--alpha"),
                           **_head_set_levels(config))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def _estimate(config: pytest.Config, expected, claims: list[pytest.Item]) -> dict[str, Any] | None:
    """Token-layers these claims cost when the expected-verdicts file (``--expected``, else
    ``<rh_expected_dir>/<model>.json``) recorded them: what the progress lines count down. None
    under ``--plain``: the file records a run with its savings, several times fewer passes, so its
    count would say a plain run nearly done when it has far to go."""
    if config.getoption("--plain"):
        return None
    if expected is None:
        folder = config.getini("rh_expected_dir")
        path = config.rootpath / folder / f"{config.getoption('--model')}.json" if folder else None
        if path is None or not path.is_file():
            return None
        from rh.expected import load_expected

        try:
            expected = load_expected(path)
        except (ValueError, OSError):
            return None
    nodes = [expected.nodes.get(it.nodeid) for it in claims]
    if not any(nodes):
        return None
    fixtures = {f for it in claims for f in it.fixturenames}
    planned = sum(int((n or {}).get("token_layers") or 0) for n in nodes) + sum(
        int(tl or 0) for f, tl in expected.fixture_token_layers.items() if f in fixtures)
    return {"planned_tl": planned, "source": str(expected.path)} if planned else None


def _head_set_levels(config: pytest.Config) -> dict[str, Any]:
    """A head set under test has one K: its size (CA-1's top K is the set; no other K exists)."""
    external = _rh(config).external
    from rh.published import HeadSet

    if not isinstance(external, HeadSet):
        return {}
    return {"ablation_levels": (len(external),)}
