"""The client-task interface: what a federated client trains, on which data, with which metrics.

A task bundles its data source, its models, its local training loop and its evaluation. The
ClientApp and ServerApp only talk to this interface, so a new task (e.g. a 3D one) is one file
plus ``@register_task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fedsim.clients.training import TrainCallback
    from fedsim.config import Profile, RunConfig


@dataclass(frozen=True)
class LocalResult:
    """What local training / evaluation reports back; all values are plain floats."""

    num_examples: int
    metrics: Mapping[str, float]


class Task(ABC):
    """A federated client task."""

    name: str
    profiles: Mapping[str, Profile]

    @abstractmethod
    def check_data(self, cfg: RunConfig) -> list[int]:
        """Validate the data source cheaply (no training, ideally no decoding) and return the
        number of samples each client will get; raise a clear error otherwise."""

    @abstractmethod
    def build_model(self, name: str, cfg: RunConfig) -> nn.Module: ...

    @abstractmethod
    def train(
        self,
        model: nn.Module,
        cfg: RunConfig,
        partition_id: int,
        server_round: int,
        device: torch.device,
        callbacks: Sequence[TrainCallback] = (),
        proximal_mu: float = 0.0,
        data_dir: str | None = None,
        anchor: dict[str, torch.Tensor] | None = None,
    ) -> LocalResult:
        """Run ``cfg.local_epochs`` local epochs on the client's training split.

        ``anchor`` holds the weights received from the server (for FedProx's proximal term).
        """

    @abstractmethod
    def evaluate_local(
        self, model: nn.Module, cfg: RunConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        """Evaluate on the client's local test split."""

    @abstractmethod
    def evaluate_global(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> LocalResult | None:
        """Evaluate on the held-out global test set (``None`` if the task has none)."""
