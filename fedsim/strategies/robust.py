"""Flower's Byzantine-robust aggregation rules, selectable by name: for faulty or hostile hospitals.

* ``fedmedian``: the coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498);
* ``fedtrimmedavg``: the coordinate-wise mean after dropping the ``beta`` share of the smallest
  and of the largest values (Yin et al. 2018); ``beta`` (0.2; ``floor(beta * clients)`` values are
  cut from each end, so with fewer than ``1/beta`` clients nothing is cut: refused);
* ``krum``: the one client update closest to its ``n - f - 2`` nearest neighbours (Blanchard et
  al., NeurIPS 2017); ``num-malicious`` ``f`` (1);
* ``multikrum``: the example-weighted mean of the ``select`` best Krum-scored updates (Blanchard
  et al. 2017); ``num-malicious`` (1), ``select`` (0 = ``n - f``, the paper's choice);
* ``bulyan``: Multi-Krum selection of ``n - 2f`` updates, then per coordinate the mean of the
  ``n - 4f`` values closest to the median (El Mhamdi et al., ICML 2018, arXiv:1802.07927);
  ``num-malicious`` (1); needs ``n >= 4f + 3`` clients.

The defaults assume one faulty hospital (``f = 1``); Flower's default ``f = 0`` makes Bulyan a
plain mean. The client counts each rule needs are checked when the config is resolved. These
rules weigh every client the same by construction (except Multi-Krum's final mean, which is
Flower's example-weighted one), so they take no ``weighting`` option.

Note that fedsim's server refuses non-finite replies (NaN/inf from a diverging client) before any
strategy sees them, so against a client whose parameters overflow no aggregation rule helps: the
run stops with the client's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedsim.config import RunConfig
from fedsim.strategies.registry import StrategyHooks, register_strategy


@dataclass(frozen=True)
class TrimmedAvgOptions:
    """``beta``: the share cut from each end, in (0, 0.5)."""

    beta: float = 0.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and 0 < self.beta < 0.5):
            raise ValueError(f"beta must be in (0, 0.5), got {self.beta}")


@dataclass(frozen=True)
class KrumOptions:
    """``num-malicious``: the number ``f`` of faulty clients to tolerate (>= 0)."""

    num_malicious: int = 1

    def __post_init__(self) -> None:
        if self.num_malicious < 0:
            raise ValueError(f"num-malicious must be >= 0, got {self.num_malicious}")


@dataclass(frozen=True)
class MultiKrumOptions(KrumOptions):
    """``num-malicious`` ``f`` (>= 0); ``select``: updates averaged (>= 1; 0 = ``n - f``)."""

    select: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select < 0:
            raise ValueError(f"select must be >= 1, or 0 for clients - num-malicious, got {self.select}")


def _per_round(cfg: RunConfig) -> tuple[int, str]:
    """Clients aggregated per round (the sampled ones) and how to name them in a message."""
    n = cfg.sample_size()
    return n, (f"{n} clients" if n == cfg.clients else f"{n} clients per round (sampled of {cfg.clients})")


def check_trimmed(options: TrimmedAvgOptions, cfg: RunConfig) -> None:
    n, what = _per_round(cfg)
    if math.floor(options.beta * n) < 1:
        raise ValueError(
            f"beta={options.beta} cuts floor({options.beta} x {what}) = 0 values from each end, "
            f"so it would be a plain mean; use beta >= {1 / n:.3g} or more clients"
        )


def check_krum(options: KrumOptions, cfg: RunConfig) -> None:
    need = 2 * options.num_malicious + 3
    n, what = _per_round(cfg)
    if n < need:
        raise ValueError(f"krum with num-malicious={options.num_malicious} needs >= 2f+3 = {need} clients, got {what}")


def check_multikrum(options: MultiKrumOptions, cfg: RunConfig) -> None:
    check_krum(options, cfg)
    n, what = _per_round(cfg)
    if options.select > n:
        raise ValueError(f"select={options.select} is more than the {what}")


def check_bulyan(options: KrumOptions, cfg: RunConfig) -> None:
    need = 4 * options.num_malicious + 3
    n, what = _per_round(cfg)
    if n < need:
        raise ValueError(
            f"bulyan with num-malicious={options.num_malicious} needs >= 4f+3 = {need} clients, got {what}; "
            "lower num-malicious or add clients"
        )


@register_strategy("fedmedian")
def build_fedmedian(options: None, hooks: StrategyHooks) -> FedMedian:
    """FedMedian: coordinate-wise median (Yin et al. 2018)."""
    return FedMedian(**hooks.fedavg_kwargs())


@register_strategy("fedtrimmedavg", options=TrimmedAvgOptions, check=check_trimmed)
def build_fedtrimmedavg(options: TrimmedAvgOptions, hooks: StrategyHooks) -> FedTrimmedAvg:
    """FedTrimmedAvg: coordinate-wise trimmed mean (Yin et al. 2018)."""
    return FedTrimmedAvg(beta=options.beta, **hooks.fedavg_kwargs())


@register_strategy("krum", options=KrumOptions, check=check_krum)
def build_krum(options: KrumOptions, hooks: StrategyHooks) -> Krum:
    """Krum: the most central client update (Blanchard et al. 2017)."""
    return Krum(num_malicious_nodes=options.num_malicious, **hooks.fedavg_kwargs())


@register_strategy("multikrum", options=MultiKrumOptions, check=check_multikrum)
def build_multikrum(options: MultiKrumOptions, hooks: StrategyHooks) -> MultiKrum:
    """Multi-Krum: mean of the most central client updates (Blanchard et al. 2017)."""
    select = options.select or hooks.per_round - options.num_malicious
    return MultiKrum(num_malicious_nodes=options.num_malicious, num_nodes_to_select=select, **hooks.fedavg_kwargs())


@register_strategy("bulyan", options=KrumOptions, check=check_bulyan)
def build_bulyan(options: KrumOptions, hooks: StrategyHooks) -> Bulyan:
    """Bulyan: Multi-Krum selection then a trimmed mean around the median (El Mhamdi et al. 2018)."""
    return Bulyan(num_malicious_nodes=options.num_malicious, **hooks.fedavg_kwargs())
