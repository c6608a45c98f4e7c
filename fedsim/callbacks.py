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


__all__ = ["ProgressLogger", "TrainCallback", "TrainInfo"]
