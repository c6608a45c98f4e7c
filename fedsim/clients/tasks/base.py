"""The client-task interface: what a federated client trains, on which data, with which metrics.

A task bundles its data source, its models (registered for it in :mod:`fedsim.models`), one epoch
of its local training and its evaluation. The ClientApp and ServerApp only talk to this
interface. :meth:`Task.train` is the same for every task: it runs the task's
:class:`~fedsim.clients.training.LocalTraining` plan through the one local-epoch runner
(:func:`~fedsim.clients.training.run_local_epochs`), which owns the callbacks, FedProx's proximal
term and the optimiser step. Most tasks build on :class:`fedsim.clients.tasks.scaffold.CohortTask`
(seeded cohort splits, per-round seeds, node-local data folders), so a new task is one file plus
``@register_task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import torch
from torch import nn

from fedsim.callbacks import TrainInfo
from fedsim.clients.training import LocalTraining, run_local_epochs
from fedsim.config import parse_options
from fedsim.faults import lr_factor
from fedsim.models import build_model, list_models

if TYPE_CHECKING:
    from fedsim.callbacks import TrainCallback
    from fedsim.config import Profile, ResolvedConfig


@dataclass(frozen=True)
class LocalResult:
    """What local training / evaluation reports back; all values are plain floats."""

    num_examples: int
    metrics: Mapping[str, float]


class Task(ABC):
    """A federated client task.

    Class attributes a task may override:

    * ``profiles``: experiment sizes (``tiny`` for tests, ``quick`` for CPU, ``paper``);
    * ``default_model``: the model every client and the server use when the user names none;
      ``None`` means "the CME paper's scenario models" (Table 1; ``brain_mri``);
    * ``primary_metric``: the metric curves and summaries lead with (e.g. ``accuracy``, ``mre``);
      ``higher_is_better`` says which way it improves;
    * ``cme_layers``: name patterns (``fnmatch``) of the layers whose full CME matrices are archived
      by default (the per-layer statistics cover every weight tensor anyway);
    * ``options_type``: a frozen dataclass of task-specific options, filled from
      ``RunConfig.task_options`` (``--task-option key=value``) and validated once in ``resolve``.
    """

    name: str
    profiles: Mapping[str, Profile]
    default_model: str | None = None
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    cme_layers: tuple[str, ...] = ("head.fc2.weight",)
    options_type: type | None = None

    def model_choices(self) -> list[str]:
        """Model names this task can build: those registered for it (``@register_model(name, tasks=...)``)."""
        return list_models(task=self.name)

    def options(self, cfg: ResolvedConfig) -> Any:
        """The task's typed options for this run (an ``options_type`` instance, or ``None``)."""
        return parse_options(self.options_type, cfg.task_options, "task", self.name)

    def model_config(self, cfg: ResolvedConfig) -> dict[str, Any]:
        """The keyword configuration :func:`fedsim.models.build_model` gets for this run."""
        return {}

    def build_model(self, name: str, cfg: ResolvedConfig) -> nn.Module:
        """Build the registered model ``name`` with this run's :meth:`model_config`."""
        return build_model(name, **self.model_config(cfg))

    def site_names(self, cfg: ResolvedConfig) -> tuple[str, ...]:
        """The clients' site names (client ``k`` is site ``k``) when the data come one folder per
        site (``--partition sites``); ``()`` otherwise (the default)."""
        return ()

    def figure_arrays(self, run_dir: Path, cfg: ResolvedConfig) -> Sequence[Any]:
        """Arrays for task-specific figures of ``fedsim analyze`` (e.g. attention maps, landmarks on
        slices), computed from the run's final global parameters; each is drawn by its display
        class in :mod:`fedsim.analysis.task_figures`. Default: none."""
        return []

    @final
    def train(
        self,
        model: nn.Module,
        cfg: ResolvedConfig,
        partition_id: int,
        server_round: int,
        device: torch.device,
        callbacks: Sequence[TrainCallback] = (),
        proximal_mu: float = 0.0,
        data_dir: str | None = None,
        anchor: dict[str, torch.Tensor] | None = None,
    ) -> LocalResult:
        """Run ``cfg.local_epochs`` local epochs on the client's training split, through the one
        local-epoch runner (every callback is called; see :func:`~fedsim.clients.training.run_local_epochs`).

        ``anchor`` holds the weights received from the server (for FedProx's proximal term).
        """
        plan = self.local_training(model, cfg, partition_id, server_round, device, data_dir)
        info = TrainInfo(server_round, partition_id, cfg.local_epochs, cfg.model_for(partition_id))
        lr_scale = lr_factor(cfg.fault_specs(), partition_id)  # lazy / diverge / free-rider faults
        metrics = run_local_epochs(model, plan, info, device, callbacks, proximal_mu=proximal_mu, anchor=anchor, lr_scale=lr_scale)
        return LocalResult(plan.num_examples, metrics)

    @abstractmethod
    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        """Validate the data source cheaply (no training, ideally no decoding) and return the
        number of samples each client will get; raise a clear error otherwise."""

    @abstractmethod
    def local_training(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, server_round: int, device: torch.device, data_dir: str | None
    ) -> LocalTraining:
        """This round's local-training plan: the client's data, optimiser and one epoch (see
        :class:`~fedsim.clients.training.LocalTraining`). ``data_dir`` is a node-local folder."""

    @abstractmethod
    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        """Evaluate on the client's local test split."""

    @abstractmethod
    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult | None:
        """Evaluate on the held-out global test set (``None`` if the task has none)."""
