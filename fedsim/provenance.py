"""Where a run was made: package versions, the source's git commit, the machine and the device.

Written into ``config.json`` under ``environment`` so a result can be traced and repeated; it is
*not* part of the config's identity (:meth:`fedsim.config.RunConfig.from_json_dict` ignores it, so
``--resume`` and ``--config OLD_RUN/config.json`` compare and take only the run's settings).
Imports no torch: versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

#: Distributions whose versions change results or behaviour (``python`` is added separately).
PACKAGES = ("fedsim", "torch", "torchvision", "flwr", "ray", "numpy")


def package_versions() -> dict[str, str | None]:
    """``{name: version}`` of :data:`PACKAGES` and ``python``; ``None`` for one not installed."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git work tree holding ``path`` (default: fedsim's
    own source), or ``None`` when it is not in one or git is not installed. ``dirty`` says whether
    tracked files differ from the commit (then the commit alone does not reproduce the code)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if sha.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine() -> dict[str, Any]:
    """Host name, CPU count and platform string (floating-point results depend on the CPU and thread count)."""
    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


def environment(device: str) -> dict[str, Any]:
    """Everything above plus ``device`` (e.g. ``cpu`` or ``cuda: <GPU name>``), for ``config.json``."""
    return {"versions": package_versions(), "git": git_commit(), "machine": machine(), "device": device}


__all__ = ["PACKAGES", "environment", "git_commit", "machine", "package_versions"]
