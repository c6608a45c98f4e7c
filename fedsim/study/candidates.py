"""Candidate CME statistics (and verdicts) per client, read from a run directory's CME archive.

The study scores every client with each candidate and reports how well it separates faulty from
healthy clients (:func:`fedsim.study.stats.auroc`). The statistics are those of
:mod:`fedsim.analysis.cme`, read through whatever it offers (imported lazily, so the study follows
the analysis as it changes):

* with ``client_statistics(archive, client, layer) -> ClientStatistics`` (the statistics behind
  ``fedsim analyze``'s verdicts): every number of its ``to_json()`` becomes ``cme_<name>`` (per-round
  lists are averaged over the rounds with a value; null bands are left out), plus
  ``cme_saturation_round`` (``rounds + 1`` when never) and, with ``decide_verdicts``, the verdict
  ``cme_verdict`` and the statistic behind it ``cme_verdict_statistic`` (text columns);
* otherwise built-in fallbacks from the older public functions: ``acf_variation`` (all layers),
  ``acf_variation_head``, ``acf_mean_head``, ``map_similarity``, ``saturation_round`` and the
  archived per-layer statistics of the analysis layer averaged over rounds and epochs.

Every value is NaN when it cannot be computed (e.g. for a diverged client).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedsim.cme import CMEArchive

log = logging.getLogger("fedsim.study")

#: Archived per-layer statistic fields averaged by the fallbacks (those the archive has).
STAT_CANDIDATES = ("l2", "mean_abs", "masked_fraction", "dead_fraction", "nonfinite_fraction", "jump_fraction")
HEAD_PREFIX = "head."
#: ``to_json()`` keys that are not statistics.
_NOT_STATISTICS = {"rounds", "head_layers", "epochs"}


def cme_candidates(
    run_dir: str | Path, null_samples: int | None = None, rows: list[dict[str, Any]] | None = None
) -> dict[int, dict[str, Any]]:
    """``{client: {"cme_<statistic>": value, ...}}`` for every client in the run's CME archive
    (``{}`` if the run recorded none). ``null_samples`` is passed to ``client_statistics`` as
    ``samples`` (draws behind its null bands) when given and accepted; ``None``: the analysis'
    default, as in ``fedsim analyze``. ``rows``: the ``metrics.jsonl`` rows the verdicts read
    (default: the run's own file)."""
    from fedsim.analysis import cme as analysis_cme
    from fedsim.cme import CMEArchive, CMEArchiveError

    try:
        arch = CMEArchive(run_dir)
    except (CMEArchiveError, FileNotFoundError):
        return {}
    if hasattr(analysis_cme, "client_statistics"):
        from fedsim.rundir import RunDir

        values = _from_analysis(arch, analysis_cme, null_samples, RunDir(run_dir).read_metrics() if rows is None else rows)
    else:
        values = {c: _fallbacks(arch, c) for c in arch.clients}
    return {c: {f"cme_{k}": v for k, v in vals.items()} for c, vals in values.items()}


def _from_analysis(
    arch: CMEArchive, A: Any, null_samples: int | None, rows: list[dict[str, Any]] | None = None
) -> dict[int, dict[str, Any]]:
    import inspect

    kwargs: dict[str, Any] = {}
    if null_samples is not None and "samples" in inspect.signature(A.client_statistics).parameters:
        kwargs["samples"] = null_samples
    out: dict[int, dict[str, Any]] = {}
    stats = []
    for c in arch.clients:
        out[c] = {}
        layers = arch.matrix_layers(c)
        if not layers:
            continue
        try:
            with np.errstate(all="ignore"):
                s = A.client_statistics(arch, c, layers[0], **kwargs)
        except Exception as exc:  # noqa: BLE001  (one client's failure leaves its statistics NaN, the study goes on)
            log.warning("CME statistics of client %d failed: %s", c, exc)
            continue
        stats.append(s)
        js = s.to_json() if hasattr(s, "to_json") else {}
        for key, value in js.items():
            if key in _NOT_STATISTICS or key.endswith("_band"):
                continue
            out[c][key] = _mean(value)
        if hasattr(s, "saturation_round"):
            out[c]["saturation_round"] = float(s.saturation_round or len(arch.rounds(c)) + 1)
    if hasattr(A, "magnitude_rank_test"):
        for s in stats:
            test = A.magnitude_rank_test(s, [p for p in stats if p.client != s.client])
            out[s.client]["magnitude_rank_sum"] = float("nan") if test is None else test.rank_sum
    if stats and hasattr(A, "decide_verdicts"):
        try:
            verdicts = A.decide_verdicts(stats, metrics_rows=rows) if rows else A.decide_verdicts(stats)
        except Exception as exc:  # noqa: BLE001  (verdicts are optional columns)
            log.warning("CME verdicts failed: %s", exc)
            verdicts = {}
        for c, v in verdicts.items():
            out[int(c)]["verdict"] = str(getattr(v, "verdict", v))
            out[int(c)]["verdict_statistic"] = str(getattr(v, "statistic", ""))
    return out


def _mean(value: Any) -> float:
    """A number as float; a list of numbers -> mean of its finite values (``inf`` if it has only
    infinities, NaN if none)."""
    if isinstance(value, list | tuple | np.ndarray):
        x = np.array([_num(v) for v in value], dtype=np.float64)
        fin = x[np.isfinite(x)]
        if len(fin):
            return float(fin.mean())
        return float(x[~np.isnan(x)][0]) if np.any(~np.isnan(x)) else float("nan")
    return _num(value)


def _num(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _fallbacks(arch: CMEArchive, client: int) -> dict[str, Any]:
    from fedsim.analysis import cme as A
    from fedsim.cme import STAT_FIELDS

    out: dict[str, Any] = {}

    def attempt(name: str, fn: Callable[[], object]) -> None:
        try:
            with np.errstate(all="ignore"):
                out[name] = _num(fn())
        except Exception as exc:  # noqa: BLE001  (NaN: e.g. a diverged client's empty statistics)
            log.debug("CME statistic %s failed for client %d: %s", name, client, exc)
            out[name] = float("nan")

    acf = None
    try:
        acf = A.client_acf(arch, client)
    except Exception as exc:  # noqa: BLE001  (NaN statistics, as above)
        log.debug("ACF failed for client %d: %s", client, exc)
    if acf is not None:
        head = [i for i, name in enumerate(acf.layers) if name.startswith(HEAD_PREFIX)]
        attempt("acf_variation", lambda: A.acf_variation(acf.normalised))
        attempt("acf_variation_head", lambda: A.acf_variation(acf.normalised[:, head]))
        attempt("acf_mean_head", lambda: np.nanmean(acf.normalised[:, head]))
    layers = arch.matrix_layers(client)
    rounds = arch.rounds(client)
    if layers:
        layer = layers[0]
        maps: list[np.ndarray] = []
        try:
            _, maps = A.round_maps(arch, client, layer)
        except Exception as exc:  # noqa: BLE001  (NaN statistics, as above)
            log.debug("covariance maps failed for client %d: %s", client, exc)
        if len(maps) >= 2:
            attempt("map_similarity", lambda: np.nanmean(A.consecutive_similarities(maps)))
            attempt("saturation_round", lambda: A.saturation_round(maps, rounds) or len(rounds) + 1)

        def stat_mean(name: str) -> Callable[[], float]:
            return lambda: float(np.nanmean(arch.stats(client, layer, name)))

        for name in STAT_CANDIDATES:
            if name in STAT_FIELDS:
                attempt(name, stat_mean(name))
    return out


__all__ = ["cme_candidates"]
