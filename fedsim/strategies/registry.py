"""Strategy registry: name -> factory building a Flower (``flwr.serverapp.strategy``) strategy.

A strategy is one file and one decorator::

    @dataclass(frozen=True)
    class MyOptions:
        beta: float = 0.9

    @register_strategy("my_strategy", options=MyOptions)
    def build_my_strategy(options: MyOptions, hooks: StrategyHooks) -> Strategy: ...

Its typed options come from ``--strategy-option key=value`` (or the ``strategy-options`` run-config
key), parsed and validated once by :func:`strategy_options` when the config is resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import RunConfig, parse_options
from fedsim.registry import Registry


@dataclass(frozen=True)
class StrategyHooks:
    """What every fedsim strategy gets from the server: all ``num_nodes`` clients train and
    evaluate every round, and the metric-aggregation hooks through which it records per-client
    results."""

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


StrategyFactory = Callable[[Any, StrategyHooks], Strategy]


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its factory and the dataclass of its options (``None``: no options)."""

    factory: StrategyFactory
    options_type: type | None = None


STRATEGIES: Registry[StrategyEntry] = Registry("strategy")


def register_strategy(name: str, options: type | None = None) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator registering ``factory(options, hooks) -> Strategy`` under ``name``."""

    def deco(factory: StrategyFactory) -> StrategyFactory:
        STRATEGIES.register(name)(StrategyEntry(factory, options))
        return factory

    return deco


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def strategy_options(cfg: RunConfig) -> Any:
    """The typed options of ``cfg.strategy`` from ``cfg.strategy_options`` (ConfigError if invalid)."""
    entry = STRATEGIES.get(cfg.strategy)
    return parse_options(entry.options_type, cfg.strategy_options, "strategy", cfg.strategy)


def build_strategy(cfg: RunConfig, hooks: StrategyHooks) -> Strategy:
    return STRATEGIES.get(cfg.strategy).factory(strategy_options(cfg), hooks)
