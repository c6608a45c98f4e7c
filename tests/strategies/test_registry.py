"""Every strategy by name: typed options, errors naming the key and the valid keys, weighting,
and one tiny in-process round each through the real ServerApp and ClientApp."""

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi, QFedAvg

from fedsim.config import ConfigError, RunConfig
from fedsim.strategies import STRATEGIES, EqualWeightFedAvg, StrategyHooks, build_strategy, list_strategies, option_help
from tests.strategies.helpers import FakeGrid, reply, run_in_process, tiny_config

FLOWER = {
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "qfedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
}


def test_every_applicable_flower_strategy_is_registered():
    assert FLOWER | {"equal_avg", "fedbn", "fedper", "dp_fixed", "dp_adaptive"} == set(list_strategies())


def test_options_are_typed_and_unknown_keys_list_the_valid_ones():
    hooks = StrategyHooks(3)
    s = build_strategy(RunConfig(strategy="fedyogi", strategy_options=(("eta", "0.05"), ("beta-1", "0.5"))), hooks)
    assert isinstance(s, FedYogi) and (s.eta, s.beta_1, s.beta_2) == (0.05, 0.5, 0.99)
    s = build_strategy(RunConfig(strategy="fedavgm", strategy_options=(("momentum", "0.5"),)), hooks)
    assert isinstance(s, FedAvgM) and s.server_momentum == 0.5 and s.server_learning_rate == 1.0
    s = build_strategy(RunConfig(strategy="qfedavg", lr=0.01), hooks)
    assert isinstance(s, QFedAvg) and s.client_learning_rate == 0.01 and s.train_loss_key == "train-loss"
    with pytest.raises(
        ConfigError, match="unknown strategy option 'momentun' for strategy 'fedavgm'; valid options: server-lr, momentum, weighting"
    ):
        build_strategy(RunConfig(strategy="fedavgm", strategy_options=(("momentun", "0.5"),)), hooks)
    with pytest.raises(ConfigError, match="weighting must be one of examples, equal, got 'size'"):
        build_strategy(RunConfig(strategy="fedavg", strategy_options=(("weighting", "size"),)), hooks)
    with pytest.raises(ConfigError, match="strategy option 'tau' expects a float, got 'x'"):
        build_strategy(RunConfig(strategy="fedadam", strategy_options=(("tau", "x"),)), hooks)
    with pytest.raises(ConfigError, match="strategy 'fedmedian' takes no --strategy-option"):
        build_strategy(RunConfig(strategy="fedmedian", strategy_options=(("beta", "1"),)), hooks)
    assert ("weighting", "'examples'", "str") in option_help("fedbn") and option_help("fedmedian") == []
    assert all(STRATEGIES.get(n).summary for n in list_strategies())  # one line each for 'fedsim list'


def test_equal_weighting_feeds_the_equal_mean_to_the_server_optimiser(task_identity):
    w = [np.array([1.0, 2.0]), np.array([4.0, 8.0]), np.array([7.0, -1.0])]
    msgs = [reply({"w": w[k]}, n, k) for k, n in enumerate([10, 30, 60])]
    s = build_strategy(RunConfig(strategy="fedadam", strategy_options=(("weighting", "equal"),)), StrategyHooks(3))
    assert isinstance(s, FedAdam) and isinstance(s, EqualWeightFedAvg)
    current = np.array([0.5, 0.5])
    list(s.configure_train(1, ArrayRecord({"w": Array(current)}), ConfigRecord(), FakeGrid(3)))
    arrays, _ = s.aggregate_train(1, msgs)
    # FedAdam by hand on the equal mean [4, 3]: delta = mean - current; m = 0.1 delta; v = 0.01 delta^2
    delta = np.array([4.0, 3.0]) - current
    m, v = 0.1 * delta, 0.01 * delta**2
    eta_norm = 0.01 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(arrays["w"].numpy(), current + eta_norm * m / (np.sqrt(v) + 1e-3), rtol=1e-6)


def _options(name: str):
    return {"bulyan": (("num-malicious", "1"),), "krum": (("num-malicious", "0"),), "multikrum": (("num-malicious", "0"),)}.get(name, ())


@pytest.mark.parametrize("name", sorted(set(list_strategies())))
def test_each_strategy_runs_a_tiny_round(name, tmp_path):
    clients = 7 if name == "bulyan" else 5 if name == "fedtrimmedavg" else 3
    cfg = tiny_config(tmp_path, name, clients=clients, options=_options(name))
    cfg = dataclasses.replace(cfg, num_samples=12 * clients + 20, local_epochs=1)
    result, _ = run_in_process(cfg)
    assert result.arrays is not None and len(result.arrays) > 0
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
    assert 1 in result.train_metrics_clientapp  # the round was aggregated
