"""The RDP accountant and the exact Gaussian ε against hand-computed values."""

import math

import numpy as np
import pytest

from fedsim.strategies.privacy import (
    GaussianRDPAccountant,
    gaussian_delta_exact,
    gaussian_epsilon_exact,
    rdp_gaussian,
    rdp_to_epsilon,
)


def test_rdp_curve_of_the_gaussian_mechanism():
    # z = 2, 3 rounds: 3 * alpha / (2 * 4) at alpha = 2 and 10
    np.testing.assert_allclose(rdp_gaussian(2.0, 3, np.array([2.0, 10.0])), [0.75, 3.75])


def test_conversion_at_one_order_by_hand():
    # z = 1, T = 1, alpha = 10, delta = 1e-5:
    # 10/2 + log(9/10) - (log(1e-5) + log(10)) / 9 = 5 - 0.1053605 + (11.5129255 - 2.3025851) / 9 = 5.9180106
    eps, order = rdp_to_epsilon(rdp_gaussian(1.0, 1, np.array([10.0])), 1e-5, np.array([10.0]))
    assert order == 10.0 and eps == pytest.approx(5.9180106, abs=1e-6)


def _golden_min(f, lo, hi, iters=200):
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iters):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if f(c) < f(d) else (c, b)
    return f((a + b) / 2)


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 1, 1e-5), (0.7, 10, 1e-5), (2.0, 50, 1e-6), (5.0, 3, 1e-5)])
def test_accountant_matches_a_continuous_minimisation_and_the_bounds(z, rounds, delta):
    acc = GaussianRDPAccountant(z, delta)
    acc.compose(rounds)
    rep = acc.report()

    def f(a: float) -> float:
        return rounds * a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)

    assert rep.epsilon == pytest.approx(_golden_min(f, 1.0001, 1e5), rel=1e-3)  # the order grid is fine enough
    rho = rounds / (2 * z * z)  # the classic conversion's closed form (Mironov 2017, Prop. 3) is looser
    assert rep.epsilon <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert rep.epsilon_exact <= rep.epsilon  # no accountant can beat the exact value
    assert rep.rounds == rounds and rep.noise_multiplier == z


def test_exact_delta_by_hand():
    # z = 1, T = 1 (mu = 1), epsilon = 1: Phi(-0.5) - e * Phi(-1.5) = 0.3085375 - 2.7182818 * 0.0668072 = 0.1269367
    assert gaussian_delta_exact(1.0, 1.0, 1) == pytest.approx(0.1269367, abs=1e-6)
    # T rounds with z is one Gaussian with z / sqrt(T): 4 rounds at z = 2 equal 1 round at z = 1
    assert gaussian_epsilon_exact(2.0, 4, 1e-5) == pytest.approx(gaussian_epsilon_exact(1.0, 1, 1e-5), rel=1e-9)
    eps = gaussian_epsilon_exact(1.0, 1, 1e-5)
    assert gaussian_delta_exact(eps, 1.0, 1) == pytest.approx(1e-5, rel=1e-6)


def test_edge_cases():
    acc = GaussianRDPAccountant(1.0, 1e-5)
    assert acc.report().epsilon == 0.0 and acc.report().rounds == 0
    assert math.isinf(gaussian_epsilon_exact(0.0, 1, 1e-5))
    acc.compose(2)
    assert acc.report().epsilon > GaussianRDPAccountant(1.0, 1e-5).report().epsilon
    with pytest.raises(ValueError, match="delta must be in"):
        GaussianRDPAccountant(1.0, 0.0)


def test_releases_with_different_noise_compose_by_inverse_variance():
    # z = 1 and z = 2: RDP alpha/2 (1 + 1/4), i.e. one Gaussian with z = (1.25)^(-1/2)
    acc = GaussianRDPAccountant(2.0, 1e-5)
    acc.compose()
    acc.compose(noise_multiplier=1.0)
    one = GaussianRDPAccountant(1.25**-0.5, 1e-5)
    one.compose()
    rep = acc.report()
    assert rep.epsilon == pytest.approx(one.report().epsilon, rel=1e-9)
    assert rep.epsilon_exact == pytest.approx(gaussian_epsilon_exact(1.25**-0.5, 1, 1e-5), rel=1e-9)
    assert rep.rounds == 2 and rep.reduced_rounds == 1 and "1 of them with fewer clients" in rep.line()
