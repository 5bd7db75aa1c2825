"""The runner (rh.runner): packets that do not depend on who runs them, the results store keyed by
row and layout, resume from its file, and the refusals. Each check is against rh.units.run_units
(the passes run directly, in this process) or a count of the rows an executor was handed."""

from __future__ import annotations

import json
import pickle

from types import SimpleNamespace

import pytest

from rh.ablation import Ablation, ablate, head_means
from rh.budget import TokenLayerCounter
from rh.heads import Head
from rh.runner import Done, Layout, LocalExecutor, ResultStore, Runner, row_key, run_one, runner_for, use_runner
from rh.units import forget_prefills, Unit, plan_packets, run_packet, run_units


class Counting(LocalExecutor):
    """The local executor, counting the rows it is handed."""

    def __init__(self, model):
        super().__init__(model)
        self.rows = 0

    def execute(self, packets, by_id, hints):
        self.rows += sum(len(p.rows) for p in packets)
        yield from super().execute(packets, by_id, hints)


def _units(samples):
    ids = tuple(s.id for s in samples)
    return [Unit(Ablation.baseline(), ids),
            Unit(Ablation("a", (Head(1, 2), Head(3, 0))), ids[:4]),
            Unit(Ablation("q", (Head(2, 1),), "query"), ids),
            Unit(Ablation("d", (Head(0, 1),), phase="decode"), ids[2:]),
            Unit(Ablation.baseline("again"), ids[1:3])]  # rows the first unit also asks for


def _same(a, b):
    assert list(a["id"]) == list(b["id"]) and list(a["condition"]) == list(b["condition"])
    assert list(a["correct"]) == list(b["correct"]) and list(a["first_argmax"]) == list(b["first_argmax"])
    assert (a["logprob"] - b["logprob"]).abs().max() <= 1e-5


def test_a_unit_and_a_packet_survive_pickling_and_a_stored_row_survives_json(tiny, tiny_samples):
    units = _units(tiny_samples)
    by_id = {s.id: s for s in tiny_samples}
    packets = plan_packets(units, by_id, 4)
    assert pickle.loads(pickle.dumps(units)) == units
    assert pickle.loads(pickle.dumps(packets)) == packets
    row = run_packet(tiny, packets[0], by_id)[0]
    from rh.runner import valid_row

    assert valid_row(json.loads(json.dumps(list(row)))) == row
    assert valid_row([1, 0.5, 0.5, 3]) is None and valid_row([True, "x", 0.5, 3]) is None  # not rows: refused


def test_packets_depend_on_the_units_alone_and_run_each_row_once(tiny, tiny_samples):
    units = _units(tiny_samples)
    by_id = {s.id: s for s in tiny_samples}
    a, b = plan_packets(units, by_id, 3), plan_packets(list(units), dict(reversed(list(by_id.items()))), 3)
    assert a == b  # the same forwards whatever order the prompts were handed in
    rows = [r for p in a for r in p.rows]
    assert sorted(rows) == sorted((j, i) for j, u in enumerate(units) for i in u.sample_ids)
    assert all(len(p.rows) <= 3 for p in a)
    assert all(p.condition is None or not Unit(p.condition, ("x",)).side_by_side for p in a)


def test_the_runner_gives_what_the_passes_give_and_a_row_asked_twice_runs_once(tiny, tiny_samples):
    units = _units(tiny_samples)
    ex = Counting(tiny)
    got = Runner(tiny, executor=ex).run(tiny_samples, units, batch_size=4)
    for a, b in zip(run_units(tiny, tiny_samples, units, batch_size=4), got):
        _same(a, b)
    asked = sum(len(u.sample_ids) for u in units)
    assert ex.rows == asked - 2  # "again" asks for two baseline rows the first unit computes
    runner = Runner(tiny, executor=ex)
    runner.run(tiny_samples, units[:1], batch_size=4)
    before = ex.rows
    _same(runner.run(tiny_samples, units[-1:], batch_size=4)[0], got[-1])
    assert ex.rows == before and runner.reused == 2  # a later call: served from the store


def test_the_store_file_resumes_a_run_that_died(tiny, tiny_samples, tmp_path):
    path = tmp_path / "rows.jsonl"
    units = _units(tiny_samples)
    first = Runner(tiny, executor=Counting(tiny), store=ResultStore(path))
    ref = first.run(tiny_samples, units, batch_size=4)
    first.close()
    lines = path.read_text().splitlines()
    stored = len(lines)
    assert stored == first.computed  # every computed row kept
    # the run "dies" having written 5 rows fewer, the last line torn
    path.write_text("\n".join(lines[:-5]) + "\n" + lines[-5][:17] + "\n")
    store = ResultStore(path)
    assert store.loaded == stored - 5 and store.skipped == 1
    ex = Counting(tiny)
    again = Runner(tiny, executor=ex, store=store).run(tiny_samples, units, batch_size=4)
    assert ex.rows == 5  # exactly the missing rows
    for a, b in zip(ref, again):
        _same(a, b)


def test_rows_are_keyed_by_layout_and_tokens_not_by_the_conditions_name(tiny, tiny_samples):
    s = tiny_samples[0]
    lay = Layout.of(tiny).key()
    heads = (Head(1, 2),)
    assert row_key(lay, Ablation("x", heads), s) == row_key(lay, Ablation("y", heads, selection="top"), s)
    assert row_key(lay, Ablation("x", heads), s) != row_key(lay, Ablation("x", heads, "query"), s)
    assert row_key(lay, Ablation("x", heads), s) != row_key(lay, Ablation("x", heads, phase="decode"), s)
    # a decode row of the phase before Wu24's (ablated from the first answer token on) is keyed apart
    import hashlib
    import json as js

    before = js.dumps([lay, ["L1H2"], "zero", "decode", list(s.input_ids), list(s.answer_ids)])
    assert row_key(lay, Ablation("x", heads, phase="decode"), s) != hashlib.sha256(before.encode()).hexdigest()
    assert row_key(lay, Ablation("x", heads), s) == hashlib.sha256(
        js.dumps([lay, ["L1H2"], "zero", "all", list(s.input_ids), list(s.answer_ids)]).encode()).hexdigest()
    assert row_key(lay, Ablation("x", heads), s) != row_key(lay, Ablation("x", heads), tiny_samples[1])
    other = Layout(model=Layout.of(tiny).model, revision=Layout.of(tiny).revision, dtype="bfloat16").key()
    assert row_key(lay, Ablation("x", heads), s) != row_key(other, Ablation("x", heads), s)
    means = head_means(tiny, tiny_samples[:2], list(heads))
    assert row_key(lay, Ablation("m", heads, "mean", reference=means), s) is None  # means are not in its value
    from rh.compression import Restriction

    w = row_key(lay, Restriction("w", heads, sink=4, window=64), s)
    assert w == row_key(lay, Restriction("v", heads, sink=4, window=64, selection="top"), s)
    assert len({w, row_key(lay, Restriction("w", heads, sink=4, window=32), s),
                row_key(lay, Restriction("w", heads, sink=0, window=64), s), row_key(lay, Ablation("x", heads), s)}) == 4


def test_on_a_hooked_model_units_run_in_place_and_nothing_is_stored(tiny, tiny_samples):
    runner = Runner(tiny, executor=Counting(tiny))
    heads = (Head(1, 2), Head(2, 5), Head(0, 0))
    with use_runner(tiny, runner):
        with ablate(tiny, heads):
            inside = run_one(tiny, tiny_samples, Ablation.baseline())
        ablated = run_one(tiny, tiny_samples, Ablation("top", heads, selection="top"))
        plain = run_one(tiny, tiny_samples, Ablation.baseline())
    assert runner_for(tiny) is not runner  # uninstalled after the block
    assert list(inside["correct"]) == list(ablated["correct"])
    assert (inside["logprob"] - ablated["logprob"]).abs().max() <= 1e-5  # the ablation around the call applied
    assert (inside["logprob"] - plain["logprob"]).abs().max() > 1e-4
    assert runner.executor.rows == 2 * len(tiny_samples)  # the hooked call bypassed it, and the store
    assert len(runner.store.rows) == 2 * len(tiny_samples)


class Broken:
    name = "broken"

    def __init__(self, how):
        self.how = how

    def execute(self, packets, by_id, hints):
        for p in packets:
            yield Done([] if self.how == "short" else [("yes", 1.0, 0.5, 2)] * len(p.rows))

    def close(self):
        pass


@pytest.mark.parametrize("how", ["short", "garbled"])
def test_results_that_are_not_rows_are_refused_not_used(tiny, tiny_samples, how):
    runner = Runner(tiny, executor=Broken(how))
    with pytest.raises(RuntimeError, match="broken executor returned"):
        runner.run(tiny_samples, _units(tiny_samples)[:1])
    assert not runner.store.rows


def test_a_bad_store_path_is_refused_naming_it(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        ResultStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultStore(tmp_path / "nope" / "rows.jsonl")


def test_token_layers_counted_where_packets_run_equal_those_of_the_direct_passes(tiny, tiny_samples):
    units = _units(tiny_samples)
    by_id = {s.id: s for s in tiny_samples}
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        forget_prefills(tiny)
        run_units(tiny, tiny_samples, units, batch_size=4)
        direct = counter.total
        forget_prefills(tiny)
        per_packet = []
        for p in plan_packets(units, by_id, 4):
            before = counter.total
            run_packet(tiny, p, by_id)
            per_packet.append(counter.total - before)
    finally:
        handle.remove()
    assert sum(per_packet) == direct
    packets = plan_packets(units, by_id, 4)
    # each packet: its padded rows x layers; a fan packet (decode phase, one prompt): the prompt but its
    # last token once, then each row's answer steps (the last prompt token and the answer but its last)
    widths = [len(by_id[p.rows[0][1]].input_ids) - 1 + len(p.rows) * len(by_id[p.rows[0][1]].answer_ids) if p.fan
              else max(len(by_id[i].input_ids) + len(by_id[i].answer_ids) - 1 for i in p.sample_ids) * len(p.rows)
              for p in packets]
    assert any(p.fan for p in packets) and any(not p.fan for p in packets)
    assert per_packet == [w * tiny.shape.n_layers for w in widths]


class _Config:
    def __init__(self, numprocesses=None, **opts):
        self.option = SimpleNamespace(numprocesses=numprocesses)
        self.opts = {"--ray": None, "--replicas": None, "--threads-per-replica": None, "--gpus-per-replica": None,
                     "--store": None, "--device": None, **{f"--{k.replace('_', '-')}": v for k, v in opts.items()}}

    def getoption(self, name):
        return self.opts[name]


@pytest.mark.parametrize("opts, message", [
    ({"replicas": 2}, "--replicas apply to Ray replicas: add --ray local"),
    ({"ray": "local", "replicas": 0}, "--replicas 0: give a whole number"),
    ({"ray": "local", "threads_per_replica": -1}, "--threads-per-replica -1"),
    ({"ray": "local", "gpus_per_replica": -1.0}, "--gpus-per-replica -1"),
    ({"ray": "somewhere"}, "give 'local' .*or the head node's HOST:PORT"),
    ({"ray": "127.0.0.1:1"}, "no Ray cluster answers there"),
    ({"ray": "local", "gpus_per_replica": 64.0}, "this machine has \\d+ GPU"),
    ({"ray": "local", "numprocesses": 2}, "--ray with -n: the Ray replicas already run the passes side by side"),
])
def test_runner_options_are_checked_before_anything_loads(opts, message):
    from rh.pytest_plugin import _check_runner_options

    with pytest.raises(pytest.UsageError, match=message):
        _check_runner_options(_Config(**opts))


def test_a_store_that_cannot_be_a_file_is_a_usage_error(tmp_path):
    from rh.pytest_plugin import _check_runner_options

    with pytest.raises(pytest.UsageError, match="is a folder"):
        _check_runner_options(_Config(store=str(tmp_path)))
    with pytest.raises(pytest.UsageError, match="does not exist"):
        _check_runner_options(_Config(store=str(tmp_path / "no" / "rows.jsonl")))
    _check_runner_options(_Config(store=str(tmp_path / "rows.jsonl")))  # a new file in a folder that exists: fine


def test_stored_readings_are_read_back_and_a_torn_or_foreign_one_is_computed_again(tmp_path):
    """A reading's values go to the store file as lines of their own and come back from it in a new
    store, exactly; a torn line is skipped (counted), a value of another width is not served, and
    what is not a list of numbers is no reading. Catches reading lines taken for torn rows (every
    reading recomputed after a resume) and values served to a reading of other heads."""
    import numpy as np

    from rh.runner import ResultStore, valid_read

    path = tmp_path / "rows.jsonl"
    first = ResultStore(path)
    first.put([("r1", (True, -0.5, 0.6, 3))], [("k1", (1.0, 2.5)), ("k2", tuple(np.array([3, 4], dtype=np.float32)))])
    first.close()
    with open(path, "a") as fh:
        fh.write('{"key": "k3", "read": [1.0, tr')
    again = ResultStore(path)
    assert again.get("r1") == (True, -0.5, 0.6, 3)
    assert again.get_read("k1", 2) == (1.0, 2.5) and again.get_read("k2", 2) == (3.0, 4.0)
    assert again.get_read("k1", 3) is None and again.get_read("k3", 2) is None
    assert (again.loaded, again.skipped) == (1, 1)
    assert valid_read([True, 1.0], 2) is None and valid_read("ab", 2) is None and valid_read([1, None], 2) is None
    assert valid_read(np.array([0.5, 2.0]), 2) == (0.5, 2.0) and valid_read([1.0], 2) is None


def test_a_reading_of_prompts_alone_runs_as_work_units_and_is_kept_in_the_store(tiny, tiny_samples, tmp_path):
    """rh.runner.read_prompts: the hub's attention profile (a reading of clean prompt-only forwards
    through the deepest head read) gives what last_token_attention computes, at the token-layers of
    those forwards through that layer; it is kept in the store, so a second call and a resumed run
    (a new store on the same file) read it with no forward, while another head set is read anew.
    A through= short of a layer read, and a model with an intervention on, are handled: the first
    refused, the second read here and not stored. Catches values paired with the wrong prompt, a
    forward run through every layer (or not far enough), and a stored reading not served."""
    import numpy as np

    from rh.scoring import LastTokenAttentionReading, last_token_attention, read_last_token_attention

    heads = [Head(1, 2), Head(2, 5)]
    samples = list(tiny_samples)
    length = len(samples[0].input_ids)
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    path = tmp_path / "rows.jsonl"
    try:
        with use_runner(tiny, Runner(tiny, store=ResultStore(path))) as runner:
            per_head = read_last_token_attention(tiny, samples, heads, batch_size=4)
            assert counter.total == len(samples) * length * 3  # layers 0..2: through the deepest head read
            mean = read_last_token_attention(tiny, samples, heads, mean=True, batch_size=4)
            assert counter.total == 2 * len(samples) * length * 3  # another reading: read anew
            read_last_token_attention(tiny, samples, heads, batch_size=4)
            assert counter.total == 2 * len(samples) * length * 3 and runner.prompts_reused == len(samples)
        with use_runner(tiny, Runner(tiny, store=ResultStore(path))) as resumed:
            again = read_last_token_attention(tiny, samples[::-1], heads, mean=True, batch_size=4)
            assert counter.total == 2 * len(samples) * length * 3 and resumed.prompts_reused == len(samples)
            read_last_token_attention(tiny, samples, heads[:1], batch_size=4)
            assert counter.total == 2 * len(samples) * length * 3 + len(samples) * length * 2
            with pytest.raises(RuntimeError, match="pass through="):
                resumed.read_prompts(samples[:1], LastTokenAttentionReading((Head(1, 2), Head(3, 0)), length), through=1)
            with ablate(tiny, [Head(0, 1)]):  # not pristine: read here, as the model stands, nothing stored
                hooked = read_last_token_attention(tiny, samples[:2], [Head(3, 0)], batch_size=4)
            assert resumed.store.get_read("x", 1) is None and len(resumed.store.reads) == 3 * len(samples)
    finally:
        handle.remove()
    for i, s in enumerate(samples):
        want = last_token_attention(tiny, s, heads)
        np.testing.assert_allclose(per_head[i], want, atol=1e-6)
        np.testing.assert_allclose(mean[i], want.mean(0), atol=1e-6)
        np.testing.assert_allclose(again[len(samples) - 1 - i], want.mean(0), atol=1e-6)
    with ablate(tiny, [Head(0, 1)]):
        np.testing.assert_allclose(hooked[0], last_token_attention(tiny, samples[0], [Head(3, 0)]), atol=1e-6)
    with pytest.raises(ValueError, match="one length"):
        read_last_token_attention(tiny, [samples[0], samples[0].__class__(**{**vars(samples[0]), "id": "short",
                                                                            "input_ids": samples[0].input_ids[1:]})],
                                  heads)
