"""The quick catalogue's evaluation both ways in one process (issue #15): ``pytest claims/ --plain``
(every forward pass in full) and then the default run with the exact savings (prefix reuse from
the first modified layer, CA-1's random head sets stopped once decided), on the same prompts and
rankings. Prints, per claim and in total, the token-layers and the wall time of each run, and
checks that every verdict is the same both ways (exit 1 if one differs).

    .venv/bin/python benchmarks/bench_savings.py [-k EXPR] [--model smollm2-135m] [--json out.json]

``-k`` selects claims as pytest's ``-k`` does (the whole plain catalogue takes about 1 h 40 min on
an AVX2-only 2-core machine; e.g. ``-k "critical or depth"`` takes a fraction). The model is
loaded once per run (inside each pytest session); the wall times are the reports' runtimes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(extra: list[str], args, report_dir: Path) -> dict:
    report_dir.mkdir(parents=True, exist_ok=True)
    argv = ["claims/", "-p", "no:cacheprovider", "-q", "--model", args.model, "--report-dir", str(report_dir), *extra]
    if args.k:
        argv += ["-k", args.k]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    code = pytest.main(argv)
    wall = time.perf_counter() - t0
    reports = sorted(report_dir.glob("*.json"))
    if not reports:
        raise SystemExit(f"pytest {' '.join(argv)} wrote no report (exit {code})")
    data = json.loads(reports[-1].read_text())
    cost = data["meta"].get("cost", {})
    verdicts = {v.get("key") or v.get("nodeid"): v.get("status") for v in data["verdicts"]}
    return {"argv": argv, "exit": int(code), "wall_s": round(wall, 1), "runtime_s": data["meta"].get("runtime_s"),
            "total": cost.get("total"), "by_claim": cost.get("by_claim", {}), "saved": cost.get("saved", {}),
            "verdicts": verdicts, "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default=None, help="pytest -k expression selecting claims")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None, help="write both runs' figures here")
    args = ap.parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        plain = _run(["--plain"], args, Path(tmp) / "plain")
        saved = _run([], args, Path(tmp) / "savings")
    claims = sorted(set(plain["by_claim"]) | set(saved["by_claim"]),
                    key=lambda c: -(plain["by_claim"].get(c) or 0))
    print(f"\n{'claim':10} {'plain token-layers':>20} {'with savings':>14} {'ratio':>7}")
    for c in claims:
        a, b = plain["by_claim"].get(c) or 0, saved["by_claim"].get(c) or 0
        print(f"{c:10} {a:>20,} {b:>14,} {b / a if a else float('nan'):>7.2f}")
    print(f"{'total':10} {plain['total']:>20,} {saved['total']:>14,} {saved['total'] / plain['total']:>7.2f}")
    print(f"wall time: plain {plain['runtime_s']} s, with savings {saved['runtime_s']} s "
          f"({saved['runtime_s'] / plain['runtime_s']:.2f}x); load average {plain['load_before']}-"
          f"{saved['load_after']}")
    print(f"left out by the savings (as counted): {saved['saved']}")
    differ = {k: (plain["verdicts"].get(k), saved["verdicts"].get(k))
              for k in set(plain["verdicts"]) | set(saved["verdicts"])
              if plain["verdicts"].get(k) != saved["verdicts"].get(k)}
    print(f"verdicts: {len(plain['verdicts'])} plain, {len(saved['verdicts'])} with savings, "
          f"{'all identical' if not differ else f'{len(differ)} differ: {differ}'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "savings": saved}, indent=1))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
