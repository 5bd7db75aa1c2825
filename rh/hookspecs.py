"""The hooks rh's pytest plugin adds, for a team's conftest or plugin to implement.

- :func:`pytest_rh_families`: the team's claim families (:class:`rh.claim_families.ClaimFamily`),
  registered beside rh's own as the plugin or conftest that defines the hook is loaded: their
  figures are drawn in the report, their parameters parametrize claims, and ``python -m rh
  calibrate --plugin FILE`` simulates their calibration.
- :func:`pytest_rh_figures`: figures of the run beyond those of any family (title -> PNG bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_rh_families() -> Sequence[Any]:
    """Return the claim families (:class:`rh.claim_families.ClaimFamily`) this plugin or conftest
    defines. Each is registered once, when the plugin is loaded, and removed at the end of the
    session; an id or claim that another family has already is a usage error."""


@hookspec
def pytest_rh_figures(verdicts: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> Mapping[str, bytes] | None:
    """Return extra figures for the report, title -> PNG bytes (a title starting with a claim id and
    a colon is shown in that claim's section). Called once, when the report is written."""
