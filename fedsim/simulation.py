"""Run a federation in Flower's Simulation Engine (Ray backend) from Python.

SIGINT (Ctrl-C) and SIGTERM stop a run cleanly: the first signal sets a stop request that the
server's grid checks while it waits for replies (every 0.2 s), so the ServerApp ends with
:class:`~fedsim.server.app.RunInterrupted`; Flower then stops its workers and shuts Ray down, and
the exception reaches the caller (the CLI prints how to resume and exits with 128 + the signal
number). Flower's workers wait for the client call in progress; if one is still running
:data:`STOP_GRACE` seconds after the signal (a long local training, a hung client), this run's
client actor processes are killed (their results are not needed: the round is lost anyway). A
second signal raises :class:`KeyboardInterrupt` at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim._logging import VERBOSE_ENV, logger, quiet_third_party, verbose
from fedsim.clients.layout import THREAD_PROFILES, ThreadProfile, _makespan, pick_client_cpus  # noqa: F401  (re-exported)
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.resolve import cuda_available
from fedsim.clients.timing import TIMINGS_ENV
from fedsim.config import ConfigError, ResolvedConfig, RunConfig

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

    from fedsim.server.app import StopRequest


def backend_config(cfg: ResolvedConfig) -> dict[str, dict[str, ConfigRecordValues]]:
    """Ray backend settings: per-client CPUs/GPUs from the config; no dashboard.

    ``init_args`` are what Flower's Ray backend passes to ``ray.init``: a Ray instance with this
    machine's CPUs, or, with ``ray_address``, the ``address`` of an existing cluster to join (whose
    nodes bring their own resources, so no ``num_cpus`` then: Ray refuses it when joining).
    """
    init_args: dict[str, ConfigRecordValues] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}, "init_args": init_args}


class RayClusterUnreachable(ConfigError):
    """``--ray-address`` names no Ray cluster this machine can reach."""


#: Seconds to wait for a TCP connection to the cluster's head before giving up.
CONNECT_TIMEOUT = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse, within ``timeout`` s, a ``host:port`` where nothing accepts connections.

    ``ray.init`` itself retries an unreachable head for minutes; a plain TCP connection to the
    head's GCS port fails at once (refused) or after ``timeout`` (filtered / no route). ``auto``
    is left to Ray, which fails at once when it finds no cluster.
    """
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise RayClusterUnreachable(
            f"cannot reach a Ray cluster at {address} ({why}); start its head with 'ray start --head --port {port}' "
            "or fix --ray-address (see docs/deployment.md)"
        ) from None


@dataclass(frozen=True)
class RayNode:
    """One alive Ray node and the resources it declares (logical: ``ray start --num-gpus 2`` on a
    machine without GPUs declares two)."""

    node_id: str
    ip: str
    cpus: float
    gpus: float

    def clients(self, client_cpus: float, client_gpus: float) -> int:
        """How many clients this node runs at a time: Flower's actor-pool rule
        (``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``): CPUs, and with
        ``client_gpus > 0`` also GPUs, a node without GPUs running none."""
        n = int(self.cpus / client_cpus)
        if client_gpus > 0:
            n = min(n, int(self.gpus / client_gpus)) if self.gpus else 0
        return n


@dataclass(frozen=True)
class RayLayout:
    """Where a run's clients can run: the Ray nodes, per-client resources and what follows from
    them. Logged at the start of a run and recorded in ``config.json`` (key ``ray``)."""

    address: str
    nodes: tuple[RayNode, ...]
    client_cpus: float
    client_gpus: float
    #: ``client_cpus`` was picked by :func:`pick_client_cpus` (``--client-cpus`` not given).
    picked: bool = False

    @property
    def cluster_cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def cluster_gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def clients_per_gpu(self) -> int:
        """``floor(1/F)`` for a fraction ``0 < F <= 1``; 0 when clients use no GPU or several each."""
        if not 0 < self.client_gpus <= 1:
            return 0
        return math.floor(1 / self.client_gpus + 1e-9)

    @property
    def concurrent_clients(self) -> int:
        """Clients running at a time over the whole cluster (Flower's actor-pool size)."""
        return sum(n.clients(self.client_cpus, self.client_gpus) for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address or "local",
            "nodes": [
                {"node_id": n.node_id, "ip": n.ip, "cpus": n.cpus, "gpus": n.gpus,
                 "clients": n.clients(self.client_cpus, self.client_gpus)}
                for n in self.nodes
            ],
            "cluster_cpus": self.cluster_cpus,
            "cluster_gpus": self.cluster_gpus,
            "client_cpus": self.client_cpus,
            "client_cpus_picked": self.picked,
            "client_gpus": self.client_gpus,
            "clients_per_gpu": self.clients_per_gpu,
            "concurrent_clients": self.concurrent_clients,
        }  # fmt: skip

    def describe(self) -> str:
        """One log line."""
        where = f"Ray cluster at {self.address}" if self.address else "Ray instance on this machine"
        nodes = "; ".join(
            f"node {n.node_id[:8]} ({n.ip}) CPU {n.cpus:g} GPU {n.gpus:g} -> {n.clients(self.client_cpus, self.client_gpus)} clients"
            for n in self.nodes
        )
        per_gpu = f", {self.clients_per_gpu} clients per GPU" if self.clients_per_gpu else ""
        return (
            f"{where}: {len(self.nodes)} nodes, CPU {self.cluster_cpus:g}, GPU {self.cluster_gpus:g} [{nodes}]; "
            f"per client CPU {self.client_cpus:g}{' (picked; --client-cpus to choose)' if self.picked else ''}, GPU {self.client_gpus:g}"
            f"{per_gpu}; {self.concurrent_clients} clients at a time"
        )

    def check(self) -> None:
        """Refuse a layout in which no node can run a client (Ray would wait forever)."""
        if self.concurrent_clients > 0:
            return
        where = f"the Ray cluster at {self.address}" if self.address else "this machine's Ray instance"
        nodes = ", ".join(f"CPU {n.cpus:g} GPU {n.gpus:g}" for n in self.nodes) or "none alive"
        largest_cpu = max((n.cpus for n in self.nodes), default=0)
        largest_gpu = max((n.gpus for n in self.nodes), default=0)
        raise ConfigError(
            f"no node of {where} can run a client with client_cpus={self.client_cpus:g}, client_gpus={self.client_gpus:g} "
            f"(nodes: {nodes}); use --client-cpus {largest_cpu:g} or fewer and --client-gpus {largest_gpu:g} or fewer"
            + (" (0: the cluster has no GPU)" if not largest_gpu else "")
        )


def ray_layout(cfg: ResolvedConfig, picked: bool = False) -> RayLayout:
    """The layout of the connected Ray session (``ray.nodes()``: alive nodes with resources);
    ``picked``: the config's ``client_cpus`` was picked, not given."""
    import ray

    nodes = tuple(
        RayNode(
            str(n["NodeID"]), str(n.get("NodeManagerAddress", "")), float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))
        )
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources")
    )
    return RayLayout(cfg.ray_address, nodes, cfg.client_cpus, cfg.client_gpus, picked)


def message_window(cfg: ResolvedConfig) -> int:
    """Messages the server keeps in flight in the Simulation Engine: 4 per client actor (Ray runs
    ``floor(CPUs / client_cpus)`` actors), enough to keep every actor busy while Flower's per-node
    polling stays cheap with many nodes (:class:`~fedsim.server.app.OrderedGrid`)."""
    actors = max(1, int((os.cpu_count() or 1) // cfg.client_cpus))
    return 4 * actors


#: Seconds after a stop signal before client calls still running are ended by killing their actors.
STOP_GRACE = 3.0


def _client_actor_pids(root: int) -> list[int]:
    """Descendants of process ``root`` that are Ray client actors (``ray::ClientAppActor``), from /proc."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                names[int(entry.name)] = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if names.get(pid, "").startswith("ray::ClientAppActor"):
            found.append(pid)
    return found


def _end_running_client_calls(done: threading.Event) -> None:
    """After :data:`STOP_GRACE` s, if the run has not ended, kill this run's client actors so
    Flower's workers stop waiting for them (Flower's error logs about them are muted)."""
    if done.wait(STOP_GRACE) or not os.path.isdir("/proc"):
        return
    pids = _client_actor_pids(os.getpid())
    if pids:
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logger.warning("ending %d client call(s) still running", len(pids))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While the block runs, SIGINT / SIGTERM set ``stop`` (a second one raises KeyboardInterrupt)
    and, after :data:`STOP_GRACE` s, end client calls still running. Outside the main thread
    (where Python allows no handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.request(signum)
        logger.warning("%s received: stopping (again to stop at once)", signal.Signals(signum).name)
        threading.Thread(target=_end_running_client_calls, args=(done,), daemon=True).start()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        done.set()
        for s, h in previous.items():
            signal.signal(s, h)


def run_simulation(cfg: RunConfig, *, resume: bool = False) -> None:
    """Validate ``cfg`` (names, numbers, data) before any work, then simulate it on Ray.

    One virtual SuperNode per client; ``partition-id`` / ``num-partitions`` are set by the
    Simulation Engine. The ServerApp writes its outputs to ``cfg.out``; with ``resume`` it
    continues the run there from its checkpoint. A signal ends the run with
    :class:`~fedsim.server.app.RunInterrupted` (see the module doc).
    """
    from fedsim.server.app import StopRequest

    stop = StopRequest()
    with stop_on_signals(stop):
        _run_simulation(cfg, resume, stop)


#: Thread-count variables of the numeric libraries (torch/OpenMP, OpenBLAS, MKL) a client actor starts with.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def client_thread_env(client_cpus: float) -> dict[str, str]:
    """The thread variables a client actor gets: ``max(floor(client_cpus), 1)`` threads for torch,
    OpenBLAS and MKL alike, the count Ray gives ``OMP_NUM_THREADS`` (so the results match
    :class:`~fedsim.server.inprocess.InProcessGrid` with :func:`~fedsim.server.inprocess.ray_client_threads`);
    Ray sets only ``OMP_NUM_THREADS``, and numpy's OpenBLAS would otherwise start one thread per core
    in every actor (parallel actors then oversubscribe the cores). Variables set in this
    environment are passed on unchanged."""
    from fedsim.server.inprocess import ray_client_threads  # imports Flower: only when a run starts

    n = str(ray_client_threads(client_cpus))
    return {k: os.environ.get(k) or n for k in THREAD_ENV_VARS}


#: Ray's setting (an environment variable read by the raylet it starts) for its workers' niceness.
NICENESS_ENV = "RAY_worker_niceness"


@contextmanager
def worker_niceness(cfg: ResolvedConfig) -> Iterator[None]:
    """Start a local Ray instance whose workers (the client actors) run at niceness 0, like the
    process that starts them, instead of Ray's default 15, under which a client actor trains slower
    than the same loop in a plain process whenever anything else wants the CPU (the driver, Ray's
    own processes, other jobs; issue 14). ``RAY_worker_niceness`` set in this environment wins; a
    cluster (``ray_address``) keeps the niceness its nodes were started with."""
    if cfg.ray_address or NICENESS_ENV in os.environ:
        yield
        return
    os.environ[NICENESS_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(NICENESS_ENV, None)


@contextmanager
def ray_session(cfg: ResolvedConfig, stop: StopRequest) -> Iterator[None]:
    """Start Ray here (or join ``cfg.ray_address``), as Flower's Ray backend would (same init arguments and ``PYTHONPATH``
    runtime env; Flower then uses this session), and shut it down afterwards in any case.

    ``ray.init`` replaces the process's SIGTERM handler with ``sys.exit``; starting Ray first lets
    :func:`stop_on_signals` put fedsim's handler back, so SIGTERM stops the run as cleanly as SIGINT.
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath, **client_thread_env(cfg.client_cpus)}
    for name in (VERBOSE_ENV, TIMINGS_ENV):  # the clients' console verbosity (fedsim._logging); benchmark timings
        if os.environ.get(name) is not None:
            env_vars[name] = os.environ[name]
    with warnings.catch_warnings(), worker_niceness(cfg):
        if not verbose():  # Ray's tip about accelerator env vars (a FutureWarning on every start)
            warnings.simplefilter("ignore", FutureWarning)
        level = logging.INFO if verbose() is not False else logging.WARNING  # "Started a local Ray instance" etc.
        try:
            ray.init(runtime_env={"env_vars": env_vars}, logging_level=level, **backend_config(cfg)["init_args"])  # type: ignore[arg-type]
        except ConnectionError as exc:  # "auto" and no cluster found, or the head went away meanwhile
            raise RayClusterUnreachable(f"cannot join a Ray cluster at {cfg.ray_address}: {exc}".splitlines()[0]) from None
    try:
        with stop_on_signals(stop):
            yield
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _run_simulation(cfg: RunConfig, resume: bool, stop: StopRequest) -> None:
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedsim.clients.app import app as client_app
    from fedsim.server.app import RunInterrupted, check_cme_layers, make_server_app

    if cfg.ray_address:  # before any other work: a wrong address is the likeliest mistake here
        check_reachable(cfg.ray_address)
    auto_gpus = cfg.client_gpus is None
    picked = cfg.client_cpus is None
    cfg = resolve_config(cfg)
    if cfg.cme:
        check_cme_layers(cfg)
    sizes = get_task(cfg.task).check_data(cfg)
    if len(sizes) > 10:
        logger.info("data ok: %d clients, %d-%d samples each", len(sizes), min(sizes), max(sizes))
    else:
        logger.info("data ok: %s samples per client", sizes)
    # With ray_address the cluster's resources count, not this machine's: checked once joined.
    if not cfg.ray_address and cfg.client_gpus > 0 and not cuda_available():
        raise ConfigError(
            f"client_gpus={cfg.client_gpus:g} but this machine has no CUDA GPU: Ray would wait for one forever; "
            "use --client-gpus 0 (or leave it unset: 1 with CUDA, else 0)"
        )
    if not cfg.ray_address and cfg.client_cpus > (os.cpu_count() or 1):
        raise ConfigError(
            f"client_cpus={cfg.client_cpus} exceeds the {os.cpu_count()} CPUs of this machine; use --client-cpus {os.cpu_count()} or fewer"
        )
    if stop.is_set():
        raise RunInterrupted(stop.signum)
    with warnings.catch_warnings(), ray_session(cfg, stop):
        warnings.simplefilter("ignore", DeprecationWarning)
        layout = ray_layout(cfg, picked)
        if cfg.ray_address and auto_gpus:  # unset: one GPU per client if the cluster has GPUs
            cfg = dataclasses.replace(cfg, client_gpus=1.0 if layout.cluster_gpus > 0 else 0.0)
            layout = ray_layout(cfg, picked)
        layout.check()
        logger.info("%s", layout.describe())
        quiet_third_party()  # now that Flower is imported: its chatter off unless -v (fedsim._logging)
        # Flower deprecates run_simulation in favour of `flwr run`, which needs a SuperLink process;
        # tests/test_flower_api.py fails as soon as the function or these parameters go.
        flwr_run_simulation(
            server_app=make_server_app(cfg, resume=resume, stop=stop, ray_layout=layout.to_json(), window=message_window(cfg)),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config(cfg),
        )
    if stop.is_set():  # the ServerApp ended (Flower may have logged the exception instead of raising it)
        raise RunInterrupted(stop.signum)
