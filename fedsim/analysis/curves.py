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

from fedsim.rundir import RunDir


def _metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every ``train_*`` / ``test_*`` numeric field any client reported, in first-seen order."""
    keys: dict[str, None] = {}
    for r in rows:
        for c in r["clients"]:
            for k, v in c.items():
                if k.startswith(("train_", "test_")) and isinstance(v, int | float):
                    keys.setdefault(k)
    return list(keys)


@dataclass(frozen=True)
class ClientCurves:
    """``values[metric]`` has shape (num_clients, num_rounds); NaN where a client did not report."""

    rounds: np.ndarray
    clients: tuple[int, ...]
    models: tuple[str, ...]
    values: Mapping[str, np.ndarray]
    sites: tuple[str, ...] = ()  # each client's site (a --partition sites run), else ()

    def label(self, i: int) -> str:
        """``client k`` or, in a multi-site run, ``client k [site]``."""
        return f"client {self.clients[i]} [{self.sites[i]}]" if self.sites else f"client {self.clients[i]}"


def client_curves(rows: Sequence[Mapping[str, Any]]) -> ClientCurves:
    """Arrange ``metrics.jsonl`` rows (one per round) into per-client arrays."""
    if not rows:
        raise ValueError("no rounds to plot: metrics.jsonl is empty or missing")
    rounds = np.array([int(r["round"]) for r in rows])
    models = {int(c["client"]): str(c["model"]) for r in rows for c in r["clients"]}
    sites = {int(c["client"]): str(c["site"]) for r in rows for c in r["clients"] if "site" in c}
    clients = tuple(sorted(models))
    pos = {c: i for i, c in enumerate(clients)}
    metrics = _metric_keys(rows)
    values = {m: np.full((len(clients), len(rows)), np.nan) for m in metrics}
    for j, r in enumerate(rows):
        for c in r["clients"]:
            for m in metrics:
                if c.get(m) is not None:  # null = undefined metric (stays NaN)
                    values[m][pos[int(c["client"])], j] = float(c[m])
    site_names = tuple(sites[c] for c in clients) if len(sites) == len(clients) else ()
    return ClientCurves(rounds, clients, tuple(models[c] for c in clients), values, site_names)


def load_client_curves(run_dir: str | Path) -> ClientCurves:
    return client_curves(RunDir(run_dir).read_metrics())


class ClientCurvesDisplay:
    """A metric (default accuracy) and the loss per client over rounds (train dashed, local test
    solid). ``clients`` restricts the plot to some clients (default: all)."""

    def __init__(self, curves: ClientCurves, metric: str = "accuracy", clients: Sequence[int] | None = None) -> None:
        self.curves = curves
        self.metric = metric
        self.clients = tuple(curves.clients if clients is None else clients)

    def plot(self, axes: Sequence[Any] | None = None) -> Any:
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
        else:
            fig = axes[0].figure
        c = self.curves
        nan = np.full(len(c.rounds), np.nan)
        for ax, kind in zip(axes, (self.metric, "loss"), strict=False):
            for i, (client, model) in enumerate(zip(c.clients, c.models, strict=True)):
                if client not in self.clients:
                    continue
                color = f"C{i}"
                test, train = c.values.get(f"test_{kind}"), c.values.get(f"train_{kind}")
                ax.plot(c.rounds, nan if test is None else test[i], "-o", color=color, label=f"{c.label(i)} ({model}) test")
                ax.plot(c.rounds, nan if train is None else train[i], "--", color=color, alpha=0.7, label=f"{c.label(i)} train")
            ax.set_xlabel("round")
            ax.set_ylabel(kind)
            ax.set_xticks(c.rounds)
        axes[0].legend(fontsize=7)
        return fig
