"""What a CME record holds (torch-free): the per-layer statistic columns, the recording settings
and one client-round of CMEs. Shared by the recorder (client), the archive (server) and the
analysis, so none of them needs the others' dependencies.

Every element of a recorded weight tensor falls, per epoch, into exactly one class (in this order):

* **non-finite**: ``w_i`` or the CME ``C_i`` is NaN or infinite (a diverging client);
* **masked**: ``|w_i| < threshold`` (eq. 2 divides by ``w_i``);
* **dead**: the element lies in a *dead unit*: a row (output neuron) or column (incoming
  connection) of the eq. 1 matrix in which no weight changed at all during the epoch, e.g. a ReLU
  unit that never fired;
* **valid**: everything else. Only valid elements enter the statistics below, the ACF terms and
  the archived matrices (which hold NaN elsewhere).

So ``count / size + masked_fraction + dead_fraction + nonfinite_fraction == 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: Columns of the per-layer statistics array (one row per local epoch).
STAT_FIELDS: tuple[str, ...] = (
    "count",  # valid elements
    "size",  # all elements
    "mean",  # of the valid C values
    "std",  # population standard deviation of the valid C values
    "l2",  # sqrt(sum C^2) over the valid elements
    "mean_abs",  # mean |C| over the valid elements
    "jump_fraction",  # fraction of the valid elements with |C| > 1: |w_i - w_{i-1}| > |w_i|
    "masked_fraction",  # |w_i| < threshold (and finite)
    "dead_fraction",  # finite, unmasked, in a dead row or column
    "nonfinite_fraction",  # w_i or C_i not finite
    "dead_rows",  # rows of the eq. 1 matrix in which no element changed
    "dead_cols",  # columns of the eq. 1 matrix in which no element changed
    "lag_count",  # elements valid in this and the previous epoch (0 for the round's first epoch)
    "lag_sum",  # sum C_i * C_{i-1} over those elements
    "lag_sq_prev",  # sum C_{i-1}^2 over those elements
    "lag_sq_cur",  # sum C_i^2 over those elements
)
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}

#: The lag-1 terms are also kept in this many element groups (for a jackknife of the ACF).
LAG_GROUPS = 16
#: Columns of a layer's lag-group array ``(epochs, LAG_GROUPS, len(LAG_GROUP_FIELDS))``.
LAG_GROUP_FIELDS: tuple[str, ...] = ("count", "sum", "sq_prev", "sq_cur")


@dataclass(frozen=True)
class CMESettings:
    """What to record. ``layers`` are ``fnmatch`` patterns of the analysis layers (full matrices).
    ``threshold`` must be > 0: eq. 2 divides by the weight."""

    layers: tuple[str, ...] = ("head.fc2.weight",)
    threshold: float = 1e-3
    max_size: int = 256
    biases: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.threshold) and 0 < self.threshold < 1):
            raise ValueError(
                f"the CME threshold must be in the range 0 < threshold < 1 (default 1e-3), got {self.threshold}: "
                "eq. 2 divides by the weight, so weights at or near 0 must be masked"
            )


@dataclass(frozen=True)
class EpochCME:
    """One client's CMEs for one round: ``stats[layer]`` is (epochs, len(STAT_FIELDS)) float64;
    ``matrices[layer]`` is (epochs, rows, cols) float32 with the kept ``rows``/``cols`` indices
    (NaN where an element is not valid); ``lag_groups[layer]`` is (epochs, LAG_GROUPS,
    len(LAG_GROUP_FIELDS)) float64: the lag-1 terms per element group (``LAG_GROUPS`` contiguous
    blocks of rows of the eq. 1 matrix, or of columns when it has fewer rows than groups)."""

    layers: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    stats: Mapping[str, np.ndarray]
    matrices: Mapping[str, np.ndarray]
    rows: Mapping[str, np.ndarray]
    cols: Mapping[str, np.ndarray]
    lag_groups: Mapping[str, np.ndarray] = field(default_factory=dict)


__all__ = ["FIELD", "LAG_GROUPS", "LAG_GROUP_FIELDS", "STAT_FIELDS", "CMESettings", "EpochCME"]
