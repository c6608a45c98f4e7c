"""Run a federation in Flower's Simulation Engine (Ray backend) from Python.

SIGINT (Ctrl-C) and SIGTERM stop a run cleanly: the first signal sets a stop request that the
server's grid checks while it waits for replies (every 0.2 s), so the ServerApp ends with
:class:`~fedsim.server.app.RunInterrupted` after the clients' current call; Flower then stops its
workers and shuts Ray down, and the exception reaches the caller (the CLI prints how to resume
and exits with 128 + the signal number). A second signal raises :class:`KeyboardInterrupt` at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fedsim._logging import logger
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


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While the block runs, SIGINT / SIGTERM set ``stop`` (a second one raises KeyboardInterrupt).
    Outside the main thread (where Python allows no handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.request(signum)
        logger.warning("%s received: stopping after the clients' current step (again to stop at once)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
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
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **backend_config(cfg)["init_args"])  # type: ignore[arg-type]
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
        flwr_run_simulation(
            server_app=make_server_app(cfg, resume=resume, stop=stop),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config(cfg),
        )
    if stop.is_set():  # the ServerApp ended (Flower may have logged the exception instead of raising it)
        raise RunInterrupted(stop.signum)
