"""FedBN: BatchNorm tensors are never sent, so never aggregated; the rest is averaged."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsim.config import RunConfig
from fedsim.strategies import FedBN, StrategyHooks, batchnorm_keys, build_strategy, kept_local
from tests.strategies.helpers import ExchangeLog, FakeGrid, reply, run_in_process, tiny_config

NAMES = [
    "backbone.0.weight", "backbone.0.bias",
    "backbone.1.weight", "backbone.1.bias", "backbone.1.running_mean", "backbone.1.running_var",
    "head.fc1.weight", "head.fc1.bias",
]  # fmt: skip
BN = ["backbone.1.weight", "backbone.1.bias", "backbone.1.running_mean", "backbone.1.running_var"]


def test_batchnorm_keys_by_name():
    assert batchnorm_keys(NAMES) == BN
    assert batchnorm_keys(["head.fc2.weight", "head.fc2.bias"]) == []  # mixed scenarios: head only, no BN
    assert kept_local(RunConfig(strategy="fedbn"), NAMES) == BN
    assert kept_local(RunConfig(strategy="fedavg"), NAMES) == []


def test_messages_carry_no_batchnorm(task_identity):
    s = build_strategy(RunConfig(strategy="fedbn"), StrategyHooks(2))
    assert isinstance(s, FedBN)
    arrays = ArrayRecord({k: Array(np.zeros(2, dtype=np.float32)) for k in NAMES})
    for msgs in (s.configure_train(1, arrays, ConfigRecord(), FakeGrid(2)), s.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(2))):
        for m in msgs:
            assert list(m.content["arrays"].keys()) == [n for n in NAMES if n not in BN]


def test_fedbn_run_keeps_each_clients_batchnorm_and_averages_the_rest(tmp_path):
    """Real ServerApp + ClientApp (3 small_cnn clients, 2 rounds, site styles): every message checked."""
    from fedsim.clients.tasks import get_task

    cfg = tiny_config(tmp_path, "fedbn", clients=3, rounds=2, site_styles=True)
    bn_names = set(batchnorm_keys(list(get_task(cfg.task).build_model("small_cnn", cfg).state_dict())))
    assert len(bn_names) == 15  # 3 BatchNorm layers x (weight, bias, mean, var, num_batches_tracked)
    log = ExchangeLog(bn_names)
    result, grid = run_in_process(cfg, on_reply=log)
    assert len(log.rows) == 2 * 2 * 3  # rounds x (train, evaluate) x clients
    for row in log.rows:
        assert not bn_names & set(row.sent) and not bn_names & set(row.got)  # never sent, never returned
    assert not bn_names & set(result.arrays.keys())  # never aggregated
    # round 2's global arrays = the example-weighted mean of round 1's train replies, tensor by tensor
    r1 = [log.get(1, "train", pid) for pid in range(3)]
    weights = np.array([r.num_examples for r in r1], dtype=np.float64)
    for k, v in log.get(2, "train", 0).sent.items():
        expect = sum(w * r.got[k].astype(np.float64) for w, r in zip(weights / weights.sum(), r1, strict=True))
        np.testing.assert_allclose(v, expect, rtol=1e-5, atol=1e-7)
    # each client's BatchNorm, tensor by tensor: the same after its train reply and at its evaluation
    # (the aggregation between them did not touch it), and at the end of the run
    for pid in range(3):
        final = grid.contexts[1000 + pid].state["fedsim.model"]
        for rnd in (1, 2):
            tr, ev = log.get(rnd, "train", pid).watched, log.get(rnd, "evaluate", pid).watched
            assert set(tr) == bn_names
            for k in bn_names:
                np.testing.assert_array_equal(tr[k], ev[k])
                if rnd == 2:
                    np.testing.assert_array_equal(tr[k], final[k].numpy())
    # ... and its own: the clients' running means differ (different scanner styles)
    means = [log.get(2, "train", pid).watched["backbone.1.running_mean"] for pid in range(3)]
    assert not np.allclose(means[0], means[1]) and not np.allclose(means[1], means[2])


@pytest.mark.usefixtures("task_identity")
def test_fedbn_aggregates_only_what_it_sent():
    s = build_strategy(RunConfig(strategy="fedbn", strategy_options=(("weighting", "equal"),)), StrategyHooks(2))
    w = {k: np.ones(2, dtype=np.float32) for k in NAMES if k not in BN}
    msgs = [reply({k: v * (i + 1) for k, v in w.items()}, 10 * (i + 1), i) for i in range(2)]
    arrays, _ = s.aggregate_train(1, msgs)
    assert set(arrays.keys()) == set(w)
    np.testing.assert_allclose(arrays["head.fc1.weight"].numpy(), [1.5, 1.5])  # equal weights: (1 + 2) / 2
