"""Robust aggregation on hand-made replies: one client sends huge values."""

import numpy as np
import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.strategies import StrategyHooks, build_strategy
from tests.strategies.helpers import reply

pytestmark = pytest.mark.usefixtures("task_identity")

RNG = np.random.default_rng(7)
HONEST = [RNG.normal(0.0, 1.0, size=(3, 4)).astype(np.float32) for _ in range(6)]
EVIL = np.full((3, 4), 1e6, dtype=np.float32)
SIZES = [10, 20, 30, 40, 50, 60, 70]


def replies(evil: bool = True):
    layers = [*HONEST, EVIL] if evil else HONEST
    return [reply({"w": w, "b": w[0] * 2}, SIZES[k], k) for k, w in enumerate(layers)]


def aggregate(name: str, options=(), clients: int = 7):
    strategy = build_strategy(RunConfig(strategy=name, clients=clients, strategy_options=tuple(options)), StrategyHooks(clients))
    arrays, _ = strategy.aggregate_train(1, replies(evil=clients == 7))
    return arrays["w"].numpy()


def test_fedavg_is_pulled_out_of_the_honest_range():
    w = aggregate("fedavg")
    assert (w > np.max(HONEST, axis=0)).all()  # the attacker's 1e6 dominates every coordinate


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_aggregate_stays_within_the_honest_range(name):
    w = aggregate(name)
    lo, hi = np.min(HONEST, axis=0), np.max(HONEST, axis=0)
    assert (w >= lo - 1e-6).all() and (w <= hi + 1e-6).all()


def test_median_and_trimmed_mean_against_numpy():
    stack = np.stack([*HONEST, EVIL])
    np.testing.assert_allclose(aggregate("fedmedian"), np.median(stack, axis=0), rtol=1e-6)
    # beta 0.2 of 7 clients: floor(1.4) = 1 value cut from each end of every coordinate
    trimmed = np.sort(stack, axis=0)[1:-1].mean(axis=0)
    np.testing.assert_allclose(aggregate("fedtrimmedavg"), trimmed, rtol=1e-5)
    # beta 0.3: floor(2.1) = 2 cut from each end
    np.testing.assert_allclose(aggregate("fedtrimmedavg", [("beta", "0.3")]), np.sort(stack, axis=0)[2:-2].mean(axis=0), rtol=1e-5)


def test_krum_picks_the_most_central_honest_update():
    flat = [np.concatenate([w.ravel(), (w[0] * 2).ravel()]).astype(np.float64) for w in [*HONEST, EVIL]]
    d = np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])
    n, f = 7, 1
    scores = [np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)]
    np.testing.assert_allclose(aggregate("krum"), HONEST[int(np.argmin(scores))], rtol=1e-6)
    # multi-krum with select=3: the example-weighted mean of the three best-scored
    best = np.argsort(scores)[:3]
    expect = sum(SIZES[i] * [*HONEST, EVIL][i] for i in best) / sum(SIZES[i] for i in best)
    np.testing.assert_allclose(aggregate("multikrum", [("select", "3")]), expect, rtol=1e-5)


def test_client_counts_are_checked_before_the_run():
    with pytest.raises(ConfigError, match=r"bulyan with num-malicious=1 needs >= 4f\+3 = 7 clients, got 3"):
        build_strategy(RunConfig(strategy="bulyan", clients=3), StrategyHooks(3))
    with pytest.raises(ConfigError, match=r"krum with num-malicious=2 needs >= 2f\+3 = 7 clients, got 5"):
        build_strategy(RunConfig(strategy="krum", clients=5, strategy_options=(("num-malicious", "2"),)), StrategyHooks(5))
    with pytest.raises(ConfigError, match=r"beta=0.2 cuts floor\(0.2 x 3 clients\) = 0 values"):
        build_strategy(RunConfig(strategy="fedtrimmedavg", clients=3), StrategyHooks(3))
    with pytest.raises(ConfigError, match=r"unknown strategy option 'f' for strategy 'bulyan'; valid options: num-malicious"):
        build_strategy(RunConfig(strategy="bulyan", clients=7, strategy_options=(("f", "1"),)), StrategyHooks(7))
