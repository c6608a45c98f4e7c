"""Strategy registry: name -> factory building a Flower (``flwr.serverapp.strategy``) strategy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import RunConfig
from fedsim.registry import Registry


@dataclass(frozen=True)
class StrategyOptions:
    """What every fedsim strategy gets: all ``num_nodes`` clients train and evaluate every round,
    and the metric-aggregation hooks through which the server records per-client results."""

    num_nodes: int
    train_metrics_aggr_fn: Callable[..., Any] | None = None
    evaluate_metrics_aggr_fn: Callable[..., Any] | None = None

    def fedavg_kwargs(self) -> dict[str, Any]:
        return {
            "fraction_train": 1.0,
            "fraction_evaluate": 1.0,
            "min_train_nodes": self.num_nodes,
            "min_evaluate_nodes": self.num_nodes,
            "min_available_nodes": self.num_nodes,
            "train_metrics_aggr_fn": self.train_metrics_aggr_fn,
            "evaluate_metrics_aggr_fn": self.evaluate_metrics_aggr_fn,
        }


StrategyFactory = Callable[[RunConfig, StrategyOptions], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    return STRATEGIES.register(name)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def build_strategy(cfg: RunConfig, options: StrategyOptions) -> Strategy:
    return STRATEGIES.get(cfg.strategy)(cfg, options)
