"""One federation of a study, run in this process through :class:`~fedsim.server.inprocess.InProcessGrid`.

:func:`run_federation` runs :func:`fedsim.server.app.run_server` unchanged (a normal run directory:
``config.json``, ``metrics.jsonl``, ``global_params.safetensors``, ``cme/``), measures every
client's update on the way (:class:`UpdateProbe`), reads the CME candidate statistics, and returns a
JSON-able record that it also writes to ``RUN_DIR/study_record.json``. A run directory with a
record is reused (an interrupted study resumes); one without a record is an interrupted run and
is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.config import RunConfig
from fedsim.rundir import RunDir, atomic_write_bytes, finite_json
from fedsim.study.stats import summarise_rounds, update_geometry

if TYPE_CHECKING:
    from flwr.app import Message

RECORD_FILE = "study_record.json"
log = logging.getLogger("fedsim.study")


@dataclass(frozen=True)
class FederationJob:
    """One federation: ``config`` (its ``out`` is set by the study), the partitions that sit it
    out (``absent``: a leave-one-out run), whether to record CMEs and measure updates, and the
    draws behind the CME statistics' null bands (``None``: the analysis' default)."""

    name: str
    config: RunConfig
    absent: tuple[int, ...] = ()
    cme: bool = True
    probe: bool = True
    null_samples: int | None = None


class UpdateProbe:
    """An ``on_reply`` hook: keeps ``w_after_local_training - w_received`` (over the shared arrays
    the client returns) of every train reply, per round and client."""

    def __init__(self) -> None:
        self.deltas: dict[int, dict[int, np.ndarray]] = {}

    def __call__(self, msg: Message, reply: Message) -> None:
        if not msg.metadata.message_type.startswith("train") or reply.has_error():
            return
        sent, got = msg.content.array_records.get("arrays"), reply.content.array_records.get("arrays")
        metrics = reply.content.metric_records.get("metrics")
        if sent is None or got is None or metrics is None:
            return
        rnd = _int(msg.content.config_records["config"].get("server-round", 0))
        keys = [k for k in got if k in sent]
        delta = np.concatenate(
            [(got[k].numpy().astype(np.float64) - sent[k].numpy().astype(np.float64)).ravel() for k in keys]
        ) if keys else np.zeros(0)  # fmt: skip
        self.deltas.setdefault(rnd, {})[_int(metrics["partition-id"])] = delta

    def summary(self) -> dict[int, dict[str, Any]]:
        """Per client: per-round ``norm`` / ``cos_mean`` / ``cos_others`` lists and ``nonfinite_rounds``."""
        out: dict[int, dict[str, Any]] = {}
        for rnd in sorted(self.deltas):
            for pid, row in update_geometry(self.deltas[rnd]).items():
                rec = out.setdefault(pid, {"rounds": [], "norm": [], "cos_mean": [], "cos_others": [], "nonfinite_rounds": 0})
                rec["rounds"].append(rnd)
                for key in ("norm", "cos_mean", "cos_others"):
                    rec[key].append(row[key])
                rec["nonfinite_rounds"] += int(not row["finite"])
        return out


def _int(v: object) -> int:
    if isinstance(v, int | float | str):
        return int(v)
    raise TypeError(f"expected a number, got {v!r}")


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence fedsim's per-epoch and Flower's per-round INFO logs during a study run."""
    from fedsim._logging import enable_console_logging

    enable_console_logging()  # attach fedsim's handler now, so the ClientApp does not reset the level later
    loggers = [logging.getLogger(n) for n in ("fedsim", "flwr")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_federation(
    job: FederationJob, out: Path, num_threads: int | None = 1, keep_cme: bool = True, refresh_cme: bool = False
) -> dict[str, Any]:
    """Run ``job`` into ``out`` (or reuse its finished record there); return the record.

    ``refresh_cme`` recomputes the CME statistics of a finished record from its archive (after
    :mod:`fedsim.analysis.cme` changed) without training again."""
    from fedsim.clients.app import app
    from fedsim.clients.tasks import get_task, resolve_config
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid
    from fedsim.study.candidates import cme_candidates

    out = Path(out)
    if (out / RECORD_FILE).exists():
        done: dict[str, Any] = json.loads((out / RECORD_FILE).read_text(encoding="utf-8"))
        if refresh_cme and job.cme and (out / "cme").is_dir():
            rows = with_update_norms(done["metrics"], done.get("updates", {}))
            done["cme"] = {str(k): v for k, v in cme_candidates(out, job.null_samples, rows).items()}
            atomic_write_bytes(out / RECORD_FILE, (json.dumps(finite_json(done), sort_keys=True) + "\n").encode())
            done = json.loads(json.dumps(finite_json(done)))
        return done
    if out.exists():
        log.info("replacing the interrupted run %s", out)
        shutil.rmtree(out)
    cfg = resolve_config(dataclasses.replace(job.config, out=str(out), cme=job.cme, tracker="none"))  # the study reads metrics.jsonl
    probe = UpdateProbe() if job.probe else None
    t0, c0 = time.perf_counter(), time.process_time()
    grid = InProcessGrid(app, cfg.clients, absent=job.absent, on_reply=probe, num_threads=num_threads)
    with quiet_logs():
        run_server(grid, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rd = RunDir(out)
    task = get_task(cfg.task)
    record: dict[str, Any] = {
        "name": job.name,
        "absent": list(job.absent),
        "config": cfg.to_json_dict(),
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better,
        "metrics": rd.read_metrics(),
        "updates": {str(k): v for k, v in (probe.summary() if probe else {}).items()},
        "cme": {str(k): v for k, v in (cme_candidates(out, job.null_samples) if job.cme else {}).items()},
        "wall_s": wall,
        "cpu_s": cpu,
        "num_threads": num_threads,
    }
    if job.cme and not keep_cme:
        shutil.rmtree(out / "cme", ignore_errors=True)
    atomic_write_bytes(out / RECORD_FILE, (json.dumps(finite_json(record), sort_keys=True) + "\n").encode())
    return json.loads(json.dumps(finite_json(record)))


def with_update_norms(rows: list[dict[str, Any]], updates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows with each client's ``update_norm`` filled in from the probe's norms
    where the row has none (runs recorded before the server wrote it; the probe measures the same
    ``||w_returned - w_sent||``, :mod:`fedsim.server.updates`). The rows are copied, not changed."""
    norms = {
        (int(pid), int(r)): (math.inf if n is None else float(n))
        for pid, u in updates.items()
        for r, n in zip(u["rounds"], u["norm"], strict=True)
    }
    out = []
    for row in rows:
        clients = []
        for c in row.get("clients", []):
            key = (int(c["client"]), int(row["round"]))
            clients.append(dict(c, update_norm=norms[key]) if "update_norm" not in c and key in norms else dict(c))
        out.append(dict(row, clients=clients))
    return out


def client_updates(record: dict[str, Any], client: int) -> dict[str, float]:
    """Baseline update scores of one client from a record: ``update_norm_{mean,first,last}``,
    ``update_cos_{mean,last}`` (to the mean update), ``update_cos_others_mean``,
    ``update_nonfinite_rounds``. Non-finite norms are ``inf``."""
    u = record["updates"].get(str(client))
    if u is None:
        return {}
    norms = [np.inf if v is None else v for v in u["norm"]]
    cos = [np.nan if v is None else v for v in u["cos_mean"]]
    cos_o = [np.nan if v is None else v for v in u["cos_others"]]
    n, c = summarise_rounds(norms), summarise_rounds(cos)
    return {
        "update_norm_mean": n["mean"],
        "update_norm_first": n["first"],
        "update_norm_last": n["last"],
        "update_cos_mean": c["mean"],
        "update_cos_last": c["last"],
        "update_cos_others_mean": summarise_rounds(cos_o)["mean"],
        "update_nonfinite_rounds": float(u["nonfinite_rounds"]),
    }


__all__ = ["RECORD_FILE", "FederationJob", "UpdateProbe", "client_updates", "quiet_logs", "run_federation", "with_update_norms"]
