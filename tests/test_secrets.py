"""The Hugging Face token never reaches any output: a fake token in the environment and in a
``.env`` file, every loading failure path (gated, not found, offline: mocked, and the real hub
call of this machine), and a search of stdout, stderr and every file the run wrote."""

from __future__ import annotations

import pytest


TOKEN = "hf_" + "Zq7xW" * 7  # 38 characters, the shape of a real token

# A plugin for the pytest run under test: transformers' loaders fail the way the hub client does,
# from inside a frame that has the token among its arguments (as huggingface_hub's calls do).
FAKEHUB = '''
import os

import transformers

import rh.models

MODE = os.environ["FAKEHUB_MODE"]
TEXT = {
    "gated": "You are trying to access a gated repo. Make sure to have access to it.",
    "notfound": "401 Client Error. Repository Not Found: is not a valid model identifier",
    "offline": "We couldn't connect to 'https://huggingface.co' to load the files",
    "other": "something else went wrong",
}


class GatedRepoError(Exception):  # named as huggingface_hub's errors are: rh reads the chain's names
    pass


class RepositoryNotFoundError(Exception):
    pass


class LocalEntryNotFoundError(Exception):
    pass


CAUSE = {"gated": GatedRepoError, "notfound": RepositoryNotFoundError, "offline": LocalEntryNotFoundError,
         "other": RuntimeError}


def hub_request(url, token, headers):
    raise CAUSE[MODE]("bad header" if MODE == "other" else f"request to {url} failed")


def fail(source, *args, token=None, **kwargs):
    try:
        hub_request(f"https://huggingface.co/{source}/resolve/main/config.json", token,
                    {"authorization": f"Bearer {token}"})
    except Exception as exc:
        raise OSError(TEXT[MODE]) from exc


if MODE != "real":
    rh.models.hub_reachable = lambda timeout=3.0: True  # the failure comes from the (fake) hub itself
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        cls.from_pretrained = fail
'''

CLAIM = '''
import pytest


@pytest.mark.claim("T-1")
def test_needs_the_model(rh_model):
    pass
'''


MODES = ["gated", "notfound", "offline", "other", "real"]
# every mode for a model whose config is fetched before collection and for one the registry knows
# (it fails when its weights load), the token in the environment or in .env alternately
CASES = [(mode, model, ("environment", ".env")[(i + j) % 2])
         for j, model in enumerate(["meta-llama/Llama-3.2-1B", "llama70b"]) for i, mode in enumerate(MODES)]


# the first case in the unit tier, the matrix in the slow tier (a subprocess each, 4-7 s)
@pytest.mark.parametrize("mode, model, where", [pytest.param(*c, marks=[pytest.mark.slow] if i else [])
                                                for i, c in enumerate(CASES)])
def test_the_token_is_in_no_output_of_any_loading_failure(pytester, monkeypatch, where, model, mode):
    pytester.makepyfile(fakehub=FAKEHUB, test_claim=CLAIM)
    monkeypatch.setenv("FAKEHUB_MODE", mode)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if where == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        (pytester.path / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    res = pytester.runpytest_subprocess("-p", "fakehub", "--model", model, "--tb=long", "--showlocals",
                                        "-p", "no:cacheprovider")
    out = res.stdout.str() + res.stderr.str()
    assert res.ret != 0, out
    assert TOKEN not in out and TOKEN[3:20] not in out
    for f in pytester.path.rglob("*"):
        if f.is_file() and f.name != ".env":
            assert TOKEN not in f.read_text(errors="replace"), f
    expected = {"gated": "is gated", "notfound": "was not found on the Hugging Face hub",
                "offline": "the hub cannot be reached", "other": "something else went wrong",
                "real": "Llama"}[mode]
    assert expected in out, out[-3000:]
    assert "Retrying in" not in out  # no storm of hub retries before the message


def test_the_token_has_a_hidden_repr(monkeypatch):
    from rh.models import hf_token

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    tok = hf_token()
    assert tok == TOKEN and f"Bearer {tok}" == f"Bearer {TOKEN}"  # used as itself
    assert TOKEN not in repr(tok) and TOKEN not in repr({"token": tok}) and TOKEN not in repr([tok])
