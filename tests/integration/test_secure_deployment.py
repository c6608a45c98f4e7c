"""A secured deployment on loopback: SuperLink with TLS and SuperNode authentication, runtime
dependency installation off; 3 registered SuperNodes complete a run, an unregistered one is refused."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from fedsim.rundir import RunDir
from fedsim.server.secure import make_credentials

from .flower_procs import BIN, PROJECT, flower_env, flwr_json, free_port, terminate, wait_run_finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_CONFIG = 'profile="tiny" rounds=1 models="small_cnn,small_cnn,small_cnn" out="{out}"'


def _wait_https_ok(url: str, ca: Path, timeout: float = 90) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def test_tls_and_registered_supernodes_only(tmp_path):
    creds = make_credentials(tmp_path / "creds", nodes=4)  # node3 is never registered
    home, out, logs = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedsim-tls"\n\n[superlink.fedsim-tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds.ca_cert}"\n'
    )
    env = flower_env(home)
    procs: list[subprocess.Popen] = []

    def supernode(k: int, log) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert), "--auth-supernode-private-key",
             str(creds.node_keys[k]), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--node-config", f"partition-id={k % 3} num-partitions=3"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    with contextlib.ExitStack() as log_files:
        try:
            log = log_files.enter_context(open(logs / "superlink.log", "w"))
            procs.append(subprocess.Popen(
                [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
                 "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth", "--database", str(tmp_path / "link.db"),
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            _wait_https_ok(f"https://127.0.0.1:{port}/health", creds.ca_cert)
            for k in range(3):
                reg = flwr_json(env, "supernode", "register", str(creds.node_public_key(k)), "fedsim-tls")
                assert reg.get("success"), reg
            for k in range(3):
                procs.append(supernode(k, log_files.enter_context(open(logs / f"supernode{k}.log", "w"))))
            intruder = supernode(3, log_files.enter_context(open(logs / "intruder.log", "w")))
            procs.append(intruder)
            started = flwr_json(env, "run", str(PROJECT), "fedsim-tls", "--run-config", RUN_CONFIG.format(out=out))
            assert started.get("success"), started
            run = wait_run_finished(env, started["run-id"], "fedsim-tls")
            assert run["status"] == "finished:completed", (run, (logs / "superlink.log").read_text()[-3000:])
        finally:
            terminate(procs)
    (row,) = RunDir(out).read_metrics()
    assert [c["client"] for c in row["clients"]] == [0, 1, 2]
    assert all("SuperNode ID:" in (logs / f"supernode{k}.log").read_text() for k in range(3))
    refused = (logs / "intruder.log").read_text()
    assert "Failed to initialize the connection to the SuperLink" in refused and "SuperNode ID:" not in refused, refused[-3000:]
    assert "Attempted to register SuperNode with public key" in (logs / "superlink.log").read_text()
