"""rh's own claim catalogue as registered families (:mod:`rh.claim_families`): importing this
package registers CA-1 ... CA-8, ID-1 ... ID-8 and IV-1 ... IV-7, each with its rule, Δ,
calibration, figures and parameters, exactly as a team registers its own.

- :mod:`rh.catalogue.causal`: CA-1 ... CA-8;
- :mod:`rh.catalogue.identification`: ID-1 ... ID-8;
- :mod:`rh.catalogue.interventions`: IV-1 ... IV-7.

The layer sits above the report (its figures draw with ``rh.report.plotting``) and below the entry
points (the pytest plugin, ``rh audit`` and ``python -m rh`` import it)."""

from __future__ import annotations

from rh.catalogue import causal, identification, interventions

__all__ = ["causal", "identification", "interventions"]
