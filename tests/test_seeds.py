"""rh.seeds: one seed function and one table of prompt streams, and the profile's fresh prompts."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from rh.heads import HeadShape
from rh.profiles import get_profile
from rh.seeds import PROMPT_STREAMS, derive_seed, prompt_seed



def _polynomial(*parts: int) -> int:
    """The integer hash CA-1's random K-sets were always drawn with (rh.causal.hash_seed until #18)."""
    out = 0
    for p in parts:
        out = (out * 1_000_003 + p) % (2**63 - 1)
    return out


def test_integer_parts_give_the_seeds_the_committed_verdicts_were_drawn_with():
    for parts in [(0,), (0, 10, 3), (7, 20, 48, 7), (2**40, 5), (123, 0, 0, 0)]:
        assert derive_seed(*parts) == _polynomial(*parts)
    assert derive_seed(np.int64(5), np.int32(2)) == _polynomial(5, 2)


def test_strings_enter_by_their_hash_and_differ_from_the_integer():
    assert derive_seed(0, "7") != derive_seed(0, 7)
    assert derive_seed(0, "passkey-512-0.5-3", 4) != derive_seed(0, "passkey-512-0.5-4", 4)
    assert 0 <= derive_seed(1, "a", "non-hub") < 2**63 - 1


def test_seeds_do_not_depend_on_the_process():
    """Python salts str hashes per process; derive_seed must not."""
    code = "from rh.seeds import derive_seed; print(derive_seed(3, 'sample-1', 'non-hub'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(other.stdout) == derive_seed(3, "sample-1", "non-hub")


@pytest.mark.parametrize("bad", [1.5, None, (1, 2), True])
def test_parts_that_are_not_ints_or_strings_are_refused(bad):
    with pytest.raises(TypeError, match="must be an int or a str"):
        derive_seed(0, bad)


def test_prompt_streams_never_share_a_seed():
    offsets = list(PROMPT_STREAMS.values())
    assert len(set(offsets)) == len(offsets) and 0 not in offsets  # 0: the identification prompts
    assert prompt_seed(5, "depth") == 5 + PROMPT_STREAMS["depth"]
    with pytest.raises(ValueError, match="unknown prompt stream 'dept'.*depth"):
        prompt_seed(0, "dept")


def test_fresh_sweep_is_the_first_length_at_the_stream_s_seed():
    prof = get_profile("quick", HeadShape(30, 9, 3, 64))
    got = prof.fresh_sweep("tasks", 8, prof.id_tasks)
    want = replace(prof.sweep(), lengths=prof.lengths[:1], tasks=tuple(prof.id_tasks), n_per_setting=8,
                   seed=prof.sample_seed + PROMPT_STREAMS["tasks"])
    assert got == want
    assert prof.fresh_sweep("depth", 40).tasks == prof.tasks  # CA-1's tasks by default


def test_profiles_are_built_by_keyword():
    prof = get_profile("quick", HeadShape(30, 9, 3, 64))
    with pytest.raises(TypeError):
        type(prof)("quick", (512,), (0.0,), 16, (10,), 49)


@pytest.mark.parametrize("shape", [HeadShape(4, 8, 2, 8), HeadShape(30, 9, 3, 64), HeadShape(32, 32, 8, 128),
                                   HeadShape(80, 64, 8, 128)])
def test_the_smoke_profile_is_quick_cut_down_and_valid_for_every_size(shape):
    """``--profile smoke``: every claim still runs (the same fields, every check of get_profile
    passes), on fewer and shorter prompts than quick's, with one K level."""
    from rh.profiles import PROFILES

    assert PROFILES == ("smoke", "quick", "full")
    smoke, quick = get_profile("smoke", shape), get_profile("quick", shape)
    assert smoke.name == "smoke" and smoke.lengths[0] <= min(quick.lengths[0], 256)
    assert smoke.ablation_levels == quick.ablation_levels[:1]
    for field in ("n_per_setting", "depth_n", "task_n", "inverse_n", "iv_n", "probe_n", "ig_n", "distractor_n",
                  "content_free_n"):
        assert getattr(smoke, field) <= getattr(quick, field), field
    if shape.n_total >= 100:  # the tiny class's quick profile is already about this small
        assert len(smoke.depths) * smoke.n_per_setting < len(quick.depths) * quick.n_per_setting
    with pytest.raises(ValueError, match="smoke, quick, full"):
        get_profile("tiny", shape)
