"""What a run of claims will cost, before any weights load: ``pytest claims/ --plan``.

For each collected claim the plan lists the conditions its fixtures and its own body evaluate, the
forward passes (prompts x conditions), and the token-layers (one token through one decoder layer,
what :class:`rh.budget.TokenLayerCounter` counts during a run): passes x tokens per pass x layers.
It is the *plain* count, an upper bound: prefix reuse (an ablated pass runs only the layers from
the first ablated one, :mod:`rh.prefix`), the early stopping of CA-1's random head sets and the
curtailment of the paired families (:mod:`rh.curtail`) make a real run cheaper; each row says
which saving may lower it. A claim pays for the fixtures it uses that no claim before it paid for
(session fixtures run once; :func:`rh.budget.plan_budget` uses the same rule), plus its own body.

Prompts are planned without the tokenizer. rh builds every prompt to an exact token length (the
profile's ``lengths``), and the prompt sets, sample ids and the 80/20 split are functions of the
profile alone (:func:`planned_prompts`, :func:`split_prompts`). A teacher-forced pass runs the
prompt plus the answer but its last token; the answer is drawn exactly as
:func:`rh.niah.build_samples` draws it (the same seeded generator) and its tokens are estimated
from its text (:func:`answer_token_estimate`: one token per digit and per punctuation mark, one per
word, as SmolLM2's tokenizer splits them; a tokenizer that merges digits gives fewer, so the plan
is then a little high). Batches are padded as :func:`rh.batching.make_batches` pads them.

Costs are registered per fixture (and per test function, for a claim's own body) with
:func:`register_cost`; this module registers those of rh's catalogue (``claims/``) and of the
plugin's fixtures. A team's own fixture declares its cost the same way::

    from rh.plan import forward_cost, register_cost

    @register_cost("my_outcomes")
    def _(ctx):  # ctx: a PlanContext (ctx.profile, ctx.shape, the planned prompt sets)
        return forward_cost("my_outcomes", ["baseline", "top3"], ctx.validation, ctx)

A fixture or test without a registered cost that asks for ``rh_model`` (or ``compare_model``)
directly may run forward passes: its cost is *unknown*, never 0. One that does not cannot run the
model under test and costs nothing.

Rankings: an identification is free when its file is in the ranking cache. Its cache key is
computed as :func:`rh.pipeline.ranking_provenance` computes it, from the model's provenance as it
is known before loading (the bundled GGUF's sha256, the hub config's commit, a local folder's
fingerprint); where that cannot be known, the identification is shown "if not cached". An
identification planned once is not planned again (the first fixture that needs it computes it).

Wall time: :func:`calibrate_config` times a forward of ``batch_size x lengths[0]`` random tokens
through a randomly initialised model of the same architecture, built from the model's config with
two decoder layers, in the dtype and on the device the run would use (:func:`rh.budget.calibrate`;
the embedding and one-position output head are shared by two layers instead of all, so the figure
is a little high). Model loading is not in the estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import mmap
import random
import re
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rh.heads import HeadShape
from rh.niah import Sweep
from rh.profiles import Profile

__all__ = [
    "CostRow", "PlannedPrompt", "PlanContext", "ClaimPlan", "Plan", "Calibration", "register_cost", "registered",
    "cost_rows", "planned_prompts", "split_prompts", "answer_token_estimate", "padded_tokens", "forward_cost",
    "identification_cost", "plan_items", "format_plan", "calibrate_config", "model_config",
]


# --------------------------------------------------------------------------- one cost


@dataclass(frozen=True)
class CostRow:
    """One homogeneous block of forward passes: ``n_conditions`` conditions (interventions, or
    kinds of pass) each over the same ``prompts`` prompts of ``tokens`` tokens (mean per pass,
    padding included), through ``layers`` decoder layers. ``token_layers`` is the plain count;
    ``savings`` says what may lower it in a real run, ``note`` anything else (e.g. "cached")."""

    name: str  # the fixture or test that runs these passes
    conditions: tuple[str, ...]  # names or descriptions, e.g. ("top10", "random10 x49")
    n_conditions: int
    prompts: int
    tokens: float
    layers: int
    savings: str = ""
    note: str = ""
    stored: int = 0  # of the n_conditions x prompts rows, those the results store holds already (no pass)

    @property
    def passes(self) -> int:
        """Forward passes of one prompt (a batch of b prompts is b passes)."""
        return self.n_conditions * self.prompts - self.stored

    @property
    def token_layers(self) -> int:
        return int(round(self.passes * self.tokens * self.layers))

    def describe(self) -> str:
        conds = ", ".join(self.conditions)
        if self.n_conditions == 0:
            text = f"{self.name}: {conds}" if conds else f"{self.name}: no passes"
        elif self.stored:
            text = (f"{self.name}: {self.n_conditions} condition{'s' if self.n_conditions > 1 else ''} ({conds}) x "
                    f"{self.prompts} prompts, {self.stored} of the rows from the results store: {self.passes} passes x "
                    f"{self.tokens:.4g} tokens x {self.layers} layers = {self.token_layers:,}")
        else:
            what = f"{self.n_conditions} conditions ({conds})" if self.n_conditions > 1 else conds
            prompts = f"{self.prompts} prompt{'s' if self.prompts != 1 else ''}"
            text = (f"{self.name}: {what} x {prompts} x {self.tokens:.4g} tokens x {self.layers} layers"
                    f" = {self.token_layers:,}")
        if self.note:
            text += f"; {self.note}"
        if self.savings and self.token_layers:
            text += f" [may save: {self.savings}]"
        return text


# --------------------------------------------------------------------------- planned prompts


@dataclass(frozen=True)
class PlannedPrompt:
    """A prompt as :func:`rh.niah.build_samples` would build it, known without the tokenizer."""

    id: str
    task: str
    length: int  # prompt tokens (exact: rh builds prompts to this length)
    depth: float
    group: str
    answer: str
    answer_tokens: int  # estimated (:func:`answer_token_estimate`)
    seed: int = 0  # the sweep's: with ``id``, which prompt it is (fresh sets reuse ids with other seeds)


_TOKEN = re.compile(r"\d|[^\w\s]|[^\W\d_]+")


def answer_token_estimate(answer: str) -> int:
    """Tokens of an answer, estimated from its text: one per digit, one per punctuation mark and
    one per word (SmolLM2's tokenizer, and GPT-2-style ones that split digits, split them so:
    ``"12,300"`` is 6 tokens, ``"New York"`` 2). At least 1."""
    return max(1, len(_TOKEN.findall(answer)))


def planned_prompts(sweep: Sweep) -> list[PlannedPrompt]:
    """Every prompt of ``sweep`` in :func:`rh.niah.build_samples`' order, with its answer drawn from
    the same seeded generator (the first draw: build_samples redraws only on a repeated window and
    answer, which is rare)."""
    from rh.tasks import get_task

    out = []
    for length, depth, _, group in sweep.groups():
        for name in sweep.tasks:
            rng = random.Random(f"{sweep.seed}:value:{name}:{group}")
            _, answer = get_task(name).make(rng)
            out.append(PlannedPrompt(f"{name}-{group}", name, length, depth, group, answer,
                                     answer_token_estimate(answer), sweep.seed))
    return out


def split_prompts(prompts: Sequence[PlannedPrompt], *, frac: float = 0.8,
                  seed: int = 0) -> tuple[list[PlannedPrompt], list[PlannedPrompt]]:
    """(identify, validate) exactly as :func:`rh.niah.split_samples` splits (by group id)."""
    from rh.niah import split_ids

    ident, _ = split_ids(sorted({p.group for p in prompts}), frac=frac, seed=seed)
    keep = set(ident)
    return [p for p in prompts if p.group in keep], [p for p in prompts if p.group not in keep]


def _seq_len(p: PlannedPrompt, answer: bool) -> int:
    return p.length + (p.answer_tokens - 1 if answer else 0)


def _batches(prompts: Sequence[PlannedPrompt], batch_size: int, answer: bool) -> list[list[PlannedPrompt]]:
    order = sorted(range(len(prompts)), key=lambda i: _seq_len(prompts[i], answer))  # make_batches' order
    return [[prompts[i] for i in order[c : c + batch_size]] for c in range(0, len(order), batch_size)]


def padded_tokens(prompts: Sequence[PlannedPrompt], batch_size: int, *, answer: bool = True,
                  extra: int = 0) -> int:
    """Tokens one pass over ``prompts`` runs, batched and left-padded as
    :func:`rh.batching.make_batches` does: per batch, rows x the longest row. ``answer``: the
    teacher-forced pass (prompt + answer - 1); ``extra``: tokens each row decodes beyond that (Wu24's
    generation, one token per step)."""
    total = 0
    for batch in _batches(prompts, max(1, batch_size), answer):
        width = max(_seq_len(p, answer) for p in batch)
        total += len(batch) * (width + extra)
    return total


# --------------------------------------------------------------------------- the context a cost sees


class PlanContext:
    """What a cost function sees: the run's ``profile`` and model ``shape`` (layers), the planned
    prompt sets of the session fixtures (``sweep_prompts``, ``identify``, ``validation``,
    ``ca_identify``), :meth:`fresh` for a fixture's own prompts, and the ranking cache
    (:meth:`ranking_status`, :attr:`ranking`)."""

    def __init__(self, profile: Profile, shape: HeadShape, *, model: str = "", method: str = "sum_attention",
                 cache_dir: str | Path | None = None, planned_model: Any = None, external: Any = None,
                 compare_model: str | None = None, recompute: bool = False) -> None:
        self.profile = profile
        self.shape = shape
        self.model = model
        self.method = method
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.planned_model = planned_model  # a stand-in with the provenance a cache key needs, or None
        self.external = external  # --rankings / --heads: a Ranking or HeadSet, or None
        self.compare_model = compare_model
        self.recompute = recompute
        self._cache: dict[Any, Any] = {}
        self.identified: dict[Any, str] = {}  # identifications planned so far -> the fixture that computes it
        self.store: set[tuple[Hashable, int, str]] = set()  # (condition key, sweep seed, prompt id): rows planned so far

    @property
    def layers(self) -> int:
        return self.shape.n_layers

    @property
    def batch_size(self) -> int:
        return self.profile.batch_size

    def prompts(self, sweep: Sweep) -> list[PlannedPrompt]:
        key = ("sweep", sweep)
        if key not in self._cache:
            self._cache[key] = planned_prompts(sweep)
        return self._cache[key]

    @property
    def sweep_prompts(self) -> list[PlannedPrompt]:
        """``niah_samples``: the profile's sweep."""
        return self.prompts(self.profile.sweep())

    def split(self, prompts: Sequence[PlannedPrompt]) -> tuple[list[PlannedPrompt], list[PlannedPrompt]]:
        return split_prompts(prompts, frac=self.profile.identify_frac, seed=self.profile.split_seed)

    @property
    def identify(self) -> list[PlannedPrompt]:
        """``niah_split[0]``: the identification side of the sweep, every task."""
        return self.split(self.sweep_prompts)[0]

    @property
    def ca_identify(self) -> list[PlannedPrompt]:
        """The identification side on the profile's CA tasks (what ``ranking`` is identified on)."""
        return [p for p in self.identify if p.task in self.profile.tasks]

    @property
    def validation(self) -> list[PlannedPrompt]:
        """``validation``: the 20% side of the sweep on the profile's CA tasks."""
        return [p for p in self.split(self.sweep_prompts)[1] if p.task in self.profile.tasks]

    def fresh(self, per_depth: int, stream: str, tasks: Sequence[str] | None = None) -> list[PlannedPrompt]:
        """Fresh prompts as the catalogue draws them (:meth:`rh.profiles.Profile.fresh_sweep`)."""
        return self.prompts(self.profile.fresh_sweep(stream, per_depth, tasks))

    # ---------------------------------------------------------------- the ranking cache

    def ranking_status(self, prompts: Sequence[PlannedPrompt], method: str = "sum_attention",
                       sweep: Sweep | None = None, *, with_scores: bool = False) -> tuple[str, Path | None]:
        """``("cached", path)`` when the identification of ``prompts`` by ``method`` is in the
        ranking cache (the key computed as :func:`rh.pipeline.ranking_provenance` computes it, with
        the model's provenance known before loading), ``("not cached", path)`` when it is not, and
        ``("unknown", None)`` where the key cannot be known without the weights."""
        key = ("status", tuple(p.id for p in prompts), method, sweep, with_scores)
        if key in self._cache:
            return self._cache[key]
        out: tuple[str, Path | None] = ("unknown", None)
        if self.planned_model is not None and self.cache_dir is not None and prompts:
            from rh.pipeline import ranking_provenance, samples_path
            from rh.rankings import cache_path

            stand_ins = [SimpleNamespace(id=p.id, task=p.task) for p in prompts]
            prov = ranking_provenance(self.planned_model, sweep or self.profile.sweep(), method, stand_ins,
                                      identify_frac=self.profile.identify_frac, split_seed=self.profile.split_seed)
            path = cache_path(self.cache_dir, prov)
            refused = path.with_suffix(".refused.json")
            hit = not self.recompute and (
                refused.exists() or (path.exists() and (not with_scores or samples_path(path).exists())))
            out = ("cached" if hit else "not cached", path)
        self._cache[key] = out
        return out

    def content_free_status(self, methods: Sequence[str]) -> tuple[str, Path | None]:
        """``("cached", path)`` when every one of ``methods``' content-free scores (ID-7's echo and
        induction) is in the ranking cache, ``("not cached", path)`` when one is not, ``("unknown",
        None)`` where the key cannot be known without the weights."""
        if self.planned_model is None or self.cache_dir is None:
            return ("unknown", None)
        from rh.content_free import content_free_provenance
        from rh.field import content_free_settings
        from rh.pipeline import samples_path
        from rh.rankings import cache_path

        path = None
        for m in methods:
            path = cache_path(self.cache_dir, content_free_provenance(self.planned_model, m,
                                                                      **content_free_settings(self.profile)))
            if self.recompute or not (path.exists() and samples_path(path).exists()):
                return ("not cached", path)
        return ("cached", path)

    @property
    def ranking(self) -> Any:
        """The ranking under test when it is known before the run (``--rankings``/``--heads``, or
        the cached file), else None."""
        if "ranking" not in self._cache:
            r = self.external
            if r is None:
                status, path = self.ranking_status(self.ca_identify, self.method)
                if status == "cached" and path is not None and path.exists():
                    from rh.rankings import Ranking

                    try:
                        r = Ranking.load(path, shape=self.shape)
                    except (ValueError, OSError):
                        r = None
            self._cache["ranking"] = r
        return self._cache["ranking"]

    def top_layers(self, k: int) -> list[int] | None:
        """The layers of the ranking's top ``k`` heads, when the ranking is known before the run."""
        r = self.ranking
        if r is None:
            return None
        try:
            return [h.layer for h in r.top(k)]
        except ValueError:  # a head set has no top k but its own size
            return None


# --------------------------------------------------------------------------- cost helpers


def forward_cost(name: str, conditions: Sequence[str],
                 prompts: Sequence[PlannedPrompt] | Sequence[Sequence[PlannedPrompt]], ctx: PlanContext, *,
                 n_conditions: int | None = None, answer: bool = True, batch_size: int | None = None,
                 layers: int | None = None, extra: int = 0, savings: str = "", note: str = "",
                 keys: Sequence[Hashable] | None = None) -> CostRow:
    """The passes of ``conditions`` over ``prompts`` (or over each group of a list of groups,
    batched separately, as a fixture that evaluates per task or per depth does). ``answer``: a
    teacher-forced pass (prompt + answer - 1 tokens); False: the prompt alone (attention capture,
    residual probes, identification). ``n_conditions`` defaults to ``len(conditions)``.

    ``keys``: one key per condition (:func:`condition_key`), for teacher-forced passes the runner
    stores: a prompt's row under a key an earlier row of the plan computed comes from the results
    store, as in the run (:meth:`rh.runner.Runner.run` runs only the rows the store lacks)."""
    groups = [list(g) for g in prompts] if prompts and not isinstance(prompts[0], PlannedPrompt) else [list(prompts)]
    if keys is not None:
        if not answer or extra or n_conditions not in (None, len(keys)):
            raise ValueError(f"{name}: keys name the rows of teacher-forced passes, one key a condition")
        return _keyed_cost(name, conditions, keys, groups, ctx, batch_size=batch_size, layers=layers,
                           savings=savings, note=note)
    n = sum(len(g) for g in groups)
    bs = ctx.batch_size if batch_size is None else batch_size
    total = sum(padded_tokens(g, bs, answer=answer, extra=extra) for g in groups if g)
    return CostRow(name, tuple(conditions), len(conditions) if n_conditions is None else n_conditions, n,
                   total / n if n else 0.0, ctx.layers if layers is None else layers, savings, note)


BASELINE_KEY: Hashable = ("baseline",)


def condition_key(label: str, heads: Sequence[Any] | None = None, *, method: str = "zero",
                  phase: str = "all") -> Hashable:
    """What the results store keys a condition's rows by (:func:`rh.runner.row_key`: the heads in
    their order, the method, the phase; the prompt's tokens beside): ``heads`` where the plan knows
    them (the ranking cached or given), else the condition's ``label`` (then no other condition's
    rows are taken for its own). The baseline: ``heads=()``."""
    if heads is None:
        return ("label", label, method, phase)
    heads = tuple(str(h) for h in heads)
    return BASELINE_KEY if not heads else ("heads", heads, method, phase)


def top_key(ctx: PlanContext, k: int, *, phase: str = "all", method: str = "zero", drop: int | None = None) -> Hashable:
    """:func:`condition_key` of the ranking's top ``k`` (a head set's own heads: rh.published.heads_under_test),
    without its ``drop``-th head if given (CA-10's sets)."""
    label = f"top{k}" + (f"-{drop}" if drop is not None else "")
    r = ctx.ranking
    if r is None:
        return condition_key(label, method=method, phase=phase)
    from rh.published import heads_under_test

    try:
        heads = list(heads_under_test(r, k))
    except ValueError:
        return condition_key(label, method=method, phase=phase)
    if drop is not None:
        heads = heads[:drop] + heads[drop + 1:]
    return condition_key(label, heads, method=method, phase=phase)


def _keyed_cost(name: str, conditions: Sequence[str], keys: Sequence[Hashable], groups: list[list[PlannedPrompt]],
                ctx: PlanContext, *, batch_size: int | None, layers: int | None, savings: str, note: str) -> CostRow:
    if len(keys) != len(conditions):
        raise ValueError(f"{name}: {len(keys)} keys for {len(conditions)} conditions")
    bs = ctx.batch_size if batch_size is None else batch_size
    total = stored = 0
    labels = []
    for label, key in zip(conditions, keys):
        hit = 0
        for g in groups:
            todo = [p for p in g if (key, p.seed, p.id) not in ctx.store]
            hit += len(g) - len(todo)
            total += padded_tokens(todo, bs) if todo else 0
            ctx.store.update((key, p.seed, p.id) for p in todo)
        stored += hit
        labels.append(label if not hit else f"{label} ({hit} rows from the results store)")
    n = sum(len(g) for g in groups)
    passes = len(conditions) * n - stored
    return CostRow(name, tuple(labels), len(conditions), n, total / passes if passes else 0.0,
                   ctx.layers if layers is None else layers, savings, note, stored=stored)


def identification_cost(name: str, prompts: Sequence[PlannedPrompt], method: str, ctx: PlanContext,
                        status: tuple[str, Path | None], *, what: str = "identification",
                        sweep: Sweep | None = None) -> CostRow:
    """Scoring ``prompts`` by ``method`` (sum attention: one pass over each prompt; Wu24: greedy
    generation of the answer's length plus 8 tokens, an upper bound: it stops when every row has
    ended), or nothing when the ranking is cached or an earlier fixture of the plan computes the
    same one (it is cached from then on)."""
    state, path = status
    label = f"{what} ({method.replace('_', ' ')})"
    if state == "cached":
        return CostRow(name, (f"{label}: cached",), 0, len(prompts), 0.0, ctx.layers,
                       note=f"{path.name}" if path is not None else "")
    key = (tuple(p.id for p in prompts), method, sweep or ctx.profile.sweep())
    if key in ctx.identified:
        return CostRow(name, (f"{label}: computed by {ctx.identified[key]} before",), 0, len(prompts), 0.0,
                       ctx.layers)
    ctx.identified[key] = name
    note = "not cached" if state == "not cached" else "if not cached"
    if method == "wu24":
        from rh.scoring import Wu24Options

        extra_tokens = Wu24Options().extra_tokens
        groups = _batches(prompts, ctx.batch_size, False)
        total = sum(len(b) * (max(p.length for p in b) + max(p.answer_tokens for p in b) + extra_tokens - 1)
                    for b in groups)
        return CostRow(name, (label,), 1, len(prompts), total / max(len(prompts), 1), ctx.layers,
                       note=note + "; generation may stop sooner")
    row = forward_cost(name, [label], prompts, ctx, answer=False)
    return dataclasses.replace(row, note=note)


_PREFIX = "prefix reuse from the first ablated layer"
_EARLY = "early stopping of random draws (none run when the baseline is below the floor)"
_CURTAIL = "curtailment once the statuses are decided"
_FAN = "shared prefill (decode phase: one clean prefill per prompt, then each condition's answer steps)"


# --------------------------------------------------------------------------- the registry

CostFn = Callable[[PlanContext], "CostRow | Sequence[CostRow] | None"]


@dataclass(frozen=True)
class _Entry:
    fn: CostFn
    where: str | None  # None: any definition of that name; "catalogue" / "plugin": rh's own only


_COSTS: dict[str, list[_Entry]] = {}
_ROOT = Path(__file__).resolve().parent
_CATALOGUE = _ROOT.parent / "claims"


def register_cost(name: str, fn: CostFn | None = None, *, where: str | None = None):
    """Declare what the fixture (or test function) ``name`` costs: ``fn(ctx)`` returns a
    :class:`CostRow`, a list of them (``[]``: no forward passes), or None (unknown). Usable as a
    decorator (``@register_cost("my_fixture")``). A later registration of a name replaces an
    earlier one; rh's built-in costs (``where="catalogue"``/``"plugin"``) apply only to rh's own
    definitions of the name, so a fixture of yours with the same name is never given them."""
    def add(f: CostFn) -> CostFn:
        entries = [e for e in _COSTS.get(name, []) if e.where != where]
        _COSTS[name] = [*entries, _Entry(f, where)]
        return f

    return add(fn) if fn is not None else add


def registered(name: str, defined_in: Path | None = None, *, builtin: bool = False) -> CostFn | None:
    """The cost function for ``name`` as defined in ``defined_in`` (a file), or None; ``builtin``:
    rh's own cost of that name, wherever it is defined. A name with no cost registered here takes
    the one a registered claim family declares (``ClaimFamily.costs``)."""
    for entry in reversed(_COSTS.get(name, [])):
        if builtin:
            if entry.where is not None:
                return entry.fn
            continue
        if entry.where is None:
            return entry.fn
        if defined_in is not None and _is_origin(defined_in, entry.where):
            return entry.fn
    if builtin:
        return None
    from rh.claim_families import costs

    return costs().get(name)


def _is_origin(path: Path, where: str) -> bool:
    path = Path(path).resolve()
    if where == "plugin":
        return path == _ROOT / "pytest_plugin.py"
    if where == "catalogue":
        return path.parent == _CATALOGUE
    return False


def _free(*names: str, where: str) -> None:
    for n in names:
        register_cost(n, lambda ctx: [], where=where)


# --------------------------------------------------------------------------- rh's own costs


def _ranking(ctx: PlanContext):
    from rh.published import HeadSet

    rows = []
    ext = ctx.external
    if ext is None:
        status = ctx.ranking_status(ctx.ca_identify, ctx.method)
        rows.append(identification_cost("ranking", ctx.ca_identify, ctx.method, ctx, status))
    elif isinstance(ext, HeadSet):
        return [CostRow("ranking", ("external head set: no passes",), 0, 0, 0.0, ctx.layers)]
    if ctx.validation:  # the report's attention example: one validation prompt, through the top 5's deepest layer
        top5 = ctx.top_layers(min(5, ctx.shape.n_total))
        rows.append(forward_cost("ranking", ["attention example"], ctx.validation[:1], ctx, answer=False,
                                 batch_size=1, **({"layers": max(top5) + 1} if top5 else {})))
    return rows


def _baseline(ctx):
    return forward_cost("baseline", ["baseline"], ctx.validation, ctx, keys=[BASELINE_KEY],
                        note="the same passes read ID-2's attention mass")


def _ca1_rows(ctx, name: str, tag: str, savings: str):
    p = ctx.profile
    phase = "decode" if tag else "all"
    top = forward_cost(name, [f"top{k}{tag}" for k in p.ablation_levels], ctx.validation, ctx, savings=savings,
                       keys=[top_key(ctx, k, phase=phase) for k in p.ablation_levels])
    conds = []
    for k in p.ablation_levels:
        conds += [f"random{k}{tag} x{p.random_draws}"]
        conds += [f"matched{k}{tag} x{p.matched_draws}"] if p.matched_draws else []
    n = len(p.ablation_levels) * (p.random_draws + p.matched_draws)
    return [top, forward_cost(name, conds, ctx.validation, ctx, n_conditions=n, savings=savings)]


def _ca1(ctx):
    return _ca1_rows(ctx, "ca1_outcomes", "", f"{_PREFIX}; {_EARLY}")


def _ca1_decode(ctx):
    """CA-1 under Wu24's protocol: the same conditions as CA-1, in full passes when plain."""
    return _ca1_rows(ctx, "ca1_decode_outcomes", " (decode)", f"{_FAN}; {_EARLY}")


def _keep_prompts(ctx):
    return ctx.fresh(ctx.profile.inverse_n, "inverse")


def _keep_baseline(ctx):
    return forward_cost("keep_baseline", ["baseline"], _keep_prompts(ctx), ctx, keys=[BASELINE_KEY])


def _ca3(ctx):
    p = ctx.profile
    return forward_cost("ca3_verdicts", [f"bottom{k}" for k in p.inverse_levels], _keep_prompts(ctx), ctx,
                        savings=f"{_PREFIX}; {_CURTAIL}", note="only when the baseline clears the floor")


def _ca8(ctx):
    p = ctx.profile
    conds = [f"{arm} K={k}" for k in p.compress_levels for arm in ("window outside the top", "window on the top")]
    return forward_cost("ca8_verdicts", conds, _keep_prompts(ctx), ctx, savings=f"{_PREFIX}; {_CURTAIL}")


def _ca7(ctx):
    p = ctx.profile
    fresh = ctx.fresh(p.distractor_n, "distractor")  # the same lengths and 4-digit answers as passkey
    return [forward_cost("ca7_verdicts", ["baseline"], fresh, ctx),
            forward_cost("ca7_verdicts", [f"top{p.id_k}", f"random{p.id_k} x{p.random_draws}"], fresh, ctx,
                         n_conditions=1 + p.random_draws, savings=f"{_PREFIX}; {_EARLY}")]


def _ranking_uncertainty(ctx):
    status = ctx.ranking_status(ctx.ca_identify, ctx.method, with_scores=True)
    return identification_cost("ranking_uncertainty", ctx.ca_identify, ctx.method, ctx, status)


def _method_scores(ctx):
    p = ctx.profile
    rows = []
    if "qrhead" in p.id_methods:
        status = ctx.ranking_status(ctx.ca_identify, "qrhead", with_scores=True)
        rows.append(identification_cost("method_scores", ctx.ca_identify, "qrhead", ctx, status))
        if status[0] != "cached" and rows[-1].token_layers:
            rows.append(CostRow("method_scores", ("qrhead's null-query calibration: the question onwards, on the cache",),
                                1, len(ctx.ca_identify), 32.0, ctx.layers, note="about 32 tokens a prompt (estimated)"))
    free = [m for m in p.id_methods if m in ("echo", "induction")]
    if free:
        from rh.content_free import REPEATS

        label = f"{' and '.join(free)} on {p.content_free_n} random sequences"
        state, path = ctx.content_free_status(free)
        if state == "cached":
            rows.append(CostRow("method_scores", (f"{label}: cached",), 0, p.content_free_n, 0.0, ctx.layers,
                                note=path.name if path is not None else ""))
        else:
            tokens = REPEATS * p.content_free_len + 1  # the copies of the random block, after the BOS
            rows.append(CostRow("method_scores", (label,), 1, p.content_free_n, float(tokens), ctx.layers,
                                note="one pass gives both scores; " + ("not cached" if state == "not cached"
                                                                        else "if not cached")))
    return rows


def _task_validation(ctx) -> list[list[PlannedPrompt]]:
    p = ctx.profile
    fresh = ctx.fresh(p.task_n, "tasks", p.id_tasks)
    return [[x for x in fresh if x.task == t] for t in p.id_tasks]


def _task_baselines(ctx):
    return forward_cost("task_baselines", ["baseline"], _task_validation(ctx), ctx,
                        note="the same passes read ID-5's attention mass")


def _ca4(ctx):
    return forward_cost("ca4_verdicts", ["general heads ablated"], _task_validation(ctx), ctx,
                        savings=f"{_PREFIX}; {_CURTAIL}",
                        note="none when the tasks' top K share no head")


def _ca6(ctx):
    p = ctx.profile
    fresh = ctx.fresh(p.depth_n, "depth")
    groups = [[x for x in fresh if x.depth == d] for d in p.depths]
    return [forward_cost("ca6_verdicts", ["baseline"], groups, ctx, keys=[BASELINE_KEY]),
            forward_cost("ca6_verdicts", [f"top{p.id_k}"], groups, ctx, savings=f"{_PREFIX}; {_CURTAIL}",
                         keys=[top_key(ctx, p.id_k)])]


def _ca6_decode(ctx):
    """CA-6 under Wu24's protocol: the top K ablated while decoding; the baselines are CA-6's rows."""
    p = ctx.profile
    fresh = ctx.fresh(p.depth_n, "depth")
    groups = [[x for x in fresh if x.depth == d] for d in p.depths]
    return forward_cost("ca6_decode_verdicts", [f"top{p.id_k} (decode)"], groups, ctx, savings=f"{_FAN}; {_CURTAIL}",
                        keys=[top_key(ctx, p.id_k, phase="decode")])


def _iv_prompts(ctx):
    return ctx.fresh(ctx.profile.iv_n, "interventions")


def _iv_baseline(ctx):
    return forward_cost("iv_baseline", ["baseline"], _iv_prompts(ctx), ctx, keys=[BASELINE_KEY])


def _iv1(ctx):
    return forward_cost("iv1", [f"top{n}" for n in ctx.profile.incremental_levels], _iv_prompts(ctx), ctx,
                        savings=_PREFIX)


def _iv3(ctx):
    return forward_cost("iv3", [f"{pat} attention" for pat in ctx.profile.override_patterns], _iv_prompts(ctx), ctx,
                        savings=f"{_PREFIX}; {_CURTAIL}")


def _hub(ctx):
    p = ctx.profile
    ident = [x for x in ctx.ca_identify if x.length == p.lengths[0]]
    layers = ctx.top_layers(p.critical_k)  # the capture runs through the deepest critical head's layer
    if not layers:
        return forward_cost("hub", ["last-token attention"], ident, ctx, answer=False, batch_size=1,
                            note="through every layer (the deepest critical head is known only once ranked)")
    return forward_cost("hub", ["last-token attention"], ident, ctx, answer=False, batch_size=1,
                        layers=max(layers) + 1, note=f"through layer {max(layers)}, the deepest critical head")


def _sum_identification(ctx):
    status = ctx.ranking_status(ctx.ca_identify, "sum_attention", with_scores=True)
    return identification_cost("sum_identification", ctx.ca_identify, "sum_attention", ctx, status)


def _wu24_identification(ctx):
    status = ctx.ranking_status(ctx.ca_identify, "wu24", with_scores=True)
    return identification_cost("wu24_identification", ctx.ca_identify, "wu24", ctx, status)


def _id7(ctx):
    """ID-7's verdicts run no pass; on a model whose registry entry names planted heads
    (``ModelSpec.planted_heads``, as its build's provenance does) they also ask for Wu24's ranking
    (its recovery of the planted heads), which the other identification claims may not have."""
    from rh.models import REGISTRY

    spec = REGISTRY.get(ctx.model)
    return _wu24_identification(ctx) if spec is not None and spec.planted_heads else []


def _task_rankings(ctx):
    rows = []
    for t in ctx.profile.id_tasks:
        prompts = [x for x in ctx.identify if x.task == t]
        rows.append(identification_cost("task_rankings", prompts, "sum_attention", ctx,
                                        ctx.ranking_status(prompts, "sum_attention"), what=f"{t} identification"))
    return rows


def _stability(ctx):
    p = ctx.profile
    sweep = dataclasses.replace(p.sweep(), lengths=(p.stability_length,), tasks=p.tasks)
    ident = ctx.split(ctx.prompts(sweep))[0]
    status = ctx.ranking_status(ident, "sum_attention", sweep, with_scores=True)
    return identification_cost("stability_verdicts", ident, "sum_attention", ctx, status, sweep=sweep,
                               what=f"identification at {p.stability_length} tokens")


def _compare_ranking(ctx):
    if not ctx.compare_model:
        return []
    return forward_cost("compare_ranking", ["--compare-model identification (sum attention)"], ctx.ca_identify, ctx,
                        answer=False, note="if not cached; on --compare-model, outside the session's count")


def _ca2_body(ctx):
    p = ctx.profile
    return forward_cost("CA-2 body", [f"top{k}" for k in p.dose_levels], ctx.validation, ctx, savings=_PREFIX,
                        keys=[top_key(ctx, k) for k in p.dose_levels])


def _sweep_prompts(ctx):
    p = ctx.profile
    fresh = ctx.fresh(p.depth_n, "depth")
    return [x for d in p.depths for x in [y for y in fresh if y.depth == d][:p.sweep_n]]


def _sweep_baseline(ctx):
    return forward_cost("sweep_baseline", ["baseline"], _sweep_prompts(ctx), ctx, keys=[BASELINE_KEY],
                        note="CA-6's rows where its baselines ran first (the results store)")


def _sweep_savings(ctx) -> str:
    return _FAN if ctx.profile.sweep_phase == "decode" else _PREFIX


def _ca9_body(ctx):
    from rh.rules.sweep import curve_levels

    ks = curve_levels(ctx.shape.n_total, ctx.profile.curve_fractions)
    phase, prompts = ctx.profile.sweep_phase, _sweep_prompts(ctx)
    return [forward_cost("CA-9 body", [f"top{k}" for k in ks], prompts, ctx, savings=_sweep_savings(ctx),
                         keys=[top_key(ctx, k, phase=phase) for k in ks]),
            forward_cost("CA-9 body", [f"random{k} (one per prompt)" for k in ks], prompts, ctx,
                         savings=_sweep_savings(ctx))]


def _ca10_body(ctx):
    k, phase = ctx.profile.id_k, ctx.profile.sweep_phase
    return forward_cost("CA-10 body", [f"top{k}"] + [f"top{k} but head {i + 1}" for i in range(k)], _sweep_prompts(ctx),
                        ctx, savings=_sweep_savings(ctx),
                        keys=[top_key(ctx, k, phase=phase)] + [top_key(ctx, k, phase=phase, drop=i) for i in range(k)])


def _ca2_decode_body(ctx):
    p = ctx.profile
    return forward_cost("CA-2 decode body", [f"top{k} (decode)" for k in p.dose_levels], ctx.validation, ctx,
                        savings=_FAN, keys=[top_key(ctx, k, phase="decode") for k in p.dose_levels])


def _ca5_body(ctx):
    probe = ctx.validation[:4]
    return [forward_cost("CA-5 body", ["query", "logits", "zero"], probe, ctx, answer=False,
                         note="the heads' outputs on 4 prompts"),
            forward_cost("CA-5 body", ["zero", "query", "logits"], ctx.validation, ctx, savings=_PREFIX,
                         keys=[top_key(ctx, ctx.profile.id_k, method=m) for m in ("zero", "query", "logits")])]


def _id2_body(ctx):
    # the attention mass is read in the baseline's forwards and stored beside its rows
    # (rh.id_claims.read_needle_mass): no pass of its own
    own = forward_cost("ID-2 body", ["attention mass: read in the baseline's passes"], ctx.validation, ctx,
                       answer=False)
    return dataclasses.replace(own, n_conditions=0, note=f"no pass of its own ({own.token_layers:,} token-layers "
                               "plain), on Ray replicas and from a store as in this process")


def _id5_body(ctx):
    if len(ctx.profile.id_tasks) < 2:
        return []
    # the attention mass is read in task_baselines' forwards wherever they run, and stored beside their
    # rows (rh.id_claims.NeedleMassReading): never a pass of its own
    own = forward_cost("ID-5 body", ["attention mass: read in task_baselines' passes"], _task_validation(ctx), ctx,
                       answer=False)
    return dataclasses.replace(own, n_conditions=0, note=f"no pass of its own ({own.token_layers:,} token-layers "
                               "plain), on Ray replicas and from a store as in this process")


def _iv2_body(ctx):
    return forward_cost("IV-2 body", ["hub patched", "non-hub patched"], _iv_prompts(ctx), ctx, savings=_PREFIX,
                        note="prompts whose needle covers the hub are left out")


def _iv4_body(ctx):
    if not ctx.compare_model:
        return [CostRow("IV-4 body", ("no --compare-model: no passes",), 0, 0, 0.0, ctx.layers)]
    try:
        from rh.models import expected_shape

        donor = expected_shape(ctx.compare_model)
    except Exception:  # noqa: BLE001 - a shape unknown before loading: plan the passes
        donor = None
    if donor is not None and (donor.n_layers, donor.n_heads, donor.n_kv_heads, donor.head_dim) != (
            ctx.shape.n_layers, ctx.shape.n_heads, ctx.shape.n_kv_heads, ctx.shape.head_dim):
        return [CostRow("IV-4 body", ("a donor of another shape: inconclusive, no passes",), 0, 0, 0.0, ctx.layers)]
    return forward_cost("IV-4 body", ["ablated", "transplanted"], _iv_prompts(ctx), ctx, savings=_PREFIX)


def _iv5_body(ctx):
    return forward_cost("IV-5 body", ["residual stream"], ctx.fresh(ctx.profile.probe_n, "probes"), ctx,
                        answer=False)


def _iv6_body(ctx):
    p = ctx.profile
    iv = _iv_prompts(ctx)
    step = max(1, len(iv) // p.ig_n)
    chosen = iv[::step][: p.ig_n]
    layers = ctx.top_layers(p.critical_k)
    deepest = max(layers) + 1 if layers else ctx.layers
    where = (f"through layer {deepest - 1}, the deepest critical head" if layers
             else "through every layer (the deepest critical head is known only once ranked)")
    return [forward_cost("IV-6 body", ["final-norm scale"], chosen, ctx, answer=False, batch_size=1),
            forward_cost("IV-6 body", [f"{p.ig_steps} IG steps + 4"], chosen, ctx, n_conditions=p.ig_steps + 4,
                         answer=False, batch_size=1, layers=deepest,
                         note=f"{where}; stops at the first prompt off completeness and, below the floor, "
                              "runs none (--plain: every prompt, as planned)")]


def _register_builtins() -> None:
    plugin = {"ranking": _ranking, "baseline": _baseline, "ranking_uncertainty": _ranking_uncertainty}
    for name, fn in plugin.items():
        register_cost(name, fn, where="plugin")
    _free("rh_model", "profile", "niah_samples", "niah_split", "validation", "identify_ranking", "record_verdict",
          "compare_model", where="plugin")
    _free("ranking_source", where="plugin")  # its passes are billed to ranking, which requests it: costed there
    catalogue = {
        "ca1_outcomes": _ca1, "ca3_verdicts": _ca3, "keep_baseline": _keep_baseline, "ca7_verdicts": _ca7,
        "ca8_verdicts": _ca8, "method_scores": _method_scores, "task_baselines": _task_baselines, "ca4_verdicts": _ca4,
        "ca6_verdicts": _ca6, "ca1_decode_outcomes": _ca1_decode, "ca6_decode_verdicts": _ca6_decode,
        "sweep_baseline": _sweep_baseline, "iv_baseline": _iv_baseline, "iv1": _iv1, "iv3": _iv3, "hub": _hub,
        "sum_identification": _sum_identification, "wu24_identification": _wu24_identification,
        "task_rankings": _task_rankings, "stability_verdicts": _stability, "compare_ranking": _compare_ranking,
        "id7_verdicts": _id7,
        # test bodies, by test function name
        "test_the_drop_grows_with_k": _ca2_body,
        "test_the_drop_while_decoding_grows_with_k": _ca2_decode_body,
        "test_the_top_k_drop_exceeds_random_over_the_whole_sweep": _ca9_body,
        "test_every_top_head_is_needed": _ca10_body,
        "test_query_and_logit_zeroing_are_uniform_attention_not_output_zeroing": _ca5_body,
        "test_top_heads_spike_on_the_needle": _id2_body,
        "test_general_retrieval_heads_exist": _id5_body,
        "test_the_hub_position_is_a_bottleneck": _iv2_body,
        "test_a_transplanted_critical_head_keeps_its_function": _iv4_body,
        "test_the_answer_becomes_decodable_after_the_critical_heads": _iv5_body,
        "test_attribution_of_the_critical_heads_concentrates_on_the_needle": _iv6_body,
    }
    for name, fn in catalogue.items():
        register_cost(name, fn, where="catalogue")
    _free("task_validation", "iv_samples", "test_base_and_instruct_share_retrieval_heads", "keep_samples",
          "test_retrieval_heads_gather_in_kv_groups", "sweep_prompts", where="catalogue")


_register_builtins()


# --------------------------------------------------------------------------- planning the collected claims

_MODEL_FIXTURES = ("rh_model", "compare_model")


@dataclass
class ClaimPlan:
    """One collected claim: what it pays for (the fixtures no earlier claim paid for, and its body)."""

    nodeid: str
    label: str
    rows: list[CostRow] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # fixtures or bodies whose cost is not known
    recorded_tl: int | None = None  # what --expected recorded for the same share
    recorded_s: float | None = None

    @property
    def token_layers(self) -> int | None:
        return None if self.unknown else sum(r.token_layers for r in self.rows)

    @property
    def passes(self) -> int:
        return sum(r.passes for r in self.rows)

    @property
    def conditions(self) -> int:
        return sum(r.n_conditions for r in self.rows if r.token_layers)


@dataclass
class Plan:
    claims: list[ClaimPlan]
    per_tl: float | None = None  # seconds per token-layer (None: not calibrated)
    calibration: str = ""
    recorded_from: str | None = None

    @property
    def token_layers(self) -> int:
        return sum(c.token_layers or 0 for c in self.claims)

    @property
    def passes(self) -> int:
        return sum(c.passes for c in self.claims)

    @property
    def unknown(self) -> list[ClaimPlan]:
        return [c for c in self.claims if c.unknown]


def _source_file(obj: Any) -> Path | None:
    obj = getattr(obj, "__wrapped__", obj)
    try:
        return Path(inspect.getsourcefile(obj) or inspect.getfile(obj))
    except (TypeError, OSError):
        return None


def cost_rows(fn: CostFn, ctx: PlanContext) -> list[CostRow] | None:
    """``fn(ctx)`` as a list of rows (None: unknown)."""
    got = fn(ctx)
    if got is None:
        return None
    return [got] if isinstance(got, CostRow) else list(got)


def _label(item: Any) -> str:
    marker = item.get_closest_marker("claim")
    claim = str(marker.args[0]) if marker is not None and marker.args else None
    callspec = getattr(item, "callspec", None)
    fixed = marker.kwargs.get("params") or {} if marker is not None else {}  # e.g. {"phase": "decode"}
    parts = ([callspec.id] if callspec is not None else []) + [f"{k}={v}" for k, v in sorted(fixed.items())]
    params = f"[{','.join(parts)}]" if parts else ""
    return f"{claim}{params}" if claim else item.name


def plan_items(items: Sequence[Any], ctx: PlanContext, *, expected: Any = None) -> Plan:
    """The plan of pytest ``items`` (the collected claims, in run order): each pays for the
    fixtures it uses that no earlier item paid for (function-scoped ones every time) and for its
    own body. ``expected``: an :class:`rh.expected.Expected` whose recorded token-layers and
    seconds are set beside each claim (the same share: its body plus the fixtures it pays for)."""
    paid: set[str] = set()
    claims = []
    rec_fx = dict(expected.fixture_token_layers) if expected is not None else {}
    rec_fs = dict(expected.fixture_seconds) if expected is not None else {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info is not None else {}
        params = set(getattr(getattr(item, "callspec", None), "params", {}) or {})
        cp = ClaimPlan(item.nodeid, _label(item))
        new = [f for f in item.fixturenames if f not in paid]
        for name in new:
            fdefs = defs.get(name) or ()
            if not fdefs or name in params:
                continue  # a parametrized argument, or pytest's own request
            fdef = fdefs[-1]
            fn = registered(name, _source_file(fdef.func))
            if fn is None:
                if any(m in fdef.argnames for m in _MODEL_FIXTURES):
                    cp.unknown.append(name)
                continue
            rows = cost_rows(fn, ctx)
            if rows is None:
                cp.unknown.append(name)
            else:
                cp.rows += rows
        func = getattr(item, "function", None)
        body = getattr(item, "originalname", None) or item.name
        fn = registered(body, Path(item.path) if getattr(item, "path", None) else None)
        if fn is not None:
            rows = cost_rows(fn, ctx)
            if rows is None:
                cp.unknown.append(body)
            else:
                cp.rows += rows
        elif func is not None and any(m in (info.argnames if info is not None else ()) for m in _MODEL_FIXTURES):
            cp.unknown.append(body)
        for name in item.fixturenames:
            fdefs = defs.get(name) or ()
            if fdefs and fdefs[-1].scope != "function":
                paid.add(name)
        if expected is not None:
            node = expected.nodes.get(item.nodeid)
            if node is not None and node.get("token_layers") is not None:
                cp.recorded_tl = int(node["token_layers"]) + sum(int(rec_fx.get(f, 0)) for f in new)
                secs = [node.get("seconds")] + [(rec_fs.get(f) or {}).get("seconds") for f in new]
                if node.get("seconds") is not None:
                    cp.recorded_s = float(sum(s for s in secs if s is not None))
        claims.append(cp)
    return Plan(claims, recorded_from=str(expected.path) if expected is not None else None)


# --------------------------------------------------------------------------- the table


def format_plan(plan: Plan, *, heading: str = "", detail: bool = True) -> list[str]:
    """The plan as lines: one row per claim (its passes, token-layers and estimated time, and what
    --expected recorded for it), the rows of what it pays for beneath it, a total, the calibration."""
    from rh.budget import format_duration

    per = plan.per_tl
    rec = plan.recorded_from is not None

    def secs(tl: int | None) -> str:
        return "?" if tl is None or per is None else format_duration(tl * per)

    n_unknown = len(plan.unknown)
    total_label = f"total ({len(plan.claims)} claims" + (f", {n_unknown} unknown" if n_unknown else "") + ")"
    width = max([len(c.label) for c in plan.claims] + [len(total_label)])
    head = f"{'claim'.ljust(width)}  {'conditions':>10}  {'passes':>9}  {'token-layers':>14}  {'est. time':>9}"
    if rec:
        head += f"  {'recorded':>14}  {'rec. time':>9}"
    lines = [heading] if heading else []
    lines.append(head)
    for c in plan.claims:
        tl = c.token_layers
        est = secs(tl) if tl is not None or c.recorded_tl is None or per is None else "~" + secs(c.recorded_tl)
        line = (f"{c.label.ljust(width)}  {c.conditions:>10,}  {c.passes:>9,}  "
                f"{('unknown' if tl is None else f'{tl:,}'):>14}  {est:>9}")
        if rec:
            line += (f"  {('-' if c.recorded_tl is None else f'{c.recorded_tl:,}'):>14}"
                     f"  {('-' if c.recorded_s is None else format_duration(c.recorded_s)):>9}")
        lines.append(line)
        if detail:
            for r in c.rows:
                if r.token_layers or r.n_conditions == 0 and r.conditions:
                    lines.append(f"    {r.describe()}")
            if c.unknown:
                lines.append(f"    unknown cost: {', '.join(c.unknown)} (asks for rh_model, no cost registered: "
                             "see rh.plan.register_cost)")
    total = plan.token_layers
    line = (f"{total_label.ljust(width)}  {sum(c.conditions for c in plan.claims):>10,}  {plan.passes:>9,}  "
            f"{total:>14,}  {secs(total):>9}")
    if rec:
        rtl = [c.recorded_tl for c in plan.claims if c.recorded_tl is not None]
        rs = [c.recorded_s for c in plan.claims if c.recorded_s is not None]
        line += f"  {(f'{sum(rtl):,}' if rtl else '-'):>14}  {(format_duration(sum(rs)) if rs else '-'):>9}"
    lines.append(line)
    lines.append("token-layers: the plain passes, an upper bound (prefix reuse, early stopping and curtailment lower them; "
                 "model loading is not included in the time)")
    if rec:
        lines.append(f"recorded: token-layers and seconds of the same share in {plan.recorded_from} "
                     "(as that run executed them, its savings included; its machine's times; ~: a time from the recorded count)")
    if plan.calibration:
        lines.append(f"this machine: {plan.calibration}")
    return lines


# --------------------------------------------------------------------------- the model's config, and timing


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar key-value pairs of a GGUF file's header (arrays skipped): what its config needs,
    read in milliseconds (the ``gguf`` reader parses the whole vocabulary, seconds)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    out: dict[str, Any] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        pos = 8
        _, n_kv = struct.unpack_from("<QQ", mm, pos)
        pos += 16

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, p)
            return mm[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

        def skip(t: int, p: int) -> tuple[Any, int]:
            if t in scalar:
                return struct.unpack_from(scalar[t], mm, p)[0], p + struct.calcsize(scalar[t])
            if t == 8:
                return string(p)
            if t == 9:
                et, n = struct.unpack_from("<IQ", mm, p)
                p += 12
                if et in scalar:
                    return ("array", n), p + n * struct.calcsize(scalar[et])
                for _ in range(n):
                    _, p = skip(et, p)
                return ("array", n), p
            raise ValueError(f"{path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (t,) = struct.unpack_from("<I", mm, pos)
            value, pos = skip(t, pos + 4)
            out[key] = value
    return out


def _gguf_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # pragma: no cover - an older transformers
        GGUF_CONFIG_MAPPING = {}
    meta = gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    mapping = GGUF_CONFIG_MAPPING.get(arch)
    if not mapping:  # an architecture this shortcut does not know: transformers' own reader (seconds)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    kwargs = {}
    for key, attr in mapping.items():
        value = meta.get(f"{arch}.{key}")
        if value is not None and attr and not isinstance(value, tuple):
            kwargs[attr] = value
    if "vocab_size" not in kwargs and isinstance(meta.get("tokenizer.ggml.tokens"), tuple):
        kwargs["vocab_size"] = int(meta["tokenizer.ggml.tokens"][1])
    if "hidden_size" in kwargs and "num_attention_heads" in kwargs:  # rope's dimensions are not always head_dim
        kwargs["head_dim"] = int(meta.get(f"{arch}.attention.key_length")
                                 or kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return AutoConfig.for_model(arch, **kwargs)


@functools.lru_cache(maxsize=8)
def model_config(name: str) -> Any:
    """The transformers config of a model, without its weights: the bundled GGUF's header, the tiny
    random Llama's config, or config.json (a local folder, or the hub's, cached). Cached per
    process: treat it as read-only (:func:`calibrate_config` works on a copy)."""
    from rh.models import _hub_kwargs, bundled_gguf_path, hub_access, resolve_spec

    spec = resolve_spec(name)
    if spec.kind == "bundled-gguf":
        return _gguf_config(bundled_gguf_path(spec))
    if spec.key in ("planted", "planted-twin"):  # built by hand in rh.planted
        from rh.planted import planted_config

        return planted_config()
    if spec.kind == "random" and spec.key != "tiny-llama":  # tiny-<family>: that family's own config
        from rh.models import tiny_config

        s = spec.shape
        return tiny_config(spec.key.removeprefix("tiny-"), n_layers=s.n_layers, n_heads=s.n_heads,
                           n_kv_heads=s.n_kv_heads, head_dim=s.head_dim)
    if spec.kind == "random":
        from transformers import LlamaConfig

        s = spec.shape  # rh.models.tiny_llama's defaults
        return LlamaConfig(vocab_size=49152, hidden_size=s.n_heads * s.head_dim,
                           intermediate_size=4 * s.n_heads * s.head_dim, num_hidden_layers=s.n_layers,
                           num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
                           max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    from transformers import AutoConfig

    with hub_access(spec) as token:
        return AutoConfig.from_pretrained(spec.source, token=token, **_hub_kwargs(spec))


def run_device_dtype(name: str, device: str | None, dtype: str | None) -> tuple[str, Any]:
    """The device and :class:`rh.models.DtypeChoice` a run of ``name`` would use (as
    :func:`rh.models.load_model` chooses them)."""
    import torch

    from rh.models import DtypeChoice, resolve_dtype, resolve_spec

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_spec(name).kind == "random" and dtype in (None, "auto"):
        return device, DtypeChoice(torch.float32, "tiny random model: float32")
    return device, resolve_dtype(dtype, device)


def planned_model(name: str, *, device: str | None = None, dtype: str | None = None, quant: str | None = None,
                  shape: HeadShape | None = None) -> Any:
    """A stand-in for the loaded model with what a ranking's cache key reads (provenance: model
    id, revision, dtype, quant; shape; whether it is instruct; device), known without the weights:
    the bundled GGUF's sha256, the hub config's commit, a local folder's fingerprint. None where
    the revision cannot be known so."""
    import torch

    from rh.models import bundled_gguf_path, expected_shape, file_sha256, resolve_spec

    spec = resolve_spec(name)
    device, choice = run_device_dtype(name, device, dtype)
    instruct = spec.instruct
    if spec.kind == "bundled-gguf":
        revision = f"sha256:{file_sha256(bundled_gguf_path(spec))}"
    elif spec.kind == "random":
        revision = "seed:0"
    elif spec.kind == "local":
        from rh.models import _dir_fingerprint

        path = Path(spec.source)
        revision = getattr(model_config(name), "_commit_hash", None) or _dir_fingerprint(path)
        try:  # instruct iff the tokenizer has a chat template, as load_model decides
            import json

            template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
            instruct = bool(template) or (path / "chat_template.jinja").exists()
        except (OSError, ValueError):
            pass
    else:
        revision = getattr(model_config(name), "_commit_hash", None)
        if not revision:
            return None
    model_id = spec.source if spec.kind == "hub" else spec.key
    dev = torch.device("cuda" if device.startswith("cuda") else device)
    prov = {"model_id": model_id, "revision": revision, "dtype": choice.name, "quant": quant or "none"}
    return SimpleNamespace(provenance=prov, shape=shape or expected_shape(name), instruct=instruct, device=dev)


@dataclass(frozen=True)
class Calibration:
    """Seconds per token-layer on this machine, and how they were measured."""

    seconds_per_token_layer: float
    how: str
    machine: str
    dtype: str
    device: str

    def line(self) -> str:
        return f"{self.machine}, {self.dtype}: {self.how}"


def machine_description(device: str) -> str:
    """The GPU's name, or the CPU's model and bf16 flags with torch's thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(idx)} (cuda)"
    from rh.models import cpu_description

    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def calibrate_config(config: Any, *, batch_size: int, length: int, device: str = "cpu", dtype: Any = None,
                     n_layers: int = 2, repeats: int = 2) -> tuple[float, str]:
    """Seconds per token-layer of ``config``'s architecture on ``device`` in ``dtype``, measured on
    a randomly initialised copy with ``n_layers`` decoder layers and a small vocabulary (the
    output head runs one position, as rh's passes do): :func:`rh.budget.calibrate` on it. No
    weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from rh.budget import calibrate

    cfg = config.__class__.from_dict(config.to_dict())
    text = getattr(cfg, "text_config", None) or cfg
    text.num_hidden_layers = max(1, min(n_layers, int(text.num_hidden_layers)))
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[: text.num_hidden_layers]
    text.vocab_size = min(int(text.vocab_size), 1024)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(text, attr):
            setattr(text, attr, None)
    dtype = dtype or torch.float32
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    try:
        per, how = calibrate(model, batch_size=batch_size, length=length, repeats=repeats)
    finally:
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return per, how.replace("took", "of random weights took")


def calibrate_run(name: str, profile: Profile, *, device: str | None = None, dtype: str | None = None,
                  quant: str | None = None) -> Calibration:
    """This machine's seconds per token-layer for a run of ``name`` in ``profile``, without its
    weights (:func:`calibrate_config` on the model's config, in the dtype the run would choose)."""
    dev, choice = run_device_dtype(name, device, dtype)
    per, how = calibrate_config(model_config(name), batch_size=profile.batch_size, length=profile.lengths[0],
                                device=dev, dtype=choice.dtype)
    if quant:
        how += f" (--quant {quant}: timed unquantized)"
    if not (per > 0 and math.isfinite(per)):
        raise ValueError(f"the calibration measured {per} s per token-layer")
    return Calibration(per, how, machine_description(dev), choice.name, dev)


# --------------------------------------------------------------------------- the plugin's entry


def plan_session(config: Any, items: Sequence[Any], *, shape: HeadShape, profile: Profile, external: Any = None,
                 expected: Any = None, cache_dir: Path | None = None, calibrate: bool = True) -> Plan:
    """The plan of a pytest session's collected claim ``items`` (``--plan``), with this machine's
    calibration; nothing is loaded but the model's config."""
    opt = config.getoption
    name = opt("--model")
    try:
        stand_in = planned_model(name, device=opt("--device"), dtype=opt("--dtype"), quant=opt("--quant"), shape=shape)
    except Exception:  # the cache status is then "if not cached"
        stand_in = None
    ctx = PlanContext(profile, shape, model=name, method=opt("--method"), cache_dir=cache_dir,
                      planned_model=stand_in, external=external, compare_model=opt("--compare-model"),
                      recompute=bool(opt("--recompute")))
    plan = plan_items(items, ctx, expected=expected)
    if calibrate:
        try:
            cal = calibrate_run(name, profile, device=opt("--device"), dtype=opt("--dtype"), quant=opt("--quant"))
            plan.per_tl, plan.calibration = cal.seconds_per_token_layer, cal.line()
        except Exception as exc:  # a plan without times is still a plan
            plan.calibration = f"no calibration ({type(exc).__name__}: {exc}); times unknown"
    return plan


def recorded_for(path: str | Path | None, model: str, profile: str) -> Any:
    """The expected-verdicts file at ``path`` when it exists and is for this model and profile."""
    if path is None or not Path(path).is_file():
        return None
    from rh.expected import load_expected

    try:
        exp = load_expected(path)
    except (ValueError, OSError):
        return None
    if exp.model not in (None, model) or exp.profile not in (None, profile):
        return None
    return exp
