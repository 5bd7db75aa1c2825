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


def _resident_bytes() -> int:
    """This process's resident set now, from /proc/self/statm (pages), not from /proc/self/status."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_peak_memory_is_this_processs_peak_resident_set_in_bytes():
    """The peak is in bytes (not KiB), at least what is resident now, and it rises by what a touched
    buffer adds: a wrong unit or another process's figure fails."""
    import numpy as np

    from rh.memory import peak_memory

    before = peak_memory()["rss_peak_bytes"]
    assert before >= _resident_bytes() * 0.99
    size = 256 * 2**20 + before  # beyond the peak so far, so the peak must move
    buf = np.ones(size // 8)  # touched: resident
    after = peak_memory()["rss_peak_bytes"]
    assert after >= _resident_bytes() * 0.99
    assert after >= size * 0.95
    del buf
    # a peak does not fall when memory is freed (Linux's per-CPU RSS counters may lag by a few pages)
    assert peak_memory()["rss_peak_bytes"] >= after - 4 * 2**20


def test_the_memory_line_gives_each_process_its_peak_and_cache():
    from rh.report.format import memory_text

    line = memory_text({"process": {"rss_peak_bytes": 12_200_000_000},
                        "replicas": [{"pid": 7, "rss_peak_bytes": 1_460_000_000, "prefix_cache_peak_bytes": 310 * 2**20,
                                      "prefix_cache_max_bytes": 2048 * 2**20,
                                      "cuda_peak_bytes": {"cuda:0": 40_000_000_000}},
                                     {"error": "replica 1 did not report its memory (GetTimeoutError)"}]})
    assert line == ("peak in this process: 12.20 GB resident; replica 0: 1.46 GB resident, GPU tensors cuda:0 40.00 GB, "
                    "prefix cache at most 310 MiB of its 2,048 MiB cap; replica 1 did not report its memory "
                    "(GetTimeoutError)")
    assert memory_text(None) == "" and memory_text({}) == ""
