"""``fedsim analyze RUN_DIR``: CME figures, ``summary.json`` and ``report.md`` for a finished run.

Writes into ``RUN_DIR/analysis/`` (or ``out``):

* ``curves.png``: every client's primary metric and loss over rounds;
* ``client<k>_cme.png``: per client, covariance maps (eq. 3) at three rounds on one colour scale
  with their diagonals apart, the statistics behind its verdict per round with their null bands,
  the normalised ACF per layer and its learning curve (the paper's Figs. 4/5, one column per
  client, plus the numbers), titled with the verdict;
* the task's own figures (:meth:`fedsim.clients.tasks.base.Task.figure_arrays`, drawn by
  :mod:`fedsim.analysis.task_figures`), if any;
* ``summary.json``: per client the verdict (one of :data:`~fedsim.analysis.cme.VERDICTS`), the
  statistic behind it, its null band and a one-line reason, the saturation round, the per-round
  statistics (:class:`~fedsim.analysis.cme.ClientStatistics`) and the final metrics; plus the
  settings used;
* ``report.md``: a readable report embedding the figures.

A run recorded without ``--cme`` still gets curves, summary and report, which say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim._logging import logger
from fedsim.analysis.cme import (
    HEAD_PATTERNS,
    MIN_EPOCHS,
    MIN_ROUNDS,
    NULL_COVERAGE,
    NULL_SAMPLES,
    SATURATION_PATIENCE,
    SIMILARITY_THRESHOLD,
    ClientStatistics,
    Verdict,
    client_statistics,
    decide_verdicts,
)
from fedsim.analysis.curves import ClientCurvesDisplay, client_curves
from fedsim.analysis.figures import ClientCMEFigure, pick_rounds
from fedsim.cme.archive import CMEArchive, NoCMERecordsError
from fedsim.rundir import RunDir, atomic_write_bytes, finite_json

ANALYSIS_DIR = "analysis"


@dataclass(frozen=True)
class AnalysisSettings:
    """Settings of the statistics, null bands and saturation rule (see :mod:`fedsim.analysis.cme`)."""

    layer: str | None = None  # None: the first archived matrix layer (the task's default)
    similarity_threshold: float = SIMILARITY_THRESHOLD
    patience: int = SATURATION_PATIENCE
    null_samples: int = NULL_SAMPLES
    coverage: float = NULL_COVERAGE
    seed: int = 0
    head_patterns: tuple[str, ...] = HEAD_PATTERNS

    def __post_init__(self) -> None:
        if not -1 <= self.similarity_threshold <= 1:
            raise ValueError(f"similarity threshold must be in [-1, 1], got {self.similarity_threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.null_samples < 20:
            raise ValueError(f"null samples must be >= 20 (a band needs a distribution), got {self.null_samples}")
        if not 0 < self.coverage < 1:
            raise ValueError(f"null band coverage must be in (0, 1), e.g. 0.9 for the 5-95 % band, got {self.coverage}")


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
        all_stats: list[ClientStatistics] = []
        for client in archive.clients:
            layer = layer or archive.matrix_layers(client)[0]
            if layer not in archive.matrix_layers(client):
                from fedsim.config import ConfigError

                raise ConfigError(
                    f"no full CME matrices of layer {layer!r} for client {client}; archived: "
                    f"{', '.join(archive.matrix_layers(client))} (record others with --cme-layers)"
                )
            all_stats.append(
                client_statistics(
                    archive,
                    client,
                    layer,
                    settings.head_patterns,
                    settings.similarity_threshold,
                    settings.patience,
                    settings.null_samples,
                    settings.coverage,
                    settings.seed,
                )
            )
        verdicts = decide_verdicts(all_stats, settings.coverage, rows)
        for s in all_stats:
            v = verdicts[s.client]
            shown = pick_rounds([int(r) for r in s.rounds], s.saturation_round)
            first = archive.read(s.client, int(s.rounds[0]))
            fig = ClientCMEFigure(
                s, v, shown, curves, metric, neurons=first.rows.get(s.layer), similarity_threshold=settings.similarity_threshold
            ).plot()
            save(fig, f"client{s.client}_cme.png")
            clients_out.append(_client_entry(_cme_entry(s, v), last.get(s.client, {}), metric))
            logger.info("client %d: %s (%s)", s.client, v.verdict, v.reason)
    else:
        for client, model in zip(curves.clients, curves.models, strict=True):
            clients_out.append(_client_entry({"client": client, "model": model}, last.get(client, {}), metric))

    from fedsim.analysis.task_figures import task_figure_displays

    for name, display in task_figure_displays(task, rd.path, cfg):  # the task's arrays, drawn by display classes
        save(display.plot(), name)

    summary = {
        "run_dir": str(rd.path),
        "task": cfg.task,
        "scenario": cfg.scenario,
        "rounds": len(rows),
        "primary_metric": metric,
        "cme": archive is not None,
        "settings": asdict(settings)
        | {"layer": layer, "cov_map_epoch": "last local epoch of each round", "min_rounds": MIN_ROUNDS, "min_epochs": MIN_EPOCHS},
        "clients": clients_out,
        "global": rows[-1].get("global"),
    }
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(finite_json(summary), indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "report.md", render_report(summary, figures, out_dir).encode())
    return AnalysisResult(out_dir, summary, figures, archive is not None)


def _cme_entry(s: ClientStatistics, v: Verdict) -> dict[str, Any]:
    """A client's ``summary.json`` entry: the verdict first, then the numbers behind it."""
    return {
        "client": s.client,
        "model": s.model,
        "verdict": v.verdict,
        "reason": v.reason,
        "statistic": v.statistic,
        "value": v.value,
        "null_band": list(v.band) if v.band is not None else None,
        "layer": s.layer,
        "rounds": [int(r) for r in s.rounds],
        "saturation_round": s.saturation_round,
        "similarities": [float(x) for x in s.similarity[1:]],
        "acf_variation_head": s.acf_variation_head,
        "acf_variation": s.acf_variation_all,
        "mean_masked_fraction": float(np.nanmean(s.masked_fraction)),
        "mean_dead_fraction": float(np.nanmean(s.dead_fraction)),
        "max_nonfinite_fraction": float(np.nanmax(s.nonfinite_fraction)),
        "statistics": s.to_json(),
    }


def _client_entry(base: dict[str, Any], last_row: dict[str, Any], metric: str) -> dict[str, Any]:
    entry = dict(base)
    if "site" in last_row:  # a --partition sites run: the client's site folder
        entry["site"] = last_row["site"]
    entry["final_metrics"] = {k: v for k, v in last_row.items() if k.startswith(("train_", "test_"))}
    entry[f"final_test_{metric}"] = last_row.get(f"test_{metric}")
    return entry


def _who(c: dict[str, Any]) -> str:
    """A client's table cell: its number, and its site in a multi-site run."""
    return f"{c['client']} ({c['site']})" if "site" in c else str(c["client"])


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
        lo, hi = (1 - st["coverage"]) / 2 * 100, (1 + st["coverage"]) / 2 * 100
        lines += [
            (
                f"CME layer `{st['layer']}`; covariance maps (eq. 3, pairwise over valid entries: masked weights, dead units "
                f"and non-finite values left out) from the {st['cov_map_epoch']}. Every client gets one verdict: "
                "**diverged** (non-finite or exploding weights/CMEs), **undetermined** (too little data; the reason says what is "
                f"missing: >= {st['min_rounds']} rounds with >= {st['min_epochs']} local epochs are needed), **weak** (among the "
                "clients of its model, its update norm (head CME magnitude when the run has no update norms) is the lowest, or its "
                "train loss on its own labels the highest, more often than chance allows for alike clients (the label test weighs "
                "later rounds more), and it is further from the others than healthy clients are apart; or its head did not change "
                "at all), **learning** (its head ACF varies between rounds more than sampling noise explains) or "
                "**dominant** (a stable head ACF); docs/cme-validation.md measures how often each is right. "
                f"Null bands are the {lo:g}-{hi:g} % quantiles of {st['null_samples']} seeded draws computed on this run "
                "(ACF: jackknife noise of the ACF if it did not change; map similarity: the next map with its neurons shuffled; "
                "weak: the rank sum's exact distribution for alike clients). "
                f"**Saturation round**: the first round from which the next {st['patience']} maps are each similar (Pearson, off the "
                "diagonal) to their predecessor above the permutation null band and at least at the noise ceiling (two bootstrap "
                "re-estimates of one map)" + (f" and at least {st['similarity_threshold']:g}." if st["similarity_threshold"] > -1 else ".")
            ),
            "",
            f"| client | model | verdict | statistic | value | null band | reason | saturation round | share in dead units | final test {m} |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in summary["clients"]:
            sat = c["saturation_round"] if c["saturation_round"] is not None else "not reached"
            nb = c.get("null_band")
            band_txt = f"[{_fmt(nb[0])}, {_fmt(nb[1])}]" if nb else "-"
            lines.append(
                f"| {_who(c)} | {c['model']} | **{c['verdict']}** | {c['statistic']} | {_fmt(c['value'])} | {band_txt} | "
                f"{c['reason']} | {sat} | {_fmt(c['mean_dead_fraction'], '.1%')} | {_fmt(c.get(f'final_test_{m}'))} |"
            )
    else:
        lines += [
            (
                "**This run has no CME records** (it was run without `--cme`), so there are no covariance maps, "
                "ACF plots, saturation rounds or client verdicts. Re-run with `fedsim run ... --cme` to record them."
            ),
            "",
            f"| client | model | final test {m} |",
            "| --- | --- | --- |",
        ]
        for c in summary["clients"]:
            lines.append(f"| {_who(c)} | {c['model']} | {_fmt(c.get(f'final_test_{m}'))} |")
    if summary.get("global"):
        lines += ["", "Global model on the held-out test set (last round): "
                  + ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in summary["global"].items())]  # fmt: skip
    lines += ["", "## Figures", ""]
    for f in figures:
        rel = f.relative_to(out_dir) if f.is_relative_to(out_dir) else f
        lines += [f"### {f.stem}", "", f"![{f.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines) + "\n"
