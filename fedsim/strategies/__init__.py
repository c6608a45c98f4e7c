"""Strategy registry: ``equal_avg`` (the paper's default), ``fedavg``, ``fedprox``, ``fedadam``."""

from fedsim.strategies import equal_avg, flower  # noqa: F401  (registration)
from fedsim.strategies.equal_avg import EqualWeightFedAvg
from fedsim.strategies.registry import STRATEGIES, StrategyOptions, build_strategy, list_strategies, register_strategy

__all__ = ["STRATEGIES", "EqualWeightFedAvg", "StrategyOptions", "build_strategy", "list_strategies", "register_strategy"]
