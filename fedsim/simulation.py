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
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fedsim._logging import VERBOSE_ENV, logger, quiet_third_party, verbose
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.resolve import cuda_available
from fedsim.config import ConfigError, ResolvedConfig, RunConfig

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

    from fedsim.server.app import StopRequest


def backend_config(cfg: ResolvedConfig) -> dict[str, dict[str, ConfigRecordValues]]:
    """Ray backend settings: per-client CPUs/GPUs from the config; no dashboard."""
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True},
    }


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


@contextmanager
def ray_session(cfg: ResolvedConfig, stop: StopRequest) -> Iterator[None]:
    """Start Ray here, as Flower's Ray backend would (same init arguments and ``PYTHONPATH``
    runtime env; Flower then uses this session), and shut it down afterwards in any case.

    ``ray.init`` replaces the process's SIGTERM handler with ``sys.exit``; starting Ray first lets
    :func:`stop_on_signals` put fedsim's handler back, so SIGTERM stops the run as cleanly as SIGINT.
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath}
    if os.environ.get(VERBOSE_ENV) is not None:  # the clients' console verbosity (fedsim._logging)
        env_vars[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    with warnings.catch_warnings():
        if not verbose():  # Ray's tip about accelerator env vars (a FutureWarning on every start)
            warnings.simplefilter("ignore", FutureWarning)
        level = logging.INFO if verbose() is not False else logging.WARNING  # "Started a local Ray instance" etc.
        ray.init(runtime_env={"env_vars": env_vars}, logging_level=level, **backend_config(cfg)["init_args"])  # type: ignore[arg-type]
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

    cfg = resolve_config(cfg)
    if cfg.cme:
        check_cme_layers(cfg)
    sizes = get_task(cfg.task).check_data(cfg)
    if len(sizes) > 10:
        logger.info("data ok: %d clients, %d-%d samples each", len(sizes), min(sizes), max(sizes))
    else:
        logger.info("data ok: %s samples per client", sizes)
    if cfg.client_gpus > 0 and not cuda_available():
        raise ConfigError(
            f"client_gpus={cfg.client_gpus:g} but this machine has no CUDA GPU: Ray would wait for one forever; "
            "use --client-gpus 0 (or leave it unset: 1 with CUDA, else 0)"
        )
    if cfg.client_cpus > (os.cpu_count() or 1):
        raise ConfigError(
            f"client_cpus={cfg.client_cpus} exceeds the {os.cpu_count()} CPUs of this machine; use --client-cpus {os.cpu_count()} or fewer"
        )
    if stop.is_set():
        raise RunInterrupted(stop.signum)
    with warnings.catch_warnings(), ray_session(cfg, stop):
        warnings.simplefilter("ignore", DeprecationWarning)
        quiet_third_party()  # now that Flower is imported: its chatter off unless -v (fedsim._logging)
        # Flower deprecates run_simulation in favour of `flwr run`, which needs a SuperLink process;
        # tests/test_flower_api.py fails as soon as the function or these parameters go.
        flwr_run_simulation(
            server_app=make_server_app(cfg, resume=resume, stop=stop, window=message_window(cfg)),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config(cfg),
        )
    if stop.is_set():  # the ServerApp ended (Flower may have logged the exception instead of raising it)
        raise RunInterrupted(stop.signum)
