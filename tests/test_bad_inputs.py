"""Bad inputs and faults, as a careless or hostile user would try them: each gets a clear message
naming the input and the fix, early (before any weights load), and leaves nothing behind. The
token's absence from every output is tested in test_secrets.py; loaders of published files in
test_published.py; --expected's merging and refusals in test_expected.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest




CLAIM = """
import pytest


@pytest.mark.claim("C-1")
def test_c(rh_model, record_verdict):
    pass
"""


def _leftovers(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Model folders a newcomer points --model at: a GPT-2 (a real tiny one written by
    save_pretrained, and its config.json alone) and a Mistral config.json without weights. Read
    once here, so that the transformers modules they need are imported before any pytester run."""
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig

    from rh.models import expected_shape, resolve_spec

    root = tmp_path_factory.mktemp("model_dirs")
    gpt2 = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=100)
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    gpt2.save_pretrained(root / "gpt2-config")
    MistralConfig(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, vocab_size=100).save_pretrained(root / "mistral-config")
    with pytest.raises(ValueError, match="GPT-2-style"):
        resolve_spec(str(root / "gpt2"))
    expected_shape(str(root / "mistral-config"))
    return {"gpt2": str(root / "gpt2"), "gpt2-config": str(root / "gpt2-config"),
            "mistral-config": str(root / "mistral-config")}


def _fill(args, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _one_line_error(err: str, message: str) -> None:
    """rh's subcommands fail in one line, ``error: <input>: <what is wrong and the fix>``."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write into: chmod 555, and where that does not stop it (root)
    the immutable attribute; skipped where neither can."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK):
            pytest.skip("this process can write into any folder (root without chattr +i)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


# --------------------------------------------------------------------------- pytest options and files


def _bad_files(tmp_path):
    (tmp_path / "truncated.json").write_text('{"verdicts": {"CA-1[k=2]": "inconc')
    (tmp_path / "noverdicts.json").write_text('{"model": "tiny-llama"}')
    (tmp_path / "list.json").write_text('["supported"]')
    (tmp_path / "a_file").write_text("")
    (tmp_path / "other.json").write_text('{"model": "smollm2-135m", "profile": "quick", "verdicts": {}}')


@pytest.mark.parametrize("args, message", [
    (["--expected", "{tmp}/truncated.json"], "not valid JSON"),
    (["--expected", "{tmp}/noverdicts.json"], 'a "verdicts" mapping'),
    (["--expected", "{tmp}/list.json"], 'a "verdicts" mapping'),
    (["--expected", "{tmp}/a_file/exp.json", "--update-expected"], "cannot be written"),
    (["--expected", "{tmp}/other.json", "--update-expected"], "is for model 'smollm2-135m'"),  # no clobbering
    (["--expected", "{tmp}/other.json"], "it cannot compare with that file"),
    (["--report-dir", "{tmp}/a_file/reports"], "is not a writable folder"),
    (["--alpha", "0"], "strictly between 0 and 1"),
    (["--alpha", "1.5"], "strictly between 0 and 1"),
    (["--alpha", "0.001"], "use an alpha above 0.04"),  # the fix a user can apply, not a field no option sets
    (["--rankings", "{tmp}/a_file"], "is empty"),
    (["--model", "{tmp}/emptymodel"], "config.json names no model_type"),
    (["--heads", "L0H1,L9H0"], "--heads: head L9H0 is outside the model"),
    (["--heads", "L0H1", "--rankings", "x.json"], "give one"),
    (["--per-layer", "2"], "--per-layer M needs --rankings"),
    (["--budget", "5"], "--budget plans from the token-layers"),
    (["--budget", "-1", "--expected", "x.json"], "positive number"),
    (["--budget", "inf", "--expected", "x.json"], "positive number"),
    (["--budget", "nan", "--expected", "x.json"], "positive number"),
    (["--budget", "0", "--expected", "x.json"], "positive number"),
    (["--ranking-cache", "{tmp}/a_file"], "--ranking-cache"),
    (["--ranking-cache", "{tmp}/a_file/rankings"], "a_file is a file, not a folder; choose another folder"),
    (["--update-expected"], "--update-expected needs --expected"),
    (["--plan", "--expected", "{tmp}/new.json", "--update-expected"], "--plan computes no verdict to record"),
    (["--expected", "nowhere.json"], "no such file"),
    (["--model", "smollm3"], "unknown model 'smollm3'"),
])
def test_a_bad_option_is_a_usage_error_before_anything_loads(pytester, args, message):
    tmp = pytester.path
    _bad_files(tmp)
    (tmp / "emptymodel").mkdir()
    (tmp / "emptymodel" / "config.json").write_text("{}")
    pytester.makepyfile(test_c=CLAIM)
    before = _leftovers(tmp)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider",
                                       *(a.replace("{tmp}", str(tmp)) for a in args))
    err = res.stderr.str()
    assert res.ret == 4, res.stdout.str()[-2000:] + err[-2000:]  # pytest's usage error
    assert message in err, err[-2000:]
    assert "Traceback" not in err and "loaded tiny-llama" not in res.stdout.str()
    assert _leftovers(tmp) == before  # no report, no cache, nothing written


def test_a_read_only_ranking_cache_is_a_usage_error_before_anything_loads(pytester, read_only):
    """Once a PermissionError in the first claim that read a ranking, after the model had loaded."""
    pytester.makepyfile(test_c=CLAIM)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider",
                                       "--ranking-cache", str(read_only / "rankings"))
    err = res.stderr.str()
    assert res.ret == 4 and f"--ranking-cache {read_only / 'rankings'}: {read_only} is a folder that cannot be " \
        "written; choose another folder" in err, err[-2000:]
    assert "Traceback" not in err and not (pytester.path / "reports").exists()


def test_two_reports_of_the_same_second_do_not_overwrite_each_other(tmp_path):
    from datetime import datetime

    from rh.report import report_stem, write_report

    stem = report_stem("tiny-llama", datetime(2026, 12, 1, 12, 0, 0))
    a = write_report([], {"run": 1}, tmp_path, stem)
    b = write_report([], {"run": 2}, tmp_path, stem)
    assert a[0] != b[0] and b[0].name == f"{stem}-2.json"
    assert json.loads(a[0].read_text())["meta"]["run"] == 1 and json.loads(b[0].read_text())["meta"]["run"] == 2


def test_a_random_models_rankings_stay_out_of_the_committed_folder(warm_imports, pytester):
    """An ini that caches rankings in fixtures/rankings (as this repository's does): tiny-llama's
    go to .rh/rankings instead."""
    pytester.makeini("[pytest]\nrh_ranking_cache = fixtures/rankings\n")
    pytester.makepyfile(test_r="""
        import pytest

        @pytest.mark.claim("R-1")
        def test_r(ranking):
            pass
        """)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider")
    assert res.ret == 0, res.stdout.str()
    assert not (pytester.path / "fixtures").exists()
    cached = list((pytester.path / ".rh" / "rankings").iterdir())
    assert any(p.name.startswith("tiny-llama-sum_attention-") for p in cached)
    assert not [p for p in cached if p.name.endswith(".lock")]  # no lock file beside the entries


# --------------------------------------------------------------------------- python -m rh identify


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n 0: give a positive whole number"),
    (["--batch-size", "0"], "--batch-size 0: give a positive whole number"),
    (["--out", "ranking.txt"], "saved as .json or .csv"),
    (["--out", "{tmp}/a_file/ranking.json"], "is not writable"),
    (["--task", "passkee"], "unknown task 'passkee'"),
    (["--cache", "{tmp}/a_file"], "--cache {tmp}/a_file: {tmp}/a_file is a file, not a folder; choose another"),
    (["--cache", "{tmp}/a_file/rankings"], "{tmp}/a_file is a file, not a folder"),
    (["--lengths", "128", "5"], "--lengths 128 5: length=5 tokens is too short for this prompt"),
    (["--lengths", "200000"], "--lengths 200000: length=200000 tokens needs"),
    (["--n", "100000000"], "--n 100000000: at 128 tokens the haystack has only"),
])
def test_identify_refuses_bad_input_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    import rh.models
    from rh.__main__ import main

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["identify", "--model", "tiny-llama", "--cache", str(tmp_path / "cache"), *_fill(args, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_error(err, _fill([message], tmp_path)[0])
    assert not (tmp_path / "cache").exists()


def test_identify_refuses_a_read_only_cache_before_the_model_loads(read_only, capsys, monkeypatch):
    """Once a raw PermissionError after the model had loaded and the samples were scored."""
    import rh.models
    from rh.__main__ import main

    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["identify", "--model", "tiny-llama", "--cache", str(read_only)])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, f"--cache {read_only}: {read_only} is a folder that cannot be written")


# --------------------------------------------------------------------------- python -m rh audit


@pytest.mark.parametrize("args, message", [
    # once: 83 s of passes, then NotADirectoryError and no report
    (["--report-dir", "{tmp}/a_file/reports"], "--report-dir {tmp}/a_file/reports: {tmp}/a_file is not a writable"),
    (["--k", "0"], "--k 0: give positive whole numbers"),
    (["--length", "5"], "--length 5: length=5 tokens is too short for this prompt"),  # once after loading
    (["--n", "100000000"], "--n 100000000: at 128 tokens the haystack has only"),  # once accepted, no cost said
    (["{tmp}/bad.yaml"], "bad.yaml' is not valid YAML (expected the node content, but found '<stream end>' at line 1"),
    # once ignored: a head set has one K, its size, and no per-layer order (as pytest refuses --heads --per-layer)
    (["--k", "2", "4"], "--k 2 4 sets the K levels of a ranking, and --heads L0H1 is a head set with one K, its "
                        "size: drop --k"),
    (["--per-layer", "2"], "--per-layer 2 needs a per-layer {layer: [heads]} file (PATH), and --heads L0H1 is a head "
                           "set: drop --per-layer"),
])
def test_audit_refuses_bad_input_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    import rh.models
    from rh.__main__ import main

    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.yaml").write_text("[[\n")
    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    given = _fill(args, tmp_path)
    rc = main(["audit", *([] if given[0].endswith(".yaml") else ["--heads", "L0H1"]), "--model", "tiny-llama",
               "--report-dir", str(tmp_path / "reports"), *given])
    out, err = capsys.readouterr()
    assert rc == 2
    _one_line_error(err, _fill([message], tmp_path)[0])
    assert "audit plan" not in out and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("args, message", [
    (["{tmp}/set.json", "--k", "2"], "--k 2: every input is a head set, with one K each (its size), and no ranking "
                                     "for --k to cut: drop --k"),
    (["{tmp}/set.json", "--per-layer", "2"], "--per-layer 2: no input is a per-layer {layer: [heads]} file, so it "
                                             "would change nothing: drop --per-layer"),
])
def test_audit_refuses_an_option_no_input_can_use(tmp_path, capsys, monkeypatch, args, message):
    """Head-set files alone: --k and --per-layer were silently ignored, as beside --heads alone."""
    import rh.models
    from rh.__main__ import main

    (tmp_path / "set.json").write_text('["L0H1", "L2H3"]')
    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["audit", *_fill(args, tmp_path), "--model", "tiny-llama", "--report-dir", str(tmp_path / "reports")])
    out, err = capsys.readouterr()
    assert rc == 2
    _one_line_error(err, message)
    assert "audit plan" not in out and not (tmp_path / "reports").exists()


def test_audit_states_the_cost_of_a_large_n_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A large --n the haystack can give is run, its forward passes and token-layers said first."""
    import rh.models
    from rh.__main__ import main

    def stop(*a, **k):
        raise ValueError("stopped where the weights would load")

    monkeypatch.setattr(rh.models, "load_model", stop)
    rc = main(["audit", "--heads", "L0H1", "--model", "tiny-llama", "--n", "100000",
               "--report-dir", str(tmp_path / "reports")])
    out, err = capsys.readouterr()
    assert rc == 2 and "stopped where the weights would load" in err
    # 100,000 prompts at each of 3 depths; each pass 128 tokens through 4 layers
    assert out.startswith("audit plan: 300,000 prompts x 51 conditions = up to 15,300,000 forward passes, about "
                          "7,833,600,000 token-layers"), out


# --------------------------------------------------------------------------- model folders, under pytest and rh


@pytest.mark.parametrize("folder, message", [
    ("gpt2", "GPT2LMHeadModel (model_type 'gpt2') is a GPT-2-style layout (fused c_attn / dense projections"),
    ("gpt2-config", "model_type 'gpt2') is a GPT-2-style layout (fused c_attn / dense projections"),
    ("mistral-config", "has a config.json (model_type 'mistral') but no weights (*.safetensors, *.bin)"),
])
def test_a_model_folder_rh_cannot_run_is_refused_alike_by_pytest_identify_and_audit(model_dirs, pytester, capsys,
                                                                                    monkeypatch, folder, message):
    """A saved tiny GPT-2 was refused ("Llama-style only") only after its weights had loaded, its
    config.json alone with transformers' misleading errors; a Mistral config.json without weights
    (Mistral is a supported family) failed each claim after collection. Now each is named before
    anything loads, the folder and the fix in one line: the same line under pytest and rh."""
    import rh.models
    from rh.__main__ import main

    path = model_dirs[folder]
    pytester.makepyfile(test_c=CLAIM)
    res = pytester.runpytest_inprocess("--model", path, "-p", "no:cacheprovider")
    err = res.stderr.str()
    assert res.ret == 4 and f"ERROR: --model: model directory '{path}'" in err and message in err, err[-2000:]
    assert "rh supports decoder-only causal LMs with Llama's layout" in err or "weights included" in err
    assert not (pytester.path / "reports").exists()
    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    for cmd in (["identify", "--cache", str(pytester.path / "cache")],
                ["audit", "--heads", "L0H1", "--report-dir", str(pytester.path / "reports")]):
        assert main([*cmd, "--model", path]) == 2
        _one_line_error(capsys.readouterr().err, f"error: model directory '{path}'")
    assert not (pytester.path / "cache").exists() and not (pytester.path / "reports").exists()


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A saved Llama (the tiny model's 4 x 8 heads, weights and the bundled tokenizer) whose config
    says max_position_embeddings 256."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rh.models import bundled_tokenizer

    path = tmp_path_factory.mktemp("models") / "ctx256"
    tok = bundled_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("cmd, message", [
    (["audit", "--heads", "L0H1", "--length", "512"],
     "--length 512: length=512 plus the 4-token answer exceeds the model's maximum of 256 positions; use a length of "
     "at most 252"),
    (["identify", "--lengths", "128", "512"],
     "--lengths 128 512: length=512 plus the 4-token answer exceeds the model's maximum of 256 positions; use a "
     "length of at most 252"),
    (["identify", "--profile", "full"],  # the tiny full profile's 128 and 256 tokens: 256 leaves no room for the answer
     "the full profile's lengths 128 256 (no --lengths given): length=256 plus the 4-token answer exceeds the "
     "model's maximum of 256 positions; use a length of at most 252 (give it with --lengths)"),
])
def test_a_length_beyond_the_models_context_is_refused_before_the_weights_load(short_context_model, tmp_path, capsys,
                                                                              monkeypatch, cmd, message):
    """Once refused only after the weights had loaded (build_samples with the loaded model's
    max_positions). The local folder's config.json gives the context without loading."""
    import rh.models
    from rh.__main__ import main

    monkeypatch.setattr(rh.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    where = ["--report-dir", str(tmp_path / "reports")] if cmd[0] == "audit" else ["--cache", str(tmp_path / "cache")]
    assert main([*cmd, "--model", short_context_model, *where]) == 2
    _one_line_error(capsys.readouterr().err, message)
    assert not any(tmp_path.iterdir())


def test_a_profile_whose_prompts_exceed_the_context_is_a_usage_error_under_pytest(short_context_model, pytester):
    """pytest claims/ with a profile whose lengths (the full profile's 256) leave no room for the answer
    in a 256-position context: refused at configure time, before collection and the weights; the
    quick profile (128, and ID-3's 160) is collected as before (the full one's longest is ID-3's 384)."""
    pytester.makepyfile(test_claims="def test_x():\n    pass\n")
    res = pytester.runpytest_inprocess("--model", short_context_model, "--profile", "full", "--collect-only",
                                       "-p", "no:cacheprovider")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    err = res.stderr.str()
    assert "--profile full: its ID-3's stability length 384 does not fit" in err and "context of 256 positions" in err, err
    ok = pytester.runpytest_inprocess("--model", short_context_model, "--profile", "quick", "--collect-only",
                                      "-p", "no:cacheprovider")
    assert ok.ret == pytest.ExitCode.OK, ok.stdout.str()[-2000:]


def test_the_context_is_known_before_loading_where_the_config_is(tiny, short_context_model):
    from rh.models import known_context

    assert known_context("tiny-llama") == tiny.max_positions == 4096  # the registry's
    assert known_context(short_context_model) == 256  # the folder's config.json
    assert known_context("nobody-we-know/no-such-model") is None  # a download: the check after loading stays


# --------------------------------------------------------------------------- head files saved with a byte-order mark


_BOM = b"\xef\xbb\xbf"


def _head_files(shape):
    from rh.heads import Head
    from rh.rankings import Ranking

    every = [(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    ranking = Ranking("hand", shape, {Head(l, h): float((7 * l + 3 * h) % 11) for l, h in every})
    return {
        "qrhead.json": json.dumps([[f"{l}-{h}", float((5 * l + h) % 13)] for l, h in every]),
        "heads.json": json.dumps(["L0H1", "L2H3"]),
        "razor.json": json.dumps({"1": [3, 0], "3": [7]}),
        "qrhead_set.txt": "2-5,1-3,0-7",
        "qrhead_config.yaml": 'model_name_or_path: meta-llama/Llama-3.1-8B-Instruct\nattn_head_set: "2-5,1-3,"\n',
        "full_attention_heads.tsv": "0.9\t0.1\n0.2\t0.7\n0.0\t0.3\n0.5\t0.4\n",
        "rh.json": json.dumps(ranking.to_json()),
        "rh.csv": ranking.to_csv(),
        "wu24.json": json.dumps({f"{l}-{h}": [float((l + 2 * h) % 5)] for l, h in every}),
    }


@pytest.mark.parametrize("name", [
    "qrhead.json", "heads.json", "razor.json", "qrhead_set.txt", "qrhead_config.yaml", "full_attention_heads.tsv",
    "rh.json", "rh.csv", "wu24.json",
])
def test_a_head_file_saved_with_a_byte_order_mark_loads_the_same_heads(tmp_path, name):
    """Windows editors write a UTF-8 byte-order mark: the file was refused as "neither JSON nor a
    head-set string" (a TSV's first gate as "not a number"). --rankings and rh audit read through
    load_heads, so both take it now."""
    from rh.heads import HeadShape
    from rh.published import load_heads

    shape = HeadShape(4, 8, 2, 8)
    text = _head_files(shape)[name]
    plain, marked = tmp_path / "plain", tmp_path / "bom"
    plain.mkdir(), marked.mkdir()
    (plain / name).write_bytes(text.encode())
    (marked / name).write_bytes(_BOM + text.encode())
    a, b = load_heads(plain / name, shape=shape), load_heads(marked / name, shape=shape)
    assert type(a) is type(b)
    assert getattr(b, "heads", getattr(b, "members", None)) == getattr(a, "heads", getattr(a, "members", None))
    assert getattr(b, "scores", None) == getattr(a, "scores", None)
    assert b.provenance.get("named_model") == a.provenance.get("named_model")


def test_rh_audit_takes_a_head_file_with_a_byte_order_mark(tmp_path, capsys, monkeypatch):
    import rh.models
    from rh.__main__ import main

    (tmp_path / "qrhead_set.txt").write_bytes(_BOM + b"2-5,1-3,0-7")

    def stop(*a, **k):
        raise ValueError("stopped where the weights would load")

    monkeypatch.setattr(rh.models, "load_model", stop)
    rc = main(["audit", str(tmp_path / "qrhead_set.txt"), "--model", "tiny-llama",
               "--report-dir", str(tmp_path / "reports")])
    out, err = capsys.readouterr()
    assert rc == 2 and "stopped where the weights would load" in err and out.startswith("audit plan:"), err


# --------------------------------------------------------------------------- library messages


def test_a_ranking_csv_without_its_columns_names_them(tmp_path):
    from rh.rankings import load_ranking

    p = tmp_path / "r.csv"
    p.write_text("lyr,head,score\n0,0,1.0\n")
    with pytest.raises(ValueError, match=r"r.csv.*no 'layer' column \(a ranking CSV has the header"):
        load_ranking(p)


def test_a_binary_ranking_file_is_named(tmp_path):
    from rh.rankings import load_ranking

    p = tmp_path / "r.json"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"r.json.*is not a text file"):
        load_ranking(p)


def test_a_truncated_cache_entry_says_to_recompute(tmp_path):
    from rh.heads import HeadShape
    from rh.rankings import cache_path, cached_ranking

    shape = HeadShape(4, 8, 2, 16)
    prov = {"model_id": "tiny", "method": "sum_attention"}
    path = cache_path(tmp_path, prov)
    path.write_text('{"format": "rh.ranking/1", "heads": [')
    with pytest.raises(ValueError, match="rerun with --recompute"):
        cached_ranking(tmp_path, prov, lambda: pytest.fail("not recomputed"), shape=shape)


def test_truncated_per_sample_scores_say_so_and_name_the_file(tmp_path):
    from rh.pipeline import load_sample_scores, samples_path

    ranking = tmp_path / "r.json"
    npz = samples_path(ranking)
    buf = tmp_path / "full.npz"
    np.savez_compressed(buf, method=np.array("sum_attention"), ids=np.array(["a"]), scores=np.zeros((1, 4)),
                        counted=np.ones(1, bool))
    npz.write_bytes(buf.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"r.samples.npz.*unreadable.*--recompute"):
        load_sample_scores(ranking)


_HOLD = """
import sys, time
from rh.io import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(path):
    """A process holding the lock at ``path`` (as a run computing that ranking does)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_the_ranking_cache_leaves_no_lock_file_behind(tmp_path):
    """filelock kept a .locks/<entry>.lock per entry after every run, finished or killed. Now a
    finished run removes its own (a claim that raised too), and the next one removes those of a
    killed run, never one a live run holds."""
    from rh.heads import Head, HeadShape
    from rh.rankings import Ranking, cached_ranking

    shape = HeadShape(1, 2, 1, 4)
    ranking = Ranking("hand", shape, {Head(0, 0): 1.0, Head(0, 1): 0.5})
    prov = {"model_id": "tiny", "method": "hand"}
    _, path, hit = cached_ranking(tmp_path, prov, lambda: ranking, shape=shape)
    assert not hit and _leftovers(tmp_path) == [path.name]
    assert cached_ranking(tmp_path, prov, lambda: pytest.fail("not recomputed"), shape=shape)[2]
    with pytest.raises(RuntimeError, match="boom"):
        cached_ranking(tmp_path, {**prov, "model_id": "other"}, lambda: (_ for _ in ()).throw(RuntimeError("boom")),
                       shape=shape)
    assert _leftovers(tmp_path) == [path.name]

    locks = tmp_path / ".locks"
    killed, live = _holder(locks / "killed.json.lock"), _holder(locks / "live.json.lock")
    try:
        killed.kill()
        killed.wait()
        assert (locks / "killed.json.lock").exists()  # SIGKILL: nothing in the process could remove it
        cached_ranking(tmp_path, prov, lambda: pytest.fail("not recomputed"), shape=shape)
        assert _leftovers(tmp_path) == [".locks", ".locks/live.json.lock", path.name]
    finally:
        live.kill()
        live.wait()
    cached_ranking(tmp_path, prov, lambda: pytest.fail("not recomputed"), shape=shape)
    assert _leftovers(tmp_path) == [path.name]


def test_a_lock_waited_on_while_its_holder_removes_it_is_still_exclusive(tmp_path):
    """The holder removes the lock file on release while others wait on it: each waiter takes the
    lock on the file then at the path, so no two are ever inside together."""
    import threading

    from rh.io import file_lock

    lock, inside, overlaps = tmp_path / ".locks" / "e.lock", [0], []

    def worker():
        for _ in range(50):
            with file_lock(lock):
                inside[0] += 1
                overlaps.append(inside[0] > 1)
                inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 200 and not any(overlaps)
    assert not tmp_path.joinpath(".locks").exists()


def test_a_supported_or_refuted_verdict_is_never_flagged_underpowered():
    """Low power is why an inconclusive verdict may have ended so; a decided verdict's test
    rejected, whatever the power on the other side."""
    from rh.report.html import render_html

    low = {"claim": "CA-6", "effect": 0.3, "ci": [0.2, 0.4], "ci_level": 0.9, "n": 16, "alpha": 0.05,
           "params": {}, "min_effect": 0.2, "reason": "", "power": {"support": 0.37, "support_at": 0.3,
                                                                     "refute": 0.03, "refute_at": 0.0}}
    meta = {"model": "tiny-llama", "profile": "quick"}
    for status in ("supported", "refuted"):
        page = render_html([{**low, "status": status}], meta)
        assert "power support 0.37 / refute 0.03" in page and "underpowered" not in page, status
    assert "underpowered at these sizes" in render_html([{**low, "status": "inconclusive"}], meta)


def test_ablate_given_one_string_says_to_pass_a_list(tiny):
    from rh.ablation import ablate

    with pytest.raises(ValueError, match=r"heads='L0H1' is one string: pass a list of heads, e.g. \['L0H1'\]"):
        with ablate(tiny, "L0H1"):
            pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.model.modules())  # no hook left


def test_no_orphan_scores_when_wu24_finds_no_passing_sample(tiny, tiny_samples, tmp_path, monkeypatch):
    """A random model retrieves nothing: the Wu24 identification refuses, leaves no scores file,
    and remembers the refusal so the next run does not score the samples again."""
    import rh.pipeline
    from rh.niah import Sweep
    from rh.pipeline import cached_identification, ranking_provenance

    sweep = Sweep((128,), (0.0, 0.5, 1.0), 2, ("passkey",), 1)
    prov = ranking_provenance(tiny, sweep, "wu24", tiny_samples, identify_frac=1.0, split_seed=0)
    with pytest.raises(ValueError, match="no sample passed"):
        cached_identification(tiny, tiny_samples, prov, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob("*.partial.json"))
    [refused] = tmp_path.glob("*.refused.json")
    monkeypatch.setattr(rh.pipeline, "score_samples", lambda *a, **k: pytest.fail("scored again"))
    with pytest.raises(ValueError, match="no sample passed.*--recompute scores the samples again"):
        cached_identification(tiny, tiny_samples, prov, cache_dir=tmp_path, progress=False)


def test_error_rows_keep_their_parameters(pytester):
    """A claim in error at every K: one row per K in the report (the keys do not collapse)."""
    pytester.makepyfile(test_e="""
        import pytest

        @pytest.mark.claim("E-1")
        def test_e(ablation_k):
            raise RuntimeError("boom")
        """)
    res = pytester.runpytest_inprocess("--model", "tiny-llama", "-p", "no:cacheprovider")
    assert res.ret == 1
    [report] = (pytester.path / "reports").glob("tiny-llama-*.json")
    rows = json.loads(report.read_text())["verdicts"]
    assert sorted(r["key"] for r in rows) == ["E-1[test_e.py::test_e[K=2]]", "E-1[test_e.py::test_e[K=4]]"]
    assert {r["status"] for r in rows} == {"error"} and all("boom" in r["reason"] for r in rows)
