"""FedPer: the chosen layers stay at each client; the base layers are averaged."""

import numpy as np
import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.strategies import FedPer, StrategyHooks, build_strategy, kept_local
from tests.strategies.helpers import ExchangeLog, run_in_process, tiny_config

HEAD = ["head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"]


def test_local_layers_option():
    assert kept_local(RunConfig(strategy="fedper"), HEAD) == ["head.out.weight", "head.out.bias"]  # default: the last layer
    two = RunConfig(strategy="fedper", strategy_options=(("local-layers", "head.fc2.*:head.out.*"),))
    assert kept_local(two, HEAD) == HEAD[1:]
    with pytest.raises(ConfigError, match=r"fedper local-layers head\.classifier\.\* match no shared parameter"):
        kept_local(RunConfig(strategy="fedper", strategy_options=(("local-layers", "head.classifier.*"),)), HEAD)
    with pytest.raises(ConfigError, match="match every shared parameter"):
        kept_local(RunConfig(strategy="fedper", strategy_options=(("local-layers", "head.*"),)), HEAD)
    with pytest.raises(ConfigError, match="unknown strategy option 'layers' for strategy 'fedper'; valid options: local-layers, weighting"):
        kept_local(RunConfig(strategy="fedper", strategy_options=(("layers", "x"),)), HEAD)


def test_fedper_run_keeps_the_head_output_layer_local(tmp_path):
    """Real ServerApp + ClientApp, 3 clients, 2 rounds: ``head.out.*`` never travels, and each
    client ends with its own output layer while every other tensor is the aggregate."""
    cfg = tiny_config(tmp_path, "fedper", clients=3, rounds=2)
    local = {"head.out.weight", "head.out.bias"}
    log = ExchangeLog(local)
    result, grid = run_in_process(cfg, on_reply=log)
    assert isinstance(build_strategy(cfg, StrategyHooks(3)), FedPer)
    for row in log.rows:
        assert not local & set(row.sent) and not local & set(row.got)
        assert "backbone.0.weight" in row.sent  # the rest of the model is shared
    assert not local & set(result.arrays.keys())
    outs = [grid.contexts[1000 + pid].state["fedsim.model"]["head.out.weight"].numpy() for pid in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    # the evaluation of round 2 used each client's own layer: unchanged since its train reply
    for pid in range(3):
        np.testing.assert_array_equal(
            log.get(2, "train", pid).watched["head.out.weight"], log.get(2, "evaluate", pid).watched["head.out.weight"]
        )


@pytest.mark.parametrize(("name", "sent"), [("fedper", {"head.fc1.bias", "head.fc2.weight", "head.fc2.bias"}), ("fedbn", None)])
def test_mixed_architectures_share_only_the_head_allow_list(name, sent, tmp_path):
    """Scenario-1 style (small_cnn, alexnet_skip, small_cnn): only the shared head travels; FedPer
    keeps head.out.* of it local, FedBN finds no BatchNorm in it and sends the whole allow-list."""
    from fedsim.clients.tasks import resolve_config

    mixed = ("small_cnn", "alexnet_skip", "small_cnn")
    cfg = resolve_config(
        RunConfig(profile="tiny", scenario=1, models=mixed, rounds=1, num_samples=60, strategy=name, out=str(tmp_path / "r"))
    )
    log = ExchangeLog(set())
    run_in_process(cfg, on_reply=log)
    keys = {k for row in log.rows for k in row.sent}
    allow = {"head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"}
    assert keys == (sent if sent is not None else allow)
