"""Run pytest against Ray nodes started on this machine, each its own raylet bound to 127.0.0.1.

    python benchmarks/two_nodes.py [--nodes 2] [--cpus-per-node 1] -- claims/ --replicas 2 --threads-per-replica 1

starts the nodes (rh.ray_executor.local_nodes), runs ``python -m pytest <args> --ray HEAD`` and
stops the nodes, exiting with pytest's status. It is the multi-node acceptance check of the Ray
executor where only one machine is at hand: with one CPU per node, two one-thread replicas must
sit on different nodes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    args = ap.parse_args(argv)
    rest = [a for a in args.pytest_args if a != "--"]
    if any(a == "--ray" or a.startswith("--ray=") for a in rest):
        ap.error("--ray is set by this script: drop it from pytest's arguments")
    from rh.ray_executor import local_nodes

    with local_nodes(args.nodes, cpus_per_node=args.cpus_per_node) as address:
        print(f"two_nodes: {args.nodes} Ray nodes of {args.cpus_per_node} CPU(s) on 127.0.0.1, head {address}",
              flush=True)
        return subprocess.call([sys.executable, "-m", "pytest", *rest, "--ray", address])


if __name__ == "__main__":
    sys.exit(main())
