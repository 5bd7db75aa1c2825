"""Unit tests of rh.expected: a strict loader (each bad file named with its fix), a comparison that
lists what was left out and fails what vanished or changed, and updates that merge a subset, refuse
another model and never write an error."""

from __future__ import annotations

import json

import pytest

from rh.expected import compare, load_expected, update


GOOD = {"model": "m", "profile": "quick",
        "verdicts": {"CA-1[k=10]": "supported", "CA-1[k=20]": "refuted", "ID-1[]": "supported"},
        "nodes": {"t::ca1[K=10]": {"key": "CA-1[k=10]", "token_layers": 100},
                  "t::ca1[K=20]": {"key": "CA-1[k=20]", "token_layers": 200},
                  "t::id1": {"key": "ID-1[]", "token_layers": 0}},
        "fixture_token_layers": {"baseline": 7}}


def _write(tmp_path, data, name="exp.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _row(nodeid, key, status):
    return {"nodeid": nodeid, "key": key, "status": status, "token_layers": 1}


@pytest.mark.parametrize("content, message", [
    ('{"verdicts": {"CA-1[k=10]": "supp', "not valid JSON"),
    ("[1, 2]", '"verdicts" mapping'),
    ('{"model": "m"}', '"verdicts" mapping'),
    ('{"verdicts": {"a": "supported", "a": "refuted"}}', "appears twice"),
    ('{"verdicts": {"a": "maybe"}}', "one of supported"),
    ('{"verdicts": {}, "nodes": {"x": 3}}', '"nodes"'),
])
def test_bad_files_are_refused_naming_the_file(tmp_path, content, message):
    p = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as err:
        load_expected(p)
    assert str(p) in str(err.value)


def test_binary_and_missing_files(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="not a text file"):
        load_expected(p)
    with pytest.raises(FileNotFoundError, match="--update-expected"):
        load_expected(tmp_path / "none.json")
    assert load_expected(tmp_path / "none.json", missing_ok=True).verdicts == {}


def test_the_first_format_still_loads(tmp_path):
    e = load_expected(_write(tmp_path, {"model": "m", "verdicts": {"CA-1[k=10]": "supported"}}))
    assert e.verdicts == {"CA-1[k=10]": "supported"} and e.nodes == {}


def test_compare_passes_what_matches_and_lists_what_was_left_out(tmp_path):
    e = load_expected(_write(tmp_path, GOOD))
    rows = [_row("t::ca1[K=10]", "CA-1[k=10]", "supported"), _row("t::id1", "ID-1[]", "supported")]
    c = compare(e, rows, left_out={"t::ca1[K=20]": "over budget"})
    assert c.ok and c.checked == 2 and c.left_out == ["CA-1[k=20]"]
    assert any("CA-1[k=20] (over budget)" in line for line in c.lines)


def test_compare_fails_a_changed_verdict_and_one_that_vanished(tmp_path):
    e = load_expected(_write(tmp_path, GOOD))
    changed = compare(e, [_row("t::ca1[K=10]", "CA-1[k=10]", "refuted"), _row("t::id1", "ID-1[]", "supported"),
                          _row("t::ca1[K=20]", "CA-1[k=20]", "refuted")], left_out={})
    assert not changed.ok and "CA-1[k=10]: expected supported, got refuted" in changed.lines
    vanished = compare(e, [_row("t::ca1[K=10]", "CA-1[k=10]", "supported")], left_out={"t::id1": "deselected"})
    assert not vanished.ok and any("CA-1[k=20]" in x and "no test produced it" in x for x in vanished.lines)
    errored = compare(e, [_row("t::ca1[K=10]", "CA-1[k=10]", "error")], left_out={"t::ca1[K=20]": "x", "t::id1": "x"})
    assert not errored.ok


def test_update_of_a_subset_merges_and_says_what_it_kept(tmp_path):
    e = load_expected(_write(tmp_path, GOOD))
    new, lines = update(e, [_row("t::ca1[K=10]", "CA-1[k=10]", "inconclusive")], model="m", profile="quick",
                        dtype="float32", recorded="today", fixture_token_layers={"baseline": 9}, complete=False)
    assert new.verdicts == {**GOOD["verdicts"], "CA-1[k=10]": "inconclusive"}
    assert new.nodes["t::ca1[K=20]"] == GOOD["nodes"]["t::ca1[K=20]"]
    assert new.nodes["t::ca1[K=10]"]["dtype"] == "float32" and new.fixture_token_layers == {"baseline": 9}
    assert "kept 2" in lines[0] and "CA-1[k=20]" in lines[0]


def test_a_complete_update_replaces_and_an_error_keeps_its_old_entry(tmp_path):
    e = load_expected(_write(tmp_path, GOOD))
    rows = [_row("t::ca1[K=10]", "CA-1[k=10]", "refuted"), _row("t::ca1[K=20]", "CA-1[k=20]", "supported"),
            _row("t::id1", "ID-1", "error")]
    new, lines = update(e, rows, model="m", profile="quick", dtype="float32", recorded="today",
                        fixture_token_layers={}, complete=True)
    assert new.verdicts == {"CA-1[k=10]": "refuted", "CA-1[k=20]": "supported", "ID-1[]": "supported"}
    assert "error" not in new.verdicts.values() and "in error: ID-1" in lines[1]


def test_update_refuses_another_models_file(tmp_path):
    e = load_expected(_write(tmp_path, GOOD))
    with pytest.raises(ValueError, match="another --expected path"):
        update(e, [], model="llama70b", profile="quick", dtype="bfloat16", recorded="", fixture_token_layers={},
               complete=True)


def test_a_left_out_test_without_a_recorded_key_is_named_when_its_verdict_goes_missing(tmp_path):
    data = {**GOOD, "nodes": {k: v for k, v in GOOD["nodes"].items() if k != "t::ca1[K=20]"}}
    e = load_expected(_write(tmp_path, data))
    c = compare(e, [_row("t::ca1[K=10]", "CA-1[k=10]", "supported"), _row("t::id1", "ID-1[]", "supported")],
                left_out={"t::ca1[K=20]": "no recorded cost"})
    assert not c.ok and any("left out without a recorded key: t::ca1[K=20]" in x for x in c.lines)


REF, AMX, AVX2 = "bfloat16 on CPU AVX512 + avx512_bf16", "bfloat16 on CPU AVX512 + AMX, 2 threads", "float32 on CPU AVX2"


def test_other_numerics_are_compared_with_the_statuses_recorded_for_them(tmp_path):
    """A status recorded for other numerics applies to them alone; keys it does not name, and
    numerics with no record, take the file's. Catches the differences applied to every run, or a
    run on unrecorded numerics passing a changed verdict."""
    e = load_expected(_write(tmp_path, {**GOOD, "numerics": REF, "differences": {AMX: {"CA-1[k=20]": "inconclusive"}}}))
    assert e.want("CA-1[k=20]", AMX) == "inconclusive" and e.want("CA-1[k=10]", AMX) == "supported"
    assert e.want("CA-1[k=20]", REF) == e.want("CA-1[k=20]", AVX2) == e.want("CA-1[k=20]") == "refuted"
    rows = [_row("t::ca1[K=10]", "CA-1[k=10]", "supported"), _row("t::ca1[K=20]", "CA-1[k=20]", "inconclusive"),
            _row("t::id1", "ID-1[]", "supported")]
    assert compare(e, rows, left_out={}, numerics=AMX).ok
    on_ref = compare(e, rows, left_out={}, numerics=REF)
    assert not on_ref.ok and "CA-1[k=20]: expected refuted, got inconclusive" in on_ref.lines
    unrecorded = compare(e, rows, left_out={}, numerics=AVX2)
    assert not unrecorded.ok and any(f"({AVX2}) are not the file's ({REF})" in x and "--update-expected" in x
                                     for x in unrecorded.lines)
    assert e.recorded_for(AMX) and e.recorded_for(REF) and not e.recorded_for(AVX2)


def test_a_run_on_other_numerics_records_only_what_differs_there(tmp_path):
    """--update-expected on numerics that are not the file's leaves its verdicts, nodes and costs,
    and writes the statuses that differ (a complete run replaces them, a run of some merges and
    drops those that now agree); the file round-trips. Catches another machine's run overwriting
    the reference verdicts."""
    e = load_expected(_write(tmp_path, {**GOOD, "numerics": REF}))
    rows = [_row("t::ca1[K=10]", "CA-1[k=10]", "supported"), _row("t::ca1[K=20]", "CA-1[k=20]", "inconclusive"),
            _row("t::id1", "ID-1[]", "supported")]
    new, lines = update(e, rows, model="m", profile="quick", dtype="bfloat16", recorded="amx run",
                        fixture_token_layers={"baseline": 1}, complete=True, numerics=AMX)
    assert new.verdicts == GOOD["verdicts"] and new.nodes == GOOD["nodes"] and new.fixture_token_layers == {"baseline": 7}
    assert new.differences == {AMX: {"CA-1[k=20]": "inconclusive"}} and new.recorded[AMX] == "amx run"
    assert "1 differ there (CA-1[k=20] inconclusive)" in lines[0]
    p = tmp_path / "round.json"
    p.write_text(json.dumps(new.as_json()))
    again = load_expected(p)
    assert again.numerics == REF and again.differences == new.differences
    merged, _ = update(again, [_row("t::ca1[K=20]", "CA-1[k=20]", "refuted"), _row("t::id1", "ID-1[]", "refuted")],
                       model="m", profile="quick", dtype="bfloat16", recorded="some", fixture_token_layers={},
                       complete=False, numerics=AMX)
    assert merged.differences == {AMX: {"ID-1[]": "refuted"}}  # CA-1[k=20] agrees now: dropped
    same, lines = update(again, rows[:1], model="m", profile="quick", dtype="bfloat16", recorded="x",
                         fixture_token_layers={}, complete=True, numerics=AMX)
    assert same.differences == {AMX: {}} and "none differ" in lines[0]  # recorded: these numerics agree


def test_a_run_on_the_files_numerics_rewrites_the_verdicts_and_drops_differences_now_equal(tmp_path):
    e = load_expected(_write(tmp_path, {**GOOD, "numerics": REF, "recorded": {REF: "old", AMX: "amx run"},
                                        "differences": {AMX: {"CA-1[k=20]": "inconclusive", "ID-1[]": "refuted"}}}))
    rows = [_row("t::ca1[K=10]", "CA-1[k=10]", "supported"), _row("t::ca1[K=20]", "CA-1[k=20]", "inconclusive"),
            _row("t::id1", "ID-1[]", "supported")]
    new, _ = update(e, rows, model="m", profile="quick", dtype="bfloat16", recorded="new", fixture_token_layers={},
                    complete=True, numerics=REF)
    assert new.verdicts["CA-1[k=20]"] == "inconclusive" and new.numerics == REF
    assert new.differences == {AMX: {"ID-1[]": "refuted"}} and new.recorded == {REF: "new", AMX: "amx run"}
    first, _ = update(load_expected(_write(tmp_path, GOOD, "plain.json")), rows, model="m", profile="quick",
                      dtype="bfloat16", recorded="r", fixture_token_layers={}, complete=True, numerics=AMX)
    assert first.numerics == AMX and first.differences == {}  # a file that named none takes this run's


@pytest.mark.parametrize("differences, message", [([1], '"differences" must map'),
                                                  ({AMX: {"CA-1[k=10]": "maybe"}}, 'under "differences"')])
def test_bad_differences_are_refused(tmp_path, differences, message):
    with pytest.raises(ValueError, match=message):
        load_expected(_write(tmp_path, {**GOOD, "numerics": REF, "differences": differences}))


@pytest.mark.parametrize("dtype, flags, cap, env, want", [
    ("bfloat16", {"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", {}, "bfloat16 on CPU AVX512 + AMX, 2 threads"),
    ("bfloat16", {"avx512f", "avx512_bf16"}, "AVX512", {}, "bfloat16 on CPU AVX512 + avx512_bf16"),
    ("bfloat16", {"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
     "bfloat16 on CPU AVX512 + avx512_bf16"),
    ("bfloat16", {"avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"},
     "bfloat16 on CPU AVX2 (bf16 emulated)"),
    ("float32", {"avx512f", "amx_bf16"}, "AVX2", {}, "float32 on CPU AVX2"),
])
def test_numerics_name_the_kernels_that_multiply(dtype, flags, cap, env, want):
    from rh.models import numerics

    assert numerics(dtype, "cpu", flags=flags, capability=cap, environ=env, threads=2) == want
    # AMX's bf16 results move with torch's threads (measured); no other path's do: only AMX names them
    one = numerics(dtype, "cpu", flags=flags, capability=cap, environ=env, threads=1)
    assert (one != want) == want.endswith("AMX, 2 threads")
    if one != want:
        assert one == want.replace("2 threads", "1 thread")
