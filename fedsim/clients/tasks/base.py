"""The client-task interface: what a federated client trains, on which data, with which metrics.

A task bundles its data source, its models, its local training loop and its evaluation. The
ClientApp and ServerApp only talk to this interface, so a new task (e.g. a 3D one) is one file
plus ``@register_task``.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        """Model names this task can build (default: every model in :data:`fedsim.models.MODELS`)."""
        from fedsim.models import list_models

        return list_models()

    def options(self, cfg: RunConfig) -> Any:
        """The task's typed options for this run (an ``options_type`` instance, or ``None``)."""
        return parse_task_options(self, cfg.task_options)

    def analysis_figures(self, run_dir: Path, cfg: RunConfig, out_dir: Path) -> list[Path]:
        """Task-specific figures for ``fedsim analyze`` (e.g. attention maps, landmarks on slices),
        drawn from the run's final global parameters; return the PNG paths written. Default: none."""
        return []

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


def parse_task_options(task: Task, pairs: Sequence[tuple[str, Any]]) -> Any:
    """Build ``task.options_type`` from ``(key, value)`` pairs; values may be strings (CLI, TOML)
    and are converted to the field's type. Keys may use ``-`` or ``_``. Unknown keys and bad
    values raise :class:`fedsim.config.ConfigError` naming the valid options."""
    from fedsim.config import ConfigError

    if task.options_type is None:
        if pairs:
            raise ConfigError(f"task {task.name!r} takes no --task-option; got {', '.join(k for k, _ in pairs)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(task.options_type)}
    hints = typing.get_type_hints(task.options_type)
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join(n.replace("_", "-") for n in fields)
            raise ConfigError(f"unknown task option {key!r} for task {task.name!r}; valid options: {valid}")
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return task.options_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid task options for {task.name!r}: {exc}") from exc


def _convert(tp: Any, value: Any, key: str) -> Any:
    from fedsim.config import ConfigError

    if not isinstance(value, str):
        return value
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float):
            return tp(value)
    except ValueError:
        raise ConfigError(f"task option {key!r} expects a {tp.__name__}, got {value!r}") from None
    return value
