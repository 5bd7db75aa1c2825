"""The package's import graph: no circle, and no arrow that points up the layers.

rh is built in six layers, each resting only on the ones below (the report wing's docstring and
``docs/writing-claims.md`` say what each holds). A module may import any module of its own layer
or of a lower one; an import that points up (``rh.stats`` reaching for ``rh.report``, a library
module reaching for the plugin) is the kind of edge that turns into an import circle later, and a
circle is refused outright. Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1] / "rh"

#: Bottom to top. A name ending in ``.*`` covers a subpackage and everything in it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation: data types, statistics and the decision rules (no model)",
     ("rh", "rh.heads", "rh.io", "rh.options", "rh.progress", "rh.seeds", "rh.tasks", "rh.stats", "rh.expected",
      "rh.rules", "rh.rules.verdict", "rh.rules.core", "rh.rules.paired", "rh.rules.claims", "rh.rules.field", "rh.rules.sweep", "rh.claim_families")),
    ("model: loading, prompts, hooks, ablation and evaluation passes",
     ("rh.models", "rh.recording", "rh.attention", "rh.budget", "rh.memory", "rh.niah", "rh.multi_needle",
      "rh.batching", "rh.prefix", "rh.profiles", "rh.ablation", "rh.compression", "rh.evaluate", "rh.units", "rh.curtail",
      "rh.journal", "rh.runner", "rh.dry", "rh.ray_executor", "rh.planted")),
    ("science: head scores, rankings and the claims' experiments",
     ("rh.scoring", "rh.rankings", "rh.published", "rh.uncertainty", "rh.pipeline", "rh.causal",
      "rh.pruning", "rh.content_free", "rh.id_claims", "rh.attribution", "rh.probes",
      "rh.interventions", "rh.field", "rh.calibration")),
    ("report: the figures, the HTML/JSON report and the comparison of runs", ("rh.report.*",)),
    ("catalogue: rh's claim families registered (rule, delta, calibration, figures, parameters)",
     ("rh.catalogue.*",)),
    ("entry points: the Run, the pytest plugin and its hooks, the plan, the audit and the command line",
     ("rh.run", "rh.pytest_plugin", "rh.hookspecs", "rh.plan", "rh.audit", "rh.__main__")),
]


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, anywhere in its body.
    ``from rh.x import y`` counts as importing ``rh.x.y`` where that is a module, else ``rh.x``."""
    mods = package_modules(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods and t.split(".")[0] == top:  # ``import rh.x.attr`` -> rh.x
                    t = t.rpartition(".")[0]
                if t in mods and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def layer_of(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if module == n or (n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1]))):
                return i
    raise KeyError(module)


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0].split(':')[0]}) imports {b} ({LAYERS[layer_of(b)][0].split(':')[0]})"
            for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_graph_is_read(graph):
    """The reader sees the edges that are there (an empty graph would pass every check below)."""
    assert set(graph) == set(package_modules(ROOT)) and len(graph) > 40
    assert "rh.recording" in graph["rh.ablation"]  # from rh.recording import ...
    assert "rh.report.format" in graph["rh.report.html"]  # from rh.report.format import ...
    assert "rh.rules.claims" in graph["rh.causal"]
    assert sum(map(len, graph.values())) > 150


def test_every_module_has_a_layer(graph):
    missing = []
    for m in graph:
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"modules {missing} are in no layer: add each to LAYERS in {Path(__file__).name}"


def test_no_import_circle(graph):
    assert cycle(graph) is None, f"an import circle: {' -> '.join(cycle(graph))}"


def test_no_upward_arrow(graph):
    up = upward_arrows(graph)
    assert not up, "imports that point up the layers:\n" + "\n".join(up)


def test_the_checks_see_a_circle_and_an_upward_arrow(tmp_path):
    """On a package written here with one circle (io -> stats -> report.html -> io, through a lazy
    import and two relative ones) and one upward import (rh.stats -> rh.report.html), both checks fire."""
    pkg = tmp_path / "rh"
    (pkg / "report").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "report" / "__init__.py").write_text("")
    (pkg / "report" / "html.py").write_text("from .. import io\n")
    (pkg / "io.py").write_text("def f():\n    from rh import stats\n")
    (pkg / "stats.py").write_text("from .report.html import x\nimport rh.report.html.x\n")
    g = import_graph(pkg)
    assert g == {"rh": set(), "rh.report": set(), "rh.report.html": {"rh.io"}, "rh.io": {"rh.stats"},
                 "rh.stats": {"rh.report.html"}}
    assert set(cycle(g)) == {"rh.io", "rh.stats", "rh.report.html"}
    assert upward_arrows(g) == ["rh.stats (foundation) imports rh.report.html (report)"]


CLAIM_ID = r"\b(?:CA|ID|IV)-\d+\b"


def test_no_report_module_names_a_claim():
    """The report wing draws every claim's figures through the registered families
    (rh.claim_families): a claim id in rh/report/ (a figure, a title, a docstring) is knowledge of
    one claim that a team's own family could not have."""
    import re

    hits = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}" for p in sorted((ROOT / "report").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(CLAIM_ID, line)]
    assert not hits, "rh/report/ names claims:\n" + "\n".join(hits)
    assert re.search(CLAIM_ID, (ROOT / "catalogue" / "causal.py").read_text())  # the pattern finds what it should
