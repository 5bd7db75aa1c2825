"""Decision rules, apart from the mechanisms that gather outcomes (CLAIMS.md's three-way rule).

- :mod:`rh.rules.verdict`: :class:`Verdict` and its typed :class:`Power` (``rh.stats.Verdict`` too).
- :mod:`rh.rules.core`: :func:`three_way`, :class:`Bounds`, t tests.
- :mod:`rh.rules.paired`: paired 0/1 outcomes (accuracy before/after an intervention), exact.
- :mod:`rh.rules.claims`: each claim family's decision from its outcomes.
- :mod:`rh.calibration` (a layer up: its simulators build the experiments' data types) runs these
  rules on simulated data at a profile's sizes.
"""

from rh.rules.core import Bounds, Power, TTestResult, Verdict, holm_pairs, t_power, t_test, three_way
from rh.rules.paired import FLIP_RATE, paired_family, paired_power, paired_tests, rule_power

__all__ = ["Bounds", "Power", "TTestResult", "Verdict", "holm_pairs", "t_power", "t_test", "three_way", "FLIP_RATE",
           "paired_family", "paired_power", "paired_tests", "rule_power"]
