"""Command line: ``python -m rh identify ...`` (Step 1 of seed 000) and ``python -m rh niah ...``.

    python -m rh identify --model smollm2-135m --method sum_attention --task passkey --task hq_state
    python -m rh identify --model llama8b --method wu24 --task inc_state --lengths 2048 4096 --per-task
    python -m rh niah --task hq_state --length 1024 --depth 0.5
    python -m rh report reports/llama8b-....json reports/llama70b-....json -o compare.html
    python -m rh calibrate --size small --profile quick --reps 300
    python -m rh calibrate --plugin conftest.py --family LAB-1
    python -m rh audit full_attention_heads.tsv qrhead_scores.json --model llama8b
    python -m rh audit --heads L16H1,L14H31 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rh.options import add_model_options, model_kwargs
from rh.profiles import PROFILES  # torch-free


def _identify(args: argparse.Namespace) -> int:
    from rh.niah import Sweep
    from rh.pipeline import DEFAULT_CACHE
    from rh.profiles import get_profile

    from rh.models import check_weights, expected_shape, resolve_spec

    from rh.audit import require_positive
    from rh.io import cache_message, unwritable_folder

    require_positive(args, "n", "batch_size", "top", "topk")  # 0 is not "the default": refused before the model loads
    if args.out:
        out = Path(args.out)
        if out.suffix and out.suffix.lower() not in (".json", ".csv"):
            raise ValueError(f"--out {args.out}: a ranking is saved as .json or .csv (or give a folder)")
        blocked = unwritable_folder(out if not out.suffix else out.parent)
        if blocked is not None:
            raise ValueError(f"--out {args.out}: {blocked} is not writable (or not a folder); choose another path")
    from rh.tasks import get_task

    for t in args.task or ():
        get_task(t)  # an unknown task is named now, not after the model has loaded
    prof = get_profile(args.profile, expected_shape(args.model))  # the model's shape, without its weights
    check_weights(args.model)
    sweep = Sweep(
        tuple(args.lengths or prof.lengths), tuple(args.depths if args.depths is not None else prof.depths),
        args.n or prof.n_per_setting, tuple(args.task or prof.tasks), args.seed,
    )
    from rh.audit import check_sweep, near_context

    if args.lengths or args.n or near_context(args.model, sweep):
        check_sweep(args, sweep)  # a prompt too short or too long for the model, a haystack too small: said now
    # a random test model's rankings never go into the folder of committed ones
    cache = Path(args.cache) if args.cache else (
        Path(".rh/rankings") if resolve_spec(args.model).kind == "random" else DEFAULT_CACHE)
    blocked = unwritable_folder(cache)
    if blocked is not None:
        raise ValueError(cache_message("--cache", cache, blocked))
    from rh.run import Run

    command = "python -m rh identify " + " ".join(sys.argv[2:])
    with Run(args.model, model_kwargs=model_kwargs(args), command=command) as run:
        _identify_on(run, args, sweep, cache)
        print(f"\nforward passes: {run.counter.total:,} token-layers "
              f"({time.perf_counter() - run.t0:.0f} s, {run.meta['dtype']})")
    return 0


def _identify_on(run, args: argparse.Namespace, sweep, cache: Path) -> None:
    """Identify on the run's model (``rh identify``'s work once its inputs are checked)."""
    from rh.niah import build_samples, split_samples
    from rh.pipeline import cached_identification, ranking_provenance
    from rh.profiles import get_profile
    from rh.report import head_grid
    from rh.scoring import Wu24Options, general_heads

    model = run.load()
    prof = get_profile(args.profile, model.shape)
    samples = build_samples(model.tokenizer, sweep, chat=model.instruct, max_positions=model.max_positions)
    ident = samples if args.split == "all" else split_samples(samples, frac=prof.identify_frac, seed=prof.split_seed)[0]
    frac = 1.0 if args.split == "all" else prof.identify_frac
    options = Wu24Options(topk=args.topk, rouge_filter=not args.no_rouge_filter,
                          once_per_position=args.once_per_position, score_prefill=not args.skip_first_step,
                          span=args.span) if args.method == "wu24" else None
    groups = {t: [s for s in ident if s.task == t] for t in sweep.tasks} if args.per_task else {"all": ident}
    rankings = {}
    for name, subset in groups.items():
        prov = ranking_provenance(model, sweep, args.method, subset, identify_frac=frac, split_seed=prof.split_seed,
                                  options=options)
        r, path, hit = cached_identification(model, subset, prov, cache_dir=cache, recompute=args.recompute,
                                             options=options, batch_size=args.batch_size or prof.batch_size)
        rankings[name] = r
        print(f"\n{name}: {args.method} over {len(subset)} samples -> {path} ({'cached' if hit else 'computed'})")
        print(f"{'rank':>4}  {'head':<8} {'score':>10}")
        for i, h in enumerate(r.top(min(args.top, model.shape.n_total))):
            print(f"{i + 1:>4}  {str(h):<8} {r.scores[h]:>10.4f}")
        if args.out:
            out = Path(args.out)
            target = out / f"{model.key}-{args.method}-{name}.json" if out.suffix == "" else out
            if len(groups) > 1 and out.suffix:
                target = out.with_name(f"{out.stem}-{name}{out.suffix}")
            r.save(target)
            print(f"saved {target}")
        if args.figures:
            fig = Path(args.figures) / f"{model.key}-{args.method}-{name}-heads.png"
            fig.parent.mkdir(parents=True, exist_ok=True)
            fig.write_bytes(head_grid(r.to_json(), top_k=args.top))
            print(f"figure {fig}")
    if args.per_task and len(rankings) > 1:
        gen = general_heads(rankings, args.top)
        print(f"\ngeneral heads (in every task's top {args.top}): {', '.join(map(str, gen)) or 'none'}")


def load_families(sources: Sequence[str]) -> None:
    """Import each ``--plugin`` source (a .py file, e.g. a team's conftest.py, or a module name),
    registering the claim families it defines at import or returns from ``pytest_rh_families``
    (after rh's own)."""
    import importlib
    import importlib.util

    import rh.catalogue  # noqa: F401
    from rh.claim_families import register_hooked

    for src in sources:
        path = Path(src)
        if src.endswith(".py") or path.exists():
            if not path.is_file():
                raise ValueError(f"--plugin {src}: no such file (give a .py file, e.g. your conftest.py, or a module "
                                 "name)")
            spec = importlib.util.spec_from_file_location(f"rh_plugin_{abs(hash(str(path.resolve())))}", path)
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own imports, as pytest's rootdir would allow
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            try:
                module = importlib.import_module(src)
            except ImportError as exc:
                raise ValueError(f"--plugin {src}: {exc}") from None
        hook = getattr(module, "pytest_rh_families", None)
        try:
            register_hooked(hook() if callable(hook) else (), [])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--plugin {src}: {exc}") from None


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from rh.calibration import calibrate, format_table
    from rh.claim_families import calibrated
    from rh.heads import HeadShape
    from rh.profiles import get_profile

    try:
        load_families(args.plugin or [])
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = {"tiny": HeadShape(4, 8, 2, 16), "small": HeadShape(30, 9, 3, 64), "large": HeadShape(32, 32, 8, 128)}
    prof = get_profile(args.profile, shape[args.size])
    known = calibrated()
    fams = args.family or list(known)
    bad = [f for f in fams if f not in known]
    if bad or args.reps < 1:
        print(f"error: unknown family {bad} (choose from {', '.join(known)})" if bad else "error: --reps must be >= 1",
              file=sys.stderr)
        return 2
    rows = []
    for f in fams:
        rows.append(calibrate(f, prof, reps=args.reps))
        print(f"{f}: done", file=sys.stderr, flush=True)
    print(f"profile {args.profile} for a {args.size} model: {rows[0].sizes}")
    print(format_table(rows))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
        tmp.replace(args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rh", description="retrieval-head tools")
    sub = ap.add_subparsers(dest="command", required=True)

    idp = sub.add_parser("identify", help="rank heads by sum attention or the Wu24 retrieval score")
    add_model_options(idp.add_argument)
    idp.add_argument("--method", default="sum_attention", choices=("sum_attention", "sum", "wu24"))
    idp.add_argument("--task", action="append", help="task to identify on (repeatable; default: the profile's)")
    idp.add_argument("--profile", default="quick", choices=PROFILES)
    idp.add_argument("--lengths", type=int, nargs="+")
    idp.add_argument("--depths", type=float, nargs="+")
    idp.add_argument("--n", type=int, help="samples per (length, depth, task)")
    idp.add_argument("--seed", type=int, default=0)
    idp.add_argument("--split", choices=("identify", "all"), default="identify",
                     help="score the 80%% identification split (default) or every sample")
    idp.add_argument("--per-task", action="store_true", help="one ranking per task, and their general heads")
    idp.add_argument("--top", type=int, default=10, help="how many top heads to print (and K for general heads)")
    idp.add_argument("--out", help="also save the ranking here (.json or .csv; a folder for one file per task)")
    idp.add_argument("--figures", help="write the layer x head score grid into this folder")
    idp.add_argument("--cache", help="ranking cache folder (default fixtures/rankings)")
    idp.add_argument("--recompute", action="store_true")
    idp.add_argument("--batch-size", type=int)
    idp.add_argument("--topk", type=int, default=1, help="wu24: check each head's top-k positions")
    idp.add_argument("--no-rouge-filter", action="store_true", help="wu24: count every trial")
    idp.add_argument("--skip-first-step", action="store_true",
                     help="wu24: do not score the forward that emits the first answer token (a departure from the "
                          "original, which scores it)")
    idp.add_argument("--span", default="exact", choices=("exact", "wu24"),
                     help="wu24: which prompt tokens are the answer: exact (default, known from prompt construction) "
                          "or the original's set-coverage search (one token early on answers that repeat a token)")
    idp.add_argument("--once-per-position", action="store_true", help="wu24: credit a needle position once")

    cal = sub.add_parser("calibrate", help="simulate every registered claim family's false-support, false-refute "
                         "and power at a profile's sizes (rh.calibration)")
    cal.add_argument("--size", default="small", choices=("tiny", "small", "large"),
                     help="the model size class whose profile sizes are used (small: SmolLM2-135M)")
    cal.add_argument("--profile", default="quick", choices=PROFILES)
    cal.add_argument("--reps", type=int, default=300, help="simulated runs per scenario and family")
    cal.add_argument("--family", action="append", help="only this family (repeatable)")
    cal.add_argument("--json", help="also write the rates to this JSON file")
    cal.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                     help="also calibrate the claim families this file (e.g. your conftest.py) or module registers "
                          "(repeatable; see docs/writing-claims.md)")

    aud = sub.add_parser("audit", help="re-check published head files (QRHead, DuoAttention, RazorAttention, "
                         "CompressKV, Wu24, rh, plain head sets): CA-1, and CA-2 where the file gives an order")
    from rh.audit import add_arguments

    add_arguments(aud)

    sub.add_parser("niah", help="print one prompt with its needle marked (see python -m rh.niah -h)", add_help=False)
    sub.add_parser("report", help="combine run reports into one comparison page (python -m rh report -h)",
                   add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["niah"]:
        from rh.niah import main as niah_main

        return niah_main(argv[1:])
    if argv[:1] == ["report"]:
        from rh.report import main_report

        return main_report(argv[1:])
    args = ap.parse_args(argv)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "audit":
        from rh.audit import run

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return run(args)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.method == "sum":
        args.method = "sum_attention"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _identify(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
