"""``fedsim analyze RUN_DIR``: CME figures, ``summary.json`` and ``report.md`` for a finished run.

Writes into ``RUN_DIR/analysis/`` (or ``out``):

* ``curves.png``: every client's primary metric and loss over rounds;
* ``client<k>_cme.png``: per client, covariance maps (eq. 3) at three rounds, the ACF per layer
  (eq. 4 and normalised), and its learning curve (the paper's Figs. 4/5, one column per client);
* the task's own figures (:meth:`fedsim.clients.tasks.base.Task.analysis_figures`), if any;
* ``summary.json``: per client the saturation round, the ACF variation and label, the final
  metrics; plus the settings used;
* ``report.md``: a readable report embedding the figures.

A run recorded without ``--cme`` still gets curves, summary and report, which say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsim._logging import logger
from fedsim.analysis.cme import (
    ACF_STABILITY_THRESHOLD,
    SATURATION_PATIENCE,
    SIMILARITY_THRESHOLD,
    client_acf,
    round_maps,
    summarise_client,
)
from fedsim.analysis.curves import ClientCurvesDisplay, client_curves
from fedsim.analysis.figures import ClientCMEFigure, pick_rounds
from fedsim.cme.archive import CMEArchive, NoCMERecordsError
from fedsim.rundir import RunDir, atomic_write_bytes, finite_json

ANALYSIS_DIR = "analysis"


@dataclass(frozen=True)
class AnalysisSettings:
    """Thresholds of the saturation and characterisation rules (see :mod:`fedsim.analysis.cme`)."""

    layer: str | None = None  # None: the first archived matrix layer (the task's default)
    similarity_threshold: float = SIMILARITY_THRESHOLD
    patience: int = SATURATION_PATIENCE
    acf_threshold: float = ACF_STABILITY_THRESHOLD

    def __post_init__(self) -> None:
        if not -1 <= self.similarity_threshold <= 1:
            raise ValueError(f"similarity threshold must be in [-1, 1], got {self.similarity_threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not self.acf_threshold >= 0:
            raise ValueError(f"ACF threshold must be >= 0, got {self.acf_threshold}")


@dataclass(frozen=True)
class AnalysisResult:
    out_dir: Path
    summary: dict[str, Any]
    figures: list[Path]
    has_cme: bool


def analyze_run(run_dir: str | Path, out: str | Path | None = None, settings: AnalysisSettings | None = None) -> AnalysisResult:
    """Analyse a finished (or interrupted) run directory; see the module docstring."""
    import matplotlib.pyplot as plt

    from fedsim.clients.tasks import get_task
    from fedsim.config import ResolvedConfig

    settings = settings or AnalysisSettings()
    rd = RunDir(run_dir)
    cfg = ResolvedConfig.from_json_dict(rd.read_config())
    task = get_task(cfg.task)
    rows = rd.read_metrics()
    if not rows:
        raise FileNotFoundError(f"{rd.path} has no metrics (metrics.jsonl is missing or empty): nothing to analyse")
    out_dir = Path(out) if out is not None else rd.path / ANALYSIS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = task.primary_metric
    curves = client_curves(rows)
    figures: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append(path)

    save(ClientCurvesDisplay(curves, metric).plot(), "curves.png")

    try:
        archive: CMEArchive | None = CMEArchive(rd.path)
    except NoCMERecordsError as exc:
        archive = None
        logger.warning("%s", exc)

    last = {int(c["client"]): c for c in rows[-1]["clients"]}
    clients_out: list[dict[str, Any]] = []
    layer = settings.layer
    if archive is not None:
        for client in archive.clients:
            layer = layer or archive.matrix_layers(client)[0]
            if layer not in archive.matrix_layers(client):
                from fedsim.config import ConfigError

                raise ConfigError(
                    f"no full CME matrices of layer {layer!r} for client {client}; archived: "
                    f"{', '.join(archive.matrix_layers(client))} (record others with --cme-layers)"
                )
            s = summarise_client(archive, client, layer, settings.similarity_threshold, settings.patience, settings.acf_threshold)
            rounds, maps = round_maps(archive, client, layer)
            shown = pick_rounds(list(rounds), s.saturation_round)
            fig = ClientCMEFigure(
                s, [maps[list(rounds).index(r)] for r in shown], shown, client_acf(archive, client), curves, metric
            ).plot()
            save(fig, f"client{client}_cme.png")
            clients_out.append(_client_entry(asdict(s), last.get(client, {}), metric))
            logger.info("client %d: saturation %s, ACF variation %.3f -> %s", client, s.saturation_round, s.acf_variation, s.label)
    else:
        for client, model in zip(curves.clients, curves.models):
            clients_out.append(_client_entry({"client": client, "model": model}, last.get(client, {}), metric))

    for path in task.analysis_figures(rd.path, cfg, out_dir):
        figures.append(Path(path))

    summary = {
        "run_dir": str(rd.path),
        "task": cfg.task,
        "scenario": cfg.scenario,
        "rounds": len(rows),
        "primary_metric": metric,
        "cme": archive is not None,
        "settings": asdict(settings) | {"layer": layer, "cov_map_epoch": "last local epoch of each round"},
        "clients": clients_out,
        "global": rows[-1].get("global"),
    }
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(finite_json(summary), indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "report.md", render_report(summary, figures, out_dir).encode())
    return AnalysisResult(out_dir, summary, figures, archive is not None)


def _client_entry(base: dict[str, Any], last_row: dict[str, Any], metric: str) -> dict[str, Any]:
    entry = dict(base)
    entry["final_metrics"] = {k: v for k, v in last_row.items() if k.startswith(("train_", "test_"))}
    entry[f"final_test_{metric}"] = last_row.get(f"test_{metric}")
    return entry


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec) if isinstance(v, float) else str(v)


def render_report(summary: dict[str, Any], figures: list[Path], out_dir: Path) -> str:
    """Markdown report embedding the figures (paths relative to ``out_dir``)."""
    m = summary["primary_metric"]
    lines = [
        f"# fedsim analysis: {summary['task']}, scenario {summary['scenario']}, {summary['rounds']} rounds",
        "",
        f"Run directory: `{summary['run_dir']}`",
        "",
    ]
    if summary["cme"]:
        st = summary["settings"]
        lines += [
            f"CME layer `{st['layer']}`; covariance maps (eq. 3) from the {st['cov_map_epoch']}. "
            f"**Saturation round**: the first round from which the next {st['patience']} maps are each at least "
            f"{st['similarity_threshold']}-similar (Pearson correlation) to their predecessor. **ACF variation**: "
            f"mean absolute round-to-round change of the normalised per-layer ACF (eq. 4); <= {st['acf_threshold']} "
            "reads as *dominant* (stable ACF, needs little learning), above as *still learning*.",
            "",
            f"| client | model | saturation round | ACF variation | label | final test {m} |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in summary["clients"]:
            sat = c["saturation_round"] if c["saturation_round"] is not None else "not reached"
            lines.append(
                f"| {c['client']} | {c['model']} | {sat} | {_fmt(c['acf_variation'])} | {c['label']} | {_fmt(c.get(f'final_test_{m}'))} |"
            )
    else:
        lines += [
            "**This run has no CME records** (it was run without `--cme`), so there are no covariance maps, "
            "ACF plots, saturation rounds or client labels. Re-run with `fedsim run ... --cme` to record them.",
            "",
            f"| client | model | final test {m} |",
            "| --- | --- | --- |",
        ]
        for c in summary["clients"]:
            lines.append(f"| {c['client']} | {c['model']} | {_fmt(c.get(f'final_test_{m}'))} |")
    if summary.get("global"):
        lines += ["", "Global model on the held-out test set (last round): "
                  + ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in summary["global"].items())]  # fmt: skip
    lines += ["", "## Figures", ""]
    for f in figures:
        rel = f.relative_to(out_dir) if f.is_relative_to(out_dir) else f
        lines += [f"### {f.stem}", "", f"![{f.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines) + "\n"
