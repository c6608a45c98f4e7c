"""Which parameters a federation shares: the explicit allow-list the server aggregates.

* All clients and the server use the same architecture (scenarios 2 and 4): every floating-point
  entry of the ``state_dict`` (weights, biases, BatchNorm running statistics) is shared.
  Integer buffers (BatchNorm's ``num_batches_tracked``) stay local.
* Mixed architectures (scenarios 1 and 3): only the standardized head's entries whose shapes agree
  across all models (``head.fc1.bias``, ``head.fc2.*``, ``head.out.*``). ``head.fc1.weight``
  depends on the backbone width and stays private, like the backbones themselves.

Matching by name *and* shape alone would also pick up unrelated backbone layers that happen to
agree (e.g. ``features.conv0`` of two different nets), hence the explicit head restriction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def shared_parameter_names(model_names: Iterable[str], build: Callable[[str], nn.Module]) -> list[str]:
    """The allow-list for a federation of ``model_names`` (clients and server); ``build(name)``
    constructs a model (called on the ``meta`` device, so nothing is allocated)."""
    names = sorted(set(model_names))
    if not names:
        raise ValueError("need at least one model name")
    with torch.device("meta"):
        states = {n: build(n).state_dict() for n in names}
    first = states[names[0]]
    if len(names) == 1:
        return [k for k, v in first.items() if v.is_floating_point()]
    shared = [k for k, v in first.items() if k.startswith("head.") and all(k in s and s[k].shape == v.shape for s in states.values())]
    if not shared:
        raise ValueError(f"models {names} share no head parameters; every fedsim model must end in StandardHead")
    return shared
