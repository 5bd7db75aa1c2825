"""Group samples into batches that stack without padding (equal prompt and answer lengths)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rh.niah import Sample


def equal_length_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Yield batches of at most ``batch_size`` samples sharing prompt and answer lengths, keeping
    the input order within each group."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    groups: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((len(s.input_ids), len(s.answer_ids)), []).append(s)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]
