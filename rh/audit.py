"""``python -m rh audit PATH ... --model M``: re-check published head files on a model.

Each file (or ``--heads``) is loaded with :func:`rh.published.load_heads` and checked against the
model's shape before any weights load. Then, on fresh passkey prompts the file's authors never saw:

- **CA-1** for every input: ablating its heads drops retrieval accuracy more than ablating random
  head sets of the same size from outside it (paired exact test per prompt against the draws, and
  the head-set null; refuted when the gap is shown below Δ = ``ca1_min_gap``). A ranking is tested
  at each K level; a head set at K = its size.
- **CA-2** where the file gives an order (a ranking): the answer's log-probability drop grows with K.
  A head set has no order, so CA-2 is reported as not applicable, never computed on an invented one.

Every verdict follows the three-way rule; the run writes an HTML/JSON report like ``pytest claims/``.
The prompts and the baseline are computed once and shared by every file of the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rh.options import add_model_options, model_kwargs
from rh.profiles import PROFILES  # torch-free
from rh.seeds import prompt_seed


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("paths", nargs="*", metavar="PATH", help="published head files (any format rh reads)")
    ap.add_argument("--heads", help="a head set on the command line instead of (or beside) files: L16H1,L14H31")
    add_model_options(ap.add_argument)
    ap.add_argument("--format", default="auto", help="the files' format (default: detected from the content)")
    ap.add_argument("--per-layer", type=int, help="with a complete per-layer order: test the first M heads of each layer")
    ap.add_argument("--profile", default="quick", choices=PROFILES)
    ap.add_argument("--k", type=int, nargs="+", help="K levels for a ranking (default: the profile's)")
    ap.add_argument("--n", type=int, help="prompts per depth (default: the profile's n_per_setting)")
    ap.add_argument("--length", type=int, help="prompt length in tokens (default: the profile's first)")
    ap.add_argument("--draws", type=int, help="random head sets per K (default: the profile's)")
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--report-dir", default="reports")


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse 0 or a negative count for any of these options (``None``: the default applies)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive whole number")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checked before weights load: the inputs, the profile and the sizes."""
    from rh.models import check_weights, expected_shape
    from rh.niah import Sweep
    from rh.profiles import get_profile
    from rh.published import HeadSet, load_heads, parse_head_set

    if not args.paths and not args.heads:
        raise ValueError("give at least one head file (PATH) or --heads L16H1,L14H31")
    require_positive(args, "n", "length", "draws", "per_layer")
    bad_k = [k for k in args.k or () if k < 1]
    if bad_k:
        raise ValueError(f"--k {bad_k[0]}: give positive whole numbers (the numbers of top heads to ablate)")
    if args.heads and not args.paths:  # as under pytest: an option --heads cannot use is refused, not ignored
        unused_by_heads(args)
    from rh.io import unwritable_folder

    blocked = unwritable_folder(args.report_dir)
    if blocked is not None:
        raise ValueError(f"--report-dir {args.report_dir}: {blocked} is not a writable folder; choose another (the "
                         "report would be lost after the run)")
    shape = expected_shape(args.model)
    check_weights(args.model)  # a local folder with a config.json alone: said now, not when loading
    inputs = []
    for p in args.paths:
        inputs.append((p, load_heads(p, shape=shape, fmt=args.format, per_layer=args.per_layer)))
    if args.heads:
        inputs.append(("--heads", parse_head_set(args.heads, shape)))
    unused_by_files(args, inputs)
    base = get_profile(args.profile, shape)
    overrides: dict[str, Any] = {"alpha": args.alpha}
    if args.draws is not None:
        overrides["random_draws"] = args.draws
    out = []
    for label, heads in inputs:
        ordered = not isinstance(heads, HeadSet)
        levels = tuple(args.k or base.ablation_levels) if ordered else (len(heads),)
        prof = get_profile(args.profile, shape, ablation_levels=levels, **overrides)
        out.append({"label": label, "heads": heads, "profile": prof, "ordered": ordered})
    names = [Path(i["label"]).name if i["label"] != "--heads" else "--heads" for i in out]
    if len({str(Path(i["label"]).resolve()) for i in out}) < len(out):
        raise ValueError("a file is given twice: audit each once")
    for i, name in zip(out, names):  # the report's "source" parameter: the file name, the path where names clash
        i["source"] = name if names.count(name) == 1 else i["label"]
    prof = out[0]["profile"]
    sweep = Sweep((args.length or prof.lengths[0],), prof.depths, args.n or prof.n_per_setting, prof.tasks,
                  prompt_seed(prof.sample_seed, "audit"))
    if args.length is not None or args.n is not None or near_context(args.model, sweep):
        check_sweep(args, sweep)  # with the tokenizer alone: a bad size is said now
    return {"inputs": out, "sweep": sweep, "cost": planned_cost(out, sweep, shape.n_layers)}


def unused_by_heads(args: argparse.Namespace) -> None:
    """``--per-layer`` or ``--k`` beside ``--heads`` alone: a head set has one K, its size, and no
    per-layer order to cut, so either option would be silently ignored. Refused instead, naming both
    options and the fix, as the pytest plugin refuses ``--heads`` with ``--per-layer``."""
    heads = f"--heads {args.heads}"
    if args.per_layer is not None:
        raise ValueError(f"--per-layer {args.per_layer} needs a per-layer {{layer: [heads]}} file (PATH), and {heads} "
                         "is a head set: drop --per-layer, or give the file instead of --heads")
    if args.k:
        raise ValueError(f"--k {' '.join(map(str, args.k))} sets the K levels of a ranking, and {heads} is a head set "
                         "with one K, its size: drop --k (K is the number of heads in --heads), or give a ranking file")


def unused_by_files(args: argparse.Namespace, inputs: list[tuple[str, Any]]) -> None:
    """``--k`` when no input is a ranking, ``--per-layer`` when no file is a per-layer order: the
    option would change nothing, so it is refused rather than ignored."""
    from rh.published import HeadSet

    if args.per_layer is not None and not any(getattr(h, "provenance", {}).get("per_layer") for _, h in inputs):
        raise ValueError(f"--per-layer {args.per_layer}: no input is a per-layer {{layer: [heads]}} file, so it would "
                         "change nothing: drop --per-layer (it takes the first M heads of each layer of such a file)")
    if args.k and all(isinstance(h, HeadSet) for _, h in inputs):
        raise ValueError(f"--k {' '.join(map(str, args.k))}: every input is a head set, with one K each (its size), "
                         "and no ranking for --k to cut: drop --k, or give a ranking file")


#: a prompt length this close to the model's context is checked with the tokenizer, even when the
#: profile chose it (the answer's tokens must fit after it; no task's answer comes near this many)
ANSWER_ROOM = 256


def near_context(model: str, sweep: Any) -> bool:
    """Whether a length of ``sweep`` comes within :data:`ANSWER_ROOM` tokens of the model's context,
    where the context is known without loading (:func:`rh.models.known_context`)."""
    from rh.models import known_context

    context = known_context(model)
    return context is not None and max(sweep.lengths) + ANSWER_ROOM > context


def check_sweep(args: argparse.Namespace, sweep: Any) -> None:
    """``--length`` and ``--n`` against the prompt, the haystack and the model's context, with the
    tokenizer alone (:func:`rh.niah.sweep_room`): a length the template, question and needle do not
    fit in, the haystack cannot fill or that leaves no room for the answer in the model's context
    (``max_position_embeddings``, where its config is known without loading:
    :func:`rh.models.known_context`), and more prompts per (length, depth) than the haystack has
    distinct windows at that length. Shared by ``rh identify`` (``--lengths``) and ``rh audit``."""
    from rh.models import known_context, load_tokenizer, resolve_spec
    from rh.niah import sweep_room

    lengths = getattr(args, "lengths", None) or ([args.length] if getattr(args, "length", None) else None)
    try:
        room = sweep_room(load_tokenizer(args.model), sweep, chat=resolve_spec(args.model).instruct,
                          max_positions=known_context(args.model))
    except ValueError as exc:
        opt = "--lengths" if hasattr(args, "lengths") else "--length"
        if lengths:
            raise ValueError(f"{opt} {' '.join(map(str, lengths))}: {exc}") from None
        raise ValueError(f"the {args.profile} profile's length{'s' if len(sweep.lengths) > 1 else ''} "
                         f"{' '.join(map(str, sweep.lengths))} (no {opt} given): {exc} (give it with {opt})") from None
    if sweep.n_per_setting > room:
        raise ValueError(f"--n {sweep.n_per_setting}: at {max(sweep.lengths)} tokens the haystack has only {room:,} "
                         f"distinct windows per depth, so {sweep.n_per_setting:,} prompts per depth would repeat them "
                         f"(prompts that are not independent); give --n {room} or fewer")


def planned_cost(inputs: list[dict[str, Any]], sweep: Any, layers: int) -> dict[str, int]:
    """The audit's forward passes before any weights load, as plain counts (early stopping and
    prefix reuse only lower them): one baseline pass per prompt, then per input and K the top K and
    every random set over every prompt, and for a ranking CA-2's top K at its other dose levels;
    token-layers at the prompts' length (each answer adds a few tokens)."""
    prompts = len(sweep.lengths) * len(sweep.depths) * sweep.n_per_setting * len(sweep.tasks)
    conditions = 1
    for i in inputs:
        prof = i["profile"]
        conditions += len(prof.ablation_levels) * (1 + prof.random_draws)
        if i["ordered"]:
            conditions += len(set(prof.dose_levels) - set(prof.ablation_levels))
    passes = prompts * conditions
    return {"prompts": prompts, "conditions": conditions, "passes": passes,
            "token_layers": passes * sweep.lengths[0] * layers}


def run(args: argparse.Namespace, *, out=None) -> int:
    from rh.run import Run

    out = out or sys.stdout
    p = plan(args)  # bad input stops here, before the weights load
    cost = p["cost"]
    print(f"audit plan: {cost['prompts']:,} prompts x {cost['conditions']:,} conditions = up to {cost['passes']:,} "
          f"forward passes, about {cost['token_layers']:,} token-layers (early stopping and prefix reuse run "
          "fewer)",
          file=out, flush=True)
    run = Run(args.model, model_kwargs=model_kwargs(args), command="python -m rh audit " + " ".join(sys.argv[2:]))
    t0 = run.t0
    from rh import progress

    last = [time.perf_counter()]

    def show(what: str, done: int, total: int | None) -> None:  # a line at most every 30 s, on stderr
        now = time.perf_counter()
        if now - last[0] >= 30 or (total and done == total):
            last[0] = now
            print(f"  [{now - t0:.0f} s] {what} {done}" + (f" of {total}" if total else ""), file=sys.stderr, flush=True)

    token = progress.listen(show)
    run.resources.callback(progress.unlisten, token)
    try:
        return _audit(run, args, p, out)
    finally:
        run.close()


def _audit(run, args: argparse.Namespace, p: dict[str, Any], out) -> int:
    """The audit's claims on the run's model (prefix reuse and the run's runner included)."""
    from rh.catalogue.causal import ca1_ablation_curve
    from rh.causal import dose_response, evaluate_baseline, necessity_outcomes, necessity_verdicts, top_logprobs
    from rh.niah import build_samples
    from rh.published import ties_at_cut
    from rh.report import report_stem, summarize
    from rh.rules.claims import inconclusive
    from rh.run import headline

    sweep = p["sweep"]
    model = run.load()
    counter = run.counter
    samples = build_samples(model.tokenizer, sweep, chat=model.instruct, max_positions=model.max_positions)
    print(f"audit on {model.key} ({model.provenance['dtype']}): {len(samples)} fresh {', '.join(sweep.tasks)} prompts "
          f"of {sweep.lengths[0]} tokens at depths {', '.join(f'{d:g}' for d in sweep.depths)}", file=out, flush=True)
    verdicts = run.verdicts
    prof0 = p["inputs"][0]["profile"]
    with counter.charged_to("baseline"):
        baseline = evaluate_baseline(model, samples, batch_size=prof0.batch_size)
    base_acc = float(baseline["correct"].mean())
    print(f"baseline accuracy {base_acc:.2f} (floor {prof0.baseline_floor:.2f})", file=out, flush=True)
    for item in p["inputs"]:
        heads, prof, label = item["heads"], item["profile"], item["label"]
        kind = (f"{heads.method} ranking of {model.shape.n_total} heads" if item["ordered"]
                else f"head set of {len(heads)} heads")
        print(f"\n== {label}: {kind}; K = {', '.join(map(str, prof.ablation_levels))}, "
              f"{prof.random_draws} random sets per K", file=out, flush=True)
        tag = {"source": item["source"]}
        with counter.charged_to(f"{label}: CA-1"):
            outs = [necessity_outcomes(model, samples, heads, k, draws=prof.random_draws, seed=prof.draw_seed,
                                       baseline=baseline, batch_size=prof.batch_size,
                                       baseline_floor=prof.baseline_floor) for k in prof.ablation_levels]
        ca1 = necessity_verdicts(outs, alpha=prof.alpha, baseline_floor=prof.baseline_floor,
                                 min_gap=prof.ca1_min_gap, n_boot=prof.n_boot, seed=prof.draw_seed,
                                 control=prof.ca1_control)
        rows = []
        for k, v in ca1.items():
            note = ties_at_cut(heads, k) if item["ordered"] else 0
            d = v.to_dict()
            d["params"] = {**d["params"], **tag}
            if note:
                d["details"] = {**d.get("details", {}), "ties_at_cut": note}
            rows.append((d, v, note))
        if item["ordered"]:
            ids = [s.id for s in samples]
            base = baseline.set_index("id").loc[ids]
            with counter.charged_to(f"{label}: CA-2"):
                tops = top_logprobs(model, samples, heads, prof.dose_levels, outs, batch_size=prof.batch_size)
            v2 = dose_response(base["logprob"].to_numpy(float), tops, ca1, alpha=prof.alpha,
                               min_growth=prof.dose_min_growth, baseline_floor=prof.baseline_floor,
                               baseline_accuracy=base_acc)
        else:
            v2 = inconclusive("CA-2", {}, f"not applicable to a head set: {label} has no order, and CA-2's "
                              "dose-response needs the top K at several K", "dose-response", prof.alpha,
                              min_effect=prof.dose_min_growth)
        d2 = v2.to_dict()
        d2["params"] = {**d2["params"], **tag}
        rows.append((d2, v2, 0))
        for d, v, ties in rows:
            d["statement"] = _STATEMENTS[v.claim]
            d["source"] = f"audit of {label}"
            run.record(d)
            params = ", ".join(f"{a}={b}" for a, b in v.params.items())
            print(f"\n{v.claim}{' ' + params if params else ''}: {v.status.upper()}", file=out)
            print("  " + v.explain().replace("\n", "\n  "), file=out)
            if ties:
                print(f"  note: the top-{v.params.get('k')} cut falls inside a tie of {ties} heads with equal "
                      "scores: which of them are ablated is the tie rule's choice, not the file's", file=out)
        out.flush()
    meta = {"model": args.model, "profile": args.profile, "dtype": model.provenance["dtype"], "baseline": {"accuracy": base_acc, "n": len(samples)},
            "audit": {"inputs": [i["label"] for i in p["inputs"]], "prompts": len(samples),
                      "length": sweep.lengths[0], "depths": list(sweep.depths)},
            "cost": run.cost()}
    stem = "audit-" + report_stem(args.model, run.started)
    figures = {}
    for item in p["inputs"]:  # one accuracy-vs-K figure per input: their K levels are not one curve
        png = ca1_ablation_curve([v for v in verdicts if v["params"].get("source") == item["source"]])
        if png:
            figures[f"CA-1: {item['label']}"] = png
    paths = run.write_report(args.report_dir, stem, figures=figures, meta=meta, family_figures=False)
    print("\n" + headline(summarize(run.verdicts)), file=out)
    print(f"forward passes: {counter.total:,} token-layers; {time.perf_counter() - run.t0:.0f} s", file=out)
    print(f"report: {paths[1]}\n        {paths[0]}", file=out)
    return 0


_STATEMENTS = {
    "CA-1": "Ablating the file's heads drops needle retrieval accuracy more than ablating as many random heads "
            "from outside them.",
    "CA-2": "The answer's log-probability drop grows with the number of top heads ablated.",
}
