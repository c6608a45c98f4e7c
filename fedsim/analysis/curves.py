"""Per-client learning curves over rounds, read from a run's ``metrics.jsonl``.

``client_curves`` is a pure function returning arrays; :class:`ClientCurvesDisplay` draws them
(matplotlib is imported lazily; ``plot`` returns the figure and never calls ``plt.show``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.server.rundir import RunDir

METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


@dataclass(frozen=True)
class ClientCurves:
    """``values[metric]`` has shape (num_clients, num_rounds); NaN where a client did not report."""

    rounds: np.ndarray
    clients: tuple[int, ...]
    models: tuple[str, ...]
    values: Mapping[str, np.ndarray]


def client_curves(rows: Sequence[Mapping[str, Any]]) -> ClientCurves:
    """Arrange ``metrics.jsonl`` rows (one per round) into per-client arrays."""
    if not rows:
        raise ValueError("no rounds to plot: metrics.jsonl is empty or missing")
    rounds = np.array([int(r["round"]) for r in rows])
    models = {int(c["client"]): str(c["model"]) for r in rows for c in r["clients"]}
    clients = tuple(sorted(models))
    pos = {c: i for i, c in enumerate(clients)}
    values = {m: np.full((len(clients), len(rows)), np.nan) for m in METRICS}
    for j, r in enumerate(rows):
        for c in r["clients"]:
            for m in METRICS:
                if m in c:
                    values[m][pos[int(c["client"])], j] = float(c[m])
    return ClientCurves(rounds, clients, tuple(models[c] for c in clients), values)


def load_client_curves(run_dir: str | Path) -> ClientCurves:
    return client_curves(RunDir(run_dir).read_metrics())


class ClientCurvesDisplay:
    """Accuracy and loss per client over rounds (train dashed, local test solid)."""

    def __init__(self, curves: ClientCurves) -> None:
        self.curves = curves

    def plot(self, axes: Sequence[Any] | None = None) -> Any:
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
        else:
            fig = axes[0].figure
        c = self.curves
        for ax, kind in zip(axes, ("accuracy", "loss")):
            for i, (client, model) in enumerate(zip(c.clients, c.models)):
                color = f"C{i}"
                ax.plot(c.rounds, c.values[f"test_{kind}"][i], "-o", color=color, label=f"client {client} ({model}) test")
                ax.plot(c.rounds, c.values[f"train_{kind}"][i], "--", color=color, alpha=0.7, label=f"client {client} train")
            ax.set_xlabel("round")
            ax.set_ylabel(kind)
            ax.set_xticks(c.rounds)
        axes[0].legend(fontsize=7)
        return fig
