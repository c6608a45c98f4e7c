"""Tracker scalars from metrics.jsonl lines, the registry, and the TensorBoard tracker read back
with TensorBoard's own EventAccumulator (no run needed: hand-made lines)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.registry import UnknownNameError
from fedsim.tracking import TRACKERS, epoch_scalars, hparams, open_tracking, round_scalars

LINES = [
    {
        "round": r,
        "wall_s": 1.5 * r,
        "clients": [
            {"client": 0, "model": "small_cnn", "num_examples": 27, "train_loss": 1.4 - 0.1 * r, "test_accuracy": 0.25 * r,
             "epochs": [{"loss": 1.5 - 0.1 * r, "accuracy": 0.2}, {"loss": 1.4 - 0.1 * r, "accuracy": 0.3}]},
            {"client": 1, "model": "small_cnn", "num_examples": 26, "train_loss": 1.3, "test_accuracy": None,
             "epochs": [{"loss": 1.35, "accuracy": 0.1}, {"loss": 1.3, "accuracy": 0.2}]},
        ],
        "global": {"accuracy": 0.1 * r, "loss": float("nan")},
    }
    for r in (1, 2)
]  # fmt: skip


def test_round_and_epoch_scalars_follow_the_line():
    got = round_scalars(LINES[1])
    assert ("client0/train_loss", 2, 1.2) in got and ("client0/test_accuracy", 2, 0.5) in got
    assert ("global/accuracy", 2, 0.2) in got and ("round/wall_s", 2, 3.0) in got
    tags = [t for t, _, _ in got]
    assert "client1/test_accuracy" not in tags and "global/loss" not in tags  # null / NaN: undefined, not logged
    assert "client0/num_examples" not in tags
    ep = epoch_scalars(LINES[1])
    # round 2 of 2-epoch rounds: global epochs 3 and 4
    assert ("client0/epoch/train_loss", 3, 1.3) in ep and ("client0/epoch/train_loss", 4, 1.2) in ep
    assert ("client1/epoch/train_accuracy", 4, 0.2) in ep and len(ep) == 8


def test_hparams_flattens_the_config():
    cfg = RunConfig(models=("small_cnn",) * 3, strategy_options=(("mu", "0.1"),)).to_json_dict() | {"environment": {"device": "cpu"}}
    hp = hparams(cfg)
    assert hp["models"] == "small_cnn,small_cnn,small_cnn" and hp["strategy_options"] == "mu=0.1"
    assert hp["seed"] == 0 and hp["cme"] is False and hp["rounds"] == "" and "environment" not in hp


def test_unknown_tracker_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown tracker 'wandb'; valid choices: mlflow, none, tensorboard"):
        TRACKERS.get("wandb")
    from fedsim.clients.tasks import resolve_config

    with pytest.raises(UnknownNameError, match="valid choices: mlflow, none, tensorboard"):
        resolve_config(RunConfig(profile="tiny", tracker="wandb"))


def test_missing_mlflow_is_a_config_error_that_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'fedsim\[mlflow\]'"):
        TRACKERS.get("mlflow").check()


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def test_tensorboard_resume_replays_the_kept_rounds_once(tmp_path):
    """A resumed run's tracker logs the kept lines first into a fresh tb/: no round twice."""
    config = RunConfig(profile="tiny").to_json_dict()
    with open_tracking("tensorboard", tmp_path, config) as listener:
        for line in LINES:
            listener(line)
    with open_tracking("tensorboard", tmp_path, config, previous=LINES[:1]) as listener:  # resumed after round 1
        listener(LINES[1])
    acc = _events(tmp_path / "tb")
    got = [(e.step, e.value) for e in acc.Scalars("client0/test_accuracy")]
    assert got == [(1, np.float32(0.25)), (2, np.float32(0.5))]
    assert [e.step for e in acc.Scalars("client0/epoch/train_loss")] == [1, 2, 3, 4]


def test_a_failed_run_closes_its_tracker_without_a_session_end(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    def failing_run() -> None:
        with open_tracking("tensorboard", tmp_path, RunConfig().to_json_dict()) as listener:
            listener(LINES[0])
            raise RuntimeError("client failed")

    with pytest.raises(RuntimeError, match="client failed"):
        failing_run()
    content = _events(tmp_path / "tb").PluginTagToContent("hparams")
    kinds = {plugin_data_pb2.HParamsPluginData.FromString(v).WhichOneof("data") for v in content.values()}
    assert kinds == {"experiment", "session_start_info"}  # no session_end_info: the run did not finish
    assert math.isclose(_events(tmp_path / "tb").Scalars("client0/train_loss")[0].value, 1.3, rel_tol=1e-6)


def test_none_tracker_yields_no_listener(tmp_path):
    with open_tracking("none", tmp_path, {}) as listener:
        assert listener is None
    assert not (tmp_path / "tb").exists()
