"""Display classes for the CME analysis (CME paper, Figs. 4 and 5, made checkable by eye).

Each class holds already-computed arrays and draws them; ``plot`` returns the matplotlib figure
(matplotlib is imported lazily, nothing calls ``plt.show``). The drawn image/line data are exactly
the arrays held (``values`` where a display transforms them, e.g. blanks the diagonal), so a
figure can be checked against the computation.

Choices that make the figures readable:

* one client's covariance maps share **one symmetric colour scale** (from the 99th percentile of
  ``|off-diagonal entries|`` over its rounds), so a fading or growing pattern is visible as such;
* the **diagonal** (each neuron's variance, positive and much larger than the covariances) is
  drawn apart, as variance per neuron, and blanked in the maps; dead units are grey (NaN);
* axes are **neuron indices** of the eq. 1 matrix and the colour bar says what it measures;
* the ACF is plotted against **layer names**, with the head layers shaded;
* the statistics behind the verdict are plotted per round **with their null bands**.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.analysis.cme import ACF, HEAD_PATTERNS, ClientStatistics, Verdict, head_layers
from fedsim.analysis.curves import ClientCurves

#: Percentile of |off-diagonal entries| that sets a client's symmetric colour scale.
COLOUR_PERCENTILE = 99.0


def pick_rounds(rounds: Sequence[int], saturation: int | None) -> list[int]:
    """The three rounds shown as covariance maps: first, middle, and the saturation round when one
    was detected (else the last); fewer when the run has fewer rounds."""
    rounds = list(rounds)
    if not rounds:
        return []
    third = saturation if saturation is not None else rounds[-1]
    picked = [rounds[0], rounds[len(rounds) // 2], third]
    return sorted(dict.fromkeys(picked))


def off_diagonal(m: np.ndarray) -> np.ndarray:
    """A copy of a map with its diagonal set to NaN."""
    out = np.array(m, dtype=np.float64)
    np.fill_diagonal(out, np.nan)
    return out


def robust_scale(maps: Sequence[np.ndarray], percentile: float = COLOUR_PERCENTILE) -> float:
    """The symmetric colour limit of a set of maps: the ``percentile`` of ``|off-diagonal entries|``
    over all of them (1.0 if none is finite and non-zero)."""
    vals = [np.abs(off_diagonal(m)).ravel() for m in maps]
    v = np.concatenate(vals) if vals else np.array([])
    v = v[np.isfinite(v)]
    lim = float(np.percentile(v, percentile)) if v.size else 0.0
    return lim if lim > 0 else 1.0


def _neuron_ticks(ax: Any, neurons: np.ndarray, axis: str = "both", count: int = 5) -> None:
    pos = np.unique(np.linspace(0, len(neurons) - 1, min(count, len(neurons))).round().astype(int))
    labels = [str(int(neurons[p])) for p in pos]
    if axis in ("x", "both"):
        ax.set_xticks(pos, labels, fontsize=7)
    if axis in ("y", "both"):
        ax.set_yticks(pos, labels, fontsize=7)


class CovarianceMapDisplay:
    """Covariance maps (eq. 3) side by side, one per round, **off the diagonal**, on one symmetric
    colour scale (``scale``; default :func:`robust_scale` of the maps shown). ``neurons`` are the
    row indices of the CME matrix the maps' rows belong to (default ``0..R-1``); NaN entries
    (dead units, and the blanked diagonal) are grey."""

    def __init__(
        self,
        maps: Sequence[np.ndarray],
        rounds: Sequence[int],
        title: str = "",
        neurons: Sequence[int] | np.ndarray | None = None,
        scale: float | None = None,
        layer: str = "",
    ) -> None:
        if len(maps) != len(rounds):
            raise ValueError(f"{len(maps)} maps but {len(rounds)} rounds")
        self.maps = [np.asarray(m) for m in maps]
        self.rounds = list(rounds)
        self.title = title
        size = self.maps[0].shape[0] if self.maps else 0
        self.neurons = np.arange(size) if neurons is None else np.asarray(neurons)
        self.scale = robust_scale(self.maps) if scale is None else float(scale)
        self.layer = layer

    @property
    def values(self) -> list[np.ndarray]:
        """The arrays drawn: each map with its diagonal blanked."""
        return [off_diagonal(m) for m in self.maps]

    def plot(self, axes: Sequence[Any] | None = None) -> Any:
        import matplotlib.pyplot as plt

        if axes is None:
            _, grid = plt.subplots(1, len(self.maps), figsize=(3.4 * len(self.maps) + 1.0, 3.4), constrained_layout=True, squeeze=False)
            axes = list(grid[0])
        fig = axes[0].figure
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
        im = None
        unit = f" of {self.layer}" if self.layer else ""
        for ax, m, r in zip(axes, self.values, self.rounds, strict=False):
            im = ax.imshow(m, cmap=cmap, vmin=-self.scale, vmax=self.scale, interpolation="nearest")
            ax.set_title(f"{self.title}round {r}".strip(), fontsize=9)
            _neuron_ticks(ax, self.neurons)
            ax.set_xlabel(f"neuron (row of C{unit})", fontsize=8)
            ax.set_ylabel("neuron", fontsize=8)
        if im is not None:  # one colour bar for all maps (one scale), glued to the last map
            last = axes[len(self.maps) - 1]
            bar = fig.colorbar(im, cax=last.inset_axes((1.04, 0.0, 0.05, 1.0)), extend="both")
            bar.set_label(f"covariance (eq. 3), off-diagonal; scale: {COLOUR_PERCENTILE:g}th pct of |values|", fontsize=7)
            bar.ax.tick_params(labelsize=7)
        return fig


class DiagonalDisplay:
    """The maps' diagonals: each neuron's variance of C (eq. 3) per round, on a log axis."""

    def __init__(self, maps: Sequence[np.ndarray], rounds: Sequence[int], neurons: Sequence[int] | np.ndarray | None = None) -> None:
        self.diagonals = [np.diag(np.asarray(m)) for m in maps]
        self.rounds = list(rounds)
        size = len(self.diagonals[0]) if self.diagonals else 0
        self.neurons = np.arange(size) if neurons is None else np.asarray(neurons)

    def plot(self, ax: Any | None = None) -> Any:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
        cmap = plt.get_cmap("viridis")
        x = np.arange(len(self.neurons))
        for i, (d, r) in enumerate(zip(self.diagonals, self.rounds, strict=True)):
            ax.plot(x, np.where(d > 0, d, np.nan), ".", ms=3, color=cmap(i / max(len(self.rounds) - 1, 1)), label=f"round {r}")
        if any(np.any(d > 0) for d in self.diagonals):
            ax.set_yscale("log")
        _neuron_ticks(ax, self.neurons, "x")
        ax.set_xlabel("neuron (row of C)", fontsize=8)
        ax.set_ylabel("variance of C (diagonal)", fontsize=8)
        ax.set_title("diagonal of the maps: variance per neuron\n(gaps: dead units)", fontsize=9)
        ax.legend(fontsize=7)
        return ax.figure


class RoundStatisticDisplay:
    """One or more per-round statistics (NaN at rounds where undefined), each with its null band
    (``(rounds, 2)``, shaded), optionally reference bands (``references``: label -> ``(rounds, 2)``,
    hatched grey, e.g. the noise ceiling of the map similarity), a threshold line and a marked round."""

    def __init__(
        self,
        rounds: Sequence[int] | np.ndarray,
        series: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
        ylabel: str,
        title: str = "",
        threshold: float | None = None,
        mark: int | None = None,
        mark_label: str = "",
        references: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.rounds = np.asarray(rounds)
        self.series = dict(series)
        self.ylabel, self.title = ylabel, title
        self.threshold, self.mark, self.mark_label = threshold, mark, mark_label
        self.references = dict(references or {})

    def plot(self, ax: Any | None = None) -> Any:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
        for i, (label, (values, nullband)) in enumerate(self.series.items()):
            color = f"C{i}"
            ax.plot(self.rounds, values, "-o", color=color, ms=4, label=label)
            if nullband is not None:
                nb = np.asarray(nullband, dtype=np.float64)
                ax.fill_between(self.rounds, nb[:, 0], nb[:, 1], color=color, alpha=0.2, lw=0, label=f"{label}: null band")
        for label, ref in self.references.items():
            rb = np.asarray(ref, dtype=np.float64)
            ax.fill_between(self.rounds, rb[:, 0], rb[:, 1], facecolor="none", edgecolor="0.45", hatch="///", lw=0, label=label)
        if self.threshold is not None:
            ax.axhline(self.threshold, color="k", ls="--", lw=1, label=f"threshold {self.threshold:g}")
        if self.mark is not None:
            ax.axvline(self.mark, color="C3", ls=":", lw=1.5, label=self.mark_label or f"round {self.mark}")
        ax.set_xticks(self.rounds)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel(self.ylabel, fontsize=8)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=6.5)
        return ax.figure


class ACFDisplay:
    """ACF per layer (x: layer names, input side left; head layers shaded), one curve per round
    (CME paper Fig. 4 j-l). ``normalised`` picks the normalised ACF (default) or eq. 4 as is."""

    def __init__(self, acf: ACF, normalised: bool = True, title: str = "", head: Sequence[str] | None = None) -> None:
        self.acf = acf
        self.normalised = normalised
        self.title = title
        self.head = list(head_layers(acf.layers, HEAD_PATTERNS) if head is None else head)

    @property
    def values(self) -> np.ndarray:
        return self.acf.normalised if self.normalised else self.acf.raw

    def plot(self, ax: Any | None = None) -> Any:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(5.5, 0.12 * len(self.acf.layers) + 3), 3.8), constrained_layout=True)
        fig = ax.figure
        layers = list(self.acf.layers)
        x = np.arange(len(layers))
        cmap = plt.get_cmap("viridis")
        n = len(self.acf.rounds)
        for i, r in enumerate(self.acf.rounds):
            ax.plot(x, self.values[i], "-", marker=".", ms=3, lw=1.2, color=cmap(i / max(n - 1, 1)), label=f"round {r}")
        head_idx = [layers.index(h) for h in self.head if h in layers]
        for h in head_idx:
            ax.axvspan(h - 0.5, h + 0.5, color="C1", alpha=0.15, lw=0)
        # every head layer is labelled; the others as far as they fit (~40 labels)
        step = max(1, int(np.ceil(len(layers) / 40)))
        shown = sorted(set(range(0, len(layers), step)) | set(head_idx))
        ax.set_xticks(shown, [layers[i] for i in shown], rotation=90, fontsize=6)
        for tick, i in zip(ax.get_xticklabels(), shown, strict=True):
            if i in head_idx:
                tick.set_color("C1")
                tick.set_fontweight("bold")
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_xlabel("layer (input -> output; head shaded)", fontsize=8)
        ax.set_ylabel("normalised ACF" if self.normalised else "ACF (eq. 4)", fontsize=8)
        if not self.normalised:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        return fig


#: characters per line of :func:`verdict_caption`: a 15-inch figure at 11 pt holds about 175
CAPTION_WIDTH = 150


def verdict_caption(stats: ClientStatistics, verdict: Verdict, width: int = CAPTION_WIDTH) -> str:
    """The figure title: client, model, verdict with its number, saturation round; wrapped at
    ``width`` characters so a long reason stays inside the figure."""
    sat = "not reached" if stats.saturation_round is None else f"round {stats.saturation_round}"
    head = textwrap.fill(
        f"client {stats.client} ({stats.model}): verdict {verdict.verdict.upper()} - {verdict.reason}", width, break_on_hyphens=False
    )
    return f"{head}\ncovariance maps of {stats.layer}; saturation {sat}"


class ClientCMEFigure:
    """One client's panel, like a column of the paper's Figs. 4/5 plus the numbers behind the
    verdict: covariance maps at up to three rounds (top, one colour scale, off-diagonal); the
    maps' diagonals, the consecutive-map similarity and the head/all-layer ACF change per round
    with their null bands (middle); the normalised ACF per layer and the learning curve (bottom).
    The title gives the verdict and its number."""

    def __init__(
        self,
        stats: ClientStatistics,
        verdict: Verdict,
        map_rounds: Sequence[int],
        curves: ClientCurves | None = None,
        metric: str = "accuracy",
        neurons: Sequence[int] | np.ndarray | None = None,
        similarity_threshold: float | None = None,
    ) -> None:
        self.stats = stats
        self.verdict = verdict
        rounds = [int(r) for r in stats.rounds]
        shown = [stats.maps[rounds.index(r)] for r in map_rounds]
        self.maps = CovarianceMapDisplay(shown, map_rounds, neurons=neurons, scale=robust_scale(stats.maps), layer=stats.layer)
        self.diagonal = DiagonalDisplay(shown, map_rounds, neurons=neurons)
        self.curves = curves
        self.metric = metric
        self.similarity_threshold = similarity_threshold

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        s = self.stats
        fig = plt.figure(figsize=(15, 12.5), constrained_layout=True)
        grid = fig.add_gridspec(3, 3, height_ratios=[1.15, 1, 1.2])
        top = [fig.add_subplot(grid[0, j]) for j in range(max(len(self.maps.maps), 1))]
        if self.maps.maps:
            self.maps.plot(top)
        self.diagonal.plot(fig.add_subplot(grid[1, 0]))
        RoundStatisticDisplay(
            s.rounds,
            {"off-diagonal similarity to previous round": (s.similarity, s.similarity_band),
             "with diagonal (old statistic)": (s.similarity_with_diagonal, None)},
            "map similarity (Pearson)",
            "map vs previous round's map (null band: neurons shuffled;\nhatched: noise ceiling, an unchanged map re-estimated)",
            threshold=self.similarity_threshold if self.similarity_threshold is not None and self.similarity_threshold > -1 else None,
            mark=s.saturation_round,
            mark_label="saturation",
            references={"noise ceiling (unchanged map)": s.ceiling_band},
        ).plot(fig.add_subplot(grid[1, 1]))  # fmt: skip
        RoundStatisticDisplay(
            s.rounds,
            {f"head ({len(s.head)} layers)": (s.acf_change_head, s.acf_change_head_band),
             "all layers": (s.acf_change_all, s.acf_change_all_band)},
            "mean |change of normalised ACF|",
            f"ACF change from the previous round (null band: noise)\nhead variation {s.acf_variation_head:.3g}, "
            f"noise band {s.acf_variation_head_band[0]:.2g}-{s.acf_variation_head_band[1]:.2g}",
        ).plot(fig.add_subplot(grid[1, 2]))  # fmt: skip
        acf_ax = fig.add_subplot(grid[2, :2])
        if s.acf is not None:
            ACFDisplay(s.acf, normalised=True, title="normalised ACF per layer (eq. 4), one curve per round", head=s.head).plot(acf_ax)
        curve_ax = fig.add_subplot(grid[2, 2])
        if self.curves is not None and s.client in self.curves.clients:
            self._plot_curves(curve_ax)
        else:
            curve_ax.set_axis_off()
        fig.suptitle(verdict_caption(s, self.verdict), fontsize=11)
        return fig

    def _plot_curves(self, ax: Any) -> None:
        """The client's primary metric (left axis, blue) and loss (right axis, red) per round."""
        c = self.curves
        assert c is not None
        i = c.clients.index(self.stats.client)
        twin = ax.twinx()
        for axis, kind, color in ((ax, self.metric, "C0"), (twin, "loss", "C3")):
            for split, style in (("test", "-o"), ("train", "--")):
                values = c.values.get(f"{split}_{kind}")
                if values is not None:
                    axis.plot(c.rounds, values[i], style, color=color, label=f"{split} {kind}")
            axis.set_ylabel(kind, color=color)
        ax.set_xlabel("round")
        ax.set_xticks(c.rounds)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
        ax.set_title(f"{self.metric} and loss per round (local test solid, train dashed)", fontsize=9)
