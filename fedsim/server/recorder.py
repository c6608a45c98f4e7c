"""Server-side per-client recording: the hooks through which ``metrics.jsonl`` is written.

Flower's ``Result`` keeps only aggregated metrics, so the recorder plugs into the strategy's
metric-aggregation hooks (``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``, which see
every client's reply) and into ``evaluate_fn``, which Flower calls at the end of every round.
Each line also carries the round's wall time (``wall_s``, from :meth:`RoundRecorder.on_round_start`)
and every client's per-epoch train metrics (``epochs``, from the reply's ``fedsim.epochs`` record);
``listeners`` (e.g. an experiment tracker, :mod:`fedsim.tracking`) get every line once it is written.

The console gets one line per round (:func:`round_line`: wall time, ETA, mean and range of the
task's primary metric over the round's clients, the global model's metric when there is one), so a
run of 1,000 clients reads as easily as one of 3; every client's metrics go to ``metrics.jsonl``
and, with ``-v``, to the log (DEBUG). Once per run a warning names clients whose local test split is
too small (:data:`MIN_TEST_EXAMPLES`) for their test metrics to mean much.
"""

from __future__ import annotations

import json
import math
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


#: Fewer local test examples than this and a client's test metric is mostly noise: an accuracy
#: near 0.5 measured on n examples has a standard error of 0.5 / sqrt(n), 0.09 at n = 30, and with
#: 7 examples it can only take the values 0, 1/7, ..., 1.
MIN_TEST_EXAMPLES = 30


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
        *,
        primary_metric: str = "accuracy",
        num_rounds: int = 0,
        record_sampled: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.listeners: list[Callable[[dict[str, Any]], None]] = list(listeners)
        self._round_start: float | None = None
        self.client_models = tuple(client_models)
        self.sites = tuple(sites)  # client k's site name (--partition sites); () = no sites
        self.global_eval = global_eval
        self.primary_metric = primary_metric
        self.num_rounds = num_rounds
        self.record_sampled = record_sampled
        self._train: dict[int, dict[str, Any]] = {}
        self._eval: dict[int, dict[str, Any]] = {}
        self._failed: list[dict[str, Any]] = []
        self._sampled: list[int] | None = None
        self._update_norms: dict[int, float] = {}
        self._warned_small_test = False
        self._last = time.monotonic()
        self._durations: list[float] = []
        self._line: tuple[int, str] | None = None

    def note_sampled(self, partitions: list[int]) -> None:
        """The clients sampled for this round's training (:class:`~fedsim.server.sampling.SampleLog`);
        recorded as ``sampled`` when ``record_sampled`` (client sampling is on)."""
        self._sampled = list(partitions)

    def note_update_norms(self, norms: Mapping[int, float]) -> None:
        """Each client's update norm this round (:class:`~fedsim.server.updates.UpdateNormLog`);
        recorded as the client's ``update_norm`` (``null`` when not finite)."""
        self._update_norms.update(norms)

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
            self._last = time.monotonic()
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
            if pid in self._update_norms and tr:
                row["update_norm"] = self._update_norms[pid]
            if EPOCHS_RECORD_KEY in tr:
                row["epochs"] = tr[EPOCHS_RECORD_KEY]
            clients.append(row)
            logger.debug(
                "round %d client %d%s (%s): %s", server_round, pid, f" [{row['site']}]" if self.sites else "", row["model"],
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("train_", "test_"))),
            )  # fmt: skip
        line: dict[str, Any] = {"round": server_round, "clients": clients, "global": _strip(glob)}
        if self.record_sampled and self._sampled is not None:
            line["sampled"] = self._sampled
        if self._failed:
            line["failed"] = list(self._failed)
        if self._round_start is not None:
            line["wall_s"] = round(time.perf_counter() - self._round_start, 3)
        self.run_dir.append_metrics(line)
        for listener in self.listeners:
            listener(line)
        self._warn_small_test(server_round, clients)
        now = time.monotonic()
        self._durations.append(now - self._last)
        self._last = now
        remaining = max(0, self.num_rounds - server_round)
        eta = sum(self._durations) / len(self._durations) * remaining if self.num_rounds else None
        self._line = (
            server_round,
            round_line(server_round, self.num_rounds, self._durations[-1], eta, clients, _strip(glob), self.primary_metric),
        )
        self._train.clear()
        self._eval.clear()
        self._failed.clear()
        self._sampled = None
        self._update_norms.clear()
        return _record(glob) if glob else None

    def log_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Round-end hook, registered after the checkpoint's: the console's line of the round
        (:func:`round_line`), so that once it shows, the round's checkpoint is on disk."""
        if self._line is not None and self._line[0] == server_round:
            extra = {"progress": (server_round, self.num_rounds)} if self.num_rounds else None
            logger.info("%s", self._line[1], extra=extra)
        self._line = None

    def _warn_small_test(self, server_round: int, clients: list[dict[str, Any]]) -> None:
        """Once per run: which clients test on fewer than :data:`MIN_TEST_EXAMPLES` examples."""
        small = [c for c in clients if 0 < c["num_test_examples"] < MIN_TEST_EXAMPLES]
        if self._warned_small_test or not small:
            return
        self._warned_small_test = True
        n = min(c["num_test_examples"] for c in small)
        who = f"clients {', '.join(str(c['client']) for c in small)}" if len(small) <= 5 else f"{len(small)} of {len(clients)} clients"
        logger.warning(
            "round %d: %s test on fewer than %d local examples (the fewest: %d), so their test %s rests on a handful of "
            "examples (an accuracy on %d can only move in steps of 1/%d) and differences between clients or rounds are mostly "
            "noise; use more data (--num-samples) or fewer clients",
            server_round, who, MIN_TEST_EXAMPLES, n, self.primary_metric, n, n,
        )  # fmt: skip


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


def _duration(seconds: float) -> str:
    """``8.4s``, ``2m05s``, ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def round_line(
    server_round: int,
    num_rounds: int,
    seconds: float,
    eta: float | None,
    clients: Sequence[Mapping[str, Any]],
    glob: Mapping[str, float] | None,
    metric: str,
) -> str:
    """The console's one line per round, e.g. ``round 2/5 8.4s (ETA 25.2s): 3 clients, test accuracy
    mean 0.333 range 0.000-0.571; global accuracy 0.222``."""
    head = f"round {server_round}/{num_rounds}" if num_rounds else f"round {server_round}"
    head += f" {_duration(seconds)}" + (f" (ETA {_duration(eta)})" if eta is not None and server_round < num_rounds else "")
    values = [float(c[f"test_{metric}"]) for c in clients if f"test_{metric}" in c and math.isfinite(float(c[f"test_{metric}"]))]
    parts = [f"{len(clients)} client{'s' if len(clients) != 1 else ''}"]
    if values:
        mean = sum(values) / len(values)
        parts[0] += f", test {metric} mean {mean:.3f} range {min(values):.3f}-{max(values):.3f}"
    line = f"{head}: {parts[0]}"
    if glob and metric in glob:
        line += f"; global {metric} {glob[metric]:.3f}"
    return line
