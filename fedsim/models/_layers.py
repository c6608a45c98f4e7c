"""Dimension-generic layer factories so small models work on 2D images and 3D volumes."""

from __future__ import annotations

from torch import nn


def _check(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def conv(spatial_dims: int) -> type[nn.Module]:
    _check(spatial_dims)
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def batchnorm(spatial_dims: int) -> type[nn.Module]:
    _check(spatial_dims)
    return nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d


def maxpool(spatial_dims: int) -> type[nn.Module]:
    _check(spatial_dims)
    return nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d


def global_avgpool(spatial_dims: int) -> nn.Module:
    _check(spatial_dims)
    return nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)


def require_2d(arch: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ValueError(
            f"model {arch!r} is a 2D torchvision backbone; spatial_dims={spatial_dims} is not "
            "supported (use 'alexnet_skip' or 'small_cnn' for 3D inputs)"
        )
