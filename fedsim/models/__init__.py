"""Model registry: ``resnet50``, ``densenet121``, ``alexnet_skip`` and ``small_cnn``.

All end in the CME paper's standardized head (:mod:`fedsim.models.base`). Weights are random;
a local weights file can be given, nothing is downloaded.
"""

from fedsim.models import alexnet_skip, densenet121, resnet50, small_cnn  # noqa: F401  (registration)
from fedsim.models.base import CME_DEFAULT_LAYER, HEAD_WIDTH, FedsimModel, StandardHead
from fedsim.models.registry import MODELS, build_model, list_models, load_local_weights, register_model

__all__ = [
    "CME_DEFAULT_LAYER",
    "HEAD_WIDTH",
    "MODELS",
    "FedsimModel",
    "StandardHead",
    "build_model",
    "list_models",
    "load_local_weights",
    "register_model",
]
