"""Flower's own averaging and server-optimiser strategies, selectable by name with typed options.

Every strategy trains and evaluates the clients of the round: all of them, or the sampled ones
(:class:`StrategyHooks`, ``--fraction-train`` / ``--clients-per-round``). Options
(``--strategy-option key=value``) keep Flower's names and defaults unless stated:

* ``fedavg``: FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629);
* ``fedprox``: FedAvg + the proximal term ``mu/2 ||w - w_global||^2`` the clients add to their loss
  (Li et al., MLSys 2020, arXiv:1812.06127); ``mu`` (0.01);
* ``fedadam``, ``fedyogi``, ``fedadagrad``: adaptive server optimisers on the averaged update
  (Reddi et al., ICLR 2021, arXiv:2003.00295); ``eta`` (server learning rate; fedsim's fedadam
  default 0.01, Flower's for the others), ``beta-1``, ``beta-2``, ``tau``;
* ``fedavgm``: server momentum (Hsu et al. 2019, arXiv:1909.06335); ``server-lr`` (1.0),
  ``momentum`` (0.9, the paper's value; Flower's default 0 would be plain FedAvg);
* ``qfedavg``: q-fair FedAvg (Li et al., ICLR 2020, arXiv:1905.10497); ``q`` (0.1),
  ``client-lr`` (its Lipschitz estimate is ``1/client-lr``; 0 = the run's ``lr``); it weighs by
  each client's reported ``train-loss``, the mean loss of its local training (the paper uses the
  loss of the received model before training; fedsim's clients do not report that), and its
  Lipschitz estimate assumes SGD while fedsim's clients use Adam.

``weighting`` (``examples``, the default, or ``equal``) chooses the client weights of the
average: ``num-examples`` as in Flower, or every hospital the same, as fedsim's ``equal_avg``
(the CME paper's averaging); the server optimisers then act on that average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, QFedAvg

from fedsim.strategies.equal_avg import with_weighting
from fedsim.strategies.registry import StrategyHooks, check_weighting, register_strategy


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")


def _unit(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class FedAvgOptions:
    """``weighting``: ``examples`` (num-examples, Flower's FedAvg) or ``equal``."""

    weighting: str = "examples"

    def __post_init__(self) -> None:
        check_weighting(self.weighting)


@dataclass(frozen=True)
class FedProxOptions:
    """``mu``: the proximal weight (>= 0); ``weighting``."""

    mu: float = 0.01
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be a number >= 0, got {self.mu}")
        check_weighting(self.weighting)


@dataclass(frozen=True)
class FedOptOptions:
    """Server learning rate ``eta`` (> 0), moments ``beta-1``, ``beta-2`` in [0, 1), the
    adaptivity ``tau`` (> 0), ``weighting``."""

    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    weighting: str = "examples"

    def __post_init__(self) -> None:
        _positive("eta", self.eta)
        _unit("beta-1", self.beta_1)
        _unit("beta-2", self.beta_2)
        _positive("tau", self.tau)
        check_weighting(self.weighting)


@dataclass(frozen=True)
class FedAdamOptions(FedOptOptions):
    """FedAdam (Reddi et al.); fedsim's default server learning rate 0.01."""


@dataclass(frozen=True)
class FedYogiOptions(FedOptOptions):
    """FedYogi (Reddi et al.); Flower's defaults."""


@dataclass(frozen=True)
class FedAdagradOptions:
    """FedAdagrad (Reddi et al.): ``eta`` (0.1), ``tau`` (1e-3), ``weighting``; Flower's defaults."""

    eta: float = 0.1
    tau: float = 1e-3
    weighting: str = "examples"

    def __post_init__(self) -> None:
        _positive("eta", self.eta)
        _positive("tau", self.tau)
        check_weighting(self.weighting)


@dataclass(frozen=True)
class FedAvgMOptions:
    """``server-lr`` (> 0), ``momentum`` in [0, 1), ``weighting``."""

    server_lr: float = 1.0
    momentum: float = 0.9
    weighting: str = "examples"

    def __post_init__(self) -> None:
        _positive("server-lr", self.server_lr)
        _unit("momentum", self.momentum)
        check_weighting(self.weighting)


@dataclass(frozen=True)
class QFedAvgOptions:
    """``q`` (>= 0; 0 is FedAvg-like), ``client-lr`` (> 0, or 0 = the run's lr)."""

    q: float = 0.1
    client_lr: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.q) and self.q >= 0):
            raise ValueError(f"q must be a number >= 0, got {self.q}")
        if not (math.isfinite(self.client_lr) and self.client_lr >= 0):
            raise ValueError(f"client-lr must be a number >= 0 (0 = the run's lr), got {self.client_lr}")


@register_strategy("fedavg", options=FedAvgOptions)
def build_fedavg(options: FedAvgOptions, hooks: StrategyHooks) -> FedAvg:
    """FedAvg: the num-examples-weighted (or equal) mean (McMahan et al. 2017)."""
    return with_weighting(FedAvg, options.weighting)(**hooks.fedavg_kwargs())


@register_strategy("fedprox", options=FedProxOptions)
def build_fedprox(options: FedProxOptions, hooks: StrategyHooks) -> FedProx:
    """FedProx: FedAvg + a proximal term in the clients' loss (Li et al. 2020)."""
    cls = with_weighting(FedProx, options.weighting)
    return cls(proximal_mu=options.mu, **hooks.fedavg_kwargs())  # type: ignore[call-arg,return-value]


@register_strategy("fedadam", options=FedAdamOptions)
def build_fedadam(options: FedAdamOptions, hooks: StrategyHooks) -> FedAdam:
    """FedAdam: server-side Adam on the averaged update (Reddi et al. 2021)."""
    cls = with_weighting(FedAdam, options.weighting)
    kw = {"eta": options.eta, "beta_1": options.beta_1, "beta_2": options.beta_2, "tau": options.tau}
    return cls(**kw, **hooks.fedavg_kwargs())  # type: ignore[arg-type,return-value]


@register_strategy("fedyogi", options=FedYogiOptions)
def build_fedyogi(options: FedYogiOptions, hooks: StrategyHooks) -> FedYogi:
    """FedYogi: server-side Yogi on the averaged update (Reddi et al. 2021)."""
    cls = with_weighting(FedYogi, options.weighting)
    kw = {"eta": options.eta, "beta_1": options.beta_1, "beta_2": options.beta_2, "tau": options.tau}
    return cls(**kw, **hooks.fedavg_kwargs())  # type: ignore[arg-type,return-value]


@register_strategy("fedadagrad", options=FedAdagradOptions)
def build_fedadagrad(options: FedAdagradOptions, hooks: StrategyHooks) -> FedAdagrad:
    """FedAdagrad: server-side Adagrad on the averaged update (Reddi et al. 2021)."""
    cls = with_weighting(FedAdagrad, options.weighting)
    return cls(eta=options.eta, tau=options.tau, **hooks.fedavg_kwargs())  # type: ignore[call-arg,return-value]


@register_strategy("fedavgm", options=FedAvgMOptions)
def build_fedavgm(options: FedAvgMOptions, hooks: StrategyHooks) -> FedAvgM:
    """FedAvgM: FedAvg with server momentum (Hsu et al. 2019)."""
    cls = with_weighting(FedAvgM, options.weighting)
    return cls(server_learning_rate=options.server_lr, server_momentum=options.momentum, **hooks.fedavg_kwargs())  # type: ignore[call-arg,return-value]


@register_strategy("qfedavg", options=QFedAvgOptions)
def build_qfedavg(options: QFedAvgOptions, hooks: StrategyHooks) -> QFedAvg:
    """q-FedAvg: clients with a higher training loss weigh more (Li et al. 2020, q-FFL)."""
    lr = options.client_lr or hooks.lr
    if not lr > 0:
        raise ValueError("qfedavg needs client-lr (the run's lr is unknown here)")
    return QFedAvg(client_learning_rate=lr, q=options.q, train_loss_key="train-loss", **hooks.fedavg_kwargs())
