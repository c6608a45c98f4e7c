import json
import os

import numpy as np
import pytest

from fedsim.rundir import METRICS_FILE, PARAMS_FILE, RunDir, RunDirExistsError, atomic_write_bytes


def test_config_metrics_params_round_trip(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.write_config({"a": 1})
    rd.append_metrics({"round": 1})
    rd.append_metrics({"round": 2})
    arrays = {"head.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    rd.save_params(arrays, {"complete": "false"})
    assert json.loads((rd.path / "config.json").read_text()) == {"a": 1}
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
    np.testing.assert_array_equal(rd.load_params()["head.w"], arrays["head.w"])


def test_existing_run_is_never_overwritten(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.append_metrics({"round": 1})
    with pytest.raises(RunDirExistsError, match="already holds a fedsim run"):
        RunDir(tmp_path / "r").create()
    assert rd.read_metrics() == [{"round": 1}]


def test_torn_last_line_is_ignored(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.append_metrics({"round": 1})
    with open(rd.path / METRICS_FILE, "a") as f:
        f.write('{"round": 2, "cli')  # a crash mid-write
    assert rd.read_metrics() == [{"round": 1}]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / PARAMS_FILE
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [PARAMS_FILE]  # temp file cleaned up


def test_undefined_metrics_are_written_as_null(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.append_metrics({"round": 1, "clients": [{"client": 0, "test_sensitivity": float("nan")}], "global": {"auc": float("inf")}})
    line = (rd.path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert rd.read_metrics() == [{"round": 1, "clients": [{"client": 0, "test_sensitivity": None}], "global": {"auc": None}}]
