"""Privacy accounting for the Gaussian mechanism with full participation: the epsilon a DP run spent.

Every round of fedsim's DP strategies (:mod:`fedsim.strategies.dp`) releases the mean of the
clients' clipped updates plus Gaussian noise of standard deviation ``z * C / n`` (``C`` the clip
norm, ``n`` the clients, all of whom take part; one client changes that mean by at most ``C / n``
when it is added or removed). That is the Gaussian mechanism with noise multiplier ``z``, and
``T`` rounds are its ``T``-fold composition. There is no sampling, hence no amplification.

* :class:`GaussianRDPAccountant`: Renyi DP (Mironov, CSF 2017, arXiv:1702.07476). The Gaussian
  mechanism is ``(alpha, alpha / (2 z^2))``-RDP for every order ``alpha > 1``, and RDP composes additively,
  so ``T`` rounds give ``eps_RDP(alpha) = T alpha / (2 z^2)``. It is converted to ``(epsilon, delta)``-DP with the
  conversion of Balle et al. (AISTATS 2020, arXiv:1905.09982, Thm. 21; also Canonne, Kamath and
  Steinke 2020, Prop. 12), ``epsilon = eps_RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)``,
  minimised over ``alpha``: what Opacus, TF Privacy and Google's dp-accounting report.
* :func:`gaussian_epsilon_exact`: the exact epsilon of ``T`` compositions (a Gaussian mechanism with
  ``mu = sqrt(T) / z``; Balle and Wang, ICML 2018, arXiv:1805.06530, Thm. 8; Dong, Roth and Su
  2019, GDP): ``delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2)``, solved for epsilon. It is a lower bound
  any correct accountant must respect, used in the tests and shown next to the RDP value.

Pure Python and numpy (no dependency): layer 2 imports no more than it may.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: RDP orders searched: 1 + 10^-3 ... 1 + 10^5 (dense enough that the grid optimum is within
#: 0.1 % of the continuous one for the noise levels fedsim uses; see the tests).
ORDERS = 1.0 + np.logspace(-3, 5, 8001)


def rdp_gaussian(noise_multiplier: float, rounds: int, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP ``epsilon(alpha)`` of ``rounds`` compositions of the Gaussian mechanism, at each order."""
    if noise_multiplier <= 0:
        return np.full(np.shape(orders), np.inf)
    return rounds * np.asarray(orders, dtype=np.float64) / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> tuple[float, float]:
    """``(epsilon, optimal order)`` of an RDP curve at ``delta`` (Balle et al. 2020's conversion)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    i = int(np.nanargmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta_exact(epsilon: float, noise_multiplier: float, rounds: int) -> float:
    """Exact delta at ``epsilon`` of ``rounds`` compositions of the Gaussian mechanism."""
    mu = math.sqrt(rounds) / noise_multiplier
    tail = _phi(-epsilon / mu - mu / 2)
    return _phi(-epsilon / mu + mu / 2) - (math.exp(epsilon) * tail if tail > 0 else 0.0)


def gaussian_epsilon_exact(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Exact (smallest) epsilon at ``delta`` of ``rounds`` compositions of the Gaussian mechanism
    (bisection on :func:`gaussian_delta_exact`, which falls with epsilon); ``inf`` without noise."""
    if noise_multiplier <= 0:
        return math.inf
    if rounds == 0 or gaussian_delta_exact(0.0, noise_multiplier, rounds) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta_exact(hi, noise_multiplier, rounds) > delta:
        lo, hi = hi, 2 * hi
        if hi > 600:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta_exact(mid, noise_multiplier, rounds) > delta else (lo, mid)
    return hi


@dataclass(frozen=True)
class PrivacyReport:
    """What a DP run spent: ``epsilon`` (RDP accountant) at ``delta`` after ``rounds`` releases
    with ``noise_multiplier``; ``epsilon_exact`` is the exact value for the same mechanism."""

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    optimal_order: float
    epsilon_exact: float
    method: str = "rdp"
    reduced_rounds: int = 0

    def line(self) -> str:
        fewer = f", {self.reduced_rounds} of them with fewer clients (less effective noise)" if self.reduced_rounds else ""
        return (
            f"privacy spent: epsilon {self.epsilon:.4g} at delta {self.delta:g} after {self.rounds} rounds{fewer} "
            f"(RDP accountant, Gaussian mechanism, noise multiplier {self.noise_multiplier:g}, full participation, "
            f"no sampling amplification; exact epsilon {self.epsilon_exact:.4g})"
        )

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "epsilon": self.epsilon, "delta": self.delta, "rounds": self.rounds, "noise_multiplier": self.noise_multiplier,
            "optimal_order": self.optimal_order, "epsilon_exact": self.epsilon_exact, "method": self.method,
            "reduced_rounds": self.reduced_rounds,
        }  # fmt: skip


class GaussianRDPAccountant:
    """Counts Gaussian-mechanism releases and reports (epsilon, delta).

    Releases normally have the configured ``noise_multiplier``; :meth:`compose` takes a smaller
    one for a round whose aggregate had fewer clients than the noise was calibrated for (the mean of
    ``m < n`` clipped updates moves by up to ``C / m`` while the noise is ``z C / n``: multiplier
    ``z m / n``). Releases with multipliers ``z_i`` compose to RDP ``alpha / 2 * sum 1 / z_i^2``,
    i.e. one Gaussian mechanism with ``z = (sum 1 / z_i^2)^(-1/2)``, which is how both the RDP and
    the exact epsilon are computed."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise multiplier must be a number >= 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.rounds = 0
        self.reduced_rounds = 0
        self.inverse_variance = 0.0  # sum over releases of 1 / z_i^2

    def compose(self, count: int = 1, noise_multiplier: float | None = None) -> None:
        """Add ``count`` releases with ``noise_multiplier`` (default: the configured one)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"noise multiplier must be a number >= 0, got {z}")
        self.rounds += count
        self.reduced_rounds += count if z < self.noise_multiplier else 0
        self.inverse_variance += count * (math.inf if z == 0 else 1.0 / z**2)

    def report(self, delta: float | None = None) -> PrivacyReport:
        d = self.delta if delta is None else delta
        if self.rounds == 0:
            return PrivacyReport(0.0, d, 0, self.noise_multiplier, math.nan, 0.0)
        z_total = 0.0 if math.isinf(self.inverse_variance) else 1.0 / math.sqrt(self.inverse_variance)
        eps, order = rdp_to_epsilon(rdp_gaussian(z_total, 1), d)
        exact = gaussian_epsilon_exact(z_total, 1, d)
        return PrivacyReport(eps, d, self.rounds, self.noise_multiplier, order, exact, reduced_rounds=self.reduced_rounds)
