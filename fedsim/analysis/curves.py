"""Per-client learning curves over rounds, read from a run's ``metrics.jsonl``.

``client_curves`` is a pure function returning arrays; :class:`ClientCurvesDisplay` draws them
with seaborn (long-form lines: colour = client, dashes = train / local test; matplotlib and
seaborn are imported lazily; ``plot`` returns the figure, never calls ``plt.show`` and leaves
matplotlib's global style alone).
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
    """A metric (default accuracy) and the loss per client over rounds (local test solid with
    dots, train dashed; a round a client did not report is a gap). ``clients`` restricts the plot
    to some clients (default: all)."""

    def __init__(self, curves: ClientCurves, metric: str = "accuracy", clients: Sequence[int] | None = None) -> None:
        self.curves = curves
        self.metric = metric
        self.clients = tuple(curves.clients if clients is None else clients)

    def long_form(self, kind: str) -> dict[str, list[Any]]:
        """The curves of ``kind`` (a metric or ``loss``) as long-form columns for seaborn: one row
        per client, split and round with a finite value; ``segment`` numbers each unbroken run of
        rounds, so a missing round stays a gap."""
        c = self.curves
        data: dict[str, list[Any]] = {"round": [], kind: [], "client": [], "split": [], "segment": []}
        segment = 0
        for i, client in enumerate(c.clients):
            if client not in self.clients:
                continue
            for split in ("test", "train"):
                values = c.values.get(f"{split}_{kind}")
                if values is None:
                    continue
                previous_finite = False
                for r, v in zip(c.rounds, values[i], strict=True):
                    if not np.isfinite(v):
                        previous_finite = False
                        continue
                    segment += 0 if previous_finite else 1
                    previous_finite = True
                    data["round"].append(int(r))
                    data[kind].append(float(v))
                    data["client"].append(f"{c.label(i)} ({c.models[i]})")
                    data["split"].append(split)
                    data["segment"].append(segment)
        return data

    def plot(self, axes: Sequence[Any] | None = None) -> Any:
        import matplotlib.pyplot as plt
        import seaborn as sns

        c = self.curves
        shown = [i for i, client in enumerate(c.clients) if client in self.clients]
        palette = dict(zip((f"{c.label(i)} ({c.models[i]})" for i in shown), sns.color_palette("colorblind", len(c.clients)), strict=False))
        with sns.axes_style("whitegrid"):
            if axes is None:
                fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
            else:
                fig = axes[0].figure
            for k, (ax, kind) in enumerate(zip(axes, (self.metric, "loss"), strict=False)):
                data = self.long_form(kind)
                if data["round"]:
                    sns.lineplot(
                        data=data, x="round", y=kind, hue="client", hue_order=list(palette), palette=palette,
                        style="split", style_order=["test", "train"], dashes={"test": "", "train": (4, 2)},
                        markers={"test": "o", "train": "."}, units="segment", estimator=None, legend=k == 0, ax=ax,
                    )  # fmt: skip
                ax.set_xlabel("round")
                ax.set_ylabel(kind)
                ax.set_xticks(c.rounds)
            if axes[0].get_legend() is not None:
                axes[0].legend(fontsize=7)
        return fig
