"""fedsim's networks and the one model registry (torchvision style).

* 2D classification (``brain_mri``, CME paper): ``resnet50``, ``densenet121``, ``alexnet_skip`` and
  ``small_cnn``, all ending in the paper's standardized head (:mod:`fedsim.models.base`);
  ``alexnet_skip`` and ``small_cnn`` also build in 3D (``spatial_dims=3``);
* 3D OCT glaucoma classification (``aicnet3d``): the five AI-CNet3D variants
  (:mod:`fedsim.models.aicnet3d`);
* 3D CT landmark detection (``h3denet``): ``h3denet``, ``h3denet_heatmap`` and ``unet3d``
  (:mod:`fedsim.models.h3denet`).

``build_model(name, **config)`` builds any of them, ``list_models(task=...)`` lists them, and a new
model is one file with ``@register_model(name, tasks=(...))``. Weights are random; a local weights
file can be given (``build_model(name, weights="local.pt")``), nothing is downloaded.
"""

from fedsim.models import aicnet3d, alexnet_skip, densenet121, h3denet, resnet50, small_cnn  # noqa: F401  (registration)
from fedsim.models.base import CME_DEFAULT_LAYER, HEAD_WIDTH, FedsimModel, StandardHead
from fedsim.models.registry import MODELS, ModelEntry, build_model, list_models, register_model

__all__ = [
    "CME_DEFAULT_LAYER",
    "HEAD_WIDTH",
    "MODELS",
    "FedsimModel",
    "ModelEntry",
    "StandardHead",
    "build_model",
    "list_models",
    "register_model",
]
