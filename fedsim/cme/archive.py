"""The CME archive: transport format, atomic on-disk archive with an index, and its reader.

**Transport.** A client packs one round's CMEs (:class:`~fedsim.cme.recorder.EpochCME`) into a
safetensors blob (:func:`encode`) and sends it in its train reply as the ``ConfigRecord``
``"cme"`` (``payload`` bytes plus ``partition-id`` / ``server-round``). That reply travels the
same way in simulation (Ray) and in deployment (gRPC). The server takes the record out of the reply
as it arrives (:meth:`CMEArchiveWriter.collect`), without changing it: Flower's strategies
aggregate only a reply's ArrayRecord and MetricRecord, so every one of them works unchanged.

**Archive layout** (``RUN_DIR/cme/``)::

    index.json                         every (client, round) entry: file, size, sha256, model,
                                       epochs, layers (in model order), matrix layers
    client<k>/round<r>.safetensors     tensors  stats/<layer>  (epochs, fields) float64
                                                lag/<layer>    (epochs, groups, 4) float32
                                                matrix/<layer> (epochs, rows, cols) float32,
                                                               NaN where not valid
                                                rows/<layer>, cols/<layer>  kept indices

Format ``fedsim-cme/2`` (this version) excludes masked, dead and non-finite elements from the
statistics and stores them as NaN in the matrices; ``fedsim-cme/1`` archives (masked elements
stored as 0 and counted in the statistics, no dead-unit or non-finite statistics) are refused with
an error that says so.

A round file is written atomically (temp file, fsync, rename) *before* the index is rewritten the
same way, so a crash leaves either the old index (the new file is ignored) or the new one; a
half-written file is never listed. The reader checks every file's size and SHA-256 against the
index before using it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim._logging import logger
from fedsim.cme.schema import FIELD, LAG_GROUP_FIELDS, LAG_GROUPS, STAT_FIELDS, EpochCME
from fedsim.rundir import atomic_write_bytes

FORMAT = "fedsim-cme/2"
#: Formats this version cannot read, and why.
OLD_FORMATS = {
    "fedsim-cme/1": "it stores masked weights as 0 inside the statistics and has no dead-unit or non-finite statistics",
}
CME_DIR = "cme"
INDEX_FILE = "index.json"
RECORD_KEY = "cme"


class NoCMERecordsError(FileNotFoundError):
    """A run directory without CME records (the run was made without ``--cme``)."""


class CMEArchiveError(ValueError):
    """An archive entry is inconsistent (corrupt file, duplicate entry, wrong format)."""


def encode(cme: EpochCME, client: int, server_round: int, model: str) -> bytes:
    """One client-round of CMEs as safetensors bytes (metadata: format, client, round, layers)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for name in cme.layers:
        tensors[f"stats/{name}"] = np.ascontiguousarray(cme.stats[name])
        if name in cme.lag_groups:
            tensors[f"lag/{name}"] = np.ascontiguousarray(cme.lag_groups[name], dtype=np.float32)  # sums in float64, kept in float32
    for name, mat in cme.matrices.items():
        tensors[f"matrix/{name}"] = np.ascontiguousarray(mat, dtype=np.float32)
        tensors[f"rows/{name}"] = np.asarray(cme.rows[name], dtype=np.int64)
        tensors[f"cols/{name}"] = np.asarray(cme.cols[name], dtype=np.int64)
    epochs = len(next(iter(cme.stats.values()))) if cme.stats else 0
    meta = {
        "format": FORMAT,
        "client": str(client),
        "round": str(server_round),
        "model": model,
        "epochs": str(epochs),
        "fields": json.dumps(STAT_FIELDS),
        "lag_groups": json.dumps([LAG_GROUPS, list(LAG_GROUP_FIELDS)]),
        "layers": json.dumps(list(cme.layers)),
        "shapes": json.dumps({k: list(v) for k, v in cme.shapes.items()}),
    }
    return save(tensors, metadata=meta)


@dataclass(frozen=True)
class RoundCME:
    """One client-round read back from the archive."""

    client: int
    round: int
    model: str
    layers: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    stats: dict[str, np.ndarray]
    matrices: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    cols: dict[str, np.ndarray]
    lag_groups: dict[str, np.ndarray]

    @property
    def epochs(self) -> int:
        return len(next(iter(self.stats.values()))) if self.stats else 0

    def stat(self, layer: str, field: str) -> np.ndarray:
        """One statistic of one layer, per epoch."""
        return self.stats[layer][:, FIELD[field]]


def decode(data: bytes) -> RoundCME:
    """Parse :func:`encode` output; raises :class:`CMEArchiveError` on anything unexpected."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
        meta = _metadata(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CMEArchiveError(f"not a CME record: {exc}") from exc
    _check_format(meta.get("format"), "CME record")
    if json.loads(meta["fields"]) != list(STAT_FIELDS):
        raise CMEArchiveError("CME record has different statistic fields than this fedsim version")
    layers = tuple(json.loads(meta["layers"]))
    group: dict[str, dict[str, np.ndarray]] = {"stats": {}, "lag": {}, "matrix": {}, "rows": {}, "cols": {}}
    for key, arr in tensors.items():
        kind, _, name = key.partition("/")
        group[kind][name] = arr
    return RoundCME(
        client=int(meta["client"]),
        round=int(meta["round"]),
        model=meta["model"],
        layers=layers,
        shapes={k: tuple(v) for k, v in json.loads(meta["shapes"]).items()},
        stats=group["stats"],
        matrices=group["matrix"],
        rows=group["rows"],
        cols=group["cols"],
        lag_groups=group["lag"],
    )


def _check_format(fmt: Any, what: str) -> None:
    if fmt == FORMAT:
        return
    if fmt in OLD_FORMATS:
        raise CMEArchiveError(
            f"{what} has the old CME format {fmt!r}: {OLD_FORMATS[fmt]}. This fedsim reads {FORMAT!r}; "
            "record the run again with 'fedsim run ... --cme' to analyse it"
        )
    raise CMEArchiveError(f"unsupported CME format {fmt!r} in {what} (expected {FORMAT!r})")


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}))


class CMEArchiveWriter:
    """Server side: takes CME records out of train replies and archives them (see module doc).

    With ``defer_index`` the index is rewritten once per round (:meth:`on_round_end`, a round-end
    hook of the server, which runs before the checkpoint's) instead of after every record: with
    hundreds of clients per round, rewriting the whole index per record would make archiving
    quadratic in the number of records. A crash before the rewrite leaves round files the index
    does not list, which readers ignore (as for a crash between a file and its index update)."""

    def __init__(self, run_dir: str | Path, *, defer_index: bool = False) -> None:
        self.root = Path(run_dir) / CME_DIR
        self._index: list[dict[str, Any]] = _read_index(self.root) if (self.root / INDEX_FILE).exists() else []
        self._archived = {(e["client"], e["round"]) for e in self._index}
        self._defer = defer_index
        self._dirty = False

    def collect(self, msg: Any) -> None:
        """Grid reply hook: archive the ``"cme"`` record of a reply, if it has one. The reply is left
        as it is: Flower's strategies aggregate only its ArrayRecord and MetricRecord."""
        if msg.has_error() or RECORD_KEY not in msg.content.config_records:
            return
        self.write(bytes(msg.content.config_records[RECORD_KEY]["payload"]))

    def write(self, payload: bytes) -> Path:
        """Validate one client-round payload, write it atomically, then update the index."""
        rec = decode(payload)
        if (rec.client, rec.round) in self._archived:
            raise CMEArchiveError(f"CMEs of client {rec.client} round {rec.round} are already archived")
        rel = Path(f"client{rec.client}") / f"round{rec.round:04d}.safetensors"
        atomic_write_bytes(self.root / rel, payload)
        entry = {
            "client": rec.client,
            "round": rec.round,
            "file": rel.as_posix(),
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "model": rec.model,
            "epochs": rec.epochs,
            "layers": list(rec.layers),
            "matrix_layers": sorted(rec.matrices),
        }
        self._index.append(entry)
        self._archived.add((rec.client, rec.round))
        self._dirty = True
        if not self._defer:
            self.flush()
        logger.debug("archived CMEs of client %d round %d (%d bytes)", rec.client, rec.round, len(payload))
        return self.root / rel

    def flush(self) -> None:
        """Rewrite ``index.json`` (atomically) with every archived record, if any was added."""
        if not self._dirty:
            return
        self._index.sort(key=lambda e: (e["client"], e["round"]))
        body = json.dumps({"format": FORMAT, "fields": list(STAT_FIELDS), "entries": self._index}, indent=1)
        atomic_write_bytes(self.root / INDEX_FILE, body.encode())
        self._dirty = False

    def on_round_end(self, server_round: int, arrays: Any) -> None:
        """Round-end hook: the round's records enter the index."""
        self.flush()


def _read_index(root: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CMEArchiveError(f"cannot read the CME index {root / INDEX_FILE}: {exc}") from exc
    _check_format(data.get("format"), str(root / INDEX_FILE))
    return list(data["entries"])


class CMEArchive:
    """Reader: ``CMEArchive(run_dir)`` lists what was recorded and returns arrays.

    >>> arch = CMEArchive("runs/s1")                      # doctest: +SKIP
    >>> arch.clients, arch.rounds(0)                      # doctest: +SKIP
    >>> arch.matrix(0, 3, "head.fc2.weight", epoch=-1)    # (128, 128) CME of round 3, last epoch
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / CME_DIR
        if not (self.root / INDEX_FILE).exists():
            raise NoCMERecordsError(
                f"{Path(run_dir)} has no CME records ({CME_DIR}/{INDEX_FILE} is missing); record them with 'fedsim run ... --cme'"
            )
        self.entries = _read_index(self.root)
        if not self.entries:
            raise NoCMERecordsError(f"{Path(run_dir)}: the CME index lists no records")
        self._by_key = {(e["client"], e["round"]): e for e in self.entries}
        self._cache: dict[tuple[int, int], RoundCME] = {}

    @property
    def clients(self) -> list[int]:
        return sorted({e["client"] for e in self.entries})

    def rounds(self, client: int) -> list[int]:
        return sorted(e["round"] for e in self.entries if e["client"] == client)

    def model(self, client: int) -> str:
        return self._entry(client, self.rounds(client)[0])["model"]

    def layers(self, client: int) -> list[str]:
        """Recorded layers of a client's model, input side first."""
        return list(self._entry(client, self.rounds(client)[0])["layers"])

    def matrix_layers(self, client: int) -> list[str]:
        return list(self._entry(client, self.rounds(client)[0])["matrix_layers"])

    def _entry(self, client: int, server_round: int) -> dict[str, Any]:
        try:
            return self._by_key[(client, server_round)]
        except KeyError:
            raise KeyError(
                f"no CMEs for client {client} round {server_round}; archived clients {self.clients}, "
                f"rounds of client {client}: {self.rounds(client) if client in self.clients else []}"
            ) from None

    def read(self, client: int, server_round: int) -> RoundCME:
        """One client-round, checked against the index's size and SHA-256."""
        key = (client, server_round)
        if key not in self._cache:
            entry = self._entry(client, server_round)
            path = self.root / entry["file"]
            data = path.read_bytes()
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CMEArchiveError(f"{path} does not match the CME index (size or checksum): the file is corrupt")
            self._cache[key] = decode(data)
        return self._cache[key]

    def __iter__(self) -> Iterator[RoundCME]:
        for e in self.entries:
            yield self.read(e["client"], e["round"])

    def stats(self, client: int, layer: str, field: str) -> np.ndarray:
        """(rounds, epochs) array of one statistic; NaN-padded if epochs differ between rounds."""
        rows = [self.read(client, r).stat(layer, field) for r in self.rounds(client)]
        out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def matrix(self, client: int, server_round: int, layer: str, epoch: int = -1) -> np.ndarray:
        """The archived CME matrix of one layer after local epoch ``epoch`` (1-based; -1 = last)."""
        rec = self.read(client, server_round)
        if layer not in rec.matrices:
            raise KeyError(f"no full CME matrix for layer {layer!r}; archived matrix layers: {sorted(rec.matrices)}")
        mats = rec.matrices[layer]
        if epoch == -1:
            return mats[-1]
        if not 1 <= epoch <= len(mats):
            raise IndexError(f"epoch {epoch} is outside 1..{len(mats)}")
        return mats[epoch - 1]
