"""Flower's own strategies, selectable by name with fedsim's client/metric settings.

* ``fedavg``: sample-weighted FedAvg (McMahan et al.), weights = ``num-examples``;
* ``fedprox``: FedAvg + the proximal term ``mu/2 ||w - w_global||^2`` that fedsim's clients add to
  their loss (Flower sends ``proximal-mu`` in the train config); option ``mu`` (0.01);
* ``fedadam``: server-side Adam on the aggregated update (Reddi et al.); option ``eta``, the
  server learning rate (0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedsim.strategies.registry import StrategyHooks, register_strategy


@dataclass(frozen=True)
class FedProxOptions:
    """``--strategy-option mu=...``: the proximal weight (>= 0)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be a number >= 0, got {self.mu}")


@dataclass(frozen=True)
class FedAdamOptions:
    """``--strategy-option eta=...``: the server learning rate (> 0)."""

    eta: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a positive number, got {self.eta}")


@register_strategy("fedavg")
def build_fedavg(options: None, hooks: StrategyHooks) -> FedAvg:
    return FedAvg(**hooks.fedavg_kwargs())


@register_strategy("fedprox", options=FedProxOptions)
def build_fedprox(options: FedProxOptions, hooks: StrategyHooks) -> FedProx:
    return FedProx(proximal_mu=options.mu, **hooks.fedavg_kwargs())


@register_strategy("fedadam", options=FedAdamOptions)
def build_fedadam(options: FedAdamOptions, hooks: StrategyHooks) -> FedAdam:
    return FedAdam(eta=options.eta, **hooks.fedavg_kwargs())
