"""DenseNet121 (torchvision, random init): client 2 of the CME paper's mixed scenarios."""

from __future__ import annotations

from torch import nn
from torchvision.models import densenet121

from fedsim.models._layers import require_2d
from fedsim.models.base import FedsimModel
from fedsim.models.registry import register_model


@register_model("densenet121", tasks=("brain_mri",))
def build_densenet121(num_classes: int = 4, in_channels: int = 1, spatial_dims: int = 2) -> FedsimModel:
    require_2d("densenet121", spatial_dims)
    net = densenet121(weights=None)
    if in_channels != 3:
        net.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_dim = net.classifier.in_features  # 1024
    net.classifier = nn.Identity()
    return FedsimModel("densenet121", net, feature_dim, num_classes)
