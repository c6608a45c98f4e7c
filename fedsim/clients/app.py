"""The fedsim ClientApp (Flower Message API): one hospital.

Each round the client

1. rebuilds its model and restores its **private** state (backbone, BatchNorm statistics, any
   unshared head layers) from ``Context.state``, which Flower keeps across rounds both in
   simulation and in deployment (where every message starts a new process); a process that
   ran the client's previous call and still holds the model of exactly that state (a token in
   ``Context.state`` says so) takes that model instead (:class:`ModelCache`);
2. overwrites the shared parameters with the arrays the server sent (the allow-list);
3. trains ``local_epochs`` epochs on its local split (``train``) or evaluates on its local test
   split (``evaluate``);
4. after training, stores its private tensors (everything but the shared keys, which arrive with
   every message) in ``Context.state`` and replies with exactly the keys it received, plus
   ``num-examples`` and its metrics;
5. with ``cme`` set, a :class:`~fedsim.cme.CMERecorder` callback records the round's
   conversational memory elements, which travel back in the reply as the ``ConfigRecord``
   ``"cme"`` (see :mod:`fedsim.cme.archive`);
6. in a checkpoint round (the message's ``fedsim.control`` record asks for it) the reply also
   carries the private tensors as the ArrayRecord ``fedsim.state``, which the server writes into
   the run's checkpoint; after ``--resume`` the server sends them back in the same record, and
   they replace ``Context.state`` (see :mod:`fedsim.server.checkpoint`).

Every train and evaluate reply also carries the ConfigRecord ``"fedsim.placement"``: where the
call ran (host, process, and under Ray the node id, actor id and the GPU ids Ray assigned) and the
torch device it used. The server logs it to ``placement.jsonl``; it never enters the metrics, which
stay bit-identical wherever the clients ran. Under Ray a client uses ``cuda`` only when Ray gave it
a GPU (``--client-gpus``) and torch sees one; a logical GPU on a machine without CUDA (``ray
start --num-gpus 2`` for tests) leaves it on the CPU.

A ``query`` message asks the client who it is: it replies with its ``partition-id``, so the
server can name clients whose replies are errors and check every reply's partition id.

The run configuration arrives in the message's ``config`` record (sent by the ServerApp), so
clients need no local configuration except their identity: ``partition-id`` and
``num-partitions`` (set by the Simulation Engine, or ``--node-config`` in deployment) and
optionally ``data-dir``, a node-local image folder that then replaces the shared cohort.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedsim._logging import enable_console_logging, logger
from fedsim.callbacks import EPOCHS_RECORD_KEY, EpochHistory, ProgressLogger, TrainCallback
from fedsim.clients.tasks import get_task
from fedsim.clients.timing import CallTimer, client_threads
from fedsim.cme import CMESettings, encode
from fedsim.cme.archive import RECORD_KEY as CME_RECORD_KEY
from fedsim.cme.recorder import CMERecorder
from fedsim.config import ConfigError, ResolvedConfig
from fedsim.faults import HANG_MARGIN, fails_in, fault_of, free_rider_noise

STATE_KEY = "fedsim.model"
#: Message records of the checkpoint protocol (:mod:`fedsim.server.checkpoint` uses the same names).
CONTROL_KEY = "fedsim.control"
STATE_RECORD_KEY = "fedsim.state"
#: Reply record saying where a client call ran (:func:`placement`; the server's ``PlacementLog`` reads it).
PLACEMENT_KEY = "fedsim.placement"
#: Keys Flower's strategies add to the config they send (not run-config fields).
FLOWER_CONFIG_KEYS = ("server-round", "proximal-mu")

app = ClientApp()


def node_identity(context: Context, cfg: ResolvedConfig) -> tuple[int, str | None]:
    """(partition id, node-local data folder or None) from the node config."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ConfigError(
            "node config lacks 'partition-id'; start the SuperNode with --node-config 'partition-id=0 num-partitions=3' (one id per node)"
        )
    pid = int(nc["partition-id"])
    if not 0 <= pid < cfg.clients:
        raise ConfigError(f"partition-id {pid} is outside 0..{cfg.clients - 1} for a run with {cfg.clients} clients")
    data_dir = str(nc["data-dir"]) if nc.get("data-dir") else None
    check_data_dir(data_dir or cfg.data_dir, pid)
    return pid, data_dir


def check_data_dir(path: str, pid: int) -> None:
    """Refuse, on the node that runs the client, a data folder it cannot read (a Ray cluster or a
    deployment needs the data at the same path on every node, or a node-local ``data-dir``)."""
    if not path:
        return
    folder = Path(path)
    if not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK):
        problem = "is not readable" if folder.is_dir() else "does not exist"
        raise ConfigError(
            f"client {pid} on host {socket.gethostname()}: data folder {path} {problem} there; every node that runs clients "
            "needs the data at this path (or its own --node-config data-dir=...), see docs/deployment.md"
        )


def _config_number(config: ConfigRecord, key: str, default: float) -> float:
    """A numeric entry of the message's ``config`` record (``server-round``, ``proximal-mu``)."""
    value = config.get(key, default)
    if not isinstance(value, int | float):
        raise TypeError(f"config entry {key!r} must be a number, got {value!r}")
    return value


def ray_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to this process (``[]``: none), or ``None`` when not in a Ray worker."""
    ray = sys.modules.get("ray")  # only a Ray worker (or driver) has imported it
    if ray is None or not ray.is_initialized():
        return None
    return [str(g) for g in ray.get_gpu_ids()]


def select_device(gpu_ids: list[str] | None, cuda: bool) -> torch.device:
    """``cuda`` if torch sees CUDA and, under Ray, Ray gave this client a GPU; else the CPU."""
    use_cuda = cuda and (gpu_ids is None or bool(gpu_ids))
    return torch.device("cuda" if use_cuda else "cpu")


def device() -> torch.device:
    return select_device(ray_gpu_ids(), torch.cuda.is_available())


def placement(pid: int, server_round: int, dev: torch.device) -> ConfigRecord:
    """Where this client call ran: host, process, torch device and, under Ray, node, actor and GPUs."""
    record: dict[str, str | int | list[str]] = {
        "partition-id": pid, "server-round": server_round, "host": socket.gethostname(), "pid": os.getpid(), "device": str(dev),
        "node-id": "", "actor-id": "", "gpu-ids": [],
    }  # fmt: skip
    gpu_ids = ray_gpu_ids()
    if gpu_ids is not None:
        ctx = sys.modules["ray"].get_runtime_context()
        record.update({"node-id": ctx.get_node_id(), "actor-id": ctx.get_actor_id() or "", "gpu-ids": gpu_ids})
    return ConfigRecord(record)  # type: ignore[arg-type]


class ModelCache:
    """The models this process's last calls left behind, so the next call of the same client in
    the same process need not rebuild its model from ``Context.state`` (a ResNet50's 95 MB of
    private tensors converted and loaded on every call; issue 14).

    Each train call stores its private state in ``Context.state`` together with a fresh random
    token (:data:`TOKEN_KEY`); the model it trained is kept here under that token. A later call
    takes the model only when its context carries the same token: then the model's private
    tensors are exactly those of the context (nothing else trained this client since, in another
    actor or from a resumed checkpoint), and the received shared arrays overwrite the rest as in a
    rebuilt model, so results are bit-identical either way. A call takes its model out while it
    runs, so a call that fails leaves nothing stale behind. At most :attr:`max_models` models and
    :attr:`max_bytes` of tensors are kept, the least recently used going first.
    """

    def __init__(self, max_models: int = 32, max_bytes: int = 2 * 1024**3) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple[str, str, int], tuple[str, torch.nn.Module, int]] = OrderedDict()

    def take(self, key: tuple[str, str, int], token: str | None) -> torch.nn.Module | None:
        """The model kept for ``key`` if it matches ``token`` (removed from the cache), else None."""
        entry = self._models.pop(key, None)
        return entry[1] if entry is not None and token is not None and entry[0] == token else None

    def put(self, key: tuple[str, str, int], token: str, model: torch.nn.Module) -> None:
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self._models[key] = (token, model, size)
        while self._models and (len(self._models) > self.max_models or sum(e[2] for e in self._models.values()) > self.max_bytes):
            self._models.popitem(last=False)

    def clear(self) -> None:
        self._models.clear()


#: ``Context.state`` record with the token of the private state (:class:`ModelCache`).
TOKEN_KEY = "fedsim.model-token"
#: This process's :class:`ModelCache`.
MODELS = ModelCache()


def _state_token(context: Context) -> str | None:
    record = context.state.config_records.get(TOKEN_KEY)
    token = record.get("token") if record is not None else None
    return token if isinstance(token, str) else None


def _prepare(
    msg: Message, context: Context
) -> tuple[ResolvedConfig, int, str | None, torch.nn.Module, dict[str, torch.Tensor], tuple[str, str, int]]:
    """Config, identity, the model (private state + received shared arrays), those arrays and the
    model's :class:`ModelCache` key."""
    enable_console_logging(client=True)
    client_threads()  # under Ray: torch threads = the CPUs Ray reserved for this actor
    cfg = ResolvedConfig.from_flower(msg.content.config_records["config"], ignore=FLOWER_CONFIG_KEYS)
    pid, data_dir = node_identity(context, cfg)
    task = get_task(cfg.task)
    incoming: dict[str, torch.Tensor] = msg.content.array_records["arrays"].to_torch_state_dict()
    private = _private_state(msg, context)
    key = (cfg.task, cfg.model_for(pid), pid)
    resumed = STATE_RECORD_KEY in msg.content.array_records
    cached = MODELS.take(key, None if resumed else _state_token(context))
    if cached is not None:  # this process's model of the client, private state as in the context
        model = cached
        incoming = _conform(model, incoming, pid, cfg)
        model.load_state_dict(incoming, strict=False)
    elif private is not None:  # later rounds (or a resumed run): private tensors + received ones, no random init
        with torch.device("meta"):
            model = task.build_model(cfg.model_for(pid), cfg)
        incoming = _conform(model, incoming, pid, cfg)
        model.load_state_dict({**private.to_torch_state_dict(), **incoming}, assign=True)
    else:  # first round: private initialisation, reproducible per client
        torch.manual_seed(cfg.seed * 1000 + pid)
        model = task.build_model(cfg.model_for(pid), cfg)
        incoming = _conform(model, incoming, pid, cfg)
        model.load_state_dict(incoming, strict=False)
    return cfg, pid, data_dir, model, incoming, key


def _private_state(msg: Message, context: Context) -> ArrayRecord | None:
    """The private tensors to continue from: those the server sent back after a resume, else the
    ones kept in ``Context.state``; ``None`` before the first round."""
    if STATE_RECORD_KEY in msg.content.array_records:
        return msg.content.array_records[STATE_RECORD_KEY]
    if STATE_KEY in context.state:
        return context.state.array_records[STATE_KEY]
    return None


def _conform(model: torch.nn.Module, incoming: dict[str, torch.Tensor], pid: int, cfg: ResolvedConfig) -> dict[str, torch.Tensor]:
    """Check names/shapes of received arrays and cast them to the model's dtypes (server-side
    optimisers such as FedAdam return float64)."""
    own = model.state_dict()
    bad = [k for k, v in incoming.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"client {pid} ({cfg.model_for(pid)}) cannot take shared arrays {bad[:5]}: unknown name or shape")
    return {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in incoming.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    timer = CallTimer("train")
    cfg, pid, data_dir, model, shared, key = _prepare(msg, context)
    timer.mark("prepare")
    task = get_task(cfg.task)
    config = msg.content.config_records["config"]
    server_round = int(_config_number(config, "server-round", 0))
    mu = float(_config_number(config, "proximal-mu", 0.0))  # set by Flower's FedProx only
    faults = cfg.fault_specs()
    free_rider = fault_of(faults, pid, "free-rider")
    if any(f.client == pid for f in faults):
        logger.info(
            "round %d client %d runs with injected faults: %s", server_round, pid, ", ".join(str(f) for f in faults if f.client == pid)
        )
    if fails_in(faults, pid, "crash", server_round):
        raise InjectedCrash(f"client {pid} crashed in round {server_round} (injected fault {pid}:crash:{server_round})")
    if fails_in(faults, pid, "hang", server_round):
        logger.warning("client %d hangs for %.0f s in round %d (injected fault)", pid, cfg.round_timeout + HANG_MARGIN, server_round)
        time.sleep(cfg.round_timeout + HANG_MARGIN)
    # the received tensors became the model's own (assign=True): copy them before training moves them
    keep = mu > 0 or free_rider is not None
    received = {k: v.detach().clone() for k, v in shared.items()} if keep else None
    history = EpochHistory()
    callbacks: list[TrainCallback] = [ProgressLogger(), history]
    cme = CMERecorder(cme_settings(cfg)) if cfg.cme else None
    if cme is not None:
        callbacks.append(cme)
    dev = device()
    result = task.train(
        model, cfg, pid, server_round, dev, callbacks=callbacks,
        proximal_mu=mu, data_dir=data_dir, anchor=received if mu > 0 else None,
    )  # fmt: skip
    timer.mark("work")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Only the private tensors are kept: the shared ones arrive with every message. Context.state
    # travels with each call (to a Ray actor, or a new ClientApp process), so smaller is faster.
    private = ArrayRecord({k: v for k, v in state.items() if k not in shared})
    context.state[STATE_KEY] = private
    token = uuid.uuid4().hex  # os.urandom: no random generator of the run is touched
    context.state[TOKEN_KEY] = ConfigRecord({"token": token})
    MODELS.put(key, token, model)
    if free_rider is not None and received is not None:  # returns what it received, plus noise
        reply_arrays = ArrayRecord(_free_ride(received, free_rider.level, cfg.seed, pid, server_round))
    elif fails_in(faults, pid, "nan", server_round):
        reply_arrays = ArrayRecord(
            {k: torch.full_like(state[k], float("nan")) if state[k].is_floating_point() else state[k] for k in shared}
        )
    else:
        reply_arrays = ArrayRecord({k: state[k] for k in shared})
    metrics: dict[str, MetricRecordValues] = {"num-examples": result.num_examples, "partition-id": pid}
    metrics.update({f"train-{k}": float(v) for k, v in result.metrics.items()})
    content = RecordDict({"arrays": reply_arrays, "metrics": MetricRecord(metrics)})
    content[PLACEMENT_KEY] = placement(pid, server_round, dev)
    content[EPOCHS_RECORD_KEY] = ConfigRecord(dict(history.as_lists()))  # per-epoch train metrics, for metrics.jsonl
    if cme is not None and cme.result is not None:  # the runner always calls the callbacks
        payload = encode(cme.result, pid, server_round, cfg.model_for(pid))
        content[CME_RECORD_KEY] = ConfigRecord({"payload": payload, "partition-id": pid, "server-round": server_round})
    control = msg.content.config_records.get(CONTROL_KEY)
    if control is not None and control.get("send-state", False):  # a checkpoint round
        content[STATE_RECORD_KEY] = private
    timer.mark("reply")
    timer.write(pid, server_round, model=cfg.model_for(pid))
    return Message(content, reply_to=msg)


class InjectedCrash(RuntimeError):
    """The ``crash`` fault (:mod:`fedsim.faults`): this client fails on purpose."""


def _free_ride(received: dict[str, torch.Tensor], scale: float, seed: int, pid: int, server_round: int) -> dict[str, torch.Tensor]:
    """A free-rider's reply (:mod:`fedsim.faults`): the received tensors plus seeded Gaussian noise
    of ``scale`` x each floating-point tensor's standard deviation."""
    out = {}
    for i, (k, v) in enumerate(sorted(received.items())):
        t = v.detach().cpu()
        if t.is_floating_point() and t.numel() > 1:
            std = float(t.double().std())
            t = t + torch.from_numpy(free_rider_noise(tuple(t.shape), scale, std, seed, pid, server_round, i)).to(t.dtype)
        out[k] = t
    return out


def cme_settings(cfg: ResolvedConfig) -> CMESettings:
    """The run's CME settings; analysis layers default to the task's (``Task.cme_layers``)."""
    layers = cfg.cme_layers or tuple(get_task(cfg.task).cme_layers)
    return CMESettings(layers, cfg.cme_threshold, cfg.cme_max_size, cfg.cme_biases, cfg.seed)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    timer = CallTimer("evaluate")
    cfg, pid, data_dir, model, _, key = _prepare(msg, context)
    timer.mark("prepare")
    dev = device()
    result = get_task(cfg.task).evaluate_local(model, cfg, pid, dev, data_dir=data_dir)
    token = _state_token(context)
    if token is not None and STATE_RECORD_KEY not in msg.content.array_records:  # evaluating changed no private tensor
        MODELS.put(key, token, model)
    timer.mark("work")
    metrics: dict[str, MetricRecordValues] = {"num-examples": result.num_examples, "partition-id": pid}
    metrics.update({f"test-{k}": float(v) for k, v in result.metrics.items()})
    server_round = int(_config_number(msg.content.config_records["config"], "server-round", 0))
    reply = Message(RecordDict({"metrics": MetricRecord(metrics), PLACEMENT_KEY: placement(pid, server_round, dev)}), reply_to=msg)
    timer.mark("reply")
    timer.write(pid, server_round, model=cfg.model_for(pid))
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? Replies with its ``partition-id`` (checked against the run's clients)."""
    cfg = ResolvedConfig.from_flower(msg.content.config_records["config"], ignore=FLOWER_CONFIG_KEYS)
    pid, _ = node_identity(context, cfg)
    return Message(RecordDict({"identity": MetricRecord({"partition-id": pid})}), reply_to=msg)
