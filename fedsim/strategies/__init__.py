"""Strategy registry: ``equal_avg`` (the paper's default), ``fedavg``, ``fedprox``, ``fedadam``."""

from fedsim.strategies import equal_avg, flower  # noqa: F401  (registration)
from fedsim.strategies.equal_avg import EqualWeightFedAvg
from fedsim.strategies.registry import (
    STRATEGIES,
    StrategyHooks,
    build_strategy,
    list_strategies,
    register_strategy,
    strategy_options,
)

__all__ = [
    "STRATEGIES",
    "EqualWeightFedAvg",
    "StrategyHooks",
    "build_strategy",
    "list_strategies",
    "register_strategy",
    "strategy_options",
]
