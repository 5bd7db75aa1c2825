"""``python -m rh identify`` and ``python -m rh niah`` on the tiny model, in process."""

from __future__ import annotations

import re

import pytest

from rh.__main__ import main
from rh.rankings import load_ranking


SMALL = ["--model", "tiny-llama", "--lengths", "128", "--depths", "0.5", "--n", "3"]


def test_identify_writes_the_ranking_prints_top_heads_and_reuses_the_cache(tmp_path, capsys):
    args = ["identify", *SMALL, "--task", "passkey", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "r.csv"), "--figures", str(tmp_path / "fig"), "--top", "5", "--split", "all"]
    assert main(args) == 0
    out = capsys.readouterr().out
    r = load_ranking(tmp_path / "r.csv")
    printed = re.findall(r"^\s+\d+\s+(L\d+H\d+)\s", out, re.M)
    assert printed == [str(h) for h in r.top(5)]
    assert "(computed)" in out and (tmp_path / "fig" / "tiny-llama-sum_attention-all-heads.png").stat().st_size > 1000
    assert r.provenance["n_samples"] == 3 and r.provenance["identify_frac"] == 1.0
    assert main(args) == 0
    assert "(cached)" in capsys.readouterr().out


def test_identify_per_task_prints_the_general_heads(tmp_path, capsys):
    args = ["identify", *SMALL, "--task", "passkey", "--task", "inc_state", "--per-task", "--top", "8",
            "--cache", str(tmp_path), "--split", "all", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    per = {t: load_ranking(tmp_path / "out" / f"tiny-llama-sum_attention-{t}.json") for t in ("passkey", "inc_state")}
    expected = set(per["passkey"].top(8)) & set(per["inc_state"].top(8))
    line = re.search(r"general heads \(in every task's top 8\): (.*)", out).group(1)
    assert set(line.split(", ")) - {"none"} == {str(h) for h in expected}


def test_bad_input_is_an_error_message_not_a_traceback(capsys):
    assert main(["identify", "--model", "tiny-llama", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["niah", "--task", "passkey", "--length", "20"]) == 2
    assert "too short" in capsys.readouterr().err


def test_the_model_options_are_the_same_in_pytest_identify_and_audit(pytestconfig):
    """One declaration (rh.options) serves the plugin and both subcommands: each knows --max-memory,
    and each refuses a dtype outside the same choices."""
    import argparse

    from rh.audit import add_arguments
    from rh.options import DTYPES

    audit = argparse.ArgumentParser()
    add_arguments(audit)
    args = audit.parse_args(["--heads", "L0H1", "--max-memory", "70GiB", "--dtype", "bf16"])
    assert (args.max_memory, args.dtype, args.model) == ("70GiB", "bf16", "smollm2-135m")
    with pytest.raises(SystemExit):
        audit.parse_args(["--heads", "L0H1", "--dtype", "float64"])
    with pytest.raises(SystemExit):
        main(["identify", "--dtype", "float64"])
    plugin = {o.names()[0]: o for o in pytestconfig._parser.getgroup("rh").options}
    assert tuple(plugin["--dtype"].attrs()["choices"]) == DTYPES and "--max-memory" in plugin
