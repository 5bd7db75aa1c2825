"""Batches of samples: equal lengths stack as they are; mixed lengths are padded on the left with
an attention mask and position ids that give every real token the position it has alone, so a
padded row computes what the unpadded prompt computes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from rh.niah import Sample


@dataclass
class Batch:
    samples: list[Sample]
    input_ids: torch.Tensor  # [b, L], left-padded
    attention_mask: torch.Tensor  # [b, L], 0 on padding
    pad: list[int]  # left padding of each row
    index: list[int] = field(default_factory=list)  # each row's position in the sequence make_batches was given

    @property
    def padded(self) -> bool:
        return any(self.pad)

    def needle_span(self, row: int) -> tuple[int, int]:
        """The row's needle span, shifted by its padding."""
        s, e = self.samples[row].needle_span
        return s + self.pad[row], e + self.pad[row]

    def answer_span(self, row: int) -> tuple[int, int]:
        s, e = self.samples[row].answer_span
        return s + self.pad[row], e + self.pad[row]

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward; position ids only where there is padding."""
        out = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        if self.padded:
            out["position_ids"] = (self.attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
        return out


def row_length(sample: Sample, *, with_answer: bool = False) -> int:
    """A sample's tokens in a forward: its prompt, with ``with_answer`` the gold answer but its last
    token (the teacher-forcing input)."""
    return len(sample.input_ids) + (len(sample.answer_ids[:-1]) if with_answer else 0)


def batch_order(samples: Sequence[Sample], batch_size: int, *, with_answer: bool = False) -> list[list[int]]:
    """Which samples :func:`make_batches` puts in each batch (their indices): ordered by length (a
    stable sort), then cut into batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    lengths = [row_length(s, with_answer=with_answer) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: lengths[i])
    return [order[c : c + batch_size] for c in range(0, len(order), batch_size)]


def make_batches(samples: Sequence[Sample], batch_size: int, pad_id: int, *,
                 with_answer: bool = False) -> Iterator[Batch]:
    """Batches of at most ``batch_size``, samples ordered by length so that equal lengths share a
    batch (no padding) and mixed ones pad as little as possible. ``with_answer`` appends the gold
    answer but its last token (the teacher-forcing input)."""
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token id: set tokenizer.pad_token before batching")
    seqs = [tuple(s.input_ids) + (tuple(s.answer_ids[:-1]) if with_answer else ()) for s in samples]
    for rows in batch_order(samples, batch_size, with_answer=with_answer):
        width = max(len(seqs[i]) for i in rows)
        pad = [width - len(seqs[i]) for i in rows]
        ids = torch.tensor([[pad_id] * p + list(seqs[i]) for p, i in zip(pad, rows)], dtype=torch.long)
        mask = torch.tensor([[0] * p + [1] * len(seqs[i]) for p, i in zip(pad, rows)], dtype=torch.long)
        yield Batch([samples[i] for i in rows], ids, mask, pad, list(rows))


@dataclass(frozen=True)
class _Running:
    """What the forward now running is: its batch and, when teacher forced, where decoding starts."""

    batch: Batch
    decode_start: torch.Tensor | None  # [b] first decoding position of each row, or None


# The one context a forward carries for the hooks inside it (interventions, decode-only ablations).
_current: ContextVar[_Running | None] = ContextVar("rh_current_forward", default=None)


@contextlib.contextmanager
def running(batch: Batch, *, decode_from: Sequence[int] | torch.Tensor | None = None) -> Iterator[Batch]:
    """Within the block, :func:`current_batch` is ``batch``: interventions that act on a sample's
    own positions (``rh.interventions``) read each row's sample and left padding from it.

    ``decode_from`` (teacher forcing: prompt + answer fed in one pass) gives each row's first
    position that greedy decoding would process as a decoding step; a forward as wide as the
    batch then treats positions ``>= decode_from[row]`` as decoding steps for ``phase="decode"``
    ablations (:func:`decode_start`), which reproduces Wu24's decode-only ablation without
    generating."""
    start = None
    if decode_from is not None:
        start = torch.as_tensor(decode_from if isinstance(decode_from, torch.Tensor) else list(decode_from),
                                dtype=torch.long).reshape(-1)
        if start.numel() != len(batch.samples):
            raise ValueError(f"decode_from has {start.numel()} positions for a batch of {len(batch.samples)} rows")
    token = _current.set(_Running(batch, start))
    try:
        yield batch
    finally:
        _current.reset(token)


def current_batch() -> Batch | None:
    """The batch the model is running (inside :func:`running`), else None."""
    run = _current.get()
    return run.batch if run is not None else None


def running_batch(width: int, who: str) -> Batch:
    """The batch of the forward now running (inside :func:`running`), which must be ``width``
    positions wide; a reader (``who``) that sees another forward is refused, naming itself."""
    batch = current_batch()
    if batch is None or batch.input_ids.shape[1] != width:
        raise RuntimeError(f"{who} reads batch forwards (inside rh.batching.running); this forward of {width} "
                           "positions is not one")
    return batch


def last_prompt_positions(width: int, who: str) -> list[int]:
    """Each row's last prompt token in the batch now running (:func:`running_batch`): its left
    padding plus its prompt's length, less one (answer tokens, if teacher-forced, come after)."""
    batch = running_batch(width, who)
    return [p + len(s.input_ids) - 1 for p, s in zip(batch.pad, batch.samples)]


def decode_start(width: int) -> torch.Tensor | None:
    """Each row's first decoding position (``[b]``) when the forward now running is a teacher-forced
    batch (``running(..., decode_from=...)``) ``width`` positions wide; else None (a prefill, or a
    decoding step)."""
    run = _current.get()
    if run is None or run.decode_start is None or run.batch.input_ids.shape[1] != width:
        return None
    return run.decode_start
