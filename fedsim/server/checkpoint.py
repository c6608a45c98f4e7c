"""Checkpoints: everything a run needs to continue after round ``k`` exactly as if it had never stopped.

One file, ``RUN_DIR/checkpoint.safetensors``, replaced atomically (temp file + ``os.replace``) at
the end of every ``checkpoint_every``-th round and after the last one. It holds

* ``global/<name>``: the global (aggregated) parameters after round ``k``, in their dtype (FedAdam's
  are float64);
* ``client/<partition>/<name>``: each client's **private** tensors (backbone, BatchNorm statistics,
  unshared head layers: what its ClientApp keeps in ``Context.state``). Clients send them to the
  server in their train reply of a checkpoint round (:class:`ClientStateExchange`), so this works in
  simulation and in deployment alike, without a shared file system;
* ``strategy/...``: the strategy's server-side state (:func:`strategy_state`), e.g. FedAdam's
  moments ``m_t`` / ``v_t``;
* ``rng/...`` and, in the JSON metadata, the process's Python, NumPy and torch RNG states, the round
  and the format version.

On ``--resume`` the server loads the file, restores the strategy and the RNG states, sends each
client its private tensors with its first messages, and continues with round ``k + 1``. Clients
seed their training per round (``Task.round_seed``), so the continued run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import Strategy

from fedsim._logging import logger
from fedsim.rundir import RunDir, atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = 1
#: Train-message record asking a client to send its private tensors (checkpoint rounds).
CONTROL_KEY = "fedsim.control"
#: ArrayRecord with a client's private tensors: in its reply (to the server) or in a message (restore).
STATE_RECORD_KEY = "fedsim.state"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the run."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` rounds."""

    round: int
    arrays: dict[str, np.ndarray]
    clients: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_meta: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    rng_arrays: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------- strategy state
def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The server-side state of a strategy: its attributes, recursively, as arrays + JSON.

    Flower's and fedsim's strategies keep their state in plain attributes (FedOpt family:
    ``current_arrays``, ``m_t``, ``v_t``; FedAvgM: ``momentum_vector``; DP adaptive clipping:
    ``clipping_norm`` and the wrapped strategy; fedsim's DP: its NumPy RNG state and accountant).
    Numbers, strings, ``None``, numpy arrays, ArrayRecords, NumPy generators and dicts, lists and
    tuples of these are captured; objects of fedsim's or Flower's classes (a wrapped strategy, an
    accountant) are captured attribute by attribute; anything else (callables, sets) is
    configuration and skipped. Settings such as ``eta`` are captured too: restoring them is a
    no-op, as a resumed run has the same config. Returns ``(arrays, metadata)``.
    """
    arrays: dict[str, np.ndarray] = {}
    spec = _encode(strategy, "strategy", arrays, set())
    return arrays, spec or {}


def _stateful_object(value: object) -> bool:
    module = type(value).__module__
    return hasattr(value, "__dict__") and not callable(value) and module.startswith(("fedsim.", "flwr."))


def _encode(value: Any, key: str, arrays: dict[str, np.ndarray], seen: set[int]) -> dict[str, Any] | None:
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool | int | float | str | np.generic):
        return {"kind": "value", "value": value.item() if isinstance(value, np.generic) else value}
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"kind": "array"}
    if isinstance(value, ArrayRecord):
        arrays.update({f"{key}/{k}": v.numpy() for k, v in value.items()})
        return {"kind": "arrayrecord", "keys": list(value)}
    if isinstance(value, np.random.Generator):
        return {"kind": "generator", "state": value.bit_generator.state}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _encode(v, f"{key}/{k}", arrays, seen) for k, v in value.items()}
        return None if any(v is None for v in items.values()) else {"kind": "dict", "items": items}
    if isinstance(value, list | tuple):
        seq = [_encode(v, f"{key}/{i}", arrays, seen) for i, v in enumerate(value)]
        return None if any(v is None for v in seq) else {"kind": "seq", "tuple": isinstance(value, tuple), "items": seq}
    if (isinstance(value, Strategy) or _stateful_object(value)) and id(value) not in seen:
        seen.add(id(value))
        attrs = {name: _encode(v, f"{key}/{name}", arrays, seen) for name, v in sorted(vars(value).items())}
        return {"kind": "object", "attrs": {k: v for k, v in attrs.items() if v is not None}}
    return None  # callables, sets, other objects: configuration, not state


def load_strategy_state(strategy: Strategy, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Put a captured state (:func:`strategy_state`) back into a freshly built strategy of the same kind."""
    if meta:
        _decode(meta, "strategy", arrays, strategy)


def _decode(spec: Mapping[str, Any], key: str, arrays: Mapping[str, np.ndarray], current: Any) -> Any:
    kind = spec["kind"]
    if kind == "none":
        return None
    if kind == "value":
        return spec["value"]
    if kind == "array":
        return arrays[key]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(np.ascontiguousarray(arrays[f"{key}/{k}"])) for k in spec["keys"]})
    if kind == "generator":
        gen = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        gen.bit_generator.state = spec["state"]
        return gen
    if kind == "dict":
        return {k: _decode(v, f"{key}/{k}", arrays, None) for k, v in spec["items"].items()}
    if kind == "seq":
        items = [_decode(v, f"{key}/{i}", arrays, None) for i, v in enumerate(spec["items"])]
        return tuple(items) if spec["tuple"] else items
    if kind == "object":
        if current is None:
            raise CheckpointError(f"the checkpoint's strategy state has an object at {key}, which this strategy does not")
        for name, sub in spec["attrs"].items():
            if not hasattr(current, name):
                raise CheckpointError(f"the checkpoint's strategy state has {key}/{name}, which {type(current).__name__} does not")
            setattr(current, name, _decode(sub, f"{key}/{name}", arrays, getattr(current, name)))
        return current
    raise CheckpointError(f"unknown strategy state kind {kind!r} at {key}")


# ---------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """This process's Python, NumPy (global) and torch RNG states: (JSON part, arrays)."""
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002  (Flower's DP wrappers draw from the global state)
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return meta, {"rng/numpy": np.asarray(keys, dtype=np.uint32), "rng/torch": torch.get_rng_state().numpy()}


def restore_rng(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, arrays["rng/numpy"], pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(arrays["rng/torch"])))


# ---------------------------------------------------------------------- file
def save_checkpoint(run_dir: RunDir, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``RUN_DIR/checkpoint.safetensors`` (replacing the previous one)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {f"global/{k}": v for k, v in ckpt.arrays.items()}
    for pid, state in ckpt.clients.items():
        tensors.update({f"client/{pid}/{k}": v for k, v in state.items()})
    tensors.update(ckpt.strategy_arrays)
    tensors.update(ckpt.rng_arrays)
    meta = {
        "format": FORMAT,
        "round": ckpt.round,
        "global": list(ckpt.arrays),
        "clients": {str(pid): list(state) for pid, state in ckpt.clients.items()},
        "strategy": ckpt.strategy_meta,
        "rng": ckpt.rng,
    }
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"fedsim": json.dumps(meta)})
    path = run_dir.path / CHECKPOINT_FILE
    atomic_write_bytes(path, data)
    return path


def load_checkpoint(run_dir: RunDir) -> Checkpoint:
    """Read ``RUN_DIR/checkpoint.safetensors`` (:class:`CheckpointError` if missing or unreadable)."""
    from safetensors import safe_open

    path = run_dir.path / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(_no_checkpoint(run_dir))
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["fedsim"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this fedsim reads format {FORMAT}")
    return Checkpoint(
        round=int(meta["round"]),
        arrays={k: tensors[f"global/{k}"] for k in meta["global"]},
        clients={int(pid): {k: tensors[f"client/{pid}/{k}"] for k in keys} for pid, keys in meta["clients"].items()},
        strategy_arrays={k: v for k, v in tensors.items() if k.startswith("strategy/")},
        strategy_meta=meta["strategy"],
        rng=meta["rng"],
        rng_arrays={k: v for k, v in tensors.items() if k.startswith("rng/")},
    )


# ---------------------------------------------------------------------- client state
class ClientStateExchange:
    """Grid hook moving the clients' private tensors between the server and the clients.

    * In a checkpoint round (``wanted(round)``) every train message carries the ConfigRecord
      ``fedsim.control`` with ``send-state``; the client adds its private tensors to its reply as
      the ArrayRecord ``fedsim.state``, which :meth:`incoming` takes out (strategies aggregate only
      the reply's one ArrayRecord) and keeps in :attr:`states` by partition id.
    * After a resume, :meth:`outgoing` adds each client's checkpointed tensors (``fedsim.state``) to
      every message for it until that client has trained once, so it continues from them instead
      of a fresh initialisation.

    ``partition_of`` maps a node id to its partition (learned when the run starts).
    """

    def __init__(
        self, wanted: Callable[[int], bool], partition_of: Mapping[int, int], restore: Mapping[int, Mapping[str, np.ndarray]] | None = None
    ) -> None:
        self._wanted = wanted
        self._partition_of = partition_of
        self.states: dict[int, dict[str, np.ndarray]] = {pid: dict(s) for pid, s in (restore or {}).items()}
        self._pending = set(self.states) if restore else set()

    def outgoing(self, messages: list[Message]) -> list[Message]:
        out = []
        for msg in messages:
            pid = self._partition_of.get(msg.metadata.dst_node_id)
            extra: dict[str, Any] = {}
            is_train = msg.metadata.message_type == MessageType.TRAIN
            if is_train and self._wanted(_round_of(msg)):
                extra[CONTROL_KEY] = ConfigRecord({"send-state": True})
            if pid in self._pending:
                extra[STATE_RECORD_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.states[pid].items()})
            out.append(_with_records(msg, extra) if extra else msg)
        return out

    def incoming(self, replies: Iterable[Message]) -> None:
        for r in replies:
            if r.has_error():
                continue
            pid = self._partition_of.get(r.metadata.src_node_id)
            if r.metadata.message_type == MessageType.TRAIN and pid is not None:
                self._pending.discard(pid)
            if STATE_RECORD_KEY in r.content.array_records:
                record = r.content.array_records[STATE_RECORD_KEY]
                del r.content[STATE_RECORD_KEY]
                if pid is not None:
                    self.states[pid] = {k: np.asarray(v.numpy()) for k, v in record.items()}


def _with_records(msg: Message, extra: Mapping[str, Any]) -> Message:
    """A copy of an unsent message with more records (the strategy's messages may share one RecordDict)."""
    md = msg.metadata
    return Message(RecordDict({**dict(msg.content.items()), **extra}), md.dst_node_id, md.message_type, ttl=md.ttl, group_id=md.group_id)


def _round_of(msg: Message) -> int:
    for record in msg.content.config_records.values():
        if "server-round" in record:
            value = record["server-round"]
            return int(value) if isinstance(value, int | float) else 0
    return 0


def log_resume(ckpt: Checkpoint, total: int) -> None:
    logger.info("resuming after round %d of %d from the checkpoint (%d clients' private state)", ckpt.round, total, len(ckpt.clients))


def is_checkpoint_round(cfg: Any, server_round: int) -> bool:
    """Whether round ``server_round`` of a run with config ``cfg`` ends with a checkpoint: every
    ``checkpoint_every`` rounds and the last one (never with ``checkpoint_every = 0``)."""
    every = int(cfg.checkpoint_every)
    return every > 0 and server_round > 0 and (server_round % every == 0 or server_round == int(cfg.rounds))


class Checkpointer:
    """Round-end hook writing the checkpoint in checkpoint rounds (:func:`is_checkpoint_round`).

    ``client_states`` is the (live) mapping partition -> private tensors that
    :class:`ClientStateExchange` keeps up to date."""

    def __init__(self, run_dir: RunDir, cfg: Any, strategy: Strategy, client_states: Mapping[int, dict[str, np.ndarray]]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy
        self.client_states = client_states

    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> None:
        if not is_checkpoint_round(self.cfg, server_round):
            return
        s_arrays, s_meta = strategy_state(self.strategy)
        r_meta, r_arrays = rng_state()
        ckpt = Checkpoint(
            round=server_round,
            arrays={k: np.asarray(v.numpy()) for k, v in arrays.items()},
            clients=dict(self.client_states),
            strategy_arrays=s_arrays,
            strategy_meta=s_meta,
            rng=r_meta,
            rng_arrays=r_arrays,
        )
        path = save_checkpoint(self.run_dir, ckpt)
        logger.debug("round %d checkpoint: %s", server_round, path)


def checkpoint_round(run_dir: RunDir) -> int | None:
    """The round of the run's checkpoint, or ``None`` without a readable one (reads the header only)."""
    from safetensors import safe_open

    path = run_dir.path / CHECKPOINT_FILE
    try:
        with safe_open(str(path), framework="numpy") as f:
            return int(json.loads((f.metadata() or {})["fedsim"])["round"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None


def _no_checkpoint(run_dir: RunDir) -> str:
    return (
        f"{run_dir.path} has no checkpoint ({CHECKPOINT_FILE}): the run stopped before its first checkpoint round or ran with "
        "--checkpoint-every 0, so it cannot be resumed; start it again with another --out"
    )


def check_resumable(run_dir: RunDir, rounds: int) -> int:
    """The round of the run's checkpoint, if the run can continue from it (cheap: header only);
    :class:`CheckpointError` naming the cause otherwise."""
    path = run_dir.path / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(_no_checkpoint(run_dir))
    saved = checkpoint_round(run_dir)
    if saved is None:
        raise CheckpointError(f"cannot read the checkpoint {path}; it cannot be resumed")
    if saved >= rounds:
        raise CheckpointError(f"{run_dir.path} already finished all {rounds} rounds; nothing to resume")
    return saved


def prune_cme_index(run_path: Path, after_round: int) -> int:
    """Drop CME archive entries of rounds after ``after_round`` from ``cme/index.json`` (atomically;
    their files are overwritten when the rounds are recorded again). Returns how many were dropped."""
    from fedsim.cme.archive import CME_DIR, INDEX_FILE

    index = run_path / CME_DIR / INDEX_FILE
    if not index.exists():
        return 0
    data = json.loads(index.read_text(encoding="utf-8"))
    keep = [e for e in data["entries"] if int(e["round"]) <= after_round]
    dropped = len(data["entries"]) - len(keep)
    if dropped:
        atomic_write_bytes(index, json.dumps({**data, "entries": keep}, indent=1).encode())
    return dropped
