"""Shared fixtures: tiny configs and hand-made Flower messages."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.clients.tasks import resolve_config
from fedsim.config import RunConfig


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    """A resolved tiny config with the small CNN (fast) and a temporary output folder."""
    return resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, out=str(tmp_path / "run")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def task_identity():
    """Flower needs a task identity to build Messages outside a running app; set a fake one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
