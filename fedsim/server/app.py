"""The fedsim ServerApp (Flower Message API): the federated server of the CME paper (Fig. 2).

It validates the run configuration, waits (with a timeout) for the clients it needs, computes
the allow-list of shared parameters (:mod:`fedsim.models.sharing`), and runs the chosen Flower
strategy for ``rounds`` rounds. Per-client metrics go to ``metrics.jsonl`` every round; the
aggregated parameters to ``global_params.safetensors`` at the end. When the whole server model is
aggregated (same-model scenarios) it is also evaluated on the held-out global test set.

``app`` reads its configuration from Flower's run config (``flwr run``);
:func:`make_server_app` binds an already-resolved :class:`ResolvedConfig` (``fedsim run``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore.run import Run

from fedsim._logging import enable_console_logging, logger
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.cme import CMEArchiveWriter
from fedsim.cme.archive import RECORD_KEY as CME_RECORD_KEY
from fedsim.cme.recorder import matching_layers, recorded_parameters
from fedsim.config import ConfigError, ResolvedConfig, RunConfig
from fedsim.models.sharing import shared_parameter_names
from fedsim.provenance import environment
from fedsim.rundir import RunDir, atomic_write_bytes, default_out_dir
from fedsim.server.checkpoint import (
    Checkpoint,
    Checkpointer,
    ClientStateExchange,
    check_resumable,
    is_checkpoint_round,
    load_checkpoint,
    load_strategy_state,
    log_resume,
    prune_cme_index,
    restore_rng,
)
from fedsim.server.loop import run_rounds
from fedsim.server.recorder import PlacementLog, RoundRecorder, scalar
from fedsim.server.sampling import SampleLog, seeded_sampling
from fedsim.server.updates import UpdateNormLog
from fedsim.strategies import StrategyHooks, build_strategy, kept_local, privacy_spent
from fedsim.tracking import open_tracking

#: Seconds between pulls for replies while a message window (``OrderedGrid(window=...)``) is full.
WINDOW_POLL = 0.05

#: Largest CME record (bytes) the server accepts from one client and round.
MAX_CME_PAYLOAD = 256_000_000


class NodeTimeoutError(TimeoutError):
    """Fewer SuperNodes connected than the run needs, within the configured timeout."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Return the connected node ids once ``needed`` are there; give up after ``timeout`` s."""
    start = time.monotonic()
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= needed:
            return ids
        if time.monotonic() - start >= timeout:
            raise NodeTimeoutError(
                f"waited {timeout:.0f}s for {needed} client nodes but saw only {len(ids)}; start more "
                "SuperNodes, lower the number of clients, or raise node-timeout"
            )
        time.sleep(poll)


class ClientFailedError(RuntimeError):
    """Clients failed and the policy (``min_clients``) does not allow going on; rounds already
    written (and the last checkpoint) are kept."""


class NonFiniteUpdateError(ClientFailedError):
    """A client returned NaN or infinite parameters, or the aggregated global model is not finite."""


class RunInterrupted(Exception):
    """The run was asked to stop (SIGINT / SIGTERM); ``signum`` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopRequest(threading.Event):
    """An event set by a signal handler, remembering the signal (:class:`OrderedGrid` ``stop``)."""

    signum: int = signal.SIGINT

    def request(self, signum: int) -> None:
        self.signum = signum
        self.set()


@dataclass(frozen=True)
class ClientFailure:
    """One client that did not deliver in one exchange: who, in which phase, and why (one line)."""

    client: int | None
    node: int
    phase: str
    reason: str

    def __str__(self) -> str:
        who = f"client {self.client}" if self.client is not None else f"node {self.node}"
        return f"{who}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """For ``metrics.jsonl``: the node id (random in Flower's engine) only when the client is unknown."""
        who: dict[str, Any] = {"client": self.client} if self.client is not None else {"client": None, "node": self.node}
        return who | {"phase": self.phase, "reason": self.reason}


class GridHook(Protocol):
    """Something that edits a round's outgoing messages and reads (or strips) the replies, e.g.
    :class:`~fedsim.server.checkpoint.ClientStateExchange`."""

    def outgoing(self, messages: list[Message]) -> list[Message]: ...

    def incoming(self, replies: Iterable[Message]) -> None: ...


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXC_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Crash|Exit|Interrupt|Warning|Fault))(?::\s*(.*))?$")


def one_line_reason(text: str, limit: int = 300) -> str:
    """The innermost ``SomeError: message`` of a client error (Ray's and Flower's wrappers repeat
    the remote traceback, with ANSI colours): one line, no escape codes, at most ``limit`` chars."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).replace("\\n", "\n").splitlines() if ln.strip()]
    hits = [m for ln in lines if (m := _EXC_LINE.match(ln)) and m.group(1) != "ClientAppException"]
    if hits:
        last = hits[-1]
        line = f"{last.group(1)}: {last.group(2)}" if last.group(2) else last.group(1)
    else:
        line = lines[-1].strip() if lines else "no reason given"
    line = line.strip().rstrip("'>")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class OrderedGrid(Grid):
    """The :class:`~flwr.serverapp.Grid` the strategy talks to: replies sorted by the clients'
    partition id, the client-failure policy, and hooks; every other call goes to the wrapped grid.

    * Aggregation sums floats in reply order; sorting makes runs with the same seed bit-identical
      whatever order the nodes answered in.
    * :meth:`identify` asks every node for its partition id once (a ``query`` message), so error
      replies name the client, and every later reply's ``partition-id`` is checked against the
      node it came from.
    * Policy: with ``min_replies == 0`` (the default, "all") a client error or a non-finite update
      stops the run with one line per failed client. With ``min_replies = N`` a round goes on if
      at least ``N`` clients delivered: errors, non-finite updates, wrong partition ids and replies
      missing at the round timeout are failures, logged once each and passed to ``on_failures``;
      below ``N`` the run stops naming them.
    * ``hooks`` (:class:`GridHook`) edit the outgoing messages and read the replies first;
      ``on_reply`` sees every delivered reply, in order (the CME archive writer reads its records
      there, whatever the strategy).
    * ``stop``: when this event is set, the wait for replies ends with :class:`RunInterrupted`
      (the CLI sets it on SIGINT / SIGTERM), within ``poll`` seconds.
    * ``window`` (with ``stop``; 0 = no limit): at most this many messages of an exchange are in
      flight; the next is pushed when a reply comes in. Flower's Simulation Engine checks every
      node's queue every 0.1 s by scanning all undelivered and unanswered messages (cost: nodes x
      messages in flight): with 1,000 nodes and 100 messages pushed at once that scan kept one of
      2 cores busy and the client actor starved (docs/scale.md). Replies are sorted anyway, so
      the window does not change results; only simulation uses it (real SuperNodes work in
      parallel).
    """

    def __init__(
        self,
        grid: Grid,
        on_reply: Callable[[Message], None] | None = None,
        *,
        min_replies: int = 0,
        on_failures: Callable[[list[ClientFailure]], None] | None = None,
        hooks: Sequence[GridHook] = (),
        stop: StopRequest | None = None,
        poll: float = 0.2,
        window: int = 0,
    ) -> None:
        self._grid = grid
        self._on_reply = on_reply
        self._min_replies = min_replies
        self._on_failures = on_failures
        self.hooks: list[GridHook] = list(hooks)
        self._stop = stop
        self._poll = poll
        self._window = window
        self.partition_of: dict[int, int] = {}

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes, in partition order once :meth:`identify` has run (Flower's
        ``sample_nodes`` draws from this list: the order makes a seeded draw reproducible)."""
        ids = list(self._grid.get_node_ids())
        if self.partition_of:
            ids.sort(key=lambda n: (n not in self.partition_of, self.partition_of.get(n, 0), n))
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def identify(self, node_ids: Iterable[int], config: ConfigRecord, timeout: float) -> dict[int, int]:
        """Ask each node for its partition id (``query``); returns and keeps node id -> partition."""
        msgs = [Message(RecordDict({"config": config}), nid, MessageType.QUERY) for nid in node_ids]
        replies = self._exchange(msgs, timeout)
        failed = [f"node {m.metadata.src_node_id}: {one_line_reason(m.error.reason or '')}" for m in replies if m.has_error()]
        if failed:
            raise ClientFailedError(f"{len(failed)} of {len(msgs)} clients failed to start: {'; '.join(failed)}")
        owners: dict[int, int] = {}
        for m in replies:
            pid = _partition_of(m)[1]
            if pid in owners:
                raise ClientFailedError(
                    f"nodes {owners[pid]} and {m.metadata.src_node_id} both say they are partition {pid}; give each node its own partition-id"
                )
            owners[pid] = m.metadata.src_node_id
        self.partition_of = {node: pid for pid, node in owners.items()}
        return dict(self.partition_of)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for hook in self.hooks:
            messages = hook.outgoing(messages)
        sent = {m.metadata.dst_node_id for m in messages}
        replies = sorted(self._exchange(messages, timeout), key=self._sort_key)
        for hook in self.hooks:
            hook.incoming(replies)
        good, failures = self._apply_policy(replies, _round_of(messages))
        missing = sorted(sent - {m.metadata.src_node_id for m in replies})
        phase = messages[0].metadata.message_type if messages else ""
        if missing:
            gone = [
                ClientFailure(self.partition_of.get(n), n, phase, f"no reply within the round timeout ({timeout:g} s)") for n in missing
            ]
            if self._min_replies:
                failures += gone
            else:
                logger.info("no reply from %s; going on without them", ", ".join(str(f).split(":")[0] for f in gone))
        if failures:
            total = len(sent | {m.metadata.src_node_id for m in replies})
            self._fail_or_tolerate(failures, len(good), total, _round_of(messages))
        if self._on_reply is not None:
            for m in good:
                self._on_reply(m)
        return good

    # ------------------------------------------------------------------ internals
    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        if self._stop is None:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        # As Flower's grids do (push, then pull until every reply is in or the time is up), but
        # checking the stop event between pulls so that a signal ends the wait, and with a window
        # keeping at most `window` messages in flight (see __init__).
        queue = list(messages)
        window = self._window or len(queue)
        pending: set[str] = set()
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        out: list[Message] = []
        while queue or pending:
            if self._stop.is_set():
                raise RunInterrupted(self._stop.signum)
            if queue and len(pending) < window:
                batch, queue = queue[: window - len(pending)], queue[window - len(pending) :]
                pending |= set(self._grid.push_messages(batch))
            got = list(self._grid.pull_messages(pending))
            out.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not (queue or pending) or time.monotonic() >= end:
                break
            if not got or not queue:
                self._stop.wait(self._poll if not self._window else min(self._poll, WINDOW_POLL))
        return out

    def _sort_key(self, msg: Message) -> tuple[int, int]:
        if msg.has_error():
            return (1, self.partition_of.get(msg.metadata.src_node_id, 0))
        return _partition_of(msg)

    def _client(self, msg: Message) -> int | None:
        return self.partition_of.get(msg.metadata.src_node_id)

    def _identity_problem(self, msg: Message, server_round: int) -> str | None:
        """Why a reply cannot be trusted, if it cannot: a ``partition-id`` (in any record) that is
        not its node's, a CME record of another round, or one larger than :data:`MAX_CME_PAYLOAD`."""
        node = msg.metadata.src_node_id
        own = self.partition_of.get(node)
        records: list[MetricRecord | ConfigRecord] = [*msg.content.metric_records.values(), *msg.content.config_records.values()]
        for record in records:
            claimed = record.get("partition-id")
            if own is not None and claimed is not None and claimed != own:
                return f"replied as partition {claimed!r}, but node {node} is client {own}"
        cme = msg.content.config_records.get(CME_RECORD_KEY)
        if cme is not None:
            payload = cme.get("payload")
            size = len(payload) if isinstance(payload, bytes) else 0
            if size > MAX_CME_PAYLOAD:
                return f"its CME record has {size:,} bytes, more than the {MAX_CME_PAYLOAD:,} fedsim accepts"
            if server_round and cme.get("server-round") != server_round:
                return f"its CME record is of round {cme.get('server-round')!r}, not {server_round}"
        return None

    def _apply_policy(self, replies: list[Message], server_round: int = 0) -> tuple[list[Message], list[ClientFailure]]:
        """Split replies into usable ones and failures (error, wrong identity, non-finite)."""
        good: list[Message] = []
        failures: list[ClientFailure] = []
        for m in replies:
            node, phase = m.metadata.src_node_id, m.metadata.message_type
            if m.has_error():
                failures.append(ClientFailure(self._client(m), node, phase, one_line_reason(m.error.reason or "")))
                continue
            claimed = _partition_of(m)[1]
            problem = self._identity_problem(m, server_round)
            if problem is not None:
                failures.append(ClientFailure(self._client(m), node, phase, problem))
                continue
            bad = nonfinite_tensor(m)
            if bad is not None:
                failures.append(NonFiniteFailure(claimed, node, phase, f"non-finite parameters ({bad})"))
                continue
            good.append(m)
        return good, failures

    def _fail_or_tolerate(self, failures: list[ClientFailure], delivered: int, sent: int, server_round: int) -> None:
        where = f"round {server_round}: " if server_round else ""
        if self._min_replies == 0 or delivered < self._min_replies:
            if all(isinstance(f, NonFiniteFailure) for f in failures):
                names = ", ".join(f"client {f.client} ({f.reason.split('(', 1)[1].rstrip(')')})" for f in failures)
                raise NonFiniteUpdateError(
                    f"{where}non-finite parameters from {names}; stopped before aggregating them "
                    "(the rounds so far are kept; a lower learning rate usually helps)"
                )
            need = f"; {self._min_replies} needed (--min-clients)" if self._min_replies else ""
            detail = "; ".join(str(f) for f in failures)
            raise ClientFailedError(f"{where}{len(failures)} of {sent} clients failed{need}: {detail}")
        for f in failures:
            logger.warning("%sgoing on without %s", where, f)
        if self._on_failures is not None:
            self._on_failures(failures)


class NonFiniteFailure(ClientFailure):
    """A reply whose parameters hold NaN or infinity."""


def nonfinite_tensor(msg: Message) -> str | None:
    """The name of the first tensor of a reply holding NaN or infinity, else ``None``."""
    for record in msg.content.array_records.values():
        name = next((k for k, a in record.items() if not np.isfinite(a.numpy()).all()), None)
        if name is not None:
            return name
    return None


def _partition_of(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, 0)
    records = msg.content.metric_records
    m = next(iter(records.values())) if records else {}
    return (0, int(scalar(m.get("partition-id", 0))))


def _round_of(messages: Sequence[Message]) -> int:
    for m in messages[:1]:
        for record in m.content.config_records.values():
            value = record.get("server-round")
            if isinstance(value, int | float):
                return int(value)
    return 0


def run_server(
    grid: Grid,
    cfg: ResolvedConfig,
    *,
    resume: bool = False,
    stop: StopRequest | None = None,
    ray_layout: dict[str, Any] | None = None,
    window: int = 0,
) -> Result:
    """Run a whole federated training with a resolved config; return Flower's ``Result``.

    ``resume``: continue the run in ``cfg.out`` from its checkpoint (:mod:`fedsim.server.checkpoint`).
    ``stop``: an event that ends the run with :class:`RunInterrupted` when set (signal handling).
    ``ray_layout``: where the clients run (``fedsim.simulation.RayLayout.to_json``), recorded in
    ``config.json`` as ``ray``.
    ``window``: messages in flight at most (:class:`OrderedGrid`; simulation only; 0 = all).
    """
    task = get_task(cfg.task)
    run_dir = _open_run_dir(cfg, resume, ray_layout)
    if cfg.faults:
        logger.warning("injected faults: %s", ", ".join(str(f) for f in cfg.fault_specs()))

    client_models = cfg.client_models()
    shared = shared_parameter_names([*client_models, cfg.server_model], lambda m: task.build_model(m, cfg))
    torch.manual_seed(cfg.seed)
    server_model = task.build_model(cfg.server_model, cfg)
    server_state = server_model.state_dict()
    complete = set(shared) == {k for k, v in server_state.items() if v.is_floating_point()}
    logger.info(
        "scenario %d (%s): clients %s, server %s; sharing %d tensors (%s)",
        cfg.scenario, cfg.scenario_spec.description, _model_list(client_models), cfg.server_model,
        len(shared), "whole model" if complete else "head layers: " + ", ".join(shared),
    )  # fmt: skip

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def global_eval(arrays: ArrayRecord) -> dict[str, float]:
        server_model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        res = task.evaluate_global(server_model, cfg, dev)
        return {} if res is None else {f"global-{k}": float(v) for k, v in res.metrics.items()}

    local = kept_local(cfg, shared)  # FedBN / FedPer: these never leave the clients
    if local:
        logger.info(
            "%s keeps %d of the %d shared tensors at the clients (%s): no global model to evaluate on the global test set; "
            "per-client test metrics are each client's own model",
            cfg.strategy, len(local), len(shared), ", ".join(local[:4]) + (", ..." if len(local) > 4 else ""),
        )  # fmt: skip
    sites = task.site_names(cfg)
    if sites:
        logger.info("one client per site: %s", ", ".join(f"client {k} = {name}" for k, name in enumerate(sites)))
    sampling = cfg.sample_size() < cfg.clients
    recorder = RoundRecorder(
        run_dir, client_models, global_eval if complete and not local else None, sites,
        primary_metric=task.primary_metric, num_rounds=cfg.rounds, record_sampled=sampling,
    )  # fmt: skip
    strategy = build_strategy(cfg, StrategyHooks(cfg.clients, recorder.train_metrics, recorder.evaluate_metrics))
    ckpt = _load_for_resume(run_dir, cfg) if resume else None
    on_reply = None
    cme_writer = None
    if cfg.cme:
        check_cme_layers(cfg)
        cme_writer = CMEArchiveWriter(run_dir.path, defer_index=True)  # index rewritten once per round
        on_reply = cme_writer.collect
        logger.info("recording CMEs into %s", run_dir.path / "cme")
    ordered = OrderedGrid(
        grid, on_reply, min_replies=cfg.min_clients, on_failures=recorder.note_failures, hooks=[PlacementLog(run_dir.path)], stop=stop,
        window=window,
    )  # fmt: skip
    ids = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    logger.info("%d client nodes connected", len(ids))
    ordered.identify(ids, ConfigRecord(cfg.to_flower()), cfg.round_timeout)
    exchange = ClientStateExchange(functools.partial(wants_client_state, cfg), ordered.partition_of, ckpt.clients if ckpt else None)
    ordered.hooks.append(exchange)
    ordered.hooks.append(SampleLog(ordered.partition_of, recorder.note_sampled))
    if privacy_spent(strategy) is None:  # under DP a client's exact update norm is not covered by the accounting
        ordered.hooks.append(UpdateNormLog(ordered.partition_of, recorder.note_update_norms))
    logger.info("%s", describe_run(cfg))
    checkpointer = Checkpointer(run_dir, cfg, strategy, exchange.states)
    if ckpt is not None:
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in ckpt.arrays.items()})
        load_strategy_state(strategy, ckpt.strategy_arrays, ckpt.strategy_meta)
        restore_rng(ckpt.rng, ckpt.rng_arrays)
    else:
        initial = ArrayRecord({k: server_state[k] for k in shared})
    previous = run_dir.read_metrics() if ckpt is not None else []
    with open_tracking(cfg.tracker, run_dir.path, run_dir.read_config(), uri=cfg.tracking_uri, cme=cfg.cme, previous=previous) as tracking:
        if tracking is not None:
            if cme_writer is not None:  # the round's CME records enter the index before the tracker reads their norms
                recorder.listeners.append(lambda _line: cme_writer.flush())
            recorder.listeners.append(tracking)
        result = run_rounds(
            strategy,
            ordered,
            initial,
            first_round=ckpt.round + 1 if ckpt else 1,
            num_rounds=cfg.rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(cfg.to_flower()),
            evaluate_config=ConfigRecord(cfg.to_flower()),
            evaluate_fn=recorder.on_round_end,
            on_round_end=[*([cme_writer.on_round_end] if cme_writer else []), checkpointer.on_round_end, recorder.log_round],
            on_round_start=[recorder.on_round_start],
            sampling=functools.partial(seeded_sampling, cfg.seed) if sampling else None,
        )
    final = {k: np.asarray(v.numpy()) for k, v in result.arrays.items()}
    meta = {"server_model": cfg.server_model, "complete": str(complete and not local).lower(), "rounds": str(cfg.rounds)}
    path = run_dir.save_params(final, meta)
    spent = privacy_spent(strategy)
    if spent is not None:  # dp_fixed / dp_adaptive: the epsilon of the whole run, next to its metrics
        logger.info("%s", spent.line())
        atomic_write_bytes(run_dir.path / "privacy.json", (json.dumps(spent.to_json(), sort_keys=True) + "\n").encode())
    logger.info("final global parameters: %s", path)
    return result


def _model_list(models: Sequence[str]) -> str:
    """``['resnet50', 'densenet121', 'alexnet_skip']``, or ``1000 x small_cnn`` when all are the same."""
    if len(models) > 3 and len(set(models)) == 1:
        return f"{len(models)} x {models[0]}"
    return str(list(models))


def wants_client_state(cfg: ResolvedConfig, server_round: int) -> bool:
    """Whether the clients that train in ``server_round`` send their private tensors: in checkpoint
    rounds, and with client sampling in every round (unless checkpoints are off), since a client
    that trains between two checkpoints may not be sampled in the next one, and the checkpoint
    must hold its newest state."""
    if cfg.sample_size() < cfg.clients and cfg.checkpoint_every > 0:
        return True
    return is_checkpoint_round(cfg, server_round)


def describe_run(cfg: ResolvedConfig) -> str:
    """One line naming the strategy, its options and weighting, and who trains per round."""
    options = ", ".join(f"{k}={v}" for k, v in cfg.strategy_options)
    line = f"{cfg.rounds} rounds of {cfg.strategy}" + (f" ({options})" if options else "")
    if cfg.strategy == "equal_avg":
        line += ", every client weighted equally"
    k = cfg.sample_size()
    if k < cfg.clients:
        return f"{line}; {k} of {cfg.clients} clients per round, sampled with seed {cfg.seed} (recorded as 'sampled' in metrics.jsonl)"
    return f"{line}; all {cfg.clients} clients every round"


def _open_run_dir(cfg: ResolvedConfig, resume: bool, ray_layout: dict[str, Any] | None = None) -> RunDir:
    """A new run directory with ``config.json`` (plus the Ray layout, if given), or (``resume``)
    the existing one, unchanged."""
    if resume:
        run_dir = RunDir(cfg.out).open_existing()
        logger.info("run directory (resumed): %s", run_dir.path)
        return run_dir
    run_dir = RunDir(cfg.out or default_out_dir(cfg.task, cfg.scenario, cfg.profile)).create()
    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    # the environment is recorded, not part of the config: RunConfig.from_json_dict ignores it
    run_dir.write_config(
        cfg.to_json_dict() | {"out": str(run_dir.path), "environment": environment(device)} | ({"ray": ray_layout} if ray_layout else {})
    )
    logger.info("run directory: %s", run_dir.path)
    return run_dir


def _load_for_resume(run_dir: RunDir, cfg: ResolvedConfig) -> Checkpoint:
    """The run's checkpoint; rounds recorded after it (metrics lines, CME records) are dropped,
    since the resumed run computes them again."""
    check_resumable(run_dir, cfg.rounds)
    ckpt = load_checkpoint(run_dir)
    dropped = run_dir.truncate_metrics(ckpt.round)
    dropped += prune_cme_index(run_dir.path, ckpt.round)
    if dropped:
        logger.info("dropped %d records of rounds after the checkpoint (round %d); they are computed again", dropped, ckpt.round)
    log_resume(ckpt, cfg.rounds)
    return ckpt


def check_cme_layers(cfg: ResolvedConfig) -> None:
    """Refuse CME layer patterns that match no weight of some client's model (before training)."""
    task = get_task(cfg.task)
    patterns = cfg.cme_layers or tuple(task.cme_layers)
    for name in sorted(set(cfg.client_models())):
        with torch.device("meta"):
            model = task.build_model(name, cfg)
        names = [n for n, _ in recorded_parameters(model, cfg.cme_biases)]
        if not matching_layers(names, patterns):
            raise ConfigError(
                f"CME layers {list(patterns)} match no weight of model {name!r}; "
                f"its last weights are {', '.join(names[-4:])} (patterns use fnmatch, e.g. 'head.*.weight')"
            )
    if cfg.local_epochs < 2:
        logger.warning("CME ACF (eq. 4) pairs consecutive local epochs: with local_epochs=1 it stays empty")


def make_server_app(
    cfg: ResolvedConfig, *, resume: bool = False, stop: StopRequest | None = None, ray_layout: dict[str, Any] | None = None, window: int = 0
) -> ServerApp:
    """A ServerApp bound to an already-resolved config (used by ``fedsim run``); ``resume``,
    ``stop``, ``ray_layout`` and ``window`` as in :func:`run_server`."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        enable_console_logging()
        run_server(grid, cfg, resume=resume, stop=stop, ray_layout=ray_layout, window=window)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the config comes from ``[tool.flwr.app.config]`` / ``--run-config``."""
    enable_console_logging()
    cfg = resolve_config(RunConfig.from_flower(context.run_config))
    get_task(cfg.task).check_data(cfg)
    run_server(grid, cfg)
