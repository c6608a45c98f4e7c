"""Strategies by name: fedsim's ``equal_avg`` (the CME paper's default), Flower's averaging,
server-optimiser and robust strategies, personalised FedBN and FedPer, and central DP with the ε
spent. See ``docs/strategies.md`` and ``fedsim list``."""

from fedsim.strategies import dp, equal_avg, fedbn, fedper, flower, robust  # noqa: F401  (registration)
from fedsim.strategies.dp import privacy_spent
from fedsim.strategies.equal_avg import EqualWeightFedAvg, with_weighting
from fedsim.strategies.fedbn import FedBN, batchnorm_keys
from fedsim.strategies.fedper import FedPer
from fedsim.strategies.personal import KeepLocalFedAvg
from fedsim.strategies.privacy import GaussianRDPAccountant, PrivacyReport
from fedsim.strategies.registry import (
    STRATEGIES,
    StrategyHooks,
    build_strategy,
    kept_local,
    list_strategies,
    option_help,
    register_strategy,
    strategy_options,
)

__all__ = [
    "STRATEGIES",
    "EqualWeightFedAvg",
    "FedBN",
    "FedPer",
    "GaussianRDPAccountant",
    "KeepLocalFedAvg",
    "PrivacyReport",
    "StrategyHooks",
    "batchnorm_keys",
    "build_strategy",
    "kept_local",
    "list_strategies",
    "option_help",
    "privacy_spent",
    "register_strategy",
    "strategy_options",
    "with_weighting",
]
