"""A real Ray run interrupted by Ctrl-C, then resumed: clean exit, no Ray process left, and the
same results as an uninterrupted run (private backbones, FedAdam state, a crashed client)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARGS = [
    "--profile", "tiny", "--rounds", "3", "--models", "small_cnn,alexnet_skip,small_cnn", "--server-model", "small_cnn",
    "--strategy", "fedadam", "--fault", "1:crash:2", "--min-clients", "2",
]  # fmt: skip


def _ray_processes(tag: str) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if tag in line and "ps -ww" not in line]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < end, f"no {text!r} after {timeout} s"
        time.sleep(0.2)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, task_identity):
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsim.cli", "run", *ARGS, "--out", str(out)],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
        _wait_for(log, "round 1/3 ", proc)  # the round's console line comes after its checkpoint is written
        assert _ray_processes(ray_tmp), "the run's Ray processes should be visible by their temp dir"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        rc = proc.wait(timeout=60)
    took = time.monotonic() - start
    text = log.read_text()
    assert rc == 130 and took < 15, (rc, took, text[-3000:])
    last = text.strip().splitlines()[-1]
    assert last == f"fedsim: stopped by SIGINT; round 1 is saved in {out} (checkpoint of round 1); continue with: fedsim run --resume {out}"
    # the interrupt itself leaves no traceback (Flower's own log may still show the injected crash
    # of round 2, with its remote traceback, when that round had started: not the driver's exit)
    assert "KeyboardInterrupt" not in text
    deadline = time.monotonic() + 10
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes(ray_tmp) == []

    resumed = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "--resume", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["failed"] == [
        {"client": 1, "phase": "train", "reason": "InjectedCrash: client 1 crashed in round 2 (injected fault 1:crash:2)"}
    ]
    assert "\x1b" not in (out / "metrics.jsonl").read_text()

    # the uninterrupted run, on the in-process grid (bit-identical to Ray, tests/server/test_inprocess.py)
    from fedsim.clients.app import app
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid, ray_client_threads

    cfg = resolve_config(RunConfig.from_json_dict({**json.loads((out / "config.json").read_text()), "out": str(tmp_path / "ref")}))
    run_server(InProcessGrid(app, cfg.clients, num_threads=ray_client_threads(cfg.client_cpus)), cfg)
    ref = RunDir(tmp_path / "ref")
    assert ref.read_results() == RunDir(out).read_results()  # all but the wall times
    a, b = ref.load_params(), RunDir(out).load_params()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
