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


def test_a_damaged_line_that_is_not_the_last_is_an_error(tmp_path):
    from fedsim.rundir import CorruptRunError

    rd = RunDir(tmp_path / "r").create()
    (rd.path / METRICS_FILE).write_text('{"round": 1, "cl\n{"round": 2}\n')
    with pytest.raises(CorruptRunError, match=r"metrics\.jsonl line 1 is not a metrics record .*restore it or remove that line"):
        rd.read_metrics()
    (rd.path / METRICS_FILE).write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(CorruptRunError, match=r"line 2 is not a metrics record \(expected a JSON object, got list\)"):
        rd.read_metrics()
    (rd.path / "config.json").write_text('{"task": "brain')
    with pytest.raises(CorruptRunError, match=r"config\.json is not a fedsim config"):
        rd.read_config()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        import fedsim.rundir

        fedsim.rundir._umask.cache_clear()
        atomic_write_bytes(tmp_path / "a", b"x")
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        fedsim.rundir._umask.cache_clear()
    atomic_write_bytes(tmp_path / "b", b"x")
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o666 & ~old


def test_out_folder_checks(tmp_path):
    from fedsim.rundir import RunDirUnwritableError

    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirUnwritableError, match=r"f is a file, not a folder"):
        RunDir(tmp_path / "f" / "a" / "b").check_writable()
    assert RunDir(tmp_path / "new" / "deep").check_writable().path == (tmp_path / "new" / "deep").resolve()
    assert not (tmp_path / "new").exists()  # the check creates nothing
