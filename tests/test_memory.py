"""Unit tests of rh.memory: an out-of-memory error inside evaluation or identification becomes a
RuntimeError that says what to lower; the batch-size estimate against a hand count."""

from __future__ import annotations

import pytest
import torch

from rh.evaluate import teacher_forced
from rh.memory import activation_bytes_per_token, auto_batch_size, is_oom, kv_bytes_per_token, oom_guard
from rh.scoring import score_samples


CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.2 GiB is free.")


@pytest.fixture
def oom_in_layer(tiny, monkeypatch):
    """The MLP of layer 2 raises CUDA's out-of-memory error, as a too-large batch would."""

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(tiny.model.model.layers[2].mlp, "forward", boom)


def _says_what_to_lower(text: str) -> None:
    for needle in ("out of accelerator memory", "batch size", "batch_size", "prompt length", "--quant 4bit",
                   "more GPUs", "tokens each"):
        assert needle in text, needle


def test_teacher_forced_oom_says_what_to_lower(tiny, tiny_samples, oom_in_layer):
    with pytest.raises(RuntimeError) as info:
        teacher_forced(tiny, tiny_samples, batch_size=4, progress=False)
    text = str(info.value)
    _says_what_to_lower(text)
    assert "teacher-forced evaluation" in text and "a batch of 4 prompts" in text
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)  # the original is kept
    assert not isinstance(info.value, torch.cuda.OutOfMemoryError)


def test_identification_oom_says_what_to_lower(tiny, tiny_samples, oom_in_layer):
    method = "sum_attention"  # the guard wraps score_samples' per-batch scorer, whichever method it runs
    with pytest.raises(RuntimeError) as info:
        score_samples(tiny, tiny_samples[:2], method, batch_size=2, progress=False)
    _says_what_to_lower(str(info.value))
    assert f"identification ({method})" in str(info.value) and "a batch of 2 prompts, 128 tokens" in str(info.value)


def test_other_errors_pass_through():
    with pytest.raises(ValueError, match="unrelated"), oom_guard("x"):
        raise ValueError("unrelated")
    with pytest.raises(RuntimeError, match="^shape mismatch$"), oom_guard("x"):
        raise RuntimeError("shape mismatch")


def test_is_oom():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))  # from a kernel or extension
    assert not is_oom(RuntimeError("expected scalar type"))
    assert not is_oom(MemoryError())


def test_kv_and_activation_bytes_by_hand(tiny):
    # tiny: 4 layers, 2 KV heads of dim 8, fp32; keys and values
    assert kv_bytes_per_token(tiny) == 2 * 4 * 2 * 8 * 4
    assert kv_bytes_per_token(tiny, layers=1) == 2 * 2 * 8 * 4
    hidden, inter = 64, 256
    assert activation_bytes_per_token(tiny) == 4 * (4 * hidden + 2 * 64 + 3 * inter) + 8 * hidden


def test_auto_batch_size(tiny):
    length, new = 1000, 64
    vocab = tiny.model.config.vocab_size
    per = kv_bytes_per_token(tiny) * (length + new) + activation_bytes_per_token(tiny) * length + 4 * vocab * new
    assert auto_batch_size(tiny, length, free=10 * per, fraction=1.0) == 10
    assert auto_batch_size(tiny, length, free=int(10 * per / 0.8) + 1) == 10  # 80% of the free memory by default
    assert auto_batch_size(tiny, length, free=per - 1, fraction=1.0) == 1  # never below one
    assert auto_batch_size(tiny, length, free=10**15) == 64  # capped
    assert auto_batch_size(tiny, 2 * length, free=10 * per, fraction=1.0) < 10  # longer prompts, fewer of them
    assert auto_batch_size(tiny, length, free={"cpu": 10 * per}, fraction=1.0) == 10  # per device name
    assert auto_batch_size(tiny, 8) >= 1  # measured free memory of the CPU
    with pytest.raises(ValueError, match="length"):
        auto_batch_size(tiny, 0)
