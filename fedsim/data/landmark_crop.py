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
it. (The authors' code measures errors with the case's original spacing; that is right for every
case it evaluates at native resolution and wrong only for the cases its ``CenterCrop`` had to
zoom out because their landmarks did not fit the crop.)

**Native resolution** (:func:`prepare_native`, what the authors' ``data_utils/transforms.py``
does): the zoom is a factor *relative to the volume's own voxels* (1 = native spacing, no
resampling at all), per axis; it is only lowered below 1 when the landmarks do not fit the crop
(:func:`fit_zoom`, the authors' ``crop / span - 0.02`` rule, ``- 0.04`` on the slice axis). The
crop is a window of the (resampled) volume: random but keeping every present landmark inside
(training), or centred on a given point (evaluation: the volume's centre, or, as in the authors'
``CenterCrop``, the centre of the true landmarks). :func:`native_region` gives the part of a
volume any such crop can touch, so a loader can keep just that (memory bounded by the crop, not
the scanner's field of view).
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
    # Not MONAI's Resize/Zoom: they call this same F.interpolate, and the landmarks need this exact voxel-centre map, not an affine.
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def _random_window(rng: np.random.Generator, n: int, c: int, coords: np.ndarray) -> int:
    """Start of a random window of ``c`` voxels on an axis of ``n > c`` voxels that keeps every
    present landmark coordinate (``coords``) inside it; uniform if none is present; centred on them
    if they span more than the window."""
    if len(coords) == 0:
        return int(rng.integers(0, n - c + 1))
    lo_p, hi_p = coords.min(), coords.max()
    lo, hi = max(0, int(np.ceil(hi_p - (c - 1)))), min(n - c, int(np.floor(lo_p)))
    if lo <= hi:
        return int(rng.integers(lo, hi + 1))
    return int(np.clip(round(0.5 * (lo_p + hi_p) - 0.5 * (c - 1)), 0, n - c))


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
            else:
                s = _random_window(rng, n, c, present[:, i])
            src.append(slice(s, s + c))
            dst.append(slice(0, c))
            offset[i] = -s

    out = np.zeros(crop, dtype=np.float32)
    out[tuple(dst)] = _resample(volume, size)[tuple(src)]
    return PreparedCase(out, zoomed + offset, spacing / scale, scale, offset)


#: The authors' margins when fitting the landmarks' extent into the crop (``RandomCrop`` and
#: ``CenterCrop`` in their ``data_utils/transforms.py``: ``crop / span - 0.02``, ``- 0.04`` on the
#: third axis).
FIT_MARGIN = (0.02, 0.02, 0.04)


def _present(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    return lm[~np.isnan(lm).any(axis=1)]


def fit_zoom(landmarks: np.ndarray, crop: tuple[int, int, int], centre: np.ndarray | None = None) -> np.ndarray:
    """Per-axis zoom (relative to native voxels, capped at 1) at which the present landmarks fit
    the crop.

    Without ``centre``: the authors' rule, ``min(1, crop_i / span_i - FIT_MARGIN_i)`` with
    ``span_i`` the landmarks' extent (``CenterCrop`` / ``RandomCrop``). With ``centre`` (a point
    in voxel coordinates): the largest zoom at which a crop *centred on that point* holds every
    landmark, ``min(1, (crop_i - 1) / (2 max |p_i - centre_i|))``. Axes without spread give 1.
    """
    present = _present(landmarks)
    c = np.asarray(crop, dtype=np.float64)
    if len(present) == 0:
        return np.ones(3)
    with np.errstate(divide="ignore"):
        if centre is None:
            span = present.max(0) - present.min(0)
            z = np.where(span > 0, c / np.where(span > 0, span, 1.0) - np.asarray(FIT_MARGIN), np.inf)
        else:
            dev = np.abs(present - np.asarray(centre, dtype=np.float64)).max(0)
            z = np.where(dev > 0, (c - 1) / (2 * np.where(dev > 0, dev, 1.0)), np.inf)
    return np.minimum(1.0, z)


def landmark_centre(landmarks: np.ndarray) -> np.ndarray | None:
    """The centre of the present landmarks' bounding box (the authors' ``CenterCrop`` centre), or
    ``None`` when none is present."""
    present = _present(landmarks)
    return None if len(present) == 0 else 0.5 * (present.min(0) + present.max(0))


def native_region(
    shape: tuple[int, ...], landmarks: np.ndarray, crop: tuple[int, int, int], zoom_min: float, eval_zoom: np.ndarray, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` voxel indices of the part of a volume of ``shape`` that native-resolution
    crops can touch: the evaluation window (``crop / eval_zoom`` voxels around ``centre``) and, for
    training, ``crop / zoom_min`` voxels around the landmarks' bounding box (or their whole extent
    plus one voxel when that is larger), clipped to the volume. Everything is in voxels of the
    original volume; a loader keeps ``volume[start:stop]`` and nothing else."""
    c = np.asarray(crop, dtype=np.float64)
    n = np.asarray(shape, dtype=np.float64)
    half_eval = 0.5 * c / np.asarray(eval_zoom, dtype=np.float64) + 1.0
    lo, hi = np.asarray(centre, dtype=np.float64) - half_eval, np.asarray(centre, dtype=np.float64) + half_eval
    present = _present(landmarks)
    if len(present):
        mid = 0.5 * (present.min(0) + present.max(0))
        half_train = np.maximum(0.5 * c / zoom_min, 0.5 * (present.max(0) - present.min(0)) + 1.0) + 1.0
        lo, hi = np.minimum(lo, mid - half_train), np.maximum(hi, mid + half_train)
    start = np.clip(np.floor(lo), 0, n - 1).astype(np.int64)
    stop = np.clip(np.ceil(hi) + 1, start + 1, n).astype(np.int64)
    return start, stop


def prepare_native(
    volume: np.ndarray,
    landmarks: np.ndarray,
    spacing: np.ndarray,
    crop: tuple[int, int, int],
    zoom: np.ndarray | tuple[float, float, float],
    rng: np.random.Generator | None,
    centre: np.ndarray | None = None,
) -> PreparedCase:
    """Resample ``volume`` by the per-axis ``zoom`` *relative to its own voxels* (``n_i =
    max(1, round(zoom_i * shape_i))``; no resampling where that is the shape) and take a ``crop``
    window of it: with ``rng`` a random one keeping every present landmark inside (centred on them
    if they cannot all fit), without ``rng`` the window centred on ``centre`` (original voxel
    coordinates; default the volume's centre), kept inside the volume. An axis shorter than the
    crop is zero-padded (centred, or at a random offset with ``rng``). Coordinates map as in
    :func:`prepare_case` and the returned spacing is ``spacing_i * shape_i / n_i``: the native
    spacing wherever the zoom is 1."""
    volume, spacing = np.asarray(volume), np.asarray(spacing, dtype=np.float64)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    crop = (*crop,)
    z = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (3,))
    _check(volume, landmarks, spacing, crop, float(z.min()))
    if not np.isfinite(z).all():
        raise ValueError(f"zoom must be three positive finite numbers, got {z.tolist()}")
    shape = np.asarray(volume.shape, dtype=np.float64)
    size = (
        max(1, round(float(z[0]) * volume.shape[0])),
        max(1, round(float(z[1]) * volume.shape[1])),
        max(1, round(float(z[2]) * volume.shape[2])),
    )
    scale = np.asarray(size, dtype=np.float64) / shape
    zoomed = (landmarks + 0.5) * scale - 0.5
    present = zoomed[~np.isnan(zoomed).any(axis=1)]
    ctr = (shape - 1) / 2 if centre is None else np.asarray(centre, dtype=np.float64)
    ctr_z = (ctr + 0.5) * scale - 0.5

    offset = np.zeros(3)
    src, dst = [], []
    for i, (n, c) in enumerate(zip(size, crop, strict=True)):
        if n <= c:
            o = int(rng.integers(0, c - n + 1)) if rng is not None else (c - n) // 2
            src.append(slice(0, n))
            dst.append(slice(o, o + n))
            offset[i] = o
            continue
        if rng is None:
            s = int(np.clip(round(ctr_z[i] - 0.5 * (c - 1)), 0, n - c))
        else:
            s = _random_window(rng, n, c, present[:, i])
        src.append(slice(s, s + c))
        dst.append(slice(0, c))
        offset[i] = -s

    out = np.zeros(crop, dtype=np.float32)
    out[tuple(dst)] = _resample(volume, size)[tuple(src)]
    return PreparedCase(out, zoomed + offset, spacing / scale, scale, offset)
