"""Client-task registry. ``brain_mri`` (the CME paper's 2D brain-tumour classification) is the default."""

from __future__ import annotations

from collections.abc import Callable

from fedsim.clients.tasks.base import LocalResult, Task
from fedsim.registry import Registry

TASKS: Registry[Task] = Registry("task")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: instantiate the task class and register the instance under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        inst = cls()
        inst.name = name
        TASKS.register(name)(inst)
        return cls

    return deco


def get_task(name: str) -> Task:
    return TASKS.get(name)


def list_tasks() -> list[str]:
    return TASKS.names()


from fedsim.clients.tasks import brain_mri  # noqa: E402,F401  (registration)
from fedsim.clients.tasks import aicnet3d  # noqa: E402,F401  (registration)
from fedsim.clients.tasks import h3denet  # noqa: E402,F401  (registration)

__all__ = ["TASKS", "LocalResult", "Task", "get_task", "list_tasks", "register_task"]
