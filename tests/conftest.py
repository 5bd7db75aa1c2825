"""Shared fixtures for the unit tests: the tiny random Llama (fp32, GQA) and samples for it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny():
    """Random Llama, 4 layers x 8 query heads, 2 KV heads (groups of 4), fp32, sdpa."""
    from rh.models import tiny_llama

    return tiny_llama(seed=0)


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
