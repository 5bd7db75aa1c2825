"""A run of claims on a model, without pytest: what the plugin, ``rh audit`` and ``rh identify``
each hold one of.

A :class:`Run` owns what every way of running claims needs, once:

- the model, loaded on first use (:meth:`Run.load`) with the forward passes' counter attached
  (:class:`rh.budget.TokenLayerCounter`), and any second model of the run (``--compare-model``:
  :meth:`Run.load_other`);
- the runner every claim hands its work units to (:mod:`rh.runner`; local by default, or what the
  caller builds: Ray replicas), with prefix reuse (:mod:`rh.prefix`) unless the run is plain;
- the savings this run made: its own :class:`rh.budget.SavingsLedger`, which every saving noted
  (:func:`rh.budget.note_saved`) goes to while the run is open and no run opened after it is
  (:meth:`Run.saved`);
- the verdicts recorded, the run's metadata, progress lines (:mod:`rh.progress`), and the report
  (:meth:`Run.write_report`: every registered family's figures, :mod:`rh.claim_families`).

Everything it opens (hooks, the prefix cache, the runner and its store, progress listeners) is
closed by :meth:`Run.close` (or leaving ``with Run(...)``), whatever happened.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Run", "hardware", "headline"]

RunnerFactory = Callable[[Any], Any]  # (loaded model) -> a context manager giving an rh.runner.Runner


class Run:
    """One run on the model ``model`` (a registry key, hub id or local folder), loaded with
    ``model_kwargs`` (``rh.options.model_kwargs``: quant, device, dtype, max_memory).

    ``plain``: no prefix reuse and no curtailment (every pass in full, :func:`rh.budget.plain_passes`).
    ``store``: the runner's results store file (None: in memory). ``runner``: builds the runner for
    the loaded model instead of the local one (the plugin's ``--ray``). ``on_load(run, model)`` runs
    after the counter is attached and before prefix reuse starts (the budget's calibration pass).
    ``on_count``: called after each counted forward (progress lines). ``weights=False``: the model
    is loaded without its weights (:func:`rh.models.load_model`), for a runner whose executor holds
    them (Ray replicas): this process then runs no forward pass of its own. ``dry=True``: a dry run
    (:mod:`rh.dry`, ``--plan``): the model without its weights, every pass plain, the runner's
    executor a :class:`rh.dry.DryExecutor` that counts each pass's token-layers and computes none,
    and a results store in memory only."""

    def __init__(self, model: str, *, model_kwargs: Mapping[str, Any] | None = None, plain: bool = False,
                 store: str | Path | None = None, runner: RunnerFactory | None = None,
                 on_load: Callable[[Run, Any], None] | None = None, on_count: Callable[[], None] | None = None,
                 command: str = "", weights: bool = True, dry: bool = False) -> None:
        from rh.budget import SavingsLedger, TokenLayerCounter

        self.model_name = model
        self.dry = dry
        self.weights = weights and not dry
        self.model_kwargs = dict(model_kwargs or {})
        self.plain = plain or dry
        self.store_path = None if dry else store
        self._runner_factory = runner
        self._on_load = on_load
        self.counter = TokenLayerCounter()
        self.counter.on_count = on_count
        self.verdicts: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.command = command
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.model = None
        self.others: dict[str, Any] = {}  # second models of the run (--compare-model), by name
        self.runner = None
        self.prefix = None
        self.loaded_at: float | None = None
        self.resources = contextlib.ExitStack()
        self.ledger = SavingsLedger()  # the exact savings of this run, open until close()
        self.ledger.open()
        self._closed = False

    # ---------------------------------------------------------------- models

    def load(self):
        """The model, loaded once: the counter attached, then ``on_load``, then prefix reuse (or
        plain passes) and the runner. What is opened here is closed by :meth:`close`."""
        if self.model is not None:
            return self.model
        if self._closed:
            raise RuntimeError("this Run is closed: start another")
        from rh.models import load_model

        if self.dry:
            from rh.dry import dry_running

            self.resources.enter_context(dry_running())
        model = load_model(self.model_name, **self.model_kwargs, weights=self.weights)
        handle = self.counter.attach(model.model)
        self.resources.callback(handle.remove)
        from rh.models import attention_features, joined_numerics, numerics

        self.meta.update({"dtype": model.provenance["dtype"], "dtype_reason": model.provenance.get("dtype_reason"),
                          "numerics": numerics(model.provenance["dtype"], str(model.provenance.get("device", "cpu"))),
                          "architecture": attention_features(model.model.config)})
        if self._on_load is not None:
            self._on_load(self, model)
        if self.plain:
            from rh.budget import plain_passes

            self.resources.enter_context(plain_passes())
        else:
            from rh.prefix import reuse_prefixes

            self.prefix = self.resources.enter_context(reuse_prefixes(model))
        self.runner = self.resources.enter_context(self._make_runner(model))
        self.meta["layout"] = self.runner.layout.as_dict()
        spread = getattr(self.runner.executor, "numerics", None)
        if spread is not None:  # the passes run in other processes (Ray replicas): their arithmetic, not this one's
            self.meta["numerics"] = joined_numerics(spread())
        self.model = model
        self.loaded_at = time.perf_counter()
        return model

    def _make_runner(self, model):
        from rh.runner import ResultStore, Runner, use_runner

        if self.dry:
            from rh.dry import DryExecutor

            executor = DryExecutor(model, label=lambda: self.counter.label)
            return use_runner(model, Runner(model, executor=executor, charge=self.counter.charge))
        if self._runner_factory is not None:
            return self._runner_factory(model)
        return use_runner(model, Runner(model, store=ResultStore(self.store_path)))

    def load_other(self, name: str, **model_kwargs: Any):
        """A second model of this run (e.g. ``--compare-model``), loaded once with this run's model
        options unless given; its passes are not on this run's counter (they are not the model
        under test)."""
        if name not in self.others:
            from rh.models import load_model

            kwargs = {k: v for k, v in self.model_kwargs.items() if k != "max_memory"}
            kwargs.update(model_kwargs)
            self.others[name] = load_model(name, **kwargs, weights=not self.dry)
        return self.others[name]

    # ---------------------------------------------------------------- verdicts and costs

    def record(self, verdict: Any) -> dict[str, Any]:
        """Keep a verdict (an :class:`rh.rules.verdict.Verdict` or its dict) and return its dict."""
        row = verdict.to_dict() if hasattr(verdict, "to_dict") else dict(verdict)
        self.verdicts.append(row)
        return row

    def saved(self) -> dict[str, int]:
        """Token-layers the exact savings spared while this run was open, by kind."""
        return {k: v for k, v in self.ledger.saved().items() if v}

    def cost(self) -> dict[str, Any]:
        """The counted token-layers, in all and by label, and the savings."""
        return {"total": self.counter.total, "by": dict(sorted(self.counter.counts.items())), "saved": self.saved()}

    def memory(self) -> dict[str, Any]:
        """The run's peak memory so far: this process's (:func:`rh.memory.peak_memory`, with its
        prefix cache's peak and cap) under ``process``, and, where an executor runs the passes in
        other processes (Ray replicas), each one's under ``replicas``. Call it before :meth:`close`."""
        from rh.memory import process_memory

        out: dict[str, Any] = {"process": process_memory(self.prefix)}
        replicas = getattr(getattr(self.runner, "executor", None), "memory", None)
        if replicas is not None:
            out["replicas"] = replicas()
        return out

    # ---------------------------------------------------------------- the report

    def write_report(self, directory: str | Path, stem: str, *, figures: Mapping[str, bytes] | None = None,
                     meta: Mapping[str, Any] | None = None, family_figures: bool = True) -> tuple[Path, Path]:
        """Write the JSON and HTML report of the verdicts recorded: this run's metadata (with
        ``meta`` over it), every registered family's figures the verdicts allow (unless
        ``family_figures`` is False: a caller drawing its own, as ``rh audit`` draws CA-1 per
        input), then ``figures``."""
        import platform

        import torch
        import transformers

        import rh
        from rh.report import report_figures, write_report

        finished = datetime.now(timezone.utc)
        full = {**self.meta, "rh_version": rh.__version__, "started": self.started.isoformat(timespec="seconds"),
                "finished": finished.isoformat(timespec="seconds"),
                "runtime_s": round(time.perf_counter() - self.t0, 1), "command": self.command,
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "platform": platform.platform(), "hardware": hardware(),
                **(meta or {})}
        drawn = report_figures(self.verdicts, full) if family_figures else {}
        drawn.update(figures or {})
        return write_report(self.verdicts, full, directory, stem, drawn)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close what the run opened (the runner and its store, the prefix cache, the counter's
        hooks), in reverse order, and its savings ledger; safe to call twice."""
        self._closed = True
        try:
            self.resources.close()
        finally:
            self.ledger.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def hardware() -> dict[str, Any]:
    """This machine as the report's provenance gives it: CPU, cores, torch threads, device, the load
    average, and the GPUs."""
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


def headline(counts: Mapping[str, int], statuses: Sequence[str] = ("supported", "refuted", "inconclusive")) -> str:
    """``"N verdicts: a supported, b refuted, c inconclusive"``."""
    n = sum(counts.values())
    return f"{n} verdicts: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in statuses)
