"""Left-padded batches compute what each prompt computes alone."""

from __future__ import annotations

import numpy as np
import pytest

from rh.batching import make_batches
from rh.evaluate import teacher_forced
from rh.niah import Sweep, build_samples
from rh.scoring import sum_attention_scores



@pytest.fixture(scope="module")
def mixed(tiny):
    """Two lengths and two tasks whose answers differ in token count (digits vs a phrase)."""
    sweep = Sweep(lengths=(110, 128), depths=(0.0, 0.6), n_per_setting=1, tasks=("passkey", "sf_activity"), seed=3)
    return build_samples(tiny.tokenizer, sweep, max_positions=tiny.max_positions)


def test_equal_lengths_stack_without_padding(tiny, tiny_samples):
    batches = list(make_batches(tiny_samples, 4, tiny.tokenizer.pad_token_id))
    assert all(not b.padded and "position_ids" not in b.model_inputs("cpu") for b in batches)
    assert sorted(s.id for b in batches for s in b.samples) == sorted(s.id for s in tiny_samples)


def test_padded_rows_keep_their_spans(tiny, mixed):
    assert len({len(s.input_ids) for s in mixed}) == 2 and len({len(s.answer_ids) for s in mixed}) > 1
    (batch,) = make_batches(mixed, len(mixed), tiny.tokenizer.pad_token_id)
    assert batch.padded
    for row, s in enumerate(batch.samples):
        a, b = batch.needle_span(row)
        assert tiny.tokenizer.decode(batch.input_ids[row, a:b].tolist()).strip() == s.needle
        assert batch.attention_mask[row].sum() == len(s.input_ids)
        assert batch.attention_mask[row, : batch.pad[row]].sum() == 0  # padding is on the left


def test_padded_sum_attention_equals_unpadded(tiny, mixed):
    alone = sum_attention_scores(tiny, mixed, batch_size=1, progress=False)
    together = sum_attention_scores(tiny, mixed, batch_size=len(mixed), progress=False)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-4)


def test_padded_teacher_forcing_equals_unpadded(tiny, mixed):
    alone = teacher_forced(tiny, mixed, batch_size=1, progress=False)
    together = teacher_forced(tiny, mixed, batch_size=len(mixed), progress=False)
    assert alone["correct"].tolist() == together["correct"].tolist()
    np.testing.assert_allclose(together["logprob"], alone["logprob"], atol=1e-4, rtol=1e-4)
    assert together["id"].tolist() == [s.id for s in mixed]
