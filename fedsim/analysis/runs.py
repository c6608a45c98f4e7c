"""A run's ``metrics.jsonl`` as a long table: one row per client per round, plus the global model.

:func:`long_rows` is a pure function of the metrics lines; :func:`write_csv` is ``fedsim export
RUN_DIR --csv``. Columns: ``round``, ``client`` (the partition id, or ``global``), ``model``,
``num_examples``, ``num_test_examples``, every ``train_*`` / ``test_*`` metric in first-seen
order, and the round's ``wall_s``. For the ``global`` row, ``model`` is the server model and the
``test_*`` columns hold the global model's metrics on the held-out global test set. An undefined
metric (``null`` in ``metrics.jsonl``) is an empty cell. Per-epoch train metrics (``epochs``) are
not in the table: the round's ``train_*`` columns are what the client reported.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.rundir import RunDir, atomic_write_bytes

#: ``client`` value of the global model's rows.
GLOBAL = "global"
#: Columns that come first, in this order; metrics follow, ``wall_s`` last.
LEADING = ("round", "client", "model", "num_examples", "num_test_examples")


def long_rows(lines: Sequence[Mapping[str, Any]], server_model: str = "") -> list[dict[str, Any]]:
    """One dict per client and round (and per round with a global evaluation), in file order."""
    out: list[dict[str, Any]] = []
    for line in lines:
        tail = {"wall_s": line["wall_s"]} if "wall_s" in line else {}
        for c in line.get("clients", []):
            row = {k: c.get(k) for k in LEADING[1:] if k in c}
            row |= {k: v for k, v in c.items() if k.startswith(("train_", "test_"))}
            out.append({"round": line["round"], **row, **tail})
        if line.get("global"):
            glob = {f"test_{k}": v for k, v in line["global"].items()}
            out.append({"round": line["round"], "client": GLOBAL, "model": server_model, **glob, **tail})
    return out


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The leading columns present, then every other key in first-seen order, ``wall_s`` last."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    lead = [k for k in LEADING if k in seen]
    rest = [k for k in seen if k not in LEADING and k != "wall_s"]
    return lead + rest + (["wall_s"] if "wall_s" in seen else [])


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of :func:`long_rows` output (header + one line per row; ``None`` as an empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``fedsim export RUN_DIR --csv``: the run's metrics as CSV (default ``RUN_DIR/metrics.csv``)."""
    rd = RunDir(run_dir).open_existing()
    config = rd.read_config()
    rows = long_rows(rd.read_metrics(), str(config.get("server_model", "")))
    if not rows:
        raise FileNotFoundError(f"{rd.path} has no rounds in metrics.jsonl yet; nothing to export")
    path = Path(out) if out is not None else rd.path / "metrics.csv"
    atomic_write_bytes(path, to_csv(rows).encode())
    return path


__all__ = ["GLOBAL", "columns", "long_rows", "to_csv", "write_csv"]
