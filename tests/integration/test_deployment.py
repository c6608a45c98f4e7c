"""The same apps on real Flower processes: a SuperLink and 3 SuperNodes on 127.0.0.1 (insecure),
and ``flwr run .`` on the local simulation federation."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from fedsim.cme import CMEArchive
from fedsim.rundir import RunDir

from .flower_procs import (
    BIN,
    PROJECT,
    flower_env,
    flwr_json,
    free_port,
    terminate,
    wait_http_ok,
    wait_run_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_CONFIG = 'profile="tiny" rounds=1 models="small_cnn,small_cnn,small_cnn" out="{out}"'


def test_superlink_and_three_supernodes(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedsim-test"\n\n[superlink.fedsim-test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as log_files:  # closed after the processes are terminated
        try:
            log = log_files.enter_context(open(logs / "superlink.log", "w"))
            procs.append(subprocess.Popen(
                [str(BIN / "flower-superlink"), "--insecure", "--database", str(tmp_path / "link.db"),
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            wait_http_ok(f"http://127.0.0.1:{port}/health")
            for i in range(3):
                log = log_files.enter_context(open(logs / f"supernode{i}.log", "w"))
                procs.append(subprocess.Popen(
                    [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=3"],
                    env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            # with CME recording: the CMEs travel in the replies over gRPC, as in simulation
            started = flwr_json(env, "run", str(PROJECT), "fedsim-test", "--run-config", RUN_CONFIG.format(out=out) + " cme=true")
            assert started.get("success"), started
            run = wait_run_finished(env, started["run-id"], "fedsim-test")
            assert run["status"] == "finished:completed", run
        finally:
            terminate(procs)
    (row,) = RunDir(out).read_metrics()
    assert row["round"] == 1 and [c["client"] for c in row["clients"]] == [0, 1, 2]
    assert all(c["model"] == "small_cnn" and c["num_examples"] == 27 for c in row["clients"])
    assert row["global"] is not None and RunDir(out).load_params()
    arch = CMEArchive(out)
    assert arch.clients == [0, 1, 2] and arch.rounds(1) == [1]
    assert arch.matrix(1, 1, "head.fc2.weight").shape == (128, 128)


def test_flwr_run_local_simulation(tmp_path):
    """``flwr run . --federation-config "num-supernodes=3"`` on the local simulation federation."""
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    port = free_port()
    env = flower_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port))
    try:
        # run from tmp_path: the detached SuperLink's working directory must not be the project
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(PROJECT), "--stream", "--format", "json",
             "--federation-config", "num-supernodes=3", "--run-config", RUN_CONFIG.format(out=out)],
            env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        import json

        run_id = json.loads(proc.stdout)["run-id"]
        run = wait_run_finished(env, run_id, None)
        assert run["status"] == "finished:completed", run
    finally:
        _stop_local_superlink(port, home)
    (row,) = RunDir(out).read_metrics()
    assert [c["client"] for c in row["clients"]] == [0, 1, 2]


def _stop_local_superlink(port: int, home) -> None:
    """``flwr run`` leaves a detached local SuperLink running; stop the one with our FLWR_HOME."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "flower-superlink" in cmd and str(home) in cmd:
            p.terminate()
            try:
                p.wait(10)
            except psutil.TimeoutExpired:
                p.kill()
