"""Strategy registry: name -> factory building a Flower (``flwr.serverapp.strategy``) strategy.

A strategy is one file and one decorator::

    @dataclass(frozen=True)
    class MyOptions:
        beta: float = 0.9

    @register_strategy("my_strategy", options=MyOptions)
    def build_my_strategy(options: MyOptions, hooks: StrategyHooks) -> Strategy: ...

Its typed options come from ``--strategy-option key=value`` (or the ``strategy-options`` run-config
key), parsed and validated once by :func:`strategy_options` when the config is resolved. Two
optional hooks of the registration:

* ``check(options, cfg)`` validates options against the rest of the run (e.g. Bulyan needs
  ``clients >= 4 f + 3``) when the config is resolved, before any client starts;
* ``local_keys(options, names)`` tells the server which of the shared parameter names the strategy
  keeps at the clients (personalised FL: FedBN, FedPer), see :func:`kept_local`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import ConfigError, RunConfig, parse_options
from fedsim.registry import Registry

#: The client weighting of the averaging strategies (option ``weighting``).
WEIGHTINGS = ("examples", "equal")


@dataclass(frozen=True)
class StrategyHooks:
    """What every fedsim strategy gets from the server: ``num_nodes`` clients, of which
    ``sample_size`` (0 = all) train and evaluate in each round, and the metric-aggregation hooks
    through which it records per-client results. ``seed`` (the run's seed: DP noise) and ``lr`` (the
    clients' learning rate: q-FedAvg's Lipschitz estimate; 0 = unknown) are filled in by
    :func:`build_strategy` from the config.

    Sampling is Flower's own: ``fraction_train`` / ``min_train_nodes`` (and the evaluate pair) make
    its ``sample_nodes`` draw exactly ``per_round`` nodes; the server makes the draw seeded and
    ordered (:mod:`fedsim.server.sampling`), and the same clients evaluate as trained."""

    num_nodes: int
    train_metrics_aggr_fn: Callable[..., Any] | None = None
    evaluate_metrics_aggr_fn: Callable[..., Any] | None = None
    seed: int = 0
    lr: float = 0.0
    sample_size: int = 0

    @property
    def per_round(self) -> int:
        """Clients in each round: ``sample_size`` (at most ``num_nodes``), or all ``num_nodes``."""
        return min(self.sample_size, self.num_nodes) if self.sample_size else self.num_nodes

    def fedavg_kwargs(self) -> dict[str, Any]:
        # int(num_nodes * fraction) may round down to per_round - 1; min_*_nodes makes it per_round.
        fraction = 1.0 if self.per_round == self.num_nodes else self.per_round / self.num_nodes
        return {
            "fraction_train": fraction,
            "fraction_evaluate": fraction,
            "min_train_nodes": self.per_round,
            "min_evaluate_nodes": self.per_round,
            "min_available_nodes": self.num_nodes,
            "train_metrics_aggr_fn": self.train_metrics_aggr_fn,
            "evaluate_metrics_aggr_fn": self.evaluate_metrics_aggr_fn,
        }


StrategyFactory = Callable[[Any, StrategyHooks], Strategy]
OptionsCheck = Callable[[Any, RunConfig], None]
LocalKeys = Callable[[Any, Sequence[str]], list[str]]


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its factory, the dataclass of its options (``None``: no options),
    an optional check of the options against the run config, and for personalised strategies the
    function naming the parameters that stay at the clients."""

    factory: StrategyFactory
    options_type: type | None = None
    check: OptionsCheck | None = None
    local_keys: LocalKeys | None = None
    summary: str = ""


STRATEGIES: Registry[StrategyEntry] = Registry("strategy")


def register_strategy(
    name: str,
    options: type | None = None,
    *,
    check: OptionsCheck | None = None,
    local_keys: LocalKeys | None = None,
) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator registering ``factory(options, hooks) -> Strategy`` under ``name``; the first
    line of the factory's docstring is the one-line summary ``fedsim list`` can show."""

    def deco(factory: StrategyFactory) -> StrategyFactory:
        summary = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        STRATEGIES.register(name)(StrategyEntry(factory, options, check, local_keys, summary))
        return factory

    return deco


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def strategy_options(cfg: RunConfig) -> Any:
    """The typed options of ``cfg.strategy`` from ``cfg.strategy_options``, checked against the
    run (ConfigError naming the key and the valid keys if invalid)."""
    entry = STRATEGIES.get(cfg.strategy)
    options = parse_options(entry.options_type, cfg.strategy_options, "strategy", cfg.strategy)
    if entry.check is not None:
        try:
            entry.check(options, cfg)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid strategy options for {cfg.strategy!r}: {exc}") from exc
    return options


def build_strategy(cfg: RunConfig, hooks: StrategyHooks) -> Strategy:
    """The strategy of ``cfg``; the hooks get the run's seed, learning rate and clients per round."""
    sampled = cfg.sample_size() if cfg.sample_size() < cfg.clients else 0  # 0: every client, however many nodes
    hooks = dataclasses.replace(hooks, seed=cfg.seed, lr=float(cfg.lr or 0.0), sample_size=sampled)
    return STRATEGIES.get(cfg.strategy).factory(strategy_options(cfg), hooks)


def kept_local(cfg: RunConfig, shared: Sequence[str]) -> list[str]:
    """The names among ``shared`` (the server's allow-list) that ``cfg.strategy`` never sends
    nor aggregates: they stay at each client (FedBN: BatchNorm layers; FedPer: the chosen head
    layers). Empty for every non-personalised strategy. A server that evaluates "the global
    model" should not do so when this is non-empty: the clients' models differ in these tensors.
    Raises ConfigError if the strategy would keep everything local or its patterns match nothing.
    """
    entry = STRATEGIES.get(cfg.strategy)
    if entry.local_keys is None:
        return []
    return entry.local_keys(strategy_options(cfg), list(shared))


def option_help(name: str) -> list[tuple[str, str, str]]:
    """``(key, default, type)`` for each option of strategy ``name`` (keys in CLI spelling)."""
    entry = STRATEGIES.get(name)
    if entry.options_type is None:
        return []
    return [
        (f.name.replace("_", "-"), repr(f.default), f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
        for f in dataclasses.fields(entry.options_type)
    ]


def check_weighting(value: str) -> None:
    """``weighting`` must be one of :data:`WEIGHTINGS` (ValueError naming them otherwise)."""
    if value not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {value!r}")
