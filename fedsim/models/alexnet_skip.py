"""AlexNet with skip connections: client 3 of the CME paper's mixed scenarios.

The paper does not specify the skip connections, so this is our design:

* the five AlexNet convolutions (64-192-384-256-256 channels, kernels 11-5-3-3-3, first stride 4)
  with BatchNorm after each (the paper trains from scratch; BN makes that practical);
* skip 1: the output of conv2 (192 ch) is projected by a 1x1 conv and added to the output of
  conv4 (256 ch), a residual around conv3-conv4;
* skip 2: an identity residual around conv5 (256 -> 256);
* max-pools use padding 1 so tiny inputs (32 px) still work, and a global average pool replaces
  torchvision's 6x6 pool and the two 4096-wide FC layers: the standardized head takes their place.

The same code builds a 3D variant (``spatial_dims=3``) for volumetric tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.models._layers import batchnorm, conv, global_avgpool, maxpool
from fedsim.models.base import FedsimModel
from fedsim.models.registry import register_model


class AlexNetSkip(nn.Module):
    def __init__(self, in_channels: int = 1, spatial_dims: int = 2) -> None:
        super().__init__()
        Conv, BN, Pool = conv(spatial_dims), batchnorm(spatial_dims), maxpool(spatial_dims)

        def block(cin: int, cout: int, k: int, s: int = 1) -> nn.Sequential:
            return nn.Sequential(Conv(cin, cout, k, stride=s, padding=k // 2), BN(cout), nn.ReLU(inplace=True))

        self.conv1 = block(in_channels, 64, 11, 4)
        self.pool1 = Pool(3, 2, padding=1)
        self.conv2 = block(64, 192, 5)
        self.pool2 = Pool(3, 2, padding=1)
        self.conv3 = block(192, 384, 3)
        self.conv4 = nn.Sequential(Conv(384, 256, 3, padding=1), BN(256))
        self.skip1 = nn.Sequential(Conv(192, 256, 1, bias=False), BN(256))
        self.conv5 = nn.Sequential(Conv(256, 256, 3, padding=1), BN(256))
        self.relu = nn.ReLU(inplace=True)
        self.pool3 = Pool(3, 2, padding=1)
        self.gap = global_avgpool(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x2 = self.pool2(self.conv2(x))
        x4 = self.relu(self.conv4(self.conv3(x2)) + self.skip1(x2))
        x5 = self.relu(self.conv5(x4) + x4)
        return torch.flatten(self.gap(self.pool3(x5)), 1)


@register_model("alexnet_skip", tasks=("brain_mri",))
def build_alexnet_skip(num_classes: int = 4, in_channels: int = 1, spatial_dims: int = 2) -> FedsimModel:
    return FedsimModel("alexnet_skip", AlexNetSkip(in_channels, spatial_dims), 256, num_classes)
