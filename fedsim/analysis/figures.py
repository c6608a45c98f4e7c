"""Display classes for the CME analysis (CME paper, Figs. 4 and 5).

Each class holds already-computed arrays and draws them; ``plot`` returns the matplotlib figure
(matplotlib is imported lazily, nothing calls ``plt.show``). The drawn image/line data are exactly
the arrays held, so a figure can be checked against the computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.analysis.cme import ACF, ClientCMESummary
from fedsim.analysis.curves import ClientCurves


def pick_rounds(rounds: Sequence[int], saturation: int | None) -> list[int]:
    """The three rounds shown as covariance maps: first, middle, and the saturation round when one
    was detected (else the last); fewer when the run has fewer rounds."""
    rounds = list(rounds)
    if not rounds:
        return []
    third = saturation if saturation is not None else rounds[-1]
    picked = [rounds[0], rounds[len(rounds) // 2], third]
    return sorted(dict.fromkeys(picked))


class CovarianceMapDisplay:
    """Covariance maps (eq. 3) side by side, one per round; each map on its own symmetric colour
    scale (CMEs shrink as training proceeds; the *pattern* is what the paper reads)."""

    def __init__(self, maps: Sequence[np.ndarray], rounds: Sequence[int], title: str = "") -> None:
        if len(maps) != len(rounds):
            raise ValueError(f"{len(maps)} maps but {len(rounds)} rounds")
        self.maps = [np.asarray(m) for m in maps]
        self.rounds = list(rounds)
        self.title = title

    def plot(self, axes: Sequence[Any] | None = None) -> Any:
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, len(self.maps), figsize=(3.4 * len(self.maps), 3.2), constrained_layout=True, squeeze=False)
            axes = list(axes[0])
        fig = axes[0].figure
        for ax, m, r in zip(axes, self.maps, self.rounds):
            lim = float(np.nanmax(np.abs(m))) or 1.0
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"{self.title}round {r}".strip(), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        return fig


class ACFDisplay:
    """ACF per layer (x: layer, input side left), one curve per round (CME paper Fig. 4 j-l).
    ``normalised`` picks the normalised ACF (default) or eq. 4 as is."""

    def __init__(self, acf: ACF, normalised: bool = True, title: str = "") -> None:
        self.acf = acf
        self.normalised = normalised
        self.title = title

    @property
    def values(self) -> np.ndarray:
        return self.acf.normalised if self.normalised else self.acf.raw

    def plot(self, ax: Any | None = None) -> Any:
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
        fig = ax.figure
        x = np.arange(len(self.acf.layers))
        cmap = plt.get_cmap("viridis")
        n = len(self.acf.rounds)
        for i, r in enumerate(self.acf.rounds):
            ax.plot(x, self.values[i], "-", lw=1.2, color=cmap(i / max(n - 1, 1)), label=f"round {r}")
        ax.set_xlabel("layer (input -> output)")
        ax.set_ylabel("normalised ACF" if self.normalised else "ACF (eq. 4)")
        if not self.normalised:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        return fig


class ClientCMEFigure:
    """One client's panel, like a column of the paper's Figs. 4/5: covariance maps at three rounds
    (top), ACF per layer (eq. 4 and normalised) and the learning curve (bottom)."""

    def __init__(
        self,
        summary: ClientCMESummary,
        maps: Sequence[np.ndarray],
        map_rounds: Sequence[int],
        acf: ACF,
        curves: ClientCurves | None = None,
        metric: str = "accuracy",
    ) -> None:
        self.summary = summary
        self.maps = CovarianceMapDisplay(maps, map_rounds)
        self.acf = acf
        self.curves = curves
        self.metric = metric

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        s = self.summary
        fig = plt.figure(figsize=(13, 7.4), constrained_layout=True)
        grid = fig.add_gridspec(2, 3)
        top = [fig.add_subplot(grid[0, j]) for j in range(len(self.maps.maps))]
        self.maps.plot(top)
        raw_ax, norm_ax, curve_ax = (fig.add_subplot(grid[1, j]) for j in range(3))
        ACFDisplay(self.acf, normalised=False, title="ACF per layer (eq. 4)").plot(raw_ax)
        ACFDisplay(self.acf, normalised=True, title=f"normalised ACF; variation {s.acf_variation:.3f}").plot(norm_ax)
        if self.curves is not None and s.client in self.curves.clients:
            self._plot_curves(curve_ax)
        else:
            curve_ax.set_axis_off()
        sat = "not reached" if s.saturation_round is None else f"round {s.saturation_round}"
        fig.suptitle(
            f"client {s.client} ({s.model}): covariance maps of {s.layer}; saturation {sat}; {s.label}", fontsize=11
        )
        return fig

    def _plot_curves(self, ax: Any) -> None:
        """The client's primary metric (left axis, blue) and loss (right axis, red) per round."""
        c = self.curves
        assert c is not None
        i = c.clients.index(self.summary.client)
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
