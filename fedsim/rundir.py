"""The run directory: ``config.json``, ``metrics.jsonl``, the checkpoint and the final global parameters.

Writes are atomic (temp file + ``os.replace``) or append-only with flush + fsync, so a crash
never leaves a half-written file; an existing run is never overwritten (``--resume`` continues it).
Files get the permissions of the process's umask (``0644`` with the usual ``022``), like files
made with ``open``, so colleagues sharing a results folder can read them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsim._logging import logger

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "global_params.safetensors"
#: Keys of a ``metrics.jsonl`` line that measure the machine, not the run: left out when runs are compared.
TIMING_KEYS = ("wall_s",)


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows without :data:`TIMING_KEYS`: what a repeat of the run must reproduce bit for bit."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def default_out_dir(task: str, scenario: int, profile: str) -> Path:
    """``runs/<task>-s<scenario>-<profile>-<time>``: where a run goes when ``--out`` is not given."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{task}-s{scenario}-{profile}-{stamp}"


class RunDirExistsError(FileExistsError):
    """The output folder already holds a fedsim run."""


class CorruptRunError(ValueError):
    """A run file exists but cannot be read as fedsim wrote it (names the file and the place)."""


class RunDirUnwritableError(OSError):
    """The output folder cannot be made or written (under a file, no permission, read-only)."""


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set, then restore
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` all or nothing (temp file in the same folder, fsync, rename);
    the file's mode is ``mode``, else follows the umask (``mkstemp`` alone would give 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), (0o666 & ~_umask()) if mode is None else mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """A run's output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def ensure_free(self) -> RunDir:
        """Refuse a folder that already holds a run (nothing is ever overwritten)."""
        if (self.path / METRICS_FILE).exists() or (self.path / CONFIG_FILE).exists():
            raise RunDirExistsError(f"{self.path} already holds a fedsim run; choose another --out folder")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirExistsError(f"{self.path} exists and is not a folder; choose another --out")
        return self

    def check_writable(self) -> RunDir:
        """Refuse an output folder that cannot be made or written, before any work: a path under a
        file, or a folder where this process may not create files (probed with a temp file)."""
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise RunDirUnwritableError(f"cannot make {self.path}: {probe} is a file, not a folder; choose another --out")
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as exc:
            raise RunDirUnwritableError(f"cannot write in {probe} ({exc.strerror or exc}); choose another --out") from None
        return self

    def create(self) -> RunDir:
        """Create the folder after :meth:`ensure_free`."""
        self.ensure_free().path.mkdir(parents=True, exist_ok=True)
        return self

    def open_existing(self) -> RunDir:
        """An existing run (to resume): its folder and ``config.json`` must be there."""
        if not (self.path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{self.path} is not a fedsim run directory ({CONFIG_FILE} is missing)")
        return self

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

    def read_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.path} is not a fedsim run directory ({CONFIG_FILE} is missing)")
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise CorruptRunError(f"{path} is not a fedsim config ({exc}); the file is damaged") from None

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one round; NaN/inf (an undefined metric, e.g. sensitivity without positives)
        are written as ``null`` so the file stays strict JSON."""
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_json(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every round of ``metrics.jsonl``. A torn last line (a kill mid-write: no final newline)
        is left out with a warning; any other line that is not a JSON object is an error
        (:class:`CorruptRunError` naming the line), never silently skipped."""
        out: list[dict[str, Any]] = []
        path = self.path / METRICS_FILE
        if not path.exists():
            return out
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    logger.warning("%s: the last line is incomplete (the run was killed while writing it); it is left out", path)
                    break
                raise CorruptRunError(
                    f"{path} line {number} is not a metrics record ({exc}); the file is damaged: restore it or remove that line"
                ) from None
            out.append(row)
        return out

    def read_results(self) -> list[dict[str, Any]]:
        """:meth:`read_metrics` without the wall times (:func:`without_timing`): equal for two runs
        of the same config and seed on the same machine."""
        return without_timing(self.read_metrics())

    def truncate_metrics(self, last_round: int) -> int:
        """Keep the rounds up to ``last_round`` in ``metrics.jsonl`` (rewritten atomically if lines
        go, a torn last line included); returns how many lines were dropped."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return 0
        text = path.read_text(encoding="utf-8")
        keep = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        body = "".join(json.dumps(finite_json(r), sort_keys=True) + "\n" for r in keep)
        if body == text:
            return 0
        atomic_write_bytes(path, body.encode())
        return len(text.splitlines()) - len(keep)

    def save_params(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=dict(metadata))
        atomic_write_bytes(self.path / PARAMS_FILE, data)
        return self.path / PARAMS_FILE

    def load_params(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path / PARAMS_FILE))
