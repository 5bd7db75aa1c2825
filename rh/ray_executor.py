"""Model replicas as Ray actors: the ``ray`` executor of :class:`rh.runner.Runner`.

Each replica is an actor holding one copy of the model (``--threads-per-replica`` CPU threads or
``--gpus-per-replica`` GPUs, reserved up front in one placement group: a bundle per replica, each
on one node, so a replica's GPUs are one node's). pytest stays the controller: a claim's call to
the runner is planned into packets (:func:`rh.units.plan_packets`, the same batches as in one
process), each packet goes to the replica its prompts hash to (a prompt batch always meets the
same replica, whose prefix cache then holds what its earlier passes kept), the replicas run their
packets concurrently, and the controller gets back the rows, the token-layers each packet executed
and the token-layers prefix reuse saved. Early stopping is the controller's: it submits a claim's
next wave once the last one is back.

A replica that dies (killed, out of memory, a node lost) is restarted by Ray, reloads the model
and runs its packets again (``max_restarts``, ``max_task_retries``); only the packets whose results
came back are counted, so nothing is counted twice.

``--ray local`` starts a cluster on this machine and stops it at the end, every Ray process bound to
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: no traffic to any other address, the machine's
own included). ``--ray HOST:PORT`` joins a running cluster (``ray start --head`` on one node,
``ray start --address HOST:PORT`` on the others), with rh installed on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rh.niah import Sample
from rh.runner import Done
from rh.units import Packet

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads (``rh.models.load_model``'s arguments) and the resources it holds."""

    model: str
    dtype: str | None = None
    quant: str | None = None
    device: str | None = None
    max_memory: str | None = None
    threads: int | None = None
    gpus: float = 0.0
    prefix_reuse: bool = True


def _local_only() -> None:
    """Every Ray process this one starts binds to the loopback address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = False  # read at call time by ray's address resolution
    except ImportError:  # pragma: no cover - checked by connect's import
        pass


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address!r}: give 'local' (a cluster on this machine) or the head node's HOST:PORT "
                         "(what `ray start --head` printed, e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"--ray {address}: no Ray cluster answers there ({e.__class__.__name__}: {e}). Start one "
                              f"with `ray start --head --port {port}` on that node, or use --ray local") from None


@contextlib.contextmanager
def _own_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler: ``ray.init`` replaces it with ``sys.exit``, which pytest
    would record as one failing test and then run on (rh's plugin ends the run and writes the report)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def connect(address: str, *, num_cpus: int | None = None) -> bool:
    """Connect to (``HOST:PORT``) or start (``local``) a Ray cluster; True if this call started it
    (and :func:`disconnect` should stop it)."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs the ray package: pip install 'ray>=2.40' (scripts/setup.sh installs it)") from None
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "configure_logging": False}
    with _own_sigterm():
        if address == "local":
            _local_only()
            ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False,
                     **quiet)
            return True
        reachable(address)
        if _is_loopback(address):  # a cluster on this machine: stay on the loopback address (see _local_only)
            _local_only()
        ray.init(address=address, **quiet)
    return False


@contextlib.contextmanager
def local_nodes(nodes: int, *, cpus_per_node: int = 1, gpus_per_node: int = 0) -> Iterator[str]:
    """``nodes`` Ray nodes on this machine, every one bound to 127.0.0.1, each with its own
    resources (its own raylet, as a second machine would have): yields the head's ``HOST:PORT`` for
    ``--ray``, and stops them all on exit. It tries a multi-node layout where only one machine is at
    hand: ``ray start --address`` cannot add a second node bound to the loopback address (Ray
    refuses multi-node clusters in its loopback-only mode, and outside it the node listens on every
    address), so the nodes are started as Ray's own multi-node tests start them."""
    _local_only()
    from ray.cluster_utils import Cluster

    args = {"node_ip_address": LOOPBACK, "num_cpus": cpus_per_node, "num_gpus": gpus_per_node,
            "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=args)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**{k: v for k, v in args.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        import ray

        if ray.is_initialized():  # the driver connected to these nodes leaves first
            ray.shutdown()
        cluster.shutdown()


def disconnect(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


def check_resources(spec: ReplicaSpec, replicas: int) -> None:
    """Refuse, before any replica loads, what the cluster cannot hold: more GPUs or threads per
    replica than its largest node has, or more replicas than fit at once."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = [float(n["Resources"].get("GPU", 0)) for n in nodes]
    cpus = [float(n["Resources"].get("CPU", 0)) for n in nodes]
    if spec.gpus and spec.gpus > max(gpus, default=0):
        raise ValueError(f"--gpus-per-replica {spec.gpus:g}: the largest node of the Ray cluster has "
                         f"{max(gpus, default=0):g} GPUs, and a replica's GPUs must sit on one node; ask for fewer "
                         "GPUs per replica (or quantize: --quant 4bit)")
    threads = spec.threads or 1
    if threads > max(cpus, default=0):
        raise ValueError(f"--threads-per-replica {threads}: the largest node of the Ray cluster has "
                         f"{max(cpus, default=0):g} CPUs; ask for at most that many")
    fit = sum(int(min(c // threads, g // spec.gpus if spec.gpus else c // threads)) for c, g in zip(cpus, gpus))
    if replicas > fit:
        raise ValueError(f"--replicas {replicas}: the Ray cluster holds {fit} replica(s) of {threads} CPU(s)"
                         + (f" and {spec.gpus:g} GPU(s)" if spec.gpus else "") + " at once; ask for fewer replicas "
                         "or add nodes")


class _Replica:
    """One model copy (a Ray actor's body; see :func:`_actor_class`)."""

    def __init__(self, spec: ReplicaSpec):
        import contextlib

        import torch

        from rh.budget import TokenLayerCounter
        from rh.models import load_model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.model = load_model(spec.model, dtype=spec.dtype, quant=spec.quant, device=spec.device,
                                max_memory=spec.max_memory)
        self.counter = TokenLayerCounter()
        self.counter.attach(self.model.model)
        self.resources = contextlib.ExitStack()
        self.prefix = None
        if spec.prefix_reuse:
            from rh.prefix import reuse_prefixes

            self.prefix = self.resources.enter_context(reuse_prefixes(self.model))

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def memory(self) -> dict[str, Any]:
        """This replica's peak memory (:func:`rh.memory.peak_memory`: resident set, and each GPU's
        tensors) and its prefix cache's peak and cap, in bytes."""
        from rh.memory import process_memory

        return {"pid": os.getpid(), **process_memory(self.prefix)}

    def numerics(self) -> str:
        """The arithmetic of this replica's passes (:func:`rh.models.numerics`), named in its own
        process: its node's CPU or GPU, which need not be the controller's."""
        from rh.models import numerics

        prov = self.model.provenance
        return numerics(prov["dtype"], str(prov.get("device", "cpu")))

    def run(self, packets: list[Packet], samples: list[Sample], hints: list[int], reading: Any = None) -> list[tuple]:
        from rh.prefix import hinting
        from rh.units import read_packet

        by_id = {s.id: s for s in samples}
        out = []
        for p in packets:
            def one(p=p):
                with hinting(self.model, hints):
                    return read_packet(self.model, p, by_id, reading)

            (scores, read), tl, saved = self._measured(one)
            out.append((scores, tl, saved, read))
        return out

    def call(self, tasks: list[Any], samples: list[Sample]) -> list[tuple]:
        """Each task's result, with the token-layers it ran and what it saved (:class:`rh.runner.Task`)."""
        by_id = {s.id: s for s in samples}
        return [self._measured(lambda t=t: t.run(self.model, by_id)) for t in tasks]

    def _measured(self, fn: Any) -> tuple[Any, int, dict[str, int]]:
        """``fn()``, the token-layers it ran on this replica and the exact savings it made."""
        from rh.budget import saved_token_layers

        tl, saved = self.counter.total, dict(saved_token_layers())
        result = fn()
        now = saved_token_layers()
        return result, self.counter.total - tl, {k: v - saved.get(k, 0) for k, v in now.items() if v - saved.get(k, 0)}


def _actor_class(max_restarts: int):
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=-1)(_Replica)


def _results(replica: int, ref: Any, n: int, what: str, lost: str) -> list:
    """What replica ``replica`` returned for ``n`` packets or tasks (``what``): refused, naming
    the replica, if it died for good (``lost`` says what that costs) or returned something else."""
    import ray

    try:
        results = ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"Ray replica {replica} died and could not be restarted ({e.__class__.__name__}); "
                           f"{lost}") from None
    if not isinstance(results, list) or len(results) != n:
        raise RuntimeError(f"Ray replica {replica} returned {type(results).__name__} for {n} {what}: its results are "
                           "not used")
    return results


def replica_of(packet: Packet, replicas: int) -> int:
    """The replica a packet goes to: a hash of its prompts (each once), so a prompt batch meets one
    replica, and so does every fan packet of one prompt (its clean prefill is kept there)."""
    digest = hashlib.sha1("\0".join(sorted(set(packet.sample_ids))).encode()).digest()
    return int.from_bytes(digest[:8], "big") % replicas


class RayExecutor:
    """``replicas`` actors of :class:`_Replica` on a Ray cluster (:func:`connect`)."""

    name = "ray"

    def __init__(self, spec: ReplicaSpec, *, address: str = "local", replicas: int = 1, max_restarts: int = 3,
                 place_timeout_s: float = 120.0):
        if replicas < 1:
            raise ValueError(f"--replicas {replicas}: need at least one replica")
        self.spec, self.address, self.replicas = spec, address, replicas
        threads = spec.threads or 1
        self.started = connect(address, num_cpus=max(os.cpu_count() or 1, replicas * threads))
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            check_resources(spec, replicas)
            bundle = {"CPU": threads, **({"GPU": spec.gpus} if spec.gpus else {})}
            self.group = placement_group([dict(bundle) for _ in range(replicas)], strategy="PACK")
            ready, _ = ray.wait([self.group.ready()], timeout=place_timeout_s)
            if not ready:
                raise TimeoutError(f"the Ray cluster could not place {replicas} replica(s) of {bundle} within "
                                   f"{place_timeout_s:.0f} s; ask for fewer replicas or fewer resources each")
            cls = _actor_class(max_restarts)
            self.actors = [cls.options(num_cpus=threads, num_gpus=spec.gpus or 0,
                                       scheduling_strategy=PlacementGroupSchedulingStrategy(
                                           placement_group=self.group, placement_group_bundle_index=i)).remote(spec)
                           for i in range(replicas)]
            self.pids = ray.get([a.pid.remote() for a in self.actors])  # waits for every replica to load
        except BaseException:
            self.close()
            raise

    def execute(self, packets: Sequence[Packet], by_id: Mapping[str, Sample], hints: Sequence[int],
                reading: Any = None) -> Iterator[Done]:
        """The packets, each on the replica :func:`replica_of` names; ``reading`` (a
        :class:`rh.runner.Reading`, a value) travels with them and is read there."""
        mine: list[list[int]] = [[] for _ in range(self.replicas)]
        for n, p in enumerate(packets):
            mine[replica_of(p, self.replicas)].append(n)
        refs = {}
        for r, idx in enumerate(mine):
            if idx:
                ps = [packets[n] for n in idx]
                samples = [by_id[i] for i in dict.fromkeys(i for p in ps for i in p.sample_ids)]
                refs[r] = self.actors[r].run.remote(ps, samples, list(hints), reading)
        got: dict[int, Done] = {}
        for r, ref in refs.items():
            results = _results(r, ref, len(mine[r]), "packets", "its packets' rows were not counted. Rerun: with "
                               "--store the rows already computed are kept")
            for n, res in zip(mine[r], results):
                scores, tl, saved, read = res
                got[n] = Done(list(scores), int(tl), dict(saved), None if read is None else list(read))
        for n in range(len(packets)):
            yield got[n]

    def call(self, tasks: Sequence[Any], by_id: Mapping[str, Sample]) -> Iterator[tuple[Any, int, dict]]:
        """Each task's result in order (:class:`rh.runner.Task`), task ``i`` on replica ``i %
        replicas``: a wave of as many tasks as replicas runs at once."""
        refs = []
        for n, t in enumerate(tasks):
            samples = [by_id[i] for i in dict.fromkeys(t.sample_ids)]
            refs.append((n % self.replicas, self.actors[n % self.replicas].call.remote([t], samples)))
        for r, ref in refs:
            ((result, tl, saved),) = _results(r, ref, 1, "tasks", "its task was not counted. Rerun")
            yield result, int(tl), dict(saved)

    def numerics(self, timeout_s: float = 60.0) -> list[str]:
        """Each replica's numerics (:meth:`_Replica.numerics`), in replica order: what the run's
        verdicts are keyed by (:func:`rh.models.joined_numerics`), read where the passes run."""
        import ray

        return [str(x) for x in ray.get([a.numerics.remote() for a in self.actors], timeout=timeout_s)]

    def memory(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Each replica's peak memory (:meth:`_Replica.memory`), in replica order; a replica that
        does not answer within ``timeout_s`` gives ``{"error": why}`` instead (a replica restarted
        after a loss reports the peak of its new process)."""
        import ray

        out = []
        for r, a in enumerate(self.actors):
            try:
                out.append(dict(ray.get(a.memory.remote(), timeout=timeout_s)))
            except Exception as e:  # noqa: BLE001 - a report field: the run's results stand
                out.append({"error": f"replica {r} did not report its memory ({e.__class__.__name__})"})
        return out

    def close(self) -> None:
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            for a in getattr(self, "actors", []):
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            group = getattr(self, "group", None)
            if group is not None:
                from ray.util.placement_group import remove_placement_group

                try:
                    remove_placement_group(group)
                except Exception:  # noqa: BLE001
                    pass
        disconnect(getattr(self, "started", False))
