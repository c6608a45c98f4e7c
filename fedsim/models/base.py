"""The standardized head every fedsim model ends in, and the model wrapper.

The CME paper (section 3.2, Fig. 2) extends every client network with three custom layers so
that heterogeneous hospital models can still be aggregated: the antepenultimate layer ``l-2``
(128 neurons), the penultimate layer ``l-1`` (128 neurons) and the output layer
(``num_classes`` neurons). Their parameter names are identical across architectures
(``head.fc1.*``, ``head.fc2.*``, ``head.out.*``); ``head.fc1.weight`` depends on the backbone's
feature width, so mixed-model federations share the others.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_WIDTH = 128
#: The 128 x 128 matrix between the antepenultimate and penultimate layers that the paper analyses.
CME_DEFAULT_LAYER = "head.fc2.weight"


class StandardHead(nn.Module):
    """feature_dim -> 128 (l-2) -> 128 (l-1) -> num_classes, ReLU in between."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.fc1 = nn.Linear(feature_dim, HEAD_WIDTH)
        self.fc2 = nn.Linear(HEAD_WIDTH, HEAD_WIDTH)
        self.out = nn.Linear(HEAD_WIDTH, num_classes)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class FedsimModel(nn.Module):
    """A backbone producing a flat feature vector, followed by the :class:`StandardHead`."""

    def __init__(self, arch: str, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.backbone = backbone
        self.head = StandardHead(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.backbone(x), 1))
