"""Loaders for published head files (rh.published): each format read into a ranking or a head set,
in order and with scores where the format has them, and every malformed file refused with a
message naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rh.heads import Head, HeadShape
from rh.published import HeadSet, HeadSetHasNoOrder, load_heads, parse_head_set, ties_at_cut
from rh.rankings import Ranking


SHAPE = HeadShape(4, 8, 2, 16)  # the tiny Llama: 4 layers x 8 query heads, 2 KV heads (groups of 4)


def _write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def _qrhead_rows(seed=0):
    """QRHead's detection output: every head with a score, best first (as its score_heads sorts)."""
    rng = np.random.default_rng(seed)
    rows = [(f"{l}-{h}", float(rng.random())) for l in range(4) for h in range(8)]
    return sorted(rows, key=lambda r: r[1], reverse=True)


# --------------------------------------------------------------------------- QRHead


def test_qrhead_scores_load_as_a_ranking_in_the_files_order(tmp_path):
    rows = _qrhead_rows()
    r = load_heads(_write(tmp_path, "qr.json", rows), shape=SHAPE)
    assert isinstance(r, Ranking) and r.method == "qrhead"
    assert [str(h) for h in r.heads] == [f"L{k.split('-')[0]}H{k.split('-')[1]}" for k, _ in rows]
    assert r.scores[Head(*map(int, rows[0][0].split("-")))] == rows[0][1]
    assert r.provenance["source_format"] == "qrhead"


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[:-3], "scores 29 heads, but the model has 32"),
    (lambda rows: rows[:-1] + [rows[0]], "listed twice"),
    (lambda rows: [["x-1", 0.5]] + rows[1:], "row 1 ('x-1') is not a head"),
    (lambda rows: [["9-0", 0.5]] + rows[1:], "outside the model"),
    (lambda rows: rows[:1] + [[rows[1][0], "high"]] + rows[2:], "row 2 (["),
])
def test_a_bad_qrhead_file_is_refused_naming_it(tmp_path, mutate, message):
    path = _write(tmp_path, "qr.json", mutate(_qrhead_rows()))
    with pytest.raises(ValueError) as err:
        load_heads(path, shape=SHAPE)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name, content", [
    ("set.json", json.dumps("2-5,1-3,,,0-7")),  # a JSON string; empty items as in QRHead's configs
    ("set.txt", "2-5,1-3,0-7\n"),  # a bare string in a text file
    ("config.yaml", 'attn_head_set: "2-5,1-3,0-7" # top3\nmodel_base_class: "x"\n'),  # a QRHead config
])
def test_qrhead_head_set_strings_load_as_a_head_set(tmp_path, name, content):
    s = load_heads(_write(tmp_path, name, content), shape=SHAPE)
    assert isinstance(s, HeadSet)
    assert set(s.members) == {Head(2, 5), Head(1, 3), Head(0, 7)}


# --------------------------------------------------------------------------- DuoAttention


def _duo_tsv(gates):
    return "\n".join("\t".join(f"{g:.18e}" for g in row) for row in gates) + "\n"


def test_duoattention_gates_rank_query_heads_by_their_kv_groups_gate(tmp_path):
    gates = np.array([[0.6, 0.0], [1.0, 0.4], [0.0, 0.99], [0.4, 0.2]])
    r = load_heads(_write(tmp_path, "full_attention_heads.tsv", _duo_tsv(gates)), shape=SHAPE)
    assert isinstance(r, Ranking) and r.method == "duo_attention"
    # independently: query head h of layer l takes gate[l, h // 4] (DuoAttention's repeat_interleave)
    per_query = np.repeat(gates, 4, axis=1)
    for l in range(4):
        for h in range(8):
            assert r.scores[Head(l, h)] == pytest.approx(per_query[l, h])
    # the stated tie rule: gate descending, then layer, then query head, ascending
    expected = sorted(((l, h) for l in range(4) for h in range(8)), key=lambda x: (-per_query[x], x[0], x[1]))
    assert [(h.layer, h.head) for h in r.heads] == expected
    assert r.heads[:4] == [Head(1, 0), Head(1, 1), Head(1, 2), Head(1, 3)]
    # a cut inside a KV group splits a tie of 4, a cut at a group boundary splits none
    assert ties_at_cut(r, 2) == 4 and ties_at_cut(r, 4) == 0


@pytest.mark.parametrize("text, message", [
    (_duo_tsv(np.full((3, 2), 0.5)), "has 3 rows, but the model has 4 layers"),  # truncated
    (_duo_tsv(np.full((4, 3), 0.5)), "row 1 has 3 columns, but the model has 2 KV heads"),
    (_duo_tsv(np.full((4, 2), 0.5)).replace("5.0", "x5.0", 1), "is not a number"),
    (_duo_tsv(np.array([[0.5, 1.5]] + [[0.5, 0.5]] * 3)), "a gate must lie in [0, 1]"),
    (_duo_tsv(np.full((4, 2), 0.5)).replace("\t", "  "), "columns"),  # spaces, not tabs
])
def test_a_bad_duoattention_file_is_refused_naming_it(tmp_path, text, message):
    path = _write(tmp_path, "full_attention_heads.tsv", text)
    with pytest.raises(ValueError) as err:
        load_heads(path, shape=SHAPE)
    assert message in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- per-layer JSON


def test_a_razorattention_style_per_layer_set_loads_as_a_head_set(tmp_path):
    s = load_heads(_write(tmp_path, "razor.json", {"1": [3, 0], "3": [7]}), shape=SHAPE)
    assert isinstance(s, HeadSet) and s.members == (Head(1, 0), Head(1, 3), Head(3, 7))


def test_a_compresskv_style_per_layer_order_needs_per_layer(tmp_path):
    rng = np.random.default_rng(1)
    order = {str(l): [int(h) for h in rng.permutation(8)] for l in range(4)}
    path = _write(tmp_path, "compress.json", order)
    with pytest.raises(ValueError, match="lists every head of every layer"):
        load_heads(path, shape=SHAPE)
    s = load_heads(path, shape=SHAPE, per_layer=2)
    assert set(s.members) == {Head(l, h) for l in range(4) for h in order[str(l)][:2]}
    assert s.provenance["per_layer"] == 2


@pytest.mark.parametrize("text, message", [
    ('{"1": [3, 0], "1": [7]}', "key '1' appears twice"),  # duplicate keys: JSON parsers keep the last
    ('{"01": [3], "1": [4]}', "layer key '01' is not written plainly"),
    ('{"1": [3, 3]}', "lists a head twice"),
    ('{"1": [8]}', "outside the model"),
    ('{"7": [0]}', "layer 7 is outside the model"),
    ('{"1": ["a"]}', "must list query-head indices"),
    ('{"1": [3, 0]', "not valid JSON"),  # truncated
])
def test_a_bad_per_layer_file_is_refused_naming_it(tmp_path, text, message):
    path = _write(tmp_path, "heads.json", text)
    with pytest.raises(ValueError) as err:
        load_heads(path, shape=SHAPE)
    assert message in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- plain head sets


@pytest.mark.parametrize("name, content", [
    ("heads.json", '["L2H5", "1-3", [0, 7]]'),
    ("heads.yaml", "- L2H5\n- 1-3\n- L0H7\n"),
])
def test_a_plain_list_of_heads_loads_as_a_head_set(tmp_path, name, content):
    s = load_heads(_write(tmp_path, name, content), shape=SHAPE)
    assert isinstance(s, HeadSet) and set(s.members) == {Head(2, 5), Head(1, 3), Head(0, 7)}


@pytest.mark.parametrize("name, content, message", [
    ("heads.json", '["L2H5", "L2H5"]', "listed twice"),
    ("heads.json", '["L2H5", "2-05"]', "listed twice"),  # an equivalent spelling is the same head
    ("heads.json", '["L2H5", "L"]', "item 2 ('L') is not a head"),
    ("heads.yaml", "a: [1]\na: [2]\n", "duplicate key"),
    ("heads.json", "", "is empty"),
])
def test_a_bad_head_list_is_refused_naming_it(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError) as err:
        load_heads(path, shape=SHAPE)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_binary_or_missing_file_is_named(tmp_path):
    path = tmp_path / "heads.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match="not a text file") as err:
        load_heads(path, shape=SHAPE)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_heads(tmp_path / "nowhere.json", shape=SHAPE)


def test_heads_on_the_command_line():
    s = parse_head_set("L2H5, 1-3,", SHAPE)
    assert s.members == (Head(1, 3), Head(2, 5))
    with pytest.raises(ValueError, match="--heads: head L2H5 is listed twice"):
        parse_head_set("L2H5,L2H5", SHAPE)
    with pytest.raises(ValueError, match="names no head"):
        parse_head_set(" , ", SHAPE)


# --------------------------------------------------------------------------- a set is not an order


def test_a_head_set_defines_top_k_only_at_its_own_size():
    s = parse_head_set("L2H5,L1H3,L0H7", SHAPE)
    assert s.top(3) == [Head(0, 7), Head(1, 3), Head(2, 5)]
    with pytest.raises(HeadSetHasNoOrder, match="the top 2 heads needs an order.*K=3"):
        s.top(2)
    with pytest.raises(HeadSetHasNoOrder):
        s.bottom(3)
    for seed in range(20):
        drawn = s.random_outside_top(3, seed=seed)
        assert len(set(drawn)) == 3 and not set(drawn) & set(s.members)
        matched = s.random_layer_matched(3, seed=seed)
        assert sorted(h.layer for h in matched) == [0, 1, 2] and not set(matched) & set(s.members)


def test_a_file_for_another_model_is_refused(tmp_path):
    big = HeadShape(32, 32, 8, 128)
    rows = [(f"{l}-{h}", 1.0 / (1 + l * 32 + h)) for l in range(32) for h in range(32)]
    with pytest.raises(ValueError, match="scores 1024 heads, but the model has 32"):
        load_heads(_write(tmp_path, "qr.json", rows), shape=SHAPE)
    assert len(load_heads(tmp_path / "qr.json", shape=big).heads) == 1024
    with pytest.raises(ValueError, match="has 4 rows, but the model has 32 layers"):
        load_heads(_write(tmp_path, "duo.tsv", _duo_tsv(np.full((4, 2), 0.5))), shape=big)


def test_rh_and_wu24_rankings_still_load_through_the_same_entry(tmp_path):
    rng = np.random.default_rng(3)
    scores = {h: float(rng.random()) for h in SHAPE.all_heads()}
    ours = Ranking("sum_attention", SHAPE, scores)
    ours.save(tmp_path / "ours.json")
    assert load_heads(tmp_path / "ours.json", shape=SHAPE).heads == ours.heads
    wu = {f"{h.layer}-{h.head}": [v, v] for h, v in scores.items()}
    assert load_heads(_write(tmp_path, "wu.json", wu), shape=SHAPE).heads == ours.heads


@pytest.mark.parametrize("text, message", [
    ('{"0-0": [0.1], "0-1": [0.2], "0-1": [99]}', "key '0-1' appears twice"),  # the last would win: L0H1 on top
    ('{"0-0": [0.1], "0-1": [0.2], "0-01": [99]}', "head L0H1 is listed twice"),  # an equivalent spelling
])
def test_a_wu24_file_listing_a_head_twice_is_refused(tmp_path, text, message):
    path = _write(tmp_path, "wu24.json", text)
    with pytest.raises(ValueError) as err:
        load_heads(path, shape=SHAPE)
    assert message in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- the model a file names


def test_a_head_file_names_its_model_in_its_config_or_its_path(tmp_path):
    """QRHead's configs carry model_name_or_path; DuoAttention keeps its patterns in a folder named
    after the model; a plain file names nothing."""
    from rh.published import named_model

    cfg = _write(tmp_path, "Llama-3.1-8B-Instruct_qr_head.yaml",
                 'attn_head_set: "14-22,13-16"\nmodel_base_class: "Llama-3.1-8B-Instruct"\n'
                 'model_name_or_path: "meta-llama/Llama-3.1-8B-Instruct"\n')
    assert named_model(cfg) == "meta-llama/Llama-3.1-8B-Instruct"
    assert named_model(_write(tmp_path, "Qwen2.5-7B-Instruct_full_head.yaml", 'attn_head_set: "1-2"\n')) == \
        "Qwen2.5-7B-Instruct"
    duo = tmp_path / "attn_patterns" / "Llama-3-8B-Instruct-Gradient-1048k" / "lr=0.02-reg=0.05"
    duo.mkdir(parents=True)
    assert named_model(_write(duo, "full_attention_heads.tsv", "1\t0\n")) == "Llama-3-8B-Instruct-Gradient-1048k"
    assert named_model(_write(tmp_path, "heads.json", ["L1H2"])) is None
    # a folder of the user's, or rh's own ranking files, name no model: only the publishers' places count
    mine = tmp_path / "smollm2-experiments"
    mine.mkdir()
    assert named_model(_write(mine, "smollm2-135m-sum_attention-06a50ae2927cda6f.json", ["L1H2"])) is None
    assert named_model(_write(mine, "heads.txt", "L1H2")) is None


def test_rhs_own_ranking_files_given_as_rankings_carry_no_model_warning():
    """The committed rankings are named after their model key and cache key
    (``smollm2-135m-sum_attention-<hash>.json``): read as a published name, they would warn that
    the heads come from another model on every run that reuses them."""
    from pathlib import Path

    from rh.models import REGISTRY
    from rh.published import model_mismatch, named_model

    root = Path(__file__).resolve().parents[1] / "fixtures" / "rankings"
    shape = REGISTRY["smollm2-135m"].shape
    files = sorted(root.glob("smollm2-135m-*.json"))
    assert files
    for f in files[:3]:
        r = load_heads(f, shape=shape)
        named = r.provenance.get("named_model")
        assert named is None and model_mismatch(named, REGISTRY["smollm2-135m"].model_name) is None
        assert named_model(f) is None  # read from the file name, it gave 'smollm2-135m-sum': another model


def test_a_version_mismatch_is_a_warning_and_the_same_model_is_not():
    from rh.models import REGISTRY
    from rh.published import model_mismatch

    llama3 = REGISTRY["llama8b"].model_name  # meta-llama/Meta-Llama-3-8B-Instruct
    warn = model_mismatch("meta-llama/Llama-3.1-8B-Instruct", llama3)
    assert warn and "Llama-3.1-8B-Instruct" in warn and "Meta-Llama-3-8B-Instruct" in warn
    assert model_mismatch("Meta-Llama-3-8B-Instruct", llama3) is None  # the same model, spelt as a folder
    assert model_mismatch("meta-llama/Llama-3.1-8B-Instruct", REGISTRY["llama3.1-8b"].model_name) is None
    assert model_mismatch(None, llama3) is None and model_mismatch("x", None) is None
    assert REGISTRY["smollm2-135m"].model_name == "SmolLM2-135M-Instruct" and REGISTRY["tiny-llama"].model_name is None


def test_the_plugin_says_so_in_the_header_and_the_report(warm_imports, pytester, tmp_path):
    """--rankings with a file that names another model: the run goes on (the shape fits), the
    terminal header and the report's provenance say whose heads they are."""
    heads = tmp_path / "SmolLM2-360M-Instruct_qr_head.yaml"
    heads.write_text('attn_head_set: "1-2,3-0"\nmodel_name_or_path: "HuggingFaceTB/SmolLM2-360M-Instruct"\n')
    pytester.makepyfile(test_x="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("--model", "smollm2-135m", "--rankings", str(heads), "--plan", "-p",
                                          "no:cacheprovider")
    out = result.stdout.str()
    assert "rh warning: the head file names 'HuggingFaceTB/SmolLM2-360M-Instruct'" in out
    assert "'SmolLM2-135M-Instruct'" in out
    from rh.report.html import provenance

    row = provenance({"heads_model_warning": "the head file names 'X'"})
    assert row["head file"] == "the head file names 'X'"


@pytest.mark.parametrize("name, content, message", [
    ("cfg.yaml", 'model_name_or_path: "meta-llama/Llama-3.1-8B-Instruct"\n', "config without attn_head_set"),
    ("cfg.yaml", "foo: 1\n", "config without attn_head_set"),
    ("config.json", {"model_type": "llama", "num_hidden_layers": 4}, "a model's config.json, not a head file"),
])
def test_a_config_that_is_not_a_head_file_says_what_it_is(tmp_path, name, content, message):
    """A QRHead YAML without attn_head_set was reported as "not valid JSON"; a model's (or
    DuoAttention's) config.json as "in no known format ... pass fmt=", the library's argument."""
    with pytest.raises(ValueError, match=message) as err:
        load_heads(_write(tmp_path, name, content), shape=SHAPE)
    assert "JSON (truncated" not in str(err.value) and "fmt=" not in str(err.value)


def test_rhs_own_ranking_csv_loads_as_a_ranking(tmp_path):
    """rh identify --out r.csv writes one; load_heads (--rankings, rh audit) once refused it as
    "neither JSON nor a head-set string"."""
    from rh.rankings import load_ranking

    ranking = load_heads(_write(tmp_path, "qr.json", _qrhead_rows()), shape=SHAPE)
    path = _write(tmp_path, "r.csv", ranking.to_csv())
    r = load_heads(path, shape=SHAPE)
    assert isinstance(r, Ranking) and r.heads == ranking.heads == load_ranking(path, shape=SHAPE).heads


def test_published_files_load_against_their_registry_keys_shapes_without_any_download(tmp_path, monkeypatch):
    """Wu24's released format for Mistral-7B-v0.2's grid (32 x 32) and a QRHead head set for
    Qwen2.5-7B-Instruct (28 x 28) load against the shapes the registry gives for their keys
    (rh.models.expected_shape: no config fetched, no weights); crossed, each is refused."""
    from rh import models

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False, raising=False)
    mistral, qwen = models.expected_shape("mistral7b-v0.2"), models.expected_shape("qwen2.5-7b")
    assert (mistral.n_layers, mistral.n_heads, qwen.n_layers, qwen.n_heads) == (32, 32, 28, 28)
    rng = np.random.default_rng(5)
    wu = {f"{l}-{h}": [float(x) for x in rng.random(3)] for l in range(32) for h in range(32)}
    r = load_heads(_write(tmp_path, "Mistral-7B-v0.2-hf.json", wu), shape=mistral)
    best = max(wu, key=lambda k: np.mean(wu[k]))
    assert len(r.heads) == 1024 and r.heads[0] == Head(*map(int, best.split("-")))
    qr = load_heads(_write(tmp_path, "Qwen2.5-7B-Instruct_full_head.yaml", 'attn_head_set: "20-7,15-27,3-0"\n'),
                    shape=qwen)
    assert isinstance(qr, HeadSet) and set(qr.members) == {Head(20, 7), Head(15, 27), Head(3, 0)}  # a set: no order
    with pytest.raises(ValueError):
        load_heads(tmp_path / "Mistral-7B-v0.2-hf.json", shape=qwen)  # 32 x 32 scores for a 28 x 28 model
    with pytest.raises(ValueError, match="L15H30 is outside the model"):
        load_heads(_write(tmp_path, "q.yaml", 'attn_head_set: "20-7,15-30"\n'), shape=qwen)  # head 30 of 28


@pytest.mark.unit
def test_heads_under_test_is_the_top_k_of_a_ranking_and_a_head_sets_own_heads():
    """A claim about "the top K" (CA-5, CA-6, CA-7, CA-10) tests a head set's own heads whatever the
    profile's K (``--heads``), and a ranking's top K. Bug caught: CA-6 skipped as "not applicable"
    under ``--heads`` though the heads were given (its K was the profile's 10, not the set's 4)."""
    from rh.heads import Head, HeadShape
    from rh.published import HeadSet, heads_under_test
    from rh.rankings import Ranking

    shape = HeadShape(2, 3, 1, 4)
    hs = HeadSet((Head(1, 2), Head(0, 1)), shape)
    assert heads_under_test(hs, 10) == [Head(0, 1), Head(1, 2)]
    r = Ranking("x", shape, {h: float(i) for i, h in enumerate(shape.all_heads())})
    assert heads_under_test(r, 2) == [Head(1, 2), Head(1, 1)] == r.top(2)
