"""``dp_fixed`` and ``dp_adaptive``: central differential privacy with Flower's server-side
clipping wrappers, and the epsilon each run spent.

Each round the server clips every client's update ``w_k - w`` to L2 norm ``C`` (the whole shared
update, Flower's flat clipping), averages the clipped models with **equal weights**
(:class:`~fedsim.strategies.equal_avg.EqualWeightFedAvg`), and adds Gaussian noise of standard
deviation ``z C / n`` to the average (DP-FedAvg: McMahan et al., ICLR 2018, arXiv:1710.06963;
Flower's ``DifferentialPrivacyServerSideFixedClipping``). Equal weights make one hospital's
influence on the mean at most ``C / n`` whatever its size, which is what the noise is calibrated
to; example weights would not be. ``dp_adaptive`` moves ``C`` towards the ``quantile`` of the
update norms with a noisy count of the clipped updates (Andrew et al., NeurIPS 2021,
arXiv:1905.03871; Flower's ``DifferentialPrivacyServerSideAdaptiveClipping``); the update noise
and the count noise together cost the same as one Gaussian mechanism with multiplier ``z``.

The epsilon is accounted per released aggregate by :class:`~fedsim.strategies.privacy.GaussianRDPAccountant`
(client-level DP, add/remove one client, no sampling amplification since every client trains every
round), logged every round, added to the round's aggregated train metrics as ``dp-epsilon``, and
available as :func:`privacy_spent` (``strategy.privacy_report()``). Only the model parameters are
accounted: the clients' metrics (losses, accuracies, example counts) are sent in the clear.
Server-side clipping means the server sees the raw updates (trusted server, as in the papers).

The noise comes from a generator seeded with the run's seed (numpy's global state is swapped in
and out around the aggregation), so a DP run is reproducible like any other.

If the server averages fewer clients than it has (``--min-clients``: failed clients are left
out), that round's noise is too small for its sensitivity; the round is accounted with the smaller
multiplier (``z m / n``) and a warning is logged.

Options: ``noise`` (``z``, > 0), ``clip`` (``C``; dp_adaptive: the initial ``C``), ``delta``;
dp_adaptive also ``quantile`` (0.5), ``clip-lr`` (0.2), ``count-stddev`` (noise of the clipped
count; 0 = ``max(clients / 20, noise)``: Andrew et al.'s ``clients / 20`` alone is too small for a
few hospitals, as Flower requires ``noise < 2 count-stddev``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedsim._logging import logger
from fedsim.config import RunConfig
from fedsim.strategies.equal_avg import EqualWeightFedAvg
from fedsim.strategies.privacy import GaussianRDPAccountant, PrivacyReport
from fedsim.strategies.registry import StrategyHooks, register_strategy


class _Accounted(Strategy):
    """Mixin for Flower's DP wrappers: seeded noise and an epsilon after every released aggregate."""

    privacy_accountant: GaussianRDPAccountant
    num_sampled_clients: int
    _rng_state: Any

    def _init_accounting(self, noise_multiplier: float, delta: float, seed: int) -> None:
        self.privacy_accountant = GaussianRDPAccountant(noise_multiplier, delta)
        self._rng_state = np.random.RandomState(seed).get_state()

    @contextmanager
    def _seeded_numpy(self) -> Iterator[None]:
        outside = np.random.get_state()  # noqa: NPY002  (Flower's wrappers draw from numpy's global state)
        np.random.set_state(self._rng_state)  # noqa: NPY002
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()  # noqa: NPY002
            np.random.set_state(outside)  # noqa: NPY002

    def round_noise(self, replied: int) -> float:
        """The noise multiplier of a round in which ``replied`` clients were averaged."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        with self._seeded_numpy():
            arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[safe-super]
        if arrays is not None:
            replied = sum(not m.has_error() for m in replies)
            full = replied >= self.num_sampled_clients
            z = self.privacy_accountant.noise_multiplier if full else self.round_noise(replied)
            if z < self.privacy_accountant.noise_multiplier:
                logger.warning(
                    "round %d: %d clients averaged but the noise is calibrated for more; this round's noise multiplier is %.3g",
                    server_round, replied, z,
                )  # fmt: skip
            self.privacy_accountant.compose(noise_multiplier=z)
            report = self.privacy_accountant.report()
            logger.info("round %d %s", server_round, report.line())
            if metrics is not None:
                metrics["dp-epsilon"] = report.epsilon
        return arrays, metrics

    def privacy_report(self) -> PrivacyReport:
        return self.privacy_accountant.report()


class AccountedFixedClipping(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with seeded noise and fedsim's epsilon accounting."""

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int, delta: float, seed: int
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._init_accounting(noise_multiplier, delta, seed)

    def round_noise(self, replied: int) -> float:
        """``z m / n``: the mean of ``m`` clipped updates moves by ``C / m``, the noise is ``z C / n``."""
        return self.noise_multiplier * min(replied, self.num_sampled_clients) / self.num_sampled_clients


class AccountedAdaptiveClipping(_Accounted, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with seeded noise and fedsim's epsilon accounting (with the
    user's total noise multiplier: Flower splits it between the update and the clipped count)."""

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int, delta: float, seed: int, **kwargs: Any
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, **kwargs)
        self._init_accounting(noise_multiplier, delta, seed)

    def round_noise(self, replied: int) -> float:
        """The update's multiplier (Flower's ``noise_multiplier``, scaled by ``m / n``) combined with
        the clipped count's (``2 clipped_count_stddev``): ``(z_u^-2 + z_b^-2)^(-1/2)``; the user's
        ``z`` when every client replied."""
        z_update = self.noise_multiplier * min(replied, self.num_sampled_clients) / self.num_sampled_clients
        z_count = 2 * self.clipped_count_stddev
        if z_update <= 0 or z_count <= 0:
            return 0.0
        return float((z_update**-2 + z_count**-2) ** -0.5)


def privacy_spent(strategy: Strategy) -> PrivacyReport | None:
    """The epsilon a DP strategy has spent so far, or None for a strategy without accounting (for the
    server: log it and write it next to the run's metrics)."""
    report = getattr(strategy, "privacy_report", None)
    return report() if callable(report) else None


def _check_common(noise: float, clip: float, delta: float) -> None:
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise (the noise multiplier z) must be a number > 0, got {noise}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a number > 0, got {clip}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass(frozen=True)
class DPFixedOptions:
    """``noise`` (z > 0), ``clip`` (C > 0), ``delta`` in (0, 1)."""

    noise: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_common(self.noise, self.clip, self.delta)


@dataclass(frozen=True)
class DPAdaptiveOptions:
    """``noise`` (z > 0), ``clip`` (initial C), ``delta``, ``quantile`` in [0, 1], ``clip-lr`` (> 0),
    ``count-stddev`` (> noise / 2, or 0 = max(clients / 20, noise))."""

    noise: float = 1.0
    clip: float = 0.1
    delta: float = 1e-5
    quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self.noise, self.clip, self.delta)
        if not 0 <= self.quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise ValueError(f"clip-lr must be a number > 0, got {self.clip_lr}")
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ValueError(f"count-stddev must be >= 0 (0 = automatic), got {self.count_stddev}")

    def count_noise(self, clients: int) -> float:
        return self.count_stddev or max(clients / 20, self.noise)


def check_adaptive(options: DPAdaptiveOptions, cfg: RunConfig) -> None:
    if options.noise >= 2 * options.count_noise(cfg.sample_size()):
        raise ValueError(f"noise {options.noise} needs count-stddev > noise / 2 = {options.noise / 2:g}, got {options.count_stddev}")


@register_strategy("dp_fixed", options=DPFixedOptions)
def build_dp_fixed(options: DPFixedOptions, hooks: StrategyHooks) -> AccountedFixedClipping:
    """DP-FedAvg, server-side fixed clipping, with the epsilon spent (McMahan et al. 2018)."""
    inner = EqualWeightFedAvg(**hooks.fedavg_kwargs())
    return AccountedFixedClipping(inner, options.noise, options.clip, hooks.per_round, options.delta, hooks.seed)


@register_strategy("dp_adaptive", options=DPAdaptiveOptions, check=check_adaptive)
def build_dp_adaptive(options: DPAdaptiveOptions, hooks: StrategyHooks) -> AccountedAdaptiveClipping:
    """DP-FedAvg, server-side adaptive clipping, with the epsilon spent (Andrew et al. 2021)."""
    inner = EqualWeightFedAvg(**hooks.fedavg_kwargs())
    return AccountedAdaptiveClipping(
        inner, options.noise, hooks.per_round, options.delta, hooks.seed,
        initial_clipping_norm=options.clip, target_clipped_quantile=options.quantile,
        clip_norm_lr=options.clip_lr, clipped_count_stddev=options.count_noise(hooks.per_round),
    )  # fmt: skip
