"""Aggregation against hand-computed values on three mock client replies."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedsim.config import ConfigError, RunConfig
from fedsim.strategies import EqualWeightFedAvg, StrategyHooks, build_strategy, list_strategies

pytestmark = pytest.mark.usefixtures("task_identity")

# three clients, two shared tensors; num-examples 10, 30, 60
W = [np.array([1.0, 2.0], dtype=np.float32), np.array([4.0, 8.0], dtype=np.float32), np.array([7.0, -1.0], dtype=np.float32)]
B = [np.array([[0.0]], dtype=np.float32), np.array([[3.0]], dtype=np.float32), np.array([[6.0]], dtype=np.float32)]
N = [10, 30, 60]


def replies() -> list[Message]:
    out = []
    for k in range(3):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"head.w": Array(W[k]), "head.b": Array(B[k])}),
                "metrics": MetricRecord({"num-examples": N[k], "train-loss": float(k), "partition-id": k}),
            }
        )
        out.append(Message(content=content, dst_node_id=k + 1, message_type="train"))
    return out


def test_equal_weights():
    arrays, metrics = EqualWeightFedAvg(min_available_nodes=3).aggregate_train(1, replies())
    # by hand: (1+4+7)/3 = 4, (2+8-1)/3 = 3, (0+3+6)/3 = 3
    np.testing.assert_allclose(arrays["head.w"].numpy(), [4.0, 3.0])
    np.testing.assert_allclose(arrays["head.b"].numpy(), [[3.0]])
    assert set(arrays.keys()) == {"head.w", "head.b"}  # only the shared keys the clients returned
    # metrics stay example-weighted: (0*10 + 1*30 + 2*60) / 100 = 1.5
    assert metrics["train-loss"] == pytest.approx(1.5)


def test_sample_weights():
    arrays, _ = FedAvg(min_available_nodes=3).aggregate_train(1, replies())
    # by hand: 0.1*1 + 0.3*4 + 0.6*7 = 5.5 ; 0.1*2 + 0.3*8 + 0.6*(-1) = 2.0 ; 0.3*3 + 0.6*6 = 4.5
    np.testing.assert_allclose(arrays["head.w"].numpy(), [5.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(arrays["head.b"].numpy(), [[4.5]], rtol=1e-6)


def test_equal_and_sample_weights_coincide_for_equal_sizes():
    msgs = replies()
    for m in msgs:
        m.content["metrics"]["num-examples"] = 20
    eq, _ = EqualWeightFedAvg().aggregate_train(1, msgs)
    fa, _ = FedAvg().aggregate_train(1, msgs)
    np.testing.assert_allclose(eq["head.w"].numpy(), fa["head.w"].numpy(), rtol=1e-6)


def test_registry_builds_flower_strategies():
    assert {"equal_avg", "fedadam", "fedavg", "fedprox"} <= set(list_strategies())
    options = {"fedprox": (("mu", "0.3"),), "fedadam": (("eta", "0.05"),)}
    hooks = StrategyHooks(num_nodes=3)
    s = {
        n: build_strategy(RunConfig(profile="tiny", strategy=n, strategy_options=options.get(n, ())), hooks)
        for n in options | {"equal_avg": (), "fedavg": ()}
    }
    assert type(s["equal_avg"]) is EqualWeightFedAvg and type(s["fedavg"]) is FedAvg
    assert isinstance(s["fedprox"], FedProx) and s["fedprox"].proximal_mu == 0.3
    assert isinstance(s["fedadam"], FedAdam) and s["fedadam"].eta == 0.05
    assert all(x.min_available_nodes == 3 and x.min_train_nodes == 3 for x in s.values())


def test_fedprox_sends_mu_to_clients():
    class FakeGrid:
        def get_node_ids(self):
            return [1, 2, 3]

    msgs = list(
        FedProx(proximal_mu=0.3, min_available_nodes=3).configure_train(
            1, ArrayRecord({"a": Array(np.zeros(1))}), ConfigRecord(), FakeGrid()
        )
    )
    assert len(msgs) == 3 and all(m.content["config"]["proximal-mu"] == 0.3 for m in msgs)


def test_strategy_options_are_typed_and_checked():
    hooks = StrategyHooks(num_nodes=3)
    assert build_strategy(RunConfig(strategy="fedprox"), hooks).proximal_mu == 0.01  # the default
    with pytest.raises(ConfigError, match="unknown strategy option 'eta' for strategy 'fedprox'; valid options: mu, weighting"):
        build_strategy(RunConfig(strategy="fedprox", strategy_options=(("eta", "1"),)), hooks)
    with pytest.raises(ConfigError, match="strategy option 'mu' expects a float, got 'big'"):
        build_strategy(RunConfig(strategy="fedprox", strategy_options=(("mu", "big"),)), hooks)
    with pytest.raises(ConfigError, match="mu must be a number >= 0"):
        build_strategy(RunConfig(strategy="fedprox", strategy_options=(("mu", "-1"),)), hooks)
    with pytest.raises(ConfigError, match="strategy 'equal_avg' takes no --strategy-option"):
        build_strategy(RunConfig(strategy_options=(("mu", "1"),)), hooks)


def test_equal_weights_leave_extra_records_of_a_reply_alone():
    msgs = replies()
    msgs[0].content["cme"] = ConfigRecord({"payload": b"x"})
    arrays, _ = EqualWeightFedAvg(min_available_nodes=3).aggregate_train(1, msgs)
    np.testing.assert_allclose(arrays["head.w"].numpy(), [4.0, 3.0])
    assert "cme" in msgs[0].content.config_records
