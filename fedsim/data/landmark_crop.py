"""Zoom and crop of a CT landmark case into the network's input (H3DE-Net, arXiv 2502.14221).

:func:`prepare_case` resamples a volume ``(X, Y, Z)`` so that it spans ``n_i = max(1,
round(zoom * crop_i))`` voxels along axis ``i`` (``zoom = 1`` fits the whole volume exactly into
the crop, ``zoom < 1`` zooms out: the volume fills a fraction of each axis, ``zoom > 1`` zooms in:
a crop is taken), then places it in the crop:

* ``n_i <= crop_i``: padded with 0 (air) at offset ``o_i``, random in ``[0, crop_i - n_i]`` with
  ``rng``, ``(crop_i - n_i) // 2`` (centred) without;
* ``n_i > crop_i``: a window of ``crop_i`` voxels starting at ``s_i``: with ``rng`` random such that
  every present landmark stays inside (voxel coordinate in ``[0, crop_i - 1]``; if they cannot all
  fit, the window is centred on their bounding box), without ``rng`` the centre window.

Resampling is trilinear (``torch.nn.functional.interpolate``, ``align_corners=False``; no
anti-aliasing when zooming out). A voxel coordinate ``p`` (voxel centres at integers) becomes
``p' = (p + 0.5) * n_i / shape_i - 0.5 + o_i`` (``- s_i`` for a window); NaN rows (missing
landmarks) stay NaN. **The resampled spacing is** ``spacing_i * shape_i / n_i``, so distances in mm
are preserved: ``|p1' - p2'| * spacing'`` equals ``|p1 - p2| * spacing``. Errors in mm must use
it; the authors' code kept the original spacing after zooming, which mis-scales every error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PreparedCase:
    """A case in the network's crop: ``volume`` float32 of shape ``crop``, ``landmarks`` ``(L, 3)``
    voxel coordinates in it (NaN rows missing), the resampled ``spacing`` ``(3,)`` mm, and the
    mapping from the original volume: ``p' = (p + 0.5) * scale - 0.5 + offset``."""

    volume: np.ndarray
    landmarks: np.ndarray
    spacing: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Voxel coordinates ``(..., 3)`` in this crop -> coordinates in the original volume."""
        return (np.asarray(points, dtype=np.float64) - self.offset + 0.5) / self.scale - 0.5


def zoomed_size(crop: tuple[int, int, int], zoom: float) -> tuple[int, int, int]:
    """The resampled volume's size ``n_i = max(1, round(zoom * crop_i))`` (Python's round)."""
    x, y, z = (max(1, round(zoom * c)) for c in crop)
    return x, y, z


def _check(volume: np.ndarray, landmarks: np.ndarray, spacing: np.ndarray, crop: tuple[int, int, int], zoom: float) -> None:
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"volume must be a non-empty 3-D array (X, Y, Z), got shape {volume.shape}")
    if landmarks.ndim != 2 or landmarks.shape[1] != 3:
        raise ValueError(f"landmarks must be (L, 3) voxel coordinates, got shape {landmarks.shape}")
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"spacing must be 3 positive finite values (mm), got {spacing.tolist()}")
    if len(crop) != 3 or not all(isinstance(c, int | np.integer) and not isinstance(c, bool) and c >= 1 for c in crop):
        raise ValueError(f"crop must be three positive integers (X, Y, Z), got {crop}")
    if not (np.isfinite(zoom) and zoom > 0):
        raise ValueError(f"zoom must be a positive finite number, got {zoom}")


def _resample(volume: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    vol = np.asarray(volume, dtype=np.float32)
    if vol.shape == size:
        return vol
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(vol))[None, None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def prepare_case(
    volume: np.ndarray,
    landmarks: np.ndarray,
    spacing: np.ndarray,
    crop: tuple[int, int, int],
    zoom: float,
    rng: np.random.Generator | None,
) -> PreparedCase:
    """Zoom ``volume`` by ``zoom`` relative to fitting it into ``crop`` and place / crop it (see
    the module docstring); random placement with ``rng``, centred without (deterministic)."""
    volume, spacing = np.asarray(volume), np.asarray(spacing, dtype=np.float64)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    crop = (*crop,)  # a tuple even if a list was passed
    _check(volume, landmarks, spacing, crop, zoom)
    shape = np.asarray(volume.shape, dtype=np.float64)
    size = zoomed_size(crop, zoom)
    scale = np.asarray(size, dtype=np.float64) / shape
    zoomed = (landmarks + 0.5) * scale - 0.5  # NaN rows stay NaN
    present = zoomed[~np.isnan(zoomed).any(axis=1)]

    offset = np.zeros(3)
    src, dst = [], []
    for i, (n, c) in enumerate(zip(size, crop, strict=True)):
        if n <= c:  # pad: the whole resampled axis at offset o
            o = int(rng.integers(0, c - n + 1)) if rng is not None else (c - n) // 2
            src.append(slice(0, n))
            dst.append(slice(o, o + n))
            offset[i] = o
        else:  # crop: a window [s, s + c)
            if rng is None:
                s = (n - c) // 2
            elif len(present) == 0:
                s = int(rng.integers(0, n - c + 1))
            else:
                lo_p, hi_p = present[:, i].min(), present[:, i].max()
                lo, hi = max(0, int(np.ceil(hi_p - (c - 1)))), min(n - c, int(np.floor(lo_p)))
                if lo <= hi:
                    s = int(rng.integers(lo, hi + 1))
                else:  # the landmarks span more than the crop: centre it on them
                    s = int(np.clip(round(0.5 * (lo_p + hi_p) - 0.5 * (c - 1)), 0, n - c))
            src.append(slice(s, s + c))
            dst.append(slice(0, c))
            offset[i] = -s

    out = np.zeros(crop, dtype=np.float32)
    out[tuple(dst)] = _resample(volume, size)[tuple(src)]
    return PreparedCase(out, zoomed + offset, spacing / scale, scale, offset)
