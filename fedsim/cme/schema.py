"""What a CME record holds (torch-free): the per-layer statistic columns, the recording settings
and one client-round of CMEs. Shared by the recorder (client), the archive (server) and the
analysis, so none of them needs the others' dependencies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Columns of the per-layer statistics array (one row per local epoch).
STAT_FIELDS: tuple[str, ...] = (
    "count",  # valid (unmasked) elements
    "size",  # all elements
    "mean",
    "std",
    "l2",
    "masked_fraction",
    "lag_count",  # elements valid in this and the previous epoch (0 for the round's first epoch)
    "lag_sum",  # sum C_i * C_{i-1} over those elements
    "lag_sq_prev",  # sum C_{i-1}^2 over those elements
    "lag_sq_cur",  # sum C_i^2 over those elements
)
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}


@dataclass(frozen=True)
class CMESettings:
    """What to record. ``layers`` are ``fnmatch`` patterns of the analysis layers (full matrices)."""

    layers: tuple[str, ...] = ("head.fc2.weight",)
    threshold: float = 1e-3
    max_size: int = 256
    biases: bool = False
    seed: int = 0


@dataclass(frozen=True)
class EpochCME:
    """One client's CMEs for one round: ``stats[layer]`` is (epochs, len(STAT_FIELDS)) float64;
    ``matrices[layer]`` is (epochs, rows, cols) float32 with the kept ``rows``/``cols`` indices."""

    layers: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    stats: Mapping[str, np.ndarray]
    matrices: Mapping[str, np.ndarray]
    rows: Mapping[str, np.ndarray]
    cols: Mapping[str, np.ndarray]


__all__ = ["FIELD", "STAT_FIELDS", "CMESettings", "EpochCME"]
