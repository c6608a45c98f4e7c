"""Central DP: server-side clipping of each update, equal-weighted mean, seeded noise, ε reported."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsim.config import ConfigError, RunConfig
from fedsim.strategies import StrategyHooks, build_strategy, privacy_spent
from fedsim.strategies.privacy import GaussianRDPAccountant
from tests.strategies.helpers import FakeGrid, reply, run_in_process, tiny_config

CURRENT = np.zeros(4, dtype=np.float64)
UPDATES = [np.array([0.3, 0.0, 0.0, 0.4]), np.array([0.0, 0.1, 0.0, 0.0]), np.array([30.0, 0.0, 40.0, 0.0])]  # norms 0.5, 0.1, 50


def _round(options, seed=0):
    s = build_strategy(RunConfig(strategy="dp_fixed", seed=seed, strategy_options=tuple(options)), StrategyHooks(3))
    list(s.configure_train(1, ArrayRecord({"w": Array(CURRENT.copy())}), ConfigRecord(), FakeGrid(3)))
    msgs = [reply({"w": CURRENT + u}, n, k) for k, (u, n) in enumerate(zip(UPDATES, [10, 20, 70], strict=True))]
    return s, *s.aggregate_train(1, msgs)


@pytest.mark.usefixtures("task_identity")
def test_updates_are_clipped_and_averaged_with_equal_weights():
    # noise 1e-9: the aggregate is the equal-weighted mean of the clipped updates (clip 1: only the third is cut, to [0.6, 0, 0.8, 0])
    _, arrays, metrics = _round([("noise", "1e-9"), ("clip", "1.0")])
    expect = (UPDATES[0] + UPDATES[1] + np.array([0.6, 0.0, 0.8, 0.0])) / 3
    np.testing.assert_allclose(arrays["w"].numpy(), expect, atol=1e-6)
    assert metrics["dp-epsilon"] > 1e6  # almost no noise: no privacy worth the name


@pytest.mark.usefixtures("task_identity")
def test_noise_is_seeded_and_epsilon_reported(caplog):
    with caplog.at_level(logging.INFO, logger="fedsim"):
        s, a, metrics = _round([("noise", "1.0"), ("clip", "1.0")], seed=3)
    _, b, _ = _round([("noise", "1.0"), ("clip", "1.0")], seed=3)
    _, c, _ = _round([("noise", "1.0"), ("clip", "1.0")], seed=4)
    np.testing.assert_array_equal(a["w"].numpy(), b["w"].numpy())
    assert not np.allclose(a["w"].numpy(), c["w"].numpy())
    # noise of std z C / n = 1/3 per coordinate around the clipped mean
    expect = GaussianRDPAccountant(1.0, 1e-5)
    expect.compose()
    report = privacy_spent(s)
    assert report is not None and report.epsilon == pytest.approx(expect.report().epsilon) and report.rounds == 1
    assert metrics["dp-epsilon"] == pytest.approx(report.epsilon)
    assert "privacy spent: epsilon" in caplog.text
    assert privacy_spent(build_strategy(RunConfig(strategy="fedavg"), StrategyHooks(3))) is None


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"noise .* must be a number > 0"):
        build_strategy(RunConfig(strategy="dp_fixed", strategy_options=(("noise", "0"),)), StrategyHooks(3))
    with pytest.raises(ConfigError, match="unknown strategy option 'sigma' for strategy 'dp_fixed'; valid options: noise, clip, delta"):
        build_strategy(RunConfig(strategy="dp_fixed", strategy_options=(("sigma", "1"),)), StrategyHooks(3))
    with pytest.raises(ConfigError, match=r"noise 1.0 needs count-stddev > noise / 2 = 0.5, got 0.2"):
        build_strategy(RunConfig(strategy="dp_adaptive", strategy_options=(("count-stddev", "0.2"),)), StrategyHooks(3))


@pytest.mark.parametrize("name", ["dp_fixed", "dp_adaptive"])
def test_dp_runs_report_epsilon(name, tmp_path):
    cfg = tiny_config(tmp_path, name, clients=3, rounds=2, options=[("noise", "0.8")])
    result, _ = run_in_process(cfg)
    expect = GaussianRDPAccountant(0.8, 1e-5)
    expect.compose(2)
    assert result.train_metrics_clientapp[2]["dp-epsilon"] == pytest.approx(expect.report().epsilon)
    assert result.train_metrics_clientapp[1]["dp-epsilon"] < result.train_metrics_clientapp[2]["dp-epsilon"]


@pytest.mark.usefixtures("task_identity")
def test_a_round_with_fewer_clients_is_accounted_with_less_noise():
    s = build_strategy(RunConfig(strategy="dp_fixed", strategy_options=(("noise", "1.5"),)), StrategyHooks(3))
    list(s.configure_train(1, ArrayRecord({"w": Array(CURRENT.copy())}), ConfigRecord(), FakeGrid(3)))
    s.aggregate_train(1, [reply({"w": CURRENT + UPDATES[k]}, 10, k) for k in range(2)])  # one client failed
    # the mean of 2 clipped updates moves by C/2 while the noise is 1.5 C/3: multiplier 1.5 * 2/3 = 1
    expect = GaussianRDPAccountant(1.0, 1e-5)
    expect.compose()
    report = privacy_spent(s)
    assert report is not None and report.reduced_rounds == 1
    assert report.epsilon == pytest.approx(expect.report().epsilon, rel=1e-9)
