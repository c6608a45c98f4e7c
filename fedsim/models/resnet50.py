"""ResNet50 (torchvision, random init): client 1 and the server model of the CME paper."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50

from fedsim.models._layers import require_2d
from fedsim.models.base import FedsimModel
from fedsim.models.registry import register_model


@register_model("resnet50", tasks=("brain_mri",))
def build_resnet50(num_classes: int = 4, in_channels: int = 1, spatial_dims: int = 2) -> FedsimModel:
    require_2d("resnet50", spatial_dims)
    net = resnet50(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features  # 2048
    net.fc = nn.Identity()
    return FedsimModel("resnet50", net, feature_dim, num_classes)
