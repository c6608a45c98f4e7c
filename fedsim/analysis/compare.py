"""``fedsim compare``: a metric vs round across runs, and the final metrics per client in the shape
of the CME paper's Table 2.

Runs are grouped into **conditions**: runs whose configs are equal except for the seed (and
settings that do not change results: output folder, tracker, timeouts, checkpoints, CME recording) are repeats of
one condition, and each curve is their mean with a 95 % t-interval over seeds
(``mean +- t(0.975, n-1) * sd / sqrt(n)``; none with one run). A condition is labelled by its
``--by`` value (strategy or scenario) plus any other setting that differs between conditions;
with ``--by model`` every client model of a condition is its own curve.

Pure functions return arrays and tables (:func:`compare_curves`, :func:`final_table`);
:class:`CompareDisplay` draws the curves with seaborn (imported lazily, ``plot(ax=None)`` returns
the figure); :func:`compare_runs` writes ``compare.png`` and ``compare.md``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import ConfigError
from fedsim.rundir import RunDir, atomic_write_bytes

BY_CHOICES = ("strategy", "scenario", "model")
#: Settings that do not make a different condition: the seed (repeats) and what does not change results
#: (CME recording only observes training: a tiny run gives the same metrics.jsonl with and without --cme).
NOT_CONDITION = (
    "seed", "out", "tracker", "tracking_uri", "node_timeout", "round_timeout", "checkpoint_every", "client_models",
    "scenario_description", "environment", "cme", "cme_layers", "cme_threshold", "cme_max_size", "cme_biases",
)  # fmt: skip
#: Series names: the mean over a condition's clients, and the global model (held-out global test set).
CLIENTS, GLOBAL = "clients (mean)", "global model"


@dataclass(frozen=True)
class RunData:
    """One run directory: its ``config.json`` and ``metrics.jsonl`` lines."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]


def load_run(path: str | Path) -> RunData:
    """Read a run directory (``FileNotFoundError`` naming it if it is none, or has no rounds)."""
    rd = RunDir(path).open_existing()
    rows = rd.read_metrics()
    if not rows:
        raise FileNotFoundError(f"{rd.path} has no rounds in metrics.jsonl; nothing to compare")
    return RunData(rd.path, rd.read_config(), rows)


def metric_field(metric: str) -> str:
    """``accuracy`` -> ``test_accuracy`` (the local test splits); ``train_loss`` / ``test_mre`` as given."""
    return metric if metric.startswith(("train_", "test_")) else f"test_{metric}"


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by integrating its
    density (trapezoid rule on a fine grid) and bisecting; accurate to ~1e-4 for df >= 1."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 20_001)
        y = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``values`` (runs x rounds, NaN = missing): mean and the ``level`` t-interval of
    the mean over the finite entries; the interval is NaN where fewer than two runs have a value."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(values, axis=0) / np.maximum(n, 1), np.nan)
        dev = np.where(finite, values - mean, 0.0)
        sd = np.sqrt((dev**2).sum(axis=0) / np.maximum(n - 1, 1))
    half = np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        if n[j] >= 2:
            half[j] = t_quantile(0.5 + level / 2, int(n[j]) - 1) * sd[j] / math.sqrt(n[j])
    return mean, mean - half, mean + half


def _condition(config: Mapping[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True) for k, v in config.items() if k not in NOT_CONDITION}


def group_conditions(runs: Sequence[RunData], by: str) -> list[tuple[str, list[RunData]]]:
    """Runs grouped into conditions (equal configs up to :data:`NOT_CONDITION`), in first-seen
    order, each with its label: the ``by`` value (strategy / scenario; nothing for ``model``) and
    every other setting that differs between the conditions."""
    if by not in BY_CHOICES:
        raise ConfigError(f"unknown --by {by!r}; valid choices: {', '.join(BY_CHOICES)}")
    keys: list[dict[str, str]] = []
    groups: list[list[RunData]] = []
    for run in runs:
        cond = _condition(run.config)
        if cond in keys:
            groups[keys.index(cond)].append(run)
        else:
            keys.append(cond)
            groups.append([run])
    names = sorted({k for c in keys for k in c})
    differ = [k for k in names if len({c.get(k) for c in keys}) > 1 and k != by]
    out = []
    for group in groups:
        cfg = group[0].config
        parts = [f"scenario {cfg.get('scenario')}" if by == "scenario" else str(cfg.get("strategy"))] if by != "model" else []
        parts += [f"{k}={_short(cfg.get(k))}" for k in differ]
        out.append((", ".join(parts) or str(cfg.get("strategy")), group))
    return out


def _short(v: Any) -> str:
    if isinstance(v, list):
        return ",".join("=".join(map(str, x)) if isinstance(x, list) else str(x) for x in v)
    return str(v)


def _rounds(runs: Sequence[RunData]) -> np.ndarray:
    return np.array(sorted({int(r["round"]) for run in runs for r in run.rows}))


def run_series(run: RunData, field: str, by: str, rounds: np.ndarray) -> dict[str, np.ndarray]:
    """One run's curves on ``rounds`` (NaN where a round is missing or the metric undefined):
    the mean over its clients (``by`` strategy / scenario) or over the clients of each model
    (``by`` model), and the global model's when it was evaluated (test metrics only)."""
    pos = {int(r): i for i, r in enumerate(rounds)}
    series: dict[str, np.ndarray] = {}
    for row in run.rows:
        j = pos[int(row["round"])]
        per: dict[str, list[float]] = {}
        for c in row.get("clients", []):
            v = c.get(field)
            if isinstance(v, int | float) and math.isfinite(v):
                per.setdefault(str(c["model"]) if by == "model" else CLIENTS, []).append(float(v))
        glob = (row.get("global") or {}).get(field.removeprefix("test_")) if field.startswith("test_") else None
        if isinstance(glob, int | float) and math.isfinite(glob):
            per[GLOBAL] = [float(glob)]
        for name, vals in per.items():
            series.setdefault(name, np.full(len(rounds), np.nan))[j] = float(np.mean(vals))
    return series


@dataclass(frozen=True)
class Curve:
    """One line of the figure: ``mean`` over a condition's runs per round, and its 95 % interval."""

    label: str
    series: str
    rounds: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    runs: int


def compare_curves(runs: Sequence[RunData], field: str, by: str) -> list[Curve]:
    """Every condition's curves (see :func:`run_series`), averaged over its runs (seeds)."""
    rounds = _rounds(runs)
    curves = []
    for label, group in group_conditions(runs, by):
        per_run = [run_series(run, field, by, rounds) for run in group]
        names = list(dict.fromkeys(n for s in per_run for n in s))
        for name in names:
            stack = np.stack([s.get(name, np.full(len(rounds), np.nan)) for s in per_run])
            mean, low, high = mean_interval(stack)
            if by == "model":
                curve_label, series = (name if not label else f"{name} ({label})"), (GLOBAL if name == GLOBAL else CLIENTS)
            else:
                curve_label, series = label, name
            curves.append(Curve(curve_label, series, rounds, mean, low, high, len(group)))
    return curves


@dataclass(frozen=True)
class TableRow:
    """One condition of the final-metrics table: per client (model, mean, interval half-width) of
    the last round's metric over the runs, and the global model's, if evaluated."""

    label: str
    runs: int
    data: str
    models: str
    clients: tuple[tuple[str, float, float], ...]
    global_model: tuple[float, float] | None


def final_table(runs: Sequence[RunData], field: str, by: str) -> list[TableRow]:
    """The CME paper's Table 2 shape: one row per condition, one column per client (the final
    round's metric, mean and 95 % half-width over seeds), plus the global model."""
    out = []
    for label, group in group_conditions(runs, by):
        last = [run.rows[-1] for run in group]
        n_clients = max(len(r.get("clients", [])) for r in last)
        cells = []
        for k in range(n_clients):
            vals = np.array([[_client_value(r, k, field)] for r in last])
            mean, low, _ = mean_interval(vals)
            model = next((str(c["model"]) for r in last for c in r.get("clients", []) if int(c["client"]) == k), "")
            cells.append((model, float(mean[0]), float(mean[0] - low[0])))
        gvals = np.array([[_global_value(r, field)] for r in last])
        gmean, glow, _ = mean_interval(gvals)
        glob = None if not np.isfinite(gmean[0]) else (float(gmean[0]), float(gmean[0] - glow[0]))
        cfg = group[0].config
        partition = str(cfg.get("partition", ""))
        data = "same" if partition == "identical" else f"different ({partition})"
        models = list(cfg.get("client_models") or [m for m, _, _ in cells])
        model_text = f"same ({models[0]})" if len(set(models)) == 1 else f"different ({', '.join(dict.fromkeys(models))})"
        out.append(TableRow(label or str(cfg.get("strategy")), len(group), data, model_text, tuple(cells), glob))
    return out


def _client_value(row: Mapping[str, Any], k: int, field: str) -> float:
    v = next((c.get(field) for c in row.get("clients", []) if int(c["client"]) == k), None)
    return float(v) if isinstance(v, int | float) else math.nan


def _global_value(row: Mapping[str, Any], field: str) -> float:
    if not field.startswith("test_"):
        return math.nan
    v = (row.get("global") or {}).get(field.removeprefix("test_"))
    return float(v) if isinstance(v, int | float) else math.nan


def _cell(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.3f}" if not math.isfinite(half) else f"{mean:.3f} ± {half:.3f}"


def table_markdown(rows: Sequence[TableRow], field: str) -> str:
    """:func:`final_table` as a markdown table (values: mean ± 95 % half-width over the runs)."""
    n = max(len(r.clients) for r in rows)
    head = ["condition", "runs", "data at clients", "models at clients", *[f"client {k}" for k in range(n)], "global model"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{_cell(m, h)} ({model})" if model else "-" for model, m, h in r.clients]
        cells += ["-"] * (n - len(cells))
        glob = _cell(*r.global_model) if r.global_model else "-"
        lines.append("| " + " | ".join([r.label, str(r.runs), r.data, r.models, *cells, glob]) + " |")
    note = f"Final-round `{field}` per client (its local test split) and of the global model (held-out global test set); mean ± 95 % t-interval half-width over the runs of a condition."
    return "\n".join([*lines, "", note]) + "\n"


class CompareDisplay:
    """The curves of :func:`compare_curves`: colour = condition (or model), line style = series
    (clients' mean solid, global model dashed), shaded 95 % interval over seeds."""

    def __init__(self, curves: Sequence[Curve], field: str, title: str = "") -> None:
        self.curves = list(curves)
        self.field = field
        self.title = title

    def plot(self, ax: Any = None) -> Any:
        import matplotlib.pyplot as plt
        import seaborn as sns

        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
        else:
            fig = ax.figure
        labels = list(dict.fromkeys(c.label for c in self.curves))
        palette = dict(zip(labels, sns.color_palette("colorblind", len(labels)), strict=True))
        points = [
            (int(r), float(m), c.label, c.series) for c in self.curves for r, m in zip(c.rounds, c.mean, strict=True) if np.isfinite(m)
        ]
        rounds, values, runs, series = (list(col) for col in zip(*points, strict=True))
        styles = [s for s in (CLIENTS, GLOBAL) if s in set(series)]
        sns.lineplot(
            x=rounds, y=values, hue=runs, style=series, style_order=styles, palette=palette,
            markers=True, dashes={CLIENTS: "", GLOBAL: (4, 2)}, errorbar=None, ax=ax,
        )  # fmt: skip
        for c in self.curves:
            ok = np.isfinite(c.low) & np.isfinite(c.high)
            if ok.any():
                ax.fill_between(c.rounds[ok], c.low[ok], c.high[ok], color=palette[c.label], alpha=0.15, linewidth=0)
        ax.set_xticks(sorted({int(r) for c in self.curves for r in c.rounds}))
        ax.set_xlabel("round")
        ax.set_ylabel(self.field)
        if self.title:
            ax.set_title(self.title)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        return fig


@dataclass(frozen=True)
class CompareResult:
    """What ``fedsim compare`` wrote, and the table's markdown."""

    metric: str
    by: str
    figure: Path
    table: Path
    markdown: str
    curves: list[Curve]
    rows: list[TableRow]


def compare_runs(paths: Sequence[str | Path], out: str | Path, metric: str | None = None, by: str = "strategy") -> CompareResult:
    """``fedsim compare``: read the runs, write ``OUT/compare.png`` (the metric vs round) and
    ``OUT/compare.md`` (final metrics per client, Table 2 shape). ``metric`` defaults to the task's
    primary metric on the local test splits; all runs must be of one task."""
    if by not in BY_CHOICES:
        raise ConfigError(f"unknown --by {by!r}; valid choices: {', '.join(BY_CHOICES)}")
    runs = [load_run(p) for p in paths]
    tasks = sorted({str(r.config.get("task")) for r in runs})
    if len(tasks) > 1:
        raise ConfigError(f"the runs are of different tasks ({', '.join(tasks)}); compare runs of one task")
    if metric is None:
        from fedsim.clients.tasks import get_task

        metric = get_task(tasks[0]).primary_metric
    field = metric_field(metric)
    known = sorted({k for r in runs for row in r.rows for c in row.get("clients", []) for k in c if k.startswith(("train_", "test_"))})
    if field not in known:
        raise ConfigError(f"no run reports {field!r}; metrics in these runs: {', '.join(known)}")
    curves = compare_curves(runs, field, by)
    rows = final_table(runs, field, by)
    md = table_markdown(rows, field)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    fig = CompareDisplay(curves, field, title=f"{tasks[0]}: {field} by {by} ({len(runs)} runs)").plot()
    figure = out_dir / "compare.png"
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    plt.close(fig)
    table = out_dir / "compare.md"
    atomic_write_bytes(table, md.encode())
    return CompareResult(metric, by, figure, table, md, curves, rows)


__all__ = [
    "BY_CHOICES",
    "CompareDisplay",
    "CompareResult",
    "Curve",
    "RunData",
    "TableRow",
    "compare_curves",
    "compare_runs",
    "final_table",
    "group_conditions",
    "load_run",
    "mean_interval",
    "metric_field",
    "run_series",
    "t_quantile",
]
