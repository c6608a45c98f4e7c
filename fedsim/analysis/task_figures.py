"""Display classes for the tasks' own figures in ``fedsim analyze``.

A task computes the arrays (:meth:`fedsim.clients.tasks.base.Task.figure_arrays`, from the run's
final global model); the classes here only draw them. ``plot`` returns the matplotlib figure
(matplotlib is imported lazily; nothing here selects a backend or calls ``plt.show``), and the
drawn image and marker data are exactly the arrays held, so a figure can be checked against the
computation.

* :class:`SaliencyOverlayDisplay`: CARE and Grad-CAM over an OCT volume (AI-CNet3D, Kenia et al.,
  MELBA 2025);
* :class:`LandmarkProjectionDisplay`: predicted vs true landmarks on maximum-intensity
  projections of a CT volume (H3DE-Net, arXiv 2502.14221).

:func:`task_figure_displays` pairs each of a task's arrays with its display and file name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedsim.clients.tasks.aicnet3d import SaliencyExample
    from fedsim.clients.tasks.base import Task
    from fedsim.clients.tasks.h3denet import LandmarkExample
    from fedsim.config import ResolvedConfig


def _axes_grid(axes: Any, rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Any, np.ndarray, bool]:
    """``(figure, rows x cols array of axes, created)``: new axes when ``axes`` is None."""
    if axes is None:
        import matplotlib.pyplot as plt

        fig, grid = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
        return fig, grid, True
    grid = np.asarray(axes, dtype=object).reshape(rows, cols)
    return grid[0, 0].figure, grid, False


class SaliencyOverlayDisplay:
    """Saliency maps over a 3D OCT volume ``(D, H, W)`` (``D``: B-scans, ``H``: depth, ``W``:
    lateral), one column per map (e.g. AI-CNet3D's CARE and Grad-CAM): the central B-scan
    (depth x lateral) with the map's central slice, and an en-face view (B-scan x lateral: the
    volume's mean and the map's maximum over depth), the map in colour over the grey volume."""

    def __init__(self, volume: np.ndarray, maps: Mapping[str, np.ndarray], title: str = "") -> None:
        self.volume = np.asarray(volume)
        self.maps = {k: np.asarray(m) for k, m in maps.items()}
        if self.volume.ndim != 3 or not self.maps:
            raise ValueError(f"need a 3D volume and at least one map, got shape {self.volume.shape} and {len(self.maps)} maps")
        bad = {k: m.shape for k, m in self.maps.items() if m.shape != self.volume.shape}
        if bad:
            raise ValueError(f"maps must have the volume's shape {self.volume.shape}, got {bad}")
        self.title = title

    def plot(self, axes: Sequence[Any] | np.ndarray | None = None) -> Any:
        """Draw into ``axes`` (2 x number of maps) or a new figure; return the figure."""
        fig, grid, created = _axes_grid(axes, 2, len(self.maps), (4.5 * len(self.maps), 7))
        v, mid = self.volume, self.volume.shape[0] // 2
        for col, (name, m) in enumerate(self.maps.items()):
            top, bottom = grid[0, col], grid[1, col]
            top.imshow(v[mid], cmap="gray", aspect="auto")
            top.imshow(m[mid], cmap="jet", alpha=0.4, vmin=0, vmax=1, aspect="auto")
            top.set_title(f"{name}: central B-scan (depth x lateral)")
            bottom.imshow(v.mean(1), cmap="gray", aspect="auto")
            bottom.imshow(m.max(1), cmap="jet", alpha=0.4, vmin=0, vmax=1, aspect="auto")
            bottom.set_title(f"{name}: en face (B-scan x lateral)")
        for ax in grid.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        if self.title:
            fig.suptitle(self.title)
        if created:
            fig.tight_layout()
        return fig


class LandmarkProjectionDisplay:
    """Predicted vs true landmarks on the maximum-intensity projections of a CT volume
    ``(X, Y, Z)`` along its three axes: true landmarks as green circles, predictions as red
    crosses joined to their truth, predictions of missing landmarks (``true`` NaN) as grey crosses.
    ``true`` and ``pred`` are voxel coordinates ``(L, 3)``."""

    #: (title, projection axis, (horizontal, vertical) coordinate) per panel.
    VIEWS = (("axial (max over z)", 2, (0, 1)), ("coronal (max over y)", 1, (0, 2)), ("sagittal (max over x)", 0, (1, 2)))

    def __init__(self, volume: np.ndarray, true: np.ndarray, pred: np.ndarray, title: str = "") -> None:
        self.volume = np.asarray(volume)
        self.true = np.asarray(true)
        self.pred = np.asarray(pred)
        if self.volume.ndim != 3 or self.true.shape != self.pred.shape or self.true.ndim != 2 or self.true.shape[1] != 3:
            raise ValueError(f"need a 3D volume and (L, 3) landmarks, got {self.volume.shape}, {self.true.shape} and {self.pred.shape}")
        self.title = title

    def plot(self, axes: Sequence[Any] | np.ndarray | None = None) -> Any:
        """Draw into three ``axes`` or a new figure; return the figure."""
        fig, grid, created = _axes_grid(axes, 1, 3, (13, 4.6))
        t, p = self.true, self.pred
        ok = np.isfinite(t).all(1)
        for ax, (title, axis, (a, b)) in zip(grid[0], self.VIEWS, strict=True):
            ax.imshow(self.volume.max(axis).T, cmap="gray", origin="lower", aspect="auto")
            for k in np.flatnonzero(ok):
                ax.plot([t[k, a], p[k, a]], [t[k, b], p[k, b]], "y-", lw=0.8)
            ax.scatter(t[ok, a], t[ok, b], s=40, facecolors="none", edgecolors="lime", label="true")
            ax.scatter(p[ok, a], p[ok, b], s=30, c="red", marker="x", label="predicted")
            if (~ok).any():
                ax.scatter(p[~ok, a], p[~ok, b], s=30, c="0.6", marker="x", label="predicted (truth missing)")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        grid[0, 0].legend(loc="lower right", fontsize=7)
        if self.title:
            fig.suptitle(self.title)
        if created:
            fig.tight_layout()
        return fig


Display = SaliencyOverlayDisplay | LandmarkProjectionDisplay


def _saliency(task: str, j: int, ex: SaliencyExample) -> tuple[str, Display]:
    title = f"global-test volume {ex.index}: {ex.label}, P(glaucoma) = {ex.probability:.2f}"
    return f"{task}_care_gradcam_{j}_{ex.label}.png", SaliencyOverlayDisplay(ex.volume, ex.maps, title)


def _landmarks(task: str, j: int, ex: LandmarkExample) -> tuple[str, Display]:
    ok = np.isfinite(ex.true).all(1)
    title = f"global-test case {ex.case}: MRE {np.nanmean(ex.errors):.2f} mm over {int(ok.sum())} landmarks ({int((~ok).sum())} missing)"
    return f"{task}_landmarks_{j}_case{ex.case}.png", LandmarkProjectionDisplay(ex.volume, ex.true, ex.pred, title)


def displays() -> dict[type, Callable[[str, int, Any], tuple[str, Display]]]:
    """The display of each kind of figure arrays a task returns: ``(task name, position, arrays)
    -> (file name, display)``. (The tasks, and with them torch, are imported only here, so the
    display classes themselves need numpy and matplotlib only.)"""
    from fedsim.clients.tasks.aicnet3d import SaliencyExample
    from fedsim.clients.tasks.h3denet import LandmarkExample

    return {SaliencyExample: _saliency, LandmarkExample: _landmarks}


def task_figure_displays(task: Task, run_dir: Path, cfg: ResolvedConfig) -> list[tuple[str, Display]]:
    """``(PNG file name, display)`` for every figure the task computes for this run."""
    kinds = displays()
    out = []
    for j, arrays in enumerate(task.figure_arrays(run_dir, cfg)):
        make = kinds.get(type(arrays))
        if make is None:
            raise TypeError(f"no display for task figure arrays of type {type(arrays).__name__}; add it to displays()")
        out.append(make(task.name, j, arrays))
    return out


__all__ = ["LandmarkProjectionDisplay", "SaliencyOverlayDisplay", "displays", "task_figure_displays"]
