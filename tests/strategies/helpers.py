"""Hand-made client replies and a tiny in-process federation for the strategy tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.clients.tasks import resolve_config
from fedsim.config import ResolvedConfig, RunConfig


def reply(arrays: dict[str, np.ndarray], num_examples: int, pid: int, loss: float = 1.0) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "partition-id": pid, "train-loss": loss}),
        }
    )
    return Message(content=content, dst_node_id=pid + 1, message_type="train")


class FakeGrid:
    """Enough of a Grid for ``configure_train`` / ``configure_evaluate``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def tiny_config(
    tmp_path: Any, strategy: str, clients: int = 3, rounds: int = 1, options: Sequence[tuple[str, str]] = (), **kw: Any
) -> ResolvedConfig:
    return resolve_config(
        RunConfig(
            profile="tiny", scenario=2, models=("small_cnn",) * clients, clients=clients, rounds=rounds, num_samples=20 * clients,
            strategy=strategy, strategy_options=tuple(options), out=str(tmp_path / f"{strategy}-{clients}"), **kw,
        )
    )  # fmt: skip


def run_in_process(cfg: ResolvedConfig, on_reply: Callable[[Message, Message], None] | None = None) -> tuple[Any, Any]:
    """Run ``cfg`` through the real ServerApp and ClientApp in this process: (Flower Result, grid)."""
    from fedsim.clients.app import app
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid
    from fedsim.study.federation import quiet_logs

    grid = InProcessGrid(app, cfg.clients, num_threads=1, on_reply=on_reply)
    if hasattr(on_reply, "bind"):  # hooks that read the clients' contexts
        on_reply.bind(grid)
    with quiet_logs():
        result = run_server(grid, cfg)
    return result, grid


def replace(cfg: ResolvedConfig, **kw: Any) -> ResolvedConfig:
    return dataclasses.replace(cfg, **kw)


@dataclass
class Exchange:
    sent: dict
    got: dict
    num_examples: int
    watched: dict


class ExchangeLog:
    """An InProcessGrid ``on_reply`` hook: per (round, message type, client) what was sent, what came
    back, and the client's tensors ``watch`` in its private state right after the call."""

    def __init__(self, watch):
        self.watch = watch
        self.grid = None
        self.rows: list[Exchange] = []
        self.index: dict[tuple[int, str, int], Exchange] = {}
        self.count: dict[tuple[str, int], int] = {}

    def bind(self, grid):
        self.grid = grid

    def __call__(self, msg, rep):
        kind = msg.metadata.message_type
        if kind not in ("train", "evaluate"):  # e.g. the server's identity query
            return
        pid = int(rep.content["metrics"]["partition-id"])
        rnd = self.count[(kind, pid)] = self.count.get((kind, pid), 0) + 1
        state = self.grid.contexts[msg.metadata.dst_node_id].state["fedsim.model"]
        arrays = rep.content.array_records.get("arrays")
        row = Exchange(
            {k: v.numpy().copy() for k, v in msg.content["arrays"].items()},
            {k: v.numpy().copy() for k, v in arrays.items()} if arrays is not None else {},
            int(rep.content["metrics"]["num-examples"]),
            {k: state[k].numpy().copy() for k in state if k in self.watch},
        )
        self.rows.append(row)
        self.index[(rnd, kind, pid)] = row

    def get(self, rnd, kind, pid) -> Exchange:
        return self.index[(rnd, kind, pid)]
