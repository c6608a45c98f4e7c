"""Helpers to drive real Flower processes (SuperLink, SuperNodes, ``flwr`` CLI) from tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that this process has not handed out before: two binds to port
    0 in a row can return the same port, and Ray refuses to start when two of its components are
    given one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment with a private FLWR_HOME and the venv's Flower executables on PATH
    (SuperLink and SuperNode start ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        **extra,
    )
    return env


def wait_http_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def flwr_json(env: dict[str, str], *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"], env=env, check=False, capture_output=True, text=True, timeout=timeout
    )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"flwr {' '.join(args)} printed no JSON:\n{proc.stdout}\n{proc.stderr}") from None


def wait_run_finished(env: dict[str, str], run_id: int, connection: str | None, timeout: float = 600) -> dict:
    """Poll ``flwr ls`` until the run's status starts with ``finished:``; return that run entry."""
    args = ["ls", *([connection] if connection else []), "--run-id", str(run_id)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = flwr_json(env, *args).get("runs", [])
        if runs and str(runs[0]["status"]).startswith("finished:"):
            return runs[0]
        time.sleep(1)
    raise TimeoutError(f"run {run_id} did not finish within {timeout}s")


def terminate(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
