"""Run every command of ``docs/deployment.md`` on loopback, in order, and time the two runs it compares.

Each ``bash`` block of the guide is preceded by ``<!-- loopback: MODE NAME... -->``: ``run`` blocks
run to completion (``bash -euo pipefail``; a failure stops the script), ``background`` blocks are
servers (``ray start --block``, ``flower-superlink``, ``flower-supernode``) started as their own
process groups and stopped at the end (SIGTERM, then SIGKILL for anything left of them; never
``ray stop``, which would stop other users' Ray). ``each-site`` blocks run once per site (3). The
guide's shell variables are set for one machine: every host is 127.0.0.1, ports are free ones,
folders live in a fresh temporary directory; each site gets a small image folder as its node-local
``data-dir``. Prints the wall time of every block; the guide's ``own-ray`` and ``cluster`` blocks
are the same tiny study on fedsim's own Ray instance and on the two-node loopback cluster. Writes
``benchmarks/results/deployment-loopback.json``.

    python benchmarks/deployment_loopback.py
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedsim.data.folder import KAGGLE_CLASSES
from fedsim.rundir import RunDir
from fedsim.server.recorder import read_placement

PROJECT = Path(__file__).resolve().parents[1]
GUIDE = PROJECT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
SITES = 3
_BLOCK = re.compile(r"<!-- loopback: (?P<spec>[^>]*?) -->\n```bash\n(?P<body>.*?)\n```", re.S)


@dataclass(frozen=True)
class Block:
    """One runnable block of the guide."""

    mode: str  # "run" or "background"
    names: tuple[str, ...]
    body: str

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.body.split()[0]


def guide_blocks(text: str) -> list[Block]:
    """The guide's bash blocks with their loopback markers; a bash block without one is an error
    (every command of the guide must run here)."""
    found = [Block(m["spec"].split()[0], tuple(m["spec"].split()[1:]), m["body"]) for m in _BLOCK.finditer(text)]
    total = text.count("```bash\n")
    if total != len(found) or any(b.mode not in ("run", "background") for b in found):
        raise ValueError(f"{GUIDE}: {total} bash blocks but {len(found)} with a valid '<!-- loopback: run|background ... -->' marker")
    return found


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 not handed out before by this script (two binds to port 0 in a row
    can return the same port; Ray refuses two components on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def site_images(folder: Path, seed: int, per_class: int = 10) -> None:
    """A small class-per-folder image set (the four Kaggle classes), different per site."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(KAGGLE_CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((40 + i, 44)) * 60 + 50 * c).astype(np.uint8)
            Image.fromarray(arr).save(folder / name / f"{i}.png")


class Servers:
    """The background processes, each in its own process group; :meth:`stop` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, block: Block, env: dict[str, str], log: Path, ready: str | None) -> None:
        with open(log, "wb") as f:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.body], env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while ready is not None and ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{block.name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def leftovers(self) -> list[int]:
        groups = {p.pid for p in self.procs}
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
                if os.getpgid(int(entry.name)) in groups or str(self.root).encode() in cmdline:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while (left := self.leftovers()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


def main() -> int:
    blocks = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    root = Path(tempfile.mkdtemp(prefix="fsdeploy-", dir="/tmp"))  # short: Ray's sockets live below it
    variables = {
        "RAY_HEAD": "127.0.0.1", "RAY_PORT": str(free_port()), "NODE_IP": "127.0.0.1", "CPUS": "2", "GPUS": "1",
        "RAY_DASHBOARD_PORT": str(free_port()), "RAY_CLIENT_PORT": str(free_port()), "RAY_TMP": str(root / "ray"),
        "LINK": "127.0.0.1", "PORT": str(free_port()), "BIND": "127.0.0.1", "CREDS": str(root / "creds"),
        "STATE": str(root / "state"), "OUT": str(root / "out"), "FEDSIM": str(PROJECT), "FLWR_HOME": str(root / "flwr-home"),
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | variables
    env |= {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(PROJECT),
        "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
    }  # fmt: skip
    for k in range(SITES):
        site_images(root / f"site{k}", seed=k)
    servers = Servers(root)
    times: dict[str, float] = {}
    print(f"fedsim deployment guide on loopback, in {root}", flush=True)
    try:
        for i, block in enumerate(blocks):
            if block.mode == "background":
                ready = "Ray runtime started" if block.name.startswith("ray-") else None
                sites: list[int | None] = list(range(SITES)) if "each-site" in block.names else [None]
                for site in sites:
                    extra = (
                        {} if site is None else {"SITE": str(site), "DATA": str(root / f"site{site}"), "CLIENTAPPIO_PORT": str(free_port())}
                    )
                    label = block.name + ("" if site is None else str(site))
                    servers.start(block, env | extra, root / f"{label}.log", ready)
                    print(f"[{i}] started {label}", flush=True)
                continue
            start = time.monotonic()
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], env=env, cwd=root, capture_output=True, text=True,
                                  timeout=900, check=False)  # fmt: skip
            elapsed = time.monotonic() - start
            times[f"{i}:{block.name}"] = round(elapsed, 1)
            print(
                f"[{i}] {block.name}: exit {proc.returncode} in {elapsed:.1f} s\n    " + proc.stdout.strip()[-600:].replace("\n", "\n    "),
                flush=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
        out = Path(variables["OUT"])
        joined = RunDir(out / "cluster").read_config()["ray"]
        nodes = {r["node_id"] for r in read_placement(out / "cluster")}
        deployed = RunDir(out / "deployed").read_metrics()
        checks = {
            "cluster_nodes": len(joined["nodes"]),
            "cluster_nodes_that_ran_clients": len(nodes),
            "same_metrics_own_and_cluster": (out / "own" / "metrics.jsonl").read_bytes()
            == (out / "cluster" / "metrics.jsonl").read_bytes(),
            "deployed_clients": [c["client"] for c in deployed[-1]["clients"]],
        }
        print(json.dumps(checks))
        own = next(v for k, v in times.items() if k.endswith(":own-ray"))
        cluster = next(v for k, v in times.items() if k.endswith(":cluster"))
        print(f"tiny study wall time: fedsim's own Ray {own:.1f} s, two-node loopback cluster {cluster:.1f} s (including its cmp)")
        load = os.getloadavg()[0]  # the machine may be shared: the times depend on it
        print(f"load average (1 min) at the end: {load:.1f}")
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_1min": round(load, 1), "block_seconds": times,
                  "checks": checks}  # fmt: skip
        (PROJECT / "benchmarks" / "results").mkdir(exist_ok=True)
        (PROJECT / "benchmarks" / "results" / "deployment-loopback.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        servers.stop()
        left = servers.leftovers()
        print(f"stopped the servers ({len(left)} processes left)")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
