"""Training callbacks: the hooks through which cross-cutting concerns join local training.

Progress logging, CME recording (:class:`fedsim.cme.CMERecorder`) and timing are
:class:`TrainCallback` objects handed to a task's local-epoch loop, not flags inside it (the
pattern of pfl-research's callbacks and Keras'). This module sits at the bottom of fedsim's
layers and imports no torch: a callback only sees the model it is given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsim._logging import logger

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TrainInfo:
    """Where a local training run sits in the federation."""

    server_round: int
    partition_id: int
    epochs: int
    model_name: str


class TrainCallback:
    """Base class; override what you need. Called in the client process around local training."""

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        """Before the first local epoch (``model`` holds the weights received this round)."""

    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        """After local epoch ``epoch`` (1-based)."""

    def on_train_end(self, model: nn.Module, info: TrainInfo) -> None:
        """After the last local epoch."""


class ProgressLogger(TrainCallback):
    """Logs one line per local epoch: round, client, epoch, the task's metrics and seconds."""

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        self._t = time.perf_counter()

    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        logger.info(
            "round %d client %d (%s) epoch %d/%d: %s (%.1fs)",
            info.server_round, info.partition_id, info.model_name, epoch, info.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), now - self._t,
        )  # fmt: skip
        self._t = now


#: Name of the ``ConfigRecord`` in a train reply that carries the round's per-epoch train metrics.
EPOCHS_RECORD_KEY = "fedsim.epochs"


class EpochHistory(TrainCallback):
    """Keeps every local epoch's train metrics, so the reply can carry them to the server
    (``metrics.jsonl``'s per-client ``epochs``, the trackers' per-epoch curves); the task itself
    reports only the round's final metrics."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        self.history = []

    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        self.history.append({k: float(v) for k, v in metrics.items()})

    def as_lists(self) -> dict[str, list[float]]:
        """``{metric: [epoch 1, epoch 2, ...]}`` (a Flower ``ConfigRecord`` holds lists, not dicts);
        a metric missing in some epoch is NaN there."""
        keys = list(dict.fromkeys(k for m in self.history for k in m))
        return {k: [m.get(k, float("nan")) for m in self.history] for k in keys}


def epochs_from_lists(lists: Mapping[str, object]) -> list[dict[str, float]]:
    """Inverse of :meth:`EpochHistory.as_lists`: one ``{metric: value}`` per epoch."""
    columns = {k: [float(x) for x in v] for k, v in lists.items() if isinstance(v, list)}
    n = max((len(v) for v in columns.values()), default=0)
    return [{k: v[i] for k, v in columns.items() if i < len(v)} for i in range(n)]


__all__ = ["EPOCHS_RECORD_KEY", "EpochHistory", "ProgressLogger", "TrainCallback", "TrainInfo", "epochs_from_lists"]
