"""The one model registry (torchvision style) and the one place models are built.

Every fedsim network, 2D or 3D, registers a builder with one decorator, naming the client tasks it
serves::

    @register_model("my_net", tasks=("brain_mri",))
    def build_my_net(num_classes: int = 4, in_channels: int = 1) -> FedsimModel: ...

The builder's keyword arguments are the model's configuration: ``build_model("my_net",
num_classes=7)``. Duplicate names are an error; an unknown name lists the registered ones; a
configuration key the builder does not take names the valid keys. ``list_models(task=...)`` is
what a task offers its users (``--models``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fedsim._logging import logger
from fedsim.config import ConfigError
from fedsim.registry import Registry

B = TypeVar("B", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and the client tasks it is offered to."""

    name: str
    builder: Callable[..., nn.Module]
    tasks: tuple[str, ...]

    def config_keys(self) -> list[str]:
        """The keyword arguments the builder takes (the model's configuration keys)."""
        return list(inspect.signature(self.builder).parameters)

    def required_keys(self) -> list[str]:
        """The configuration keys without a default."""
        params = inspect.signature(self.builder).parameters.values()
        return [p.name for p in params if p.default is inspect.Parameter.empty]


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, tasks: tuple[str, ...] = ()) -> Callable[[B], B]:
    """Decorator registering a model builder under ``name`` for the client ``tasks`` it serves."""

    def deco(builder: B) -> B:
        MODELS.register(name)(ModelEntry(name, builder, tuple(tasks)))
        return builder

    return deco


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted; with ``task`` only those registered for that task."""
    return [n for n in MODELS.names() if task is None or task in MODELS.get(n).tasks]


def build_model(name: str, *, weights: str | Path | None = None, **config: Any) -> nn.Module:
    """Build the registered model ``name`` with random initialisation and configuration ``config``
    (the builder's keyword arguments, e.g. ``num_classes=4, spatial_dims=3`` or ``input_shape=...``).

    ``weights`` optionally names a *local* ``state_dict`` file (``torch.save`` or ``.safetensors``);
    tensors whose name and shape match are loaded, the rest keep their random init and are logged.
    Nothing is ever downloaded.
    """
    entry = MODELS.get(name)
    keys = entry.config_keys()
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ConfigError(f"model {name!r} takes no config key {', '.join(map(repr, unknown))}; valid keys: {', '.join(keys)}")
    missing = [k for k in entry.required_keys() if k not in config]
    if missing:
        raise ConfigError(f"model {name!r} needs the config key(s) {', '.join(map(repr, missing))}")
    model = entry.builder(**config)
    if weights is not None:
        _load_local_weights(model, weights)
    return model


def _load_local_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load matching tensors from a local file into ``model``; return the names that were skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (fedsim never downloads weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(matched))
    if not matched:
        raise ValueError(f"no tensor in {path} matches the model's names and shapes")
    model.load_state_dict(matched, strict=False)
    logger.info("loaded %d tensors from %s (%d kept their random init)", len(matched), path, len(skipped))
    return skipped
