"""Client-task registry. ``brain_mri`` (the CME paper's 2D brain-tumour classification) is the default."""

from __future__ import annotations

from fedsim.clients.tasks import aicnet3d, brain_mri, h3denet  # noqa: F401  (registration)
from fedsim.clients.tasks.base import LocalResult, Task
from fedsim.clients.tasks.registry import TASKS, get_task, register_task
from fedsim.clients.tasks.resolve import resolve_config
from fedsim.clients.tasks.scaffold import CohortSplit, CohortTask
from fedsim.clients.training import LocalTraining, TrainStep

__all__ = [
    "TASKS",
    "CohortSplit",
    "CohortTask",
    "LocalResult",
    "LocalTraining",
    "Task",
    "TrainStep",
    "get_task",
    "register_task",
    "resolve_config",
]
