"""rh.journal: what makes two runs' inputs the same, and a journal's records on disk."""

from __future__ import annotations

import json

from rh import journal as jr


def _fp(**options):
    base = {"model": "tiny-llama", "profile": "quick", "alpha": None, "report_dir": None, "store": None}
    return jr.session_fingerprint({**base, **options}, model={"key": "tiny-llama"}, dtype="torch.float32",
                                  code="c", libraries={"torch": "2"})


def test_the_fingerprint_follows_the_options_that_can_change_a_verdict_and_no_other():
    assert _fp() == _fp()
    assert _fp(report_dir="elsewhere") == _fp() and _fp(store="rows.jsonl") == _fp()  # where things go
    assert _fp(alpha=0.01) != _fp() and _fp(profile="full") != _fp()
    assert _fp(plain=True) != _fp()  # an option added later counts unless it is declared neutral
    one = jr.session_fingerprint({}, model={"key": "a"}, dtype="bf16", code="c", libraries={})
    assert one != jr.session_fingerprint({}, model={"key": "a"}, dtype="fp32", code="c", libraries={})
    assert one != jr.session_fingerprint({}, model={"key": "a"}, dtype="bf16", code="d", libraries={})
    assert one != jr.session_fingerprint({}, model={"key": "a"}, dtype="bf16", code="c", libraries={"torch": "3"})
    assert one != jr.session_fingerprint({}, model={"key": "a"}, dtype="bf16", code="c", libraries={},
                                         files={"rankings": "x"})


def test_a_local_model_folder_is_identified_by_its_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    before = jr.model_identity(str(folder))
    assert before == jr.model_identity(str(folder))
    (folder / "model.safetensors").write_bytes(b"y" * 11)
    assert jr.model_identity(str(folder)) != before


def test_a_claims_fingerprint_follows_its_file_and_the_conftests_above_it(tmp_path):
    (tmp_path / "conftest.py").write_text("a = 1\n")
    sub = tmp_path / "claims"
    sub.mkdir()
    test = sub / "test_x.py"
    test.write_text("def test_x(): pass\n")
    assert jr.conftests(test, tmp_path) == [tmp_path / "conftest.py"]

    def fp(nodeid="claims/test_x.py::test_x"):
        return jr.item_fingerprint("s", nodeid, [*jr.conftests(test, tmp_path), test])

    first = fp()
    assert fp() == first and fp("claims/test_x.py::test_x[K=20]") != first
    (sub / "conftest.py").write_text("b = 2\n")  # a new conftest nearer the test
    second = fp()
    assert second != first
    (tmp_path / "conftest.py").write_text("a = 2\n")
    assert fp() != second
    assert jr.item_fingerprint("other session", "claims/test_x.py::test_x", [test]) != jr.item_fingerprint(
        "s", "claims/test_x.py::test_x", [test])


def test_a_journal_keeps_claims_and_the_last_metadata_and_skips_what_it_cannot_read(tmp_path):
    j = jr.Journal(tmp_path, "f" * 64)
    assert not j.path.exists()  # nothing written until a claim finishes
    j.add("t::a", "ia", {"claim": "X-1", "status": "supported"}, {"token_layers": 5}, meta={"ranking": {"k": 1}})
    j.add("t::b", "ib", {"claim": "X-2", "status": "refuted"}, {"token_layers": 7}, meta={"ranking": {"k": 1}})
    j.close()
    lines = j.path.read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["meta", "claim", "claim"]  # metadata kept once, unchanged
    again = jr.Journal(tmp_path, "f" * 64)
    assert again.get("t::a", "ia")["cost"] == {"token_layers": 5} and again.meta == {"ranking": {"k": 1}}
    assert again.get("t::a", "other fingerprint") is None and again.get("t::c", "ic") is None
    with open(j.path, "a") as fh:  # another session's line, a line of garbage, a torn last line
        fh.write(json.dumps({"kind": "claim", "session": "g" * 64, "nodeid": "t::c", "item": "ic",
                             "verdict": {}}) + "\n" + "not json\n" + lines[-1][:30])
    torn = jr.Journal(tmp_path, "f" * 64)
    assert torn.skipped == 3 and set(torn.records) == {"t::a", "t::b"}
    torn.add("t::c", "ic", {"claim": "X-3"}, {})
    torn.close()
    assert set(jr.Journal(tmp_path, "f" * 64).records) == {"t::a", "t::b", "t::c"}  # not glued to the torn line
    torn.discard()
    assert not j.path.exists()


def test_a_store_appended_after_a_torn_line_keeps_the_new_rows(tmp_path):
    from rh.runner import ResultStore

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"key": "a", "row": [True, -1.0, 0.5, 3]}) + "\n" + '{"key": "b", "row": [tr')
    store = ResultStore(path)
    assert store.loaded == 1 and store.skipped == 1
    store.put([("c", (False, -2.0, 0.25, 4))])
    store.close()
    again = ResultStore(path)
    assert again.get("c") == (False, -2.0, 0.25, 4) and again.loaded == 2


def test_a_declared_data_folder_counts_with_every_file_in_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("1\n")
    test = tmp_path / "test_x.py"
    test.write_text("")
    first = jr.item_fingerprint("s", "t", [test, data])
    assert jr.item_fingerprint("s", "t", [test, data]) == first
    (data / "b.csv").write_text("2\n")
    assert jr.item_fingerprint("s", "t", [test, data]) != first
