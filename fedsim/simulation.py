"""Run a federation in Flower's Simulation Engine (Ray backend) from Python."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from fedsim._logging import logger
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.resolve import cuda_available
from fedsim.config import ConfigError, ResolvedConfig, RunConfig

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues


def backend_config(cfg: ResolvedConfig) -> dict[str, dict[str, ConfigRecordValues]]:
    """Ray backend settings: per-client CPUs/GPUs from the config; no dashboard."""
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True},
    }


def run_simulation(cfg: RunConfig) -> None:
    """Validate ``cfg`` (names, numbers, data) before any work, then simulate it on Ray.

    One virtual SuperNode per client; ``partition-id`` / ``num-partitions`` are set by the
    Simulation Engine. The ServerApp writes its outputs to ``cfg.out``.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedsim.clients.app import app as client_app
    from fedsim.server.app import check_cme_layers, make_server_app

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flwr_run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config(cfg),
        )
