"""A real Ray cluster on this machine for tests: a head and worker nodes started with ``ray start``.

Each node is one ``ray start --block`` process in its own session (process group), bound to
127.0.0.1, with free ports and a private temp dir. Two things keep it from touching other Ray
users of the machine: the private ``--temp-dir`` (``ray start`` writes the "current cluster" file
there, which a plain ``ray.init()`` elsewhere would otherwise join), and the teardown, which stops
only these processes: SIGTERM to each ``ray start --block`` (it stops its node's processes), then
SIGKILL to whatever is left in those process groups or still uses the temp dir. Never ``ray stop``:
it stops every Ray process of the user on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .flower_procs import BIN, free_port


class LocalRayCluster:
    """Start with :meth:`start_head` and :meth:`add_worker`; always call :meth:`stop` (it is safe
    after a failed start, and twice). ``address`` is the head's ``host:port``."""

    def __init__(self) -> None:
        # Short on purpose: Ray's Unix sockets live below it (108-byte path limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.address = ""
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _start(self, name: str, args: list[str], ready: float | None) -> None:
        log = self.temp_dir / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", *args], env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        if ready is not None:
            self._wait(proc, name, log, ready)

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until every node started so far says it runs."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            self._wait(proc, log.stem, log, timeout)

    def _wait(self, proc: subprocess.Popen[bytes], name: str, log: Path, ready: float) -> None:
        deadline = time.monotonic() + ready
        while time.monotonic() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"ray start ({name}) did not come up within {ready:g} s:\n{log.read_text(errors='replace')[-3000:]}")

    def common_args(self, num_cpus: float, num_gpus: float) -> list[str]:
        return [
            "--node-ip-address", "127.0.0.1", "--num-cpus", f"{num_cpus:g}", "--num-gpus", f"{num_gpus:g}",
            "--temp-dir", str(self.temp_dir), "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
        ]  # fmt: skip

    def start_head(self, num_cpus: float, num_gpus: float = 0, ready: float | None = 90) -> str:
        """Start the head node (``ready=None``: do not wait for it; workers may start meanwhile,
        they retry until the head answers)."""
        port = free_port()
        self._start(
            "head",
            ["--head", "--port", str(port), "--include-dashboard", "false", "--dashboard-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), *self.common_args(num_cpus, num_gpus)],
            ready,
        )  # fmt: skip
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_worker(self, num_cpus: float, num_gpus: float = 0, ready: float | None = 90) -> None:
        self._start(f"worker{len(self.procs)}", ["--address", self.address, *self.common_args(num_cpus, num_gpus)], ready)

    def leftover_pids(self) -> list[int]:
        """Processes still in the nodes' process groups or naming the private temp dir."""
        groups = {p.pid for p in self.procs}
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":  # a zombie: already ended
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                if os.getpgid(pid) in groups or str(self.temp_dir).encode() in cmdline:
                    found.append(pid)
        return found

    def stop(self, grace: float = 20) -> None:
        """Stop every node started here, then kill anything of theirs left; remove the temp dir."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        deadline = time.monotonic() + 10
        while (left := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
