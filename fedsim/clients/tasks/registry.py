"""The task registry: ``@register_task("name")`` on a :class:`~fedsim.clients.tasks.base.Task` subclass."""

from __future__ import annotations

from collections.abc import Callable

from fedsim.clients.tasks.base import Task
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
