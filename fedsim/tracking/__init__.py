"""Experiment tracking: every round of a run, besides ``metrics.jsonl``, in TensorBoard or MLflow.

A tracker is a listener of the server's :class:`~fedsim.server.recorder.RoundRecorder`: it gets
each ``metrics.jsonl`` line as it is written and logs the scalars derived from it (per-client and
global metrics per round, per-epoch train metrics, the round's wall time, CME norms when
recorded; :func:`round_scalars`), so what a tracker shows is exactly what ``metrics.jsonl``
holds. Trackers are registered by name (``--tracker``; :data:`TRACKERS`); training code knows
nothing about them.

* ``tensorboard`` (default): PyTorch's ``SummaryWriter`` into ``RUN_DIR/tb/``;
* ``mlflow`` (optional extra ``fedsim[mlflow]``, mlflow-skinny): a local SQLite store
  ``RUN_DIR/mlflow.db`` by default, or the ``--tracking-uri`` given;
* ``none``: ``metrics.jsonl`` only.
"""

from __future__ import annotations

from fedsim.tracking import backends as _backends  # noqa: F401  (registers the trackers)
from fedsim.tracking.base import (
    TRACKERS,
    Scalar,
    Tracker,
    TrackerSpec,
    TrackingListener,
    cme_scalars,
    epoch_scalars,
    hparams,
    open_tracking,
    round_scalars,
)

__all__ = [
    "TRACKERS",
    "Scalar",
    "Tracker",
    "TrackerSpec",
    "TrackingListener",
    "cme_scalars",
    "epoch_scalars",
    "hparams",
    "open_tracking",
    "round_scalars",
]
