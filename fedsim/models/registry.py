"""Model registry and the one place models are built (optionally from a local weights file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from fedsim._logging import logger
from fedsim.models.base import FedsimModel
from fedsim.registry import Registry


class ModelBuilder(Protocol):
    def __call__(self, num_classes: int, in_channels: int, spatial_dims: int) -> FedsimModel: ...


MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def build_model(
    name: str,
    num_classes: int = 4,
    in_channels: int = 1,
    spatial_dims: int = 2,
    weights: str | Path | None = None,
) -> FedsimModel:
    """Build a registered model with random initialisation.

    ``weights`` optionally names a *local* ``state_dict`` file (``torch.save``/safetensors);
    tensors whose name and shape match are loaded, the rest keep their random init and are
    logged. Nothing is ever downloaded.
    """
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, spatial_dims=spatial_dims)
    if weights is not None:
        load_local_weights(model, weights)
    return model


def load_local_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
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
