"""Where a client call's time goes, for ``benchmarks/overhead.py``; and the client's thread count.

With the environment variable :data:`TIMINGS_ENV` naming a file, every ClientApp call appends one
JSON line to it (the Ray workers inherit the variable from the process that starts Ray): the
phase, round and client; the process (pid, niceness, torch threads, ``OMP_NUM_THREADS``); when the
process started and when it imported the ClientApp (start-up); and the call's own parts in seconds:
``prepare_s`` (config from the message, model rebuilt from the private state plus the received
arrays), ``work_s`` (local training or evaluation), ``reply_s`` (state and reply records). What
the call does not see (Ray and Flower moving the message and the context to the actor and back)
is the caller's wall time minus ``total_s``. Without the variable nothing is measured or written.

:func:`client_threads` sets torch's intra-op threads of a Ray client actor to the CPUs Ray
reserved for it, so parallel actors never oversubscribe the cores (and the thread count, which
changes floating-point results, follows ``--client-cpus`` whatever the process imported first).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

#: Environment variable naming the JSON-lines file the calls' timings go to (unset: none).
TIMINGS_ENV = "FEDSIM_CLIENT_TIMINGS"

#: When this process imported the client code (``fedsim.clients.app`` imports this module).
IMPORTED_AT = time.time()


def process_started_at() -> float | None:
    """This process's start time (Unix seconds), from ``/proc``; None where there is no ``/proc``."""
    try:
        with open("/proc/self/stat", encoding="utf-8") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="utf-8") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


def ray_client_cpus() -> float | None:
    """The CPUs Ray reserved for this process (a client actor), or None outside a Ray worker."""
    ray = sys.modules.get("ray")  # only a Ray worker (or driver) has imported it
    if ray is None or not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return None  # not a worker (a driver has no reserved resources)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return float(cpus) if cpus else None


def client_threads() -> int | None:
    """Give torch ``max(floor(CPUs), 1)`` intra-op threads for the CPUs Ray reserved for this actor
    (the rule of Ray's ``OMP_NUM_THREADS``, :func:`fedsim.server.inprocess.ray_client_threads`);
    ``OMP_NUM_THREADS`` set by the user wins. Outside Ray nothing changes. Returns the count set."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "")
    cpus = ray_client_cpus()
    if cpus is None:
        return None
    n = int(env) if env.isdigit() and int(env) > 0 else max(math.floor(cpus), 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class CallTimer:
    """Marks the parts of one ClientApp call; :meth:`write` appends them to :data:`TIMINGS_ENV`'s file."""

    def __init__(self, phase: str) -> None:
        self.path = os.environ.get(TIMINGS_ENV, "")
        self.phase = phase
        self.start = time.time()
        self._last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def mark(self, part: str) -> None:
        """The time since the previous mark (or the start) was spent on ``part``."""
        if not self.path:
            return
        now = time.perf_counter()
        self.parts[f"{part}_s"] = round(now - self._last, 4)
        self._last = now

    def write(self, pid: int, server_round: int, **extra: Any) -> None:
        if not self.path:
            return
        import torch

        row = {
            "phase": self.phase, "round": server_round, "client": pid, "pid": os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "process_started": process_started_at(), "imported": IMPORTED_AT, "start": self.start,
            **self.parts, "total_s": round(time.time() - self.start, 4), **extra,
        }  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:  # one short line per call: appends do not interleave
            f.write(json.dumps(row) + "\n")
