"""rh: check causal claims about retrieval heads in LLMs, as pytest tests.

The library holds primitives only (models, prompts, attention capture, ablation, evaluation,
statistics, report); the claims live in ``claims/`` and the pytest plugin in ``rh/pytest_plugin.py``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("rh")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
