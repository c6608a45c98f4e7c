"""Tracker contract, the scalars every tracker logs, and the listener that feeds them.

The scalars are pure functions of a ``metrics.jsonl`` line (and of the CME archive for CME norms),
so tests and users can compute what a tracker must hold from the run directory alone:

=====================================  ===========================  ===================================
tag                                    step                         value
=====================================  ===========================  ===================================
``client<k>/<train_|test_><metric>``   round                        the client's field in the line
``global/<metric>``                    round                        the global model's metric
``round/wall_s``                       round                        the round's wall time (seconds)
``client<k>/epoch/train_<metric>``     (round - 1) * E + epoch      the client's per-epoch train metric
``client<k>/cme/<layer>/l2``           (round - 1) * E + epoch      L2 norm of the layer's valid CMEs
=====================================  ===========================  ===================================

(``E``: the client's local epochs in that round; CME norms for the archived analysis layers,
``--cme-layers``, when the run records CMEs.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedsim._logging import logger
from fedsim.registry import Registry

#: One logged value: (tag, step, value).
Scalar = tuple[str, int, float]


def _number(v: Any) -> float | None:
    """A finite number as float, else None (``null`` in metrics.jsonl, NaN, lists, strings)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def round_scalars(line: Mapping[str, Any]) -> list[Scalar]:
    """Per-client ``train_*`` / ``test_*`` metrics, the global model's metrics and the wall time of one round."""
    rnd = int(line["round"])
    out: list[Scalar] = []
    for c in line.get("clients", []):
        for k, v in c.items():
            if k.startswith(("train_", "test_")) and (x := _number(v)) is not None:
                out.append((f"client{c['client']}/{k}", rnd, x))
    for k, v in (line.get("global") or {}).items():
        if (x := _number(v)) is not None:
            out.append((f"global/{k}", rnd, x))
    if (x := _number(line.get("wall_s"))) is not None:
        out.append(("round/wall_s", rnd, x))
    return out


def epoch_scalars(line: Mapping[str, Any]) -> list[Scalar]:
    """Every client's per-epoch train metrics (the line's ``epochs``), stepped by global epoch."""
    rnd = int(line["round"])
    out: list[Scalar] = []
    for c in line.get("clients", []):
        epochs = c.get("epochs") or []
        for e, metrics in enumerate(epochs, 1):
            for k, v in metrics.items():
                if (x := _number(v)) is not None:
                    out.append((f"client{c['client']}/epoch/train_{k}", (rnd - 1) * len(epochs) + e, x))
    return out


def cme_scalars(run_dir: str | Path, line: Mapping[str, Any]) -> list[Scalar]:
    """CME norms of the archived analysis layers, per client and epoch of the line's round
    (nothing when the run has no CME archive or the round is not in it)."""
    from fedsim.cme import CMEArchive
    from fedsim.cme.archive import NoCMERecordsError

    try:
        arch = CMEArchive(run_dir)
    except NoCMERecordsError:
        return []
    rnd = int(line["round"])
    out: list[Scalar] = []
    for c in line.get("clients", []):
        k = int(c["client"])
        if k not in arch.clients or rnd not in arch.rounds(k):
            continue
        rec = arch.read(k, rnd)
        for layer in sorted(rec.matrices):
            norms = rec.stat(layer, "l2")
            for e, v in enumerate(norms, 1):
                if (x := _number(float(v))) is not None:
                    out.append((f"client{k}/cme/{layer}/l2", (rnd - 1) * len(norms) + e, x))
    return out


def hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A run's ``config.json`` as flat hyper-parameters (TensorBoard's HParams, MLflow params):
    scalars kept, lists and pairs joined with commas, ``None`` as ``""``; nested tables
    (``environment``) left out."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in sorted(config.items()):
        if isinstance(v, Mapping):
            continue
        if v is None:
            out[k] = ""
        elif isinstance(v, bool | int | float | str):
            out[k] = v
        elif isinstance(v, list | tuple):
            out[k] = ",".join("=".join(map(str, x)) if isinstance(x, list | tuple) else str(x) for x in v)
        else:
            out[k] = str(v)
    return out


class Tracker(Protocol):
    """An open tracker of one run: ``log`` a round's scalars, ``close`` at the end."""

    def log(self, scalars: Sequence[Scalar]) -> None: ...

    def close(self, final: Mapping[str, float], ok: bool) -> None:
        """``final``: the last round's per-client and global scalars by tag; ``ok``: the run completed."""


@dataclass(frozen=True)
class TrackerSpec:
    """A registered tracker: ``check()`` raises ``ConfigError`` if it cannot run here (a missing
    optional package), before any work; ``open(run_dir, config, uri, resumed)`` starts it."""

    name: str
    summary: str
    check: Callable[[], None]
    open: Callable[[Path, Mapping[str, Any], str, bool], Tracker]


TRACKERS: Registry[TrackerSpec] = Registry("tracker")


class TrackingListener:
    """The :class:`~fedsim.server.recorder.RoundRecorder` listener: logs each written line's scalars."""

    def __init__(self, tracker: Tracker, run_dir: Path, cme: bool) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.cme = cme
        self.last: dict[str, float] = {}

    def __call__(self, line: Mapping[str, Any]) -> None:
        per_round = round_scalars(line)
        scalars = per_round + epoch_scalars(line) + (cme_scalars(self.run_dir, line) if self.cme else [])
        self.tracker.log(scalars)
        self.last = {tag: v for tag, _, v in per_round if tag != "round/wall_s"}


@contextlib.contextmanager
def open_tracking(
    name: str, run_dir: Path, config: Mapping[str, Any], *, uri: str = "", cme: bool = False, previous: Sequence[Mapping[str, Any]] = ()
) -> Iterator[TrackingListener | None]:
    """Open tracker ``name`` for the run in ``run_dir`` (``None`` for ``none``); yields the listener
    to hand the round recorder. ``previous``: the ``metrics.jsonl`` lines a resumed run keeps; they
    are logged first, so the tracker holds the whole run. Closed on exit (``ok`` = no exception)."""
    if name == "none":
        yield None
        return
    spec = TRACKERS.get(name)
    spec.check()
    tracker = spec.open(run_dir, config, uri, bool(previous))
    listener = TrackingListener(tracker, run_dir, cme)
    for line in previous:
        listener(line)
    logger.info("tracking with %s", name)
    ok = False
    try:
        yield listener
        ok = True
    finally:
        tracker.close(listener.last, ok)
