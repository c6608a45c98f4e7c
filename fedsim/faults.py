"""Fault injection: make one hospital weak, noisy, lazy, a free-rider or divergent, on purpose.

Robustness studies and the CME validation study (``docs/cme-validation.md``) need clients whose
flaw is known. ``fedsim run --fault CLIENT:KIND[:LEVEL]`` (repeatable; run-config key ``faults``,
comma-separated) gives client ``CLIENT`` one of these kinds:

==============  =========================================================  =============
kind            what the client does                                        LEVEL default
==============  =========================================================  =============
``few-data``    keeps a seeded LEVEL share of its training split (>= 2)     0.1
``label-noise`` LEVEL of its training labels are replaced by a random        0.5
                *other* class (seeded); landmark tasks swap the whole
                landmark set with another training case's
``lazy``        trains with its learning rate x LEVEL                       0.1
``free-rider``  does not learn (learning rate 0) and returns the weights      1e-3
                it received plus Gaussian noise of LEVEL x each tensor's
                standard deviation
``diverge``     trains with its learning rate x LEVEL, large enough to       1e4
                blow up; non-finite values are possible
``crash``       raises an error in round LEVEL (its ClientApp fails)          1
``hang``        in round LEVEL, sleeps past the round timeout before it       1
                trains (its reply comes too late: Flower drops it)
``nan``         returns NaN parameters in round LEVEL                        1
==============  =========================================================  =============

``crash``, ``hang`` and ``nan`` exercise the server's client-failure policy (``--min-clients``,
``docs/reliability.md``); their LEVEL is a round number (1 = the first round).

The functions here are pure (numpy only) and seeded by ``(seed, client)``, so a faulty run is as
reproducible as a healthy one. Tasks apply the data faults through their shared split handling,
the ClientApp the learning-rate and free-rider faults.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Fault kinds and their default LEVEL.
FAULT_KINDS: dict[str, float] = {
    "few-data": 0.1,
    "label-noise": 0.5,
    "lazy": 0.1,
    "free-rider": 1e-3,
    "diverge": 1e4,
    "crash": 1,
    "hang": 1,
    "nan": 1,
}
#: Fault kinds whose LEVEL is the round in which the client fails.
ROUND_FAULTS = ("crash", "hang", "nan")
#: A ``hang`` client sleeps this many seconds longer than the round timeout.
HANG_MARGIN = 2.0


class FaultSpecError(ValueError):
    """A malformed ``--fault`` value; the message names the expected form and the valid kinds."""


@dataclass(frozen=True)
class Fault:
    """Client ``client`` has fault ``kind`` at ``level``."""

    client: int
    kind: str
    level: float

    def __str__(self) -> str:
        return f"{self.client}:{self.kind}:{self.level:g}"


def parse_fault(text: str) -> Fault:
    """``"1:few-data:0.1"`` or ``"2:free-rider"`` -> :class:`Fault` (LEVEL defaults per kind)."""
    form = f"expected CLIENT:KIND[:LEVEL] with KIND one of {', '.join(FAULT_KINDS)}"
    parts = [p.strip() for p in str(text).split(":")]
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise FaultSpecError(f"bad fault {text!r}: {form}, e.g. 1:few-data:0.1")
    try:
        client = int(parts[0])
    except ValueError:
        raise FaultSpecError(f"bad fault {text!r}: CLIENT must be a client index, got {parts[0]!r}") from None
    kind = parts[1]
    if kind not in FAULT_KINDS:
        raise FaultSpecError(f"unknown fault kind {kind!r} in {text!r}; valid kinds: {', '.join(FAULT_KINDS)}")
    try:
        level = float(parts[2]) if len(parts) == 3 else FAULT_KINDS[kind]
    except ValueError:
        raise FaultSpecError(f"bad fault {text!r}: LEVEL must be a number, got {parts[2]!r}") from None
    if client < 0:
        raise FaultSpecError(f"bad fault {text!r}: CLIENT must be >= 0")
    if not np.isfinite(level):
        raise FaultSpecError(f"bad fault {text!r}: LEVEL must be finite")
    if kind in ("few-data", "label-noise") and not 0 < level <= 1:
        raise FaultSpecError(f"bad fault {text!r}: {kind} LEVEL is a share in (0, 1], got {level:g}")
    if kind in ("lazy", "diverge", "free-rider") and level < 0:
        raise FaultSpecError(f"bad fault {text!r}: {kind} LEVEL must be >= 0, got {level:g}")
    if kind in ROUND_FAULTS and not (level >= 1 and level == int(level)):
        raise FaultSpecError(f"bad fault {text!r}: {kind} LEVEL is the round it happens in, a whole number >= 1, got {level:g}")
    return Fault(client, kind, level)


def parse_faults(texts: Iterable[str], num_clients: int) -> tuple[Fault, ...]:
    """Parse every spec; a client index outside the federation or a kind given twice for one
    client is an error."""
    faults = tuple(parse_fault(t) for t in texts)
    seen: set[tuple[int, str]] = set()
    for f in faults:
        if f.client >= num_clients:
            raise FaultSpecError(f"fault {f} names client {f.client}, but the run has clients 0..{num_clients - 1}")
        if (f.client, f.kind) in seen:
            raise FaultSpecError(f"client {f.client} has fault {f.kind!r} twice; give it once")
        seen.add((f.client, f.kind))
    return faults


def fault_of(faults: Sequence[Fault], client: int, kind: str) -> Fault | None:
    """The client's fault of this kind, if any."""
    return next((f for f in faults if f.client == client and f.kind == kind), None)


def fails_in(faults: Sequence[Fault], client: int, kind: str, server_round: int) -> bool:
    """Whether the client has the round fault ``kind`` (``crash``, ``hang``, ``nan``) in this round."""
    f = fault_of(faults, client, kind)
    return f is not None and int(f.level) == server_round


def lr_factor(faults: Sequence[Fault], client: int) -> float:
    """Product of the client's learning-rate factors: ``lazy`` / ``diverge`` LEVEL, 0 for a free-rider."""
    factor = 1.0
    for f in faults:
        if f.client == client and f.kind in ("lazy", "diverge"):
            factor *= f.level
        elif f.client == client and f.kind == "free-rider":
            factor = 0.0
    return factor


def _rng(seed: int, client: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, client, 7919, salt])


def few_data(train_idx: np.ndarray, level: float, seed: int, client: int, minimum: int = 2) -> np.ndarray:
    """A seeded ``level`` share (at least ``minimum``) of the training indices, in their order."""
    n = len(train_idx)
    keep = min(n, max(minimum, round(level * n)))
    chosen = np.sort(_rng(seed, client, 1).choice(n, size=keep, replace=False))
    return np.asarray(train_idx)[chosen]


def noisy_labels(labels: np.ndarray, train_idx: np.ndarray, level: float, num_classes: int, seed: int, client: int) -> np.ndarray:
    """A copy of ``labels`` where a seeded ``level`` share of ``train_idx`` get a random *other*
    class (so exactly that share is wrong). Only training labels change; test labels stay true."""
    out = np.array(labels, copy=True)
    rng = _rng(seed, client, 2)
    n_flip = round(level * len(train_idx))
    flip = rng.choice(np.asarray(train_idx), size=n_flip, replace=False)
    shift = rng.integers(1, num_classes, size=n_flip)  # 1..C-1: never the true class
    out[flip] = (out[flip] + shift) % num_classes
    return out


def swapped_targets(n: int, level: float, seed: int, client: int) -> np.ndarray:
    """For tasks whose label is not a class (landmarks): ``perm`` such that training case ``i``
    gets the target of case ``perm[i]``; a seeded ``level`` share of the cases get another case's
    target (a derangement among them), the rest keep their own."""
    rng = _rng(seed, client, 3)
    perm = np.arange(n)
    chosen = rng.choice(n, size=round(level * n), replace=False)
    if len(chosen) >= 2:
        perm[chosen] = np.roll(chosen, 1)  # a cycle: nobody in `chosen` keeps its own target
    return perm


def free_rider_noise(shape: tuple[int, ...], scale: float, std: float, seed: int, client: int, server_round: int, salt: int) -> np.ndarray:
    """Gaussian noise of standard deviation ``scale * std`` for one returned tensor."""
    rng = np.random.default_rng([seed, client, server_round, 7919, 4, salt])
    return rng.normal(0.0, scale * std, size=shape)


__all__ = [
    "FAULT_KINDS",
    "HANG_MARGIN",
    "ROUND_FAULTS",
    "Fault",
    "FaultSpecError",
    "fails_in",
    "fault_of",
    "few_data",
    "free_rider_noise",
    "lr_factor",
    "noisy_labels",
    "parse_fault",
    "parse_faults",
    "swapped_targets",
]
