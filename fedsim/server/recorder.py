"""Server-side per-client recording: the hooks through which ``metrics.jsonl`` is written.

Flower's ``Result`` keeps only aggregated metrics, so the recorder plugs into the strategy's
metric-aggregation hooks (``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``, which see
every client's reply) and into ``evaluate_fn``, which Flower calls at the end of every round.
Each line also carries the round's wall time (``wall_s``, from :meth:`RoundRecorder.on_round_start`)
and every client's per-epoch train metrics (``epochs``, from the reply's ``fedsim.epochs`` record);
``listeners`` (e.g. an experiment tracker, :mod:`fedsim.tracking`) get every line once it is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedsim._logging import logger
from fedsim.callbacks import EPOCHS_RECORD_KEY, epochs_from_lists
from fedsim.rundir import RunDir


def _field(key: str) -> str | None:
    """Client metric key -> metrics.jsonl field: ``train-loss`` -> ``train_loss``,
    ``test-sdr-2.5mm`` -> ``test_sdr_2.5mm``; bookkeeping keys (``num-examples``) -> None."""
    if key.startswith(("train-", "test-")):
        return key.replace("-", "_")
    return None


def _metrics(rd: RecordDict) -> MetricRecord:
    return next(iter(rd.metric_records.values()))


def scalar(value: MetricRecordValues) -> int | float:
    """One metric value as a number (Flower's records also hold lists, which fedsim never sends)."""
    if isinstance(value, list):
        raise TypeError(f"expected a number, got the list {value}")
    return value


def _record(m: Mapping[str, float]) -> MetricRecord:
    values: dict[str, MetricRecordValues] = dict(m)
    return MetricRecord(values)


class RoundRecorder:
    """Collects per-client train/evaluate metrics and writes one ``metrics.jsonl`` line per round."""

    def __init__(
        self,
        run_dir: RunDir,
        client_models: Sequence[str],
        global_eval: Callable[[ArrayRecord], dict[str, float]] | None = None,
        sites: Sequence[str] = (),
        listeners: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        self.run_dir = run_dir
        self.listeners: list[Callable[[dict[str, Any]], None]] = list(listeners)
        self._round_start: float | None = None
        self.client_models = tuple(client_models)
        self.sites = tuple(sites)  # client k's site name (--partition sites); () = no sites
        self.global_eval = global_eval
        self._train: dict[int, dict[str, Any]] = {}
        self._eval: dict[int, dict[str, Any]] = {}
        self._failed: list[dict[str, Any]] = []

    def note_failures(self, failures: Sequence[Any]) -> None:
        """Clients the round went on without (``ClientFailure``: ``to_json()``); recorded in the
        round's line as ``failed`` (the key is absent when every client delivered)."""
        self._failed.extend(f.to_json() for f in failures)

    def _collect(self, store: dict[int, dict[str, Any]], records: list[RecordDict], key: str) -> MetricRecord:
        for rd in records:
            m = _metrics(rd)
            pid = int(scalar(m["partition-id"]))
            store[pid] = {k: m[k] for k in m if k != "partition-id"}
            if EPOCHS_RECORD_KEY in rd.config_records:
                store[pid][EPOCHS_RECORD_KEY] = epochs_from_lists(rd.config_records[EPOCHS_RECORD_KEY])
        agg = aggregate_metricrecords(records, key)
        if "partition-id" in agg:
            del agg["partition-id"]
        return agg

    def train_metrics(self, records: list[RecordDict], key: str) -> MetricRecord:
        return self._collect(self._train, records, key)

    def evaluate_metrics(self, records: list[RecordDict], key: str) -> MetricRecord:
        return self._collect(self._eval, records, key)

    def on_round_start(self, server_round: int) -> None:
        """The round begins (before its train instructions go out): its ``wall_s`` counts from here."""
        self._round_start = time.perf_counter()

    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: global evaluation (if any) and the round's metrics line."""
        glob = self.global_eval(arrays) if self.global_eval is not None else None
        if server_round == 0:
            if glob:
                logger.info("initial global model: %s", _fmt(glob))
            return _record(glob) if glob else None
        clients = []
        for pid in sorted(set(self._train) | set(self._eval)):
            tr, ev = self._train.get(pid, {}), self._eval.get(pid, {})
            row: dict[str, Any] = {"client": pid, "model": self.client_models[pid]}
            if self.sites:
                row["site"] = self.sites[pid]
            row["num_examples"] = int(tr.get("num-examples", 0))
            row["num_test_examples"] = int(ev.get("num-examples", 0))
            for src in (tr, ev):
                row.update({name: float(v) for k, v in src.items() if (name := _field(k))})
            if EPOCHS_RECORD_KEY in tr:
                row["epochs"] = tr[EPOCHS_RECORD_KEY]
            clients.append(row)
            logger.info(
                "round %d client %d%s (%s): %s", server_round, pid, f" [{row['site']}]" if self.sites else "", row["model"],
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("train_", "test_"))),
            )  # fmt: skip
        if glob:
            logger.info("round %d global model: %s", server_round, _fmt(glob))
        line: dict[str, Any] = {"round": server_round, "clients": clients, "global": _strip(glob)}
        if self._failed:
            line["failed"] = list(self._failed)
        if self._round_start is not None:
            line["wall_s"] = round(time.perf_counter() - self._round_start, 3)
        self.run_dir.append_metrics(line)
        for listener in self.listeners:
            listener(line)
        self._train.clear()
        self._eval.clear()
        self._failed.clear()
        return _record(glob) if glob else None


def _strip(m: dict[str, float] | None) -> dict[str, float] | None:
    return {k.removeprefix("global-"): v for k, v in m.items()} if m else None


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


#: The client's reply record saying where it ran (``fedsim.clients.app.PLACEMENT_KEY``).
PLACEMENT_KEY = "fedsim.placement"
#: Run-directory file with one line per delivered client reply: where it ran.
PLACEMENT_FILE = "placement.jsonl"


class PlacementLog:
    """Grid hook (:class:`~fedsim.server.app.GridHook`) writing ``placement.jsonl``: for every client
    reply that carries a placement record, one line ``{"round", "phase", "client", "host", "pid",
    "device", "node_id", "actor_id", "gpu_ids"}`` (Ray ids empty outside Ray), in client order.

    It is a log of where calls ran, kept apart from ``metrics.jsonl`` so that the metrics stay
    bit-identical whichever node ran a client; a resumed run appends to it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / PLACEMENT_FILE

    def outgoing(self, messages: list[Message]) -> list[Message]:
        return messages

    def incoming(self, replies: Iterable[Message]) -> None:
        rows = []
        for m in replies:
            if m.has_error() or PLACEMENT_KEY not in m.content.config_records:
                continue
            r = m.content.config_records[PLACEMENT_KEY]
            rows.append({
                "round": r.get("server-round"), "phase": m.metadata.message_type, "client": r.get("partition-id"),
                "host": r.get("host"), "pid": r.get("pid"), "device": r.get("device"), "node_id": r.get("node-id"),
                "actor_id": r.get("actor-id"), "gpu_ids": list(r.get("gpu-ids") or []),  # type: ignore[arg-type]
            })  # fmt: skip
        if not rows:
            return
        rows.sort(key=lambda row: (str(row["phase"]), int(row["client"] if isinstance(row["client"], int) else -1)))
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def read_placement(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's ``placement.jsonl`` (empty if it has none)."""
    path = Path(run_dir) / PLACEMENT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
