"""Every seed rh derives, from one function and one table.

- :func:`derive_seed` turns a tuple of parts (a base seed, a K, a draw index, a sample id, a layer,
  a label) into one 63-bit seed, the same in every process and on every machine (Python's
  ``hash`` is salted per process; this is not). Integer parts are combined by a polynomial hash,
  ``s = (s * 1_000_003 + part) mod (2**63 - 1)``; a string part enters as the first 8 bytes of its
  SHA-256, so ``"7"`` and ``7`` give different seeds.
- :data:`PROMPT_STREAMS` names each family of fresh prompts a claim draws, by the offset added to
  the profile's ``sample_seed``: prompts of different streams never share a seed with each other
  or with the identification prompts (offset 0). :func:`prompt_seed` is that sum; the planner
  (:mod:`rh.plan`) reads the same table, so a plan counts the prompts a run makes.

A team's own claim that needs fresh prompts takes an offset no stream here uses (and registers
it in its own table): two claims that share a stream share their prompts.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any

__all__ = ["derive_seed", "PROMPT_STREAMS", "prompt_seed"]

_MOD = 2**63 - 1
_MULT = 1_000_003

# offset added to the profile's sample_seed -> what the prompts of that stream are for
PROMPT_STREAMS: dict[str, int] = {
    "depth": 1_000_003,  # CA-6's prompts at each needle depth (IV-5, CA-9 and CA-10 read the first of them)
    "interventions": 2_000_003,  # the IV claims', CA-3's and CA-8's fresh prompts (identification never saw them)
    "probes": 3_000_017,  # IV-5's probe prompts until it read CA-6's ("depth"); kept so that no stream takes its seed
    "inverse": 4_000_037,  # CA-3's and CA-8's until they shared the IV claims'; kept so no stream takes its seed
    "tasks": 5_000_011,  # CA-4 / ID-5's prompts of every task
    "distractor": 6_000_011,  # CA-7's multi-needle prompts with a distractor
    "content_free": 7_000_003,  # ID-7's random repeated-token sequences
    "audit": 9_000_011,  # the random-weights audit's prompts
}


def _part(p: Any) -> int:
    if isinstance(p, bool) or not isinstance(p, (numbers.Integral, str)):
        raise TypeError(f"derive_seed: a part must be an int or a str, not {type(p).__name__} ({p!r})")
    if isinstance(p, str):
        return int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
    return int(p)


def derive_seed(*parts: int | str) -> int:
    """One deterministic seed in ``[0, 2**63 - 1)`` from ``parts`` (ints and strings), e.g.
    ``derive_seed(seed, k, draw)`` for CA-1's random K-sets or ``derive_seed(seed, sample.id, layer)``
    for a sample's noise. Equal parts give equal seeds in every process."""
    out = 0
    for p in parts:
        out = (out * _MULT + _part(p)) % _MOD
    return out


def prompt_seed(sample_seed: int, stream: str) -> int:
    """The seed of the fresh prompts of ``stream`` (a key of :data:`PROMPT_STREAMS`)."""
    if stream not in PROMPT_STREAMS:
        raise ValueError(f"unknown prompt stream {stream!r}: use one of {', '.join(sorted(PROMPT_STREAMS))}")
    return int(sample_seed) + PROMPT_STREAMS[stream]
