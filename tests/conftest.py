"""Shared fixtures for the unit tests: the tiny random Llama (fp32, GQA) and samples for it; and the
two tiers.

Tiers: every test under ``tests/`` is either ``slow`` (marked so: end-to-end catalogue runs in a
subprocess, calibration at the profiles' real sizes, the notebook) or ``unit`` (everything else,
marked here, so a module never has to say it). ``pytest -m unit`` is the quick check a contributor
runs after every change; CI runs ``-m slow`` once after it.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]


def pytest_configure(config):
    """Under ``pytest -n`` each worker computes with one torch thread (and so do its subprocesses):
    workers that share the cores would otherwise spin-wait on each other's intra-op threads."""
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test of this folder that is not ``slow`` as ``unit``."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny():
    """Random Llama, 4 layers x 8 query heads, 2 KV heads (groups of 4), fp32, sdpa."""
    from rh.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def warm_imports(tiny):
    """Pytester's in-process run drops the modules first imported after it started (torch's and
    transformers' cannot be imported twice, nor can transformers' lazy model classes): import what a
    claim run uses before (the tiny model's build imports the Llama classes)."""
    import rh.expected
    import rh.pipeline
    import rh.plan
    import rh.published
    import rh.pytest_plugin  # noqa: F401
    import matplotlib.pyplot  # noqa: F401  (the report's figures: matplotlib's state cannot be imported twice)
    import rh.report.figures  # noqa: F401
    import rh.report.html  # noqa: F401

    rh.plan.calibrate_config(rh.plan.model_config("tiny-llama"), batch_size=1, length=8, repeats=1)


@pytest.fixture(scope="session")
def tiny_eager():
    """The same weights as ``tiny`` (same seed), with eager attention."""
    from rh.models import tiny_llama

    return tiny_llama(seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_samples(tiny):
    """Passkey prompts of 128 tokens at three depths for the tiny model."""
    from rh.niah import build_passkey_samples

    return build_passkey_samples(tiny.tokenizer, lengths=[128], depths=[0.0, 0.5, 1.0], n_per_setting=2, seed=1,
                                 max_positions=tiny.max_positions)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """``tiny_llama()`` (fp32) written by save_pretrained, tokenizer included: a local model
    directory like a user's own."""
    path = tmp_path_factory.mktemp("models") / "tiny-saved"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ends_sentence(tok):
    """Whether a token's text ends a sentence (., ! or ?, trailing whitespace ignored), under the
    module's ``tok``: an independent reading of where rh may splice a needle."""
    memo: dict[int, bool] = {}

    def ends(token_id: int) -> bool:
        token_id = int(token_id)
        if token_id not in memo:
            memo[token_id] = tok.decode([token_id]).rstrip().endswith((".", "!", "?"))
        return memo[token_id]

    return ends
