"""The fedsim ServerApp (Flower Message API): the federated server of the CME paper (Fig. 2).

It validates the run configuration, waits (with a timeout) for the clients it needs, computes
the allow-list of shared parameters (:mod:`fedsim.models.sharing`), and runs the chosen Flower
strategy for ``rounds`` rounds. Per-client metrics go to ``metrics.jsonl`` every round; the
aggregated parameters to ``global_params.safetensors`` at the end. When the whole server model is
aggregated (same-model scenarios) it is also evaluated on the held-out global test set.

``app`` reads its configuration from Flower's run config (``flwr run``);
:func:`make_server_app` binds an already-resolved :class:`ResolvedConfig` (``fedsim run``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore.run import Run

from fedsim._logging import enable_console_logging, logger
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.cme import CMEArchiveWriter
from fedsim.cme.recorder import matching_layers, recorded_parameters
from fedsim.config import ConfigError, ResolvedConfig, RunConfig
from fedsim.models.sharing import shared_parameter_names
from fedsim.rundir import RunDir, default_out_dir
from fedsim.server.recorder import RoundRecorder, scalar
from fedsim.strategies import StrategyHooks, build_strategy


class NodeTimeoutError(TimeoutError):
    """Fewer SuperNodes connected than the run needs, within the configured timeout."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Return the connected node ids once ``needed`` are there; give up after ``timeout`` s."""
    start = time.monotonic()
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= needed:
            return ids
        if time.monotonic() - start >= timeout:
            raise NodeTimeoutError(
                f"waited {timeout:.0f}s for {needed} client nodes but saw only {len(ids)}; start more "
                "SuperNodes, lower the number of clients, or raise node-timeout"
            )
        time.sleep(poll)


class ClientFailedError(RuntimeError):
    """A client replied with an error; the run stops (rounds already written are kept)."""


class NonFiniteUpdateError(ClientFailedError):
    """A client returned NaN or infinite parameters; the run stops before they are aggregated."""


class OrderedGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that returns replies sorted by the clients' partition id,
    and stops the run when a client failed; every other call goes to the wrapped grid.

    Aggregation sums floats in reply order; sorting makes runs with the same seed bit-identical
    whatever order the nodes answered in. ``on_reply`` sees every reply first, in that order (the
    CME archive writer reads its records there, whatever the strategy). fedsim's strategies train
    every client every round, so a client error (bad local data, out of memory, ...) ends the run
    with its reason instead of silently aggregating fewer hospitals.
    """

    def __init__(self, grid: Grid, on_reply: Callable[[Message], None] | None = None) -> None:
        self._grid = grid
        self._on_reply = on_reply

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = sorted(self._grid.send_and_receive(messages, timeout=timeout), key=_partition_of)
        errors = [m for m in replies if m.has_error()]
        if errors:
            detail = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors)
            raise ClientFailedError(f"{len(errors)} of {len(replies)} clients failed: {detail}")
        check_finite(replies)
        if self._on_reply is not None:
            for m in replies:
                self._on_reply(m)
        return replies


def check_finite(replies: Sequence[Message]) -> None:
    """Refuse replies carrying non-finite parameters (:class:`NonFiniteUpdateError`, naming the
    clients and a tensor each), so one diverged hospital cannot turn the average into NaN."""
    bad = []
    for m in replies:
        for record in m.content.array_records.values():
            name = next((k for k, a in record.items() if not np.isfinite(a.numpy()).all()), None)
            if name is not None:
                bad.append(f"client {_partition_of(m)[1]} ({name})")
                break
    if bad:
        raise NonFiniteUpdateError(
            f"non-finite parameters from {', '.join(bad)}; stopped before aggregating them "
            "(the rounds so far are kept; a lower learning rate usually helps)"
        )


def _partition_of(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, 0)
    records = msg.content.metric_records
    m = next(iter(records.values())) if records else {}
    return (0, int(scalar(m.get("partition-id", 0))))


def run_server(grid: Grid, cfg: ResolvedConfig) -> Result:
    """Run a whole federated training with a resolved config; return Flower's ``Result``."""
    task = get_task(cfg.task)
    run_dir = RunDir(cfg.out or default_out_dir(cfg.task, cfg.scenario, cfg.profile)).create()
    cfg_json = cfg.to_json_dict() | {"out": str(run_dir.path)}
    run_dir.write_config(cfg_json)
    logger.info("run directory: %s", run_dir.path)
    if cfg.faults:
        logger.warning("injected faults: %s", ", ".join(str(f) for f in cfg.fault_specs()))

    client_models = cfg.client_models()
    shared = shared_parameter_names([*client_models, cfg.server_model], lambda m: task.build_model(m, cfg))
    torch.manual_seed(cfg.seed)
    server_model = task.build_model(cfg.server_model, cfg)
    server_state = server_model.state_dict()
    complete = set(shared) == {k for k, v in server_state.items() if v.is_floating_point()}
    logger.info(
        "scenario %d (%s): clients %s, server %s; sharing %d tensors (%s)",
        cfg.scenario, cfg.scenario_spec.description, list(client_models), cfg.server_model,
        len(shared), "whole model" if complete else "head layers: " + ", ".join(shared),
    )  # fmt: skip

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def global_eval(arrays: ArrayRecord) -> dict[str, float]:
        server_model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        res = task.evaluate_global(server_model, cfg, dev)
        return {} if res is None else {f"global-{k}": float(v) for k, v in res.metrics.items()}

    recorder = RoundRecorder(run_dir, client_models, global_eval if complete else None)
    strategy = build_strategy(cfg, StrategyHooks(cfg.clients, recorder.train_metrics, recorder.evaluate_metrics))
    on_reply = None
    if cfg.cme:
        check_cme_layers(cfg)
        on_reply = CMEArchiveWriter(run_dir.path).collect
        logger.info("recording CMEs into %s", run_dir.path / "cme")
    ids = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    logger.info("%d client nodes connected", len(ids))
    record = ConfigRecord(cfg.to_flower())
    result = strategy.start(
        grid=OrderedGrid(grid, on_reply),
        initial_arrays=ArrayRecord({k: server_state[k] for k in shared}),
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout,
        train_config=record,
        evaluate_config=ConfigRecord(cfg.to_flower()),
        evaluate_fn=recorder.on_round_end,
    )
    final = {k: np.asarray(v.numpy()) for k, v in result.arrays.items()}
    path = run_dir.save_params(final, {"server_model": cfg.server_model, "complete": str(complete).lower(), "rounds": str(cfg.rounds)})
    logger.info("final global parameters: %s", path)
    return result


def check_cme_layers(cfg: ResolvedConfig) -> None:
    """Refuse CME layer patterns that match no weight of some client's model (before training)."""
    task = get_task(cfg.task)
    patterns = cfg.cme_layers or tuple(task.cme_layers)
    for name in sorted(set(cfg.client_models())):
        with torch.device("meta"):
            model = task.build_model(name, cfg)
        names = [n for n, _ in recorded_parameters(model, cfg.cme_biases)]
        if not matching_layers(names, patterns):
            raise ConfigError(
                f"CME layers {list(patterns)} match no weight of model {name!r}; "
                f"its last weights are {', '.join(names[-4:])} (patterns use fnmatch, e.g. 'head.*.weight')"
            )
    if cfg.local_epochs < 2:
        logger.warning("CME ACF (eq. 4) pairs consecutive local epochs: with local_epochs=1 it stays empty")


def make_server_app(cfg: ResolvedConfig) -> ServerApp:
    """A ServerApp bound to an already-resolved config (used by ``fedsim run``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        enable_console_logging()
        run_server(grid, cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the config comes from ``[tool.flwr.app.config]`` / ``--run-config``."""
    enable_console_logging()
    cfg = resolve_config(RunConfig.from_flower(context.run_config))
    get_task(cfg.task).check_data(cfg)
    run_server(grid, cfg)
