"""Flower's own strategies, selectable by name with fedsim's client/metric settings.

* ``fedavg``: sample-weighted FedAvg (McMahan et al.), weights = ``num-examples``;
* ``fedprox``: FedAvg + the proximal term ``mu/2 ||w - w_global||^2`` that fedsim's clients add to
  their loss (Flower sends ``proximal-mu`` in the train config); ``mu`` = ``cfg.fedprox_mu``;
* ``fedadam``: server-side Adam on the aggregated update (Reddi et al.), ``eta`` = ``cfg.server_lr``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedsim.config import RunConfig
from fedsim.strategies.registry import StrategyOptions, register_strategy


@register_strategy("fedavg")
def build_fedavg(cfg: RunConfig, options: StrategyOptions) -> FedAvg:
    return FedAvg(**options.fedavg_kwargs())


@register_strategy("fedprox")
def build_fedprox(cfg: RunConfig, options: StrategyOptions) -> FedProx:
    return FedProx(proximal_mu=cfg.fedprox_mu, **options.fedavg_kwargs())


@register_strategy("fedadam")
def build_fedadam(cfg: RunConfig, options: StrategyOptions) -> FedAdam:
    return FedAdam(eta=cfg.server_lr, **options.fedavg_kwargs())
