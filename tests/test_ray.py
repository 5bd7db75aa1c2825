"""The Ray executor (rh.ray_executor) on a local cluster bound to 127.0.0.1: replicas of the tiny
model give the rows and token-layers the in-process passes give, a replica killed mid-run is
restarted and loses nothing, bad resources and addresses are refused before any replica loads,
and no Ray process outlives the tests."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from rh.ablation import Ablation  # noqa: E402
from rh.budget import TokenLayerCounter  # noqa: E402
from rh.heads import Head  # noqa: E402
from rh.niah import build_passkey_samples  # noqa: E402
from rh.runner import Runner  # noqa: E402
from rh.units import Unit, run_units  # noqa: E402


def _ray_processes() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().decode(errors="replace")
            except OSError:
                continue
            if "raylet" in cmd or "gcs_server" in cmd:
                out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def replicas():
    from rh.ray_executor import RayExecutor, ReplicaSpec

    already = set(_ray_processes())  # another run's cluster on this machine is not ours to judge
    # no prefix reuse: the counts are compared with plain passes here
    ex = RayExecutor(ReplicaSpec("tiny-llama", threads=1, prefix_reuse=False), address="local", replicas=2)
    try:
        yield ex
    finally:
        ex.close()
        assert not ray.is_initialized()
        deadline = time.time() + 20
        while set(_ray_processes()) - already and time.time() < deadline:
            time.sleep(0.5)
        assert not set(_ray_processes()) - already, "a Ray process outlived the cluster the tests started"


@pytest.fixture(scope="module")
def samples(tiny):
    return build_passkey_samples(tiny.tokenizer, lengths=[96, 128], depths=[0.0, 0.5, 1.0], n_per_setting=2, seed=3,
                                 max_positions=tiny.max_positions)


def _units(samples):
    ids = tuple(s.id for s in samples)
    return [Unit(Ablation.baseline(), ids), Unit(Ablation("top", (Head(1, 2), Head(3, 0)), selection="top"), ids),
            *[Unit(Ablation(f"random2#{d}", (Head(d % 4, d), Head(2, 7 - d)), selection="random", draw=d), ids[d:d + 5])
              for d in range(6)],
            Unit(Ablation("q", (Head(2, 1),), "query"), ids), Unit(Ablation("d", (Head(0, 1),), phase="decode"), ids)]


def _local(tiny, samples, units):
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        frames = run_units(tiny, samples, units, batch_size=4)
    finally:
        handle.remove()
    return frames, counter.total


def _check(frames, ref):
    for a, b in zip(frames, ref):
        assert list(a["id"]) == list(b["id"]) and list(a["correct"]) == list(b["correct"])
        assert list(a["first_argmax"]) == list(b["first_argmax"])
        assert (a["logprob"] - b["logprob"]).abs().max() <= 1e-5


def _counted(tiny, fn):
    """``fn()`` run here, and the token-layers it ran."""
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        return fn(), counter.total
    finally:
        handle.remove()


def _installable(tiny, replicas, charged):
    """A runner on the module's replicas to install on ``tiny`` (rh.runner.use_runner closes the
    runner it installs: this one leaves the replicas to the module's fixture)."""
    from rh.runner import Layout

    class Kept:
        name = "ray"

        def execute(self, *args):
            return replicas.execute(*args)

        def call(self, *args):
            return replicas.call(*args)

        def close(self):
            pass

    return Runner(tiny, executor=Kept(), layout=Layout.of(tiny, executor="ray", replicas=2), charge=charged.append)


def test_every_ray_process_binds_to_the_loopback_address(replicas):
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}


def test_replicas_return_the_rows_and_token_layers_of_the_passes_run_here(tiny, samples, replicas):
    units = _units(samples)
    ref, tl = _local(tiny, samples, units)
    charged = []
    frames = Runner(tiny, executor=replicas, charge=charged.append).run(samples, units, batch_size=4)
    _check(frames, ref)
    assert sum(charged) == tl  # the same forwards, counted on the replicas
    from rh.ray_executor import replica_of
    from rh.units import plan_packets

    used = {replica_of(p, 2) for p in plan_packets(units, {s.id: s for s in samples}, 4)}
    assert used == {0, 1}  # both replicas worked


def test_a_reading_travels_with_the_packets_and_is_read_on_the_replicas_as_here(tiny, samples, replicas):
    """ID-5's needle mass (a :class:`rh.runner.Reading`, a value) rides on the baseline's packets to
    the replicas: the same values per prompt as read in this process, the rows and token-layers of
    the plain baseline, and no forward of its own. Catches a reading left behind on the controller
    (the replicas would return none), values paired with the wrong rows of a packet, and a replica
    that runs a second pass to read."""
    import numpy as np

    from rh.id_claims import NeedleMassReading

    reading = NeedleMassReading((Head(1, 2), Head(3, 0), Head(3, 5)))
    units = [Unit(Ablation.baseline(), tuple(s.id for s in samples))]
    ref, tl = _local(tiny, samples, units)
    here_frames, here = Runner(tiny).read(samples, units, reading, batch_size=4)
    charged: list[int] = []
    frames, got = Runner(tiny, executor=replicas, charge=charged.append).read(samples, units, reading, batch_size=4)
    _check(frames, ref)
    _check(here_frames, ref)
    assert sum(charged) == tl
    assert set(got[0]) == set(here[0]) == {s.id for s in samples}
    for i, values in here[0].items():
        assert values.shape == (3,) and np.isfinite(values).all()
        np.testing.assert_allclose(got[0][i], values, rtol=1e-5)


def test_prompt_only_readings_run_on_the_replicas_as_here(tiny, samples, replicas):
    """The clean prompt-only forwards of rh.runner.read_prompts on the replicas: IV-5's residual
    streams (rh.probes.ResidualReading, every layer) and the hub's attention profile
    (rh.scoring.LastTokenAttentionReading, through the deepest head read) equal the values read in
    this process, at the token-layers counted here. Catches those passes left on the controller, a
    reading that does not survive the trip, and a replica that runs every layer for a shorter read."""
    import numpy as np

    from rh.probes import ResidualReading, last_token_residuals
    from rh.scoring import LastTokenAttentionReading, last_token_attention

    alone, tl = _counted(tiny, lambda: last_token_residuals(tiny, samples, batch_size=4, progress=False))
    charged: list[int] = []
    runner = Runner(tiny, executor=replicas, charge=charged.append)
    got = runner.read_prompts(samples, ResidualReading.of(tiny), batch_size=4)
    assert sum(charged) == tl
    for i, s in enumerate(samples):
        np.testing.assert_allclose(got[s.id].reshape(alone.shape[1:]), alone[i], rtol=1e-4, atol=1e-5)
    same = [s for s in samples if len(s.input_ids) == 128]
    heads = (Head(1, 2), Head(2, 0))
    hub = runner.read_prompts(same, LastTokenAttentionReading(heads, 128, mean=True), batch_size=4, through=2)
    assert sum(charged) == tl + len(same) * 128 * 3
    for s in same:
        np.testing.assert_allclose(hub[s.id], last_token_attention(tiny, s, heads).mean(0), atol=1e-6)


def test_identification_by_sum_attention_runs_on_the_replicas_as_here(tiny, samples, replicas):
    """With a Ray runner installed on the model, sum-attention identification (rh.scoring.score_samples)
    reads its prompts' clean forwards on the replicas: the scores computed in this process, at the
    token-layers counted here, charged as the replicas count them. Catches identification left on
    the controller and batches cut otherwise than make_batches cuts them (other padding, other
    token-layers than --plan plans)."""
    import numpy as np

    from rh.runner import use_runner
    from rh.content_free import content_free_scores
    from rh.scoring import score_samples

    here, tl = _counted(tiny, lambda: score_samples(tiny, samples, "sum_attention", batch_size=4, progress=False))
    wu24, wu24_tl = _counted(tiny, lambda: score_samples(tiny, samples, "wu24", batch_size=4, progress=False))
    charged: list[int] = []
    runner = _installable(tiny, replicas, charged)
    with use_runner(tiny, runner):
        there = score_samples(tiny, samples, "sum_attention", batch_size=4, progress=False)
        assert sum(charged) == tl and runner.prompts_read == len(samples)
        wu24_there = score_samples(tiny, samples, "wu24", batch_size=4, progress=False)  # tasks: one a batch
        assert sum(charged) == tl + wu24_tl
        free_there = content_free_scores(tiny, ("echo", "induction"), n_sequences=5, seq_len=16, batch_size=2)
    free, free_tl = _counted(tiny, lambda: content_free_scores(tiny, ("echo", "induction"), n_sequences=5, seq_len=16,
                                                               batch_size=2))
    assert sum(charged) == tl + wu24_tl + free_tl
    for m in ("echo", "induction"):  # float32 sums: a one-thread replica adds in another order than two threads here
        np.testing.assert_allclose(free_there[m].scores, free[m].scores, rtol=1e-5, atol=1e-7)
    assert there.ids == here.ids
    np.testing.assert_allclose(there.scores, here.scores, atol=1e-6)
    np.testing.assert_allclose(wu24_there.scores, wu24.scores, atol=1e-9)
    assert list(wu24_there.counted) == list(wu24.counted)
    assert [i["generated"] for i in wu24_there.info] == [i["generated"] for i in wu24.info]


def test_iv6s_attributions_run_on_the_replicas_as_here(tiny, samples, replicas):
    """IV-6's integrated gradients as tasks (rh.attribution.attribute through a Ray runner): each
    prompt's attribution as computed here, in order, the forwards' token-layers charged as counted
    here; with a stop asked at the first prompt, only that prompt runs, as in this process (the
    token-layers of a stopped run do not depend on the replicas). Catches IG left on the
    controller, results paired with the wrong prompt, and passes left off the bill."""
    import numpy as np

    from rh.attribution import attribute, integrated_gradients
    from rh.runner import use_runner

    heads = [Head(1, 2), Head(2, 5)]
    chosen = samples[:3]
    here, tl = _counted(tiny, lambda: [integrated_gradients(tiny, s, heads, n_steps=4) for s in chosen])

    charged: list[int] = []
    runner = _installable(tiny, replicas, charged)
    with use_runner(tiny, runner):
        there = attribute(tiny, chosen, heads, n_steps=4)
        assert sum(charged) == tl
        first = attribute(tiny, chosen, heads, n_steps=4, until=lambda a: True)
    assert [a.sample_id for a in there] == [s.id for s in chosen]
    assert [a.sample_id for a in first] == [s.id for s in chosen[:1]]
    for a, b in zip(there, here):
        np.testing.assert_allclose(a.token_attr, b.token_attr, rtol=1e-5, atol=1e-8)


def test_ca5s_head_outputs_run_on_the_replicas_as_here(tiny, samples, replicas):
    """CA-5's heads' outputs under each mechanism as tasks (rh.causal.HeadOutputsTask): on the
    replicas as in this process, and its verdict the same."""
    import numpy as np

    from rh.causal import HeadOutputsTask, evaluate_baseline, head_outputs, mechanism_comparison
    from rh.runner import use_runner

    heads = (Head(1, 2), Head(2, 5))
    ids = tuple(s.id for s in samples[:4])
    here = {m: head_outputs(tiny, samples[:4], heads, m, batch_size=4) for m in ("query", "zero")}
    base = evaluate_baseline(tiny, samples)
    want = mechanism_comparison(tiny, samples, list(heads), base, batch_size=4)
    charged: list[int] = []
    with use_runner(tiny, _installable(tiny, replicas, charged)) as runner:
        got = runner.call(samples[:4], [HeadOutputsTask(ids, heads, m, 4) for m in ("query", "zero")])
        v = mechanism_comparison(tiny, samples, list(heads), base, batch_size=4)
    assert charged
    for m, out in zip(("query", "zero"), got):
        for h in heads:
            np.testing.assert_allclose(out[h], here[m][h], atol=1e-6)
    assert (v.status, v.details["query_vs_logits_rel_diff"] <= v.details["tolerance"]) == \
        (want.status, want.details["query_vs_logits_rel_diff"] <= want.details["tolerance"])


def test_iv4s_transplant_runs_on_the_replicas_as_here(tiny, samples, replicas):
    """IV-4's transplanted pass as a task carrying the donor's heads (rh.interventions.TransplantTask):
    on a replica, which holds the recipient alone, the verdict and the accuracies are those of this
    process, and its token-layers are charged here."""
    from rh.budget import TokenLayerCounter
    from rh.causal import evaluate_baseline
    from rh.interventions import transplant_function
    from rh.models import tiny_llama
    from rh.runner import use_runner

    heads = [Head(1, 2), Head(3, 7)]
    donor = tiny_llama(seed=1)
    base = evaluate_baseline(tiny, samples)
    want = transplant_function(tiny, donor, samples, heads, base, batch_size=4)
    charged: list[int] = []
    counter = TokenLayerCounter()
    handle = counter.attach(tiny.model)
    try:
        with use_runner(tiny, _installable(tiny, replicas, charged)):
            got = transplant_function(tiny, donor, samples, heads, base, batch_size=4)
    finally:
        handle.remove()
    assert sum(charged) > 0 and counter.total == 0  # every pass on the replicas, none here
    assert (got.status, got.p_value, got.details) == (want.status, want.p_value, want.details)


def test_a_replica_killed_mid_run_is_restarted_and_loses_nothing(tiny, samples, replicas):
    units = [Unit(Ablation(f"r{d}", (Head(d % 4, d // 4),)), tuple(s.id for s in samples)) for d in range(24)]
    ref, tl = _local(tiny, samples, units)
    victim = replicas.pids[0]
    charged: list[int] = []
    result: dict = {}

    def go():
        result["frames"] = Runner(tiny, executor=replicas, charge=charged.append).run(samples, units, batch_size=4)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    _check(result["frames"], ref)
    assert sum(charged) == tl  # the lost replica's packets ran again, and were counted once
    now = ray.get([a.pid.remote() for a in replicas.actors])
    assert victim not in now  # restarted: a new process
    replicas.pids = now


def test_the_budgets_calibration_times_a_replica(tiny, replicas):
    """Under --ray the controller holds no weights: the seconds per token-layer are measured on a
    replica (rh.budget.CalibrationTask), its three forwards (a warm-up, best of two) charged here:
    3 x 4 x 64 tokens x 4 layers. Catches the calibration run on the controller or left uncounted."""
    from rh.budget import CalibrationTask

    charged: list[int] = []
    per_tl, how = Runner(tiny, executor=replicas, charge=charged.append).call([], [CalibrationTask(4, 64)])[0]
    assert sum(charged) == 3 * 4 * 64 * 4
    assert per_tl > 0 and "one forward of 4 x 64 tokens x 4 layers" in how


def test_each_replica_names_the_numerics_it_computes_in(tiny, replicas):
    """Read in each replica's process, as rh.models.numerics names them here for the replicas' dtype
    and device (this one machine: the same CPU)."""
    from rh.models import numerics

    assert replicas.numerics() == [numerics(tiny.provenance["dtype"], "cpu")] * replicas.replicas


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:"))


def test_each_replica_reports_its_own_peak_memory(tiny, samples, replicas):
    """What a replica reports is its own process's peak (read here from /proc), not the controller's."""
    Runner(tiny, executor=replicas).run(samples, [Unit(Ablation.baseline(), tuple(s.id for s in samples))],
                                        batch_size=4)
    got = replicas.memory()
    assert [m["pid"] for m in got] == list(replicas.pids)
    for m in got:
        outside = _vm_hwm(m["pid"])
        assert abs(m["rss_peak_bytes"] - outside) <= 0.02 * outside
        assert "prefix_cache_max_bytes" not in m  # these replicas do not reuse prefixes
    assert all(m["pid"] != os.getpid() for m in got)


def test_what_the_cluster_cannot_hold_is_refused_before_any_replica_loads(replicas):
    from rh.ray_executor import ReplicaSpec, check_resources

    with pytest.raises(ValueError, match="GPUs must sit on one node"):
        check_resources(ReplicaSpec("tiny-llama", gpus=1), 1)
    cpus = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    with pytest.raises(ValueError, match="largest node of the Ray cluster has"):
        check_resources(ReplicaSpec("tiny-llama", threads=int(cpus) + 1), 1)
    with pytest.raises(ValueError, match="replica\\(s\\) of 1 CPU"):
        check_resources(ReplicaSpec("tiny-llama", threads=1), int(cpus) + 1)


def test_an_address_that_does_not_answer_is_said_at_once():
    from rh.ray_executor import reachable

    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="no Ray cluster answers there"):
        reachable("127.0.0.1:1")
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="HOST:PORT"):
        reachable("somewhere")


def test_two_nodes_on_this_machine_each_hold_a_replica_and_give_the_rows_of_one_process(tiny, samples, replicas):
    """Two Ray nodes of one CPU each, both on 127.0.0.1: the two one-thread replicas must sit on
    different nodes, and their rows and token-layers are those of the passes run here."""
    from rh.ray_executor import RayExecutor, ReplicaSpec, local_nodes

    replicas.close()  # this test's own cluster; the module's is not needed after it
    units = _units(samples)[:4]
    ref, tl = _local(tiny, samples, units)
    with local_nodes(2) as address:
        assert address.startswith("127.0.0.1:")
        ex = RayExecutor(ReplicaSpec("tiny-llama", threads=1, prefix_reuse=False), address=address, replicas=2)
        try:
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2 and {n["NodeManagerAddress"] for n in alive} == {"127.0.0.1"}
            where = ray.get([a.node.remote() for a in ex.actors])
            assert len(set(where)) == 2  # one replica per node
            charged: list[int] = []
            frames = Runner(tiny, executor=ex, charge=charged.append).run(samples, units, batch_size=4)
        finally:
            ex.close()
    _check(frames, ref)
    assert sum(charged) == tl


def test_connecting_keeps_the_controllers_sigterm_handler(replicas):
    """``ray.init`` installs ``sys.exit`` for SIGTERM; the controller's own handler (rh's plugin ends
    the run and writes the report) must still be the one in place after connecting."""
    import signal

    from rh.ray_executor import connect, disconnect

    replicas.close()  # a fresh connection, not the module's
    def mine(signum, frame):  # noqa: E306
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        started = connect("local", num_cpus=1)
        try:
            assert started and ray.is_initialized()
            assert signal.getsignal(signal.SIGTERM) is mine
        finally:
            disconnect(started)
    finally:
        signal.signal(signal.SIGTERM, before)
