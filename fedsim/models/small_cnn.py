"""A small 3-block CNN (2D or 3D) for fast tests and smoke runs; same standardized head."""

from __future__ import annotations

from torch import nn

from fedsim.models._layers import batchnorm, conv, global_avgpool, maxpool
from fedsim.models.base import FedsimModel
from fedsim.models.registry import register_model


@register_model("small_cnn", tasks=("brain_mri",))
def build_small_cnn(num_classes: int = 4, in_channels: int = 1, spatial_dims: int = 2) -> FedsimModel:
    Conv, BN, Pool = conv(spatial_dims), batchnorm(spatial_dims), maxpool(spatial_dims)
    layers: list[nn.Module] = []
    cin = in_channels
    for cout in (16, 32, 64):
        layers += [Conv(cin, cout, 3, padding=1), BN(cout), nn.ReLU(inplace=True), Pool(2, ceil_mode=True)]
        cin = cout
    layers.append(global_avgpool(spatial_dims))
    return FedsimModel("small_cnn", nn.Sequential(*layers), 64, num_classes)
