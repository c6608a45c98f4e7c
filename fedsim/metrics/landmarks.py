"""Landmark-detection metrics in millimetres (H3DE-Net, arXiv 2502.14221, section 4).

* **Radial error** of a landmark: the Euclidean distance between prediction and truth in mm,
  ``sqrt(sum_i ((p_i - t_i) * spacing_i)^2)``, with the voxel ``spacing`` of the volume the
  coordinates refer to. After zooming a volume, that is the *resampled* spacing
  (:func:`fedsim.data.landmark_crop.prepare_case` / ``prepare_native`` return it); at native
  resolution it is the case's own spacing. (The authors' ``utils.metric_proposal`` always uses
  the original spacing: right for the cases evaluated at native resolution, wrong only for those
  their ``CenterCrop`` zoomed out.)

Two conventions for MRE +/- SD, both reported:

* **pooled** (``mre``, ``sd``): mean and *population* standard deviation of the radial errors of
  all existing landmarks of all cases, as one sample;
* **per case** (``mre-case``, ``sd-case``), the convention of the paper's tables (the authors'
  ``main_yolol.test``): each case's mean error over its existing landmarks, then the mean of those
  case means and their standard deviation with ``N - 1`` (``N`` = cases with at least one existing
  landmark). It weights every case equally and its SD measures the spread *between cases*, so it is
  much smaller than the pooled SD (e.g. the paper's "2.07 +/- 0.96 mm").

* **SDR@r**: the percentage of existing landmarks with radial error <= r mm, r in 2, 2.5, 3, 4,
  pooled over landmarks (as the authors' hit counts are).

:func:`landmark_metrics` reports these for all cases and, suffixed ``-missing``, for the cases
that have at least one missing landmark (the paper's "incomplete" subset). Missing landmarks
(NaN truth) are never scored.
"""

from __future__ import annotations

import math

import numpy as np

SDR_THRESHOLDS = (2.0, 2.5, 3.0, 4.0)


def radial_errors(pred: np.ndarray, true: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Radial errors in mm ``(N, L)`` of predictions ``(N, L, 3)`` against truth ``(N, L, 3)``
    (NaN rows = missing landmarks, which give NaN), with per-case spacing ``(N, 3)`` or one
    spacing ``(3,)`` for all cases."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    spacing = np.asarray(spacing, np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"pred and true must both be (N, L, 3); got {pred.shape} and {true.shape}")
    if spacing.shape not in ((3,), (len(true), 3)):
        raise ValueError(f"spacing must be (3,) or (N, 3) = ({len(true)}, 3); got {spacing.shape}")
    sp = spacing if spacing.ndim == 1 else spacing[:, None, :]
    return np.sqrt((((pred - true) * sp) ** 2).sum(-1))


def _summary(err: np.ndarray, thresholds: tuple[float, ...]) -> dict[str, float]:
    e = err[np.isfinite(err)]
    out = {"mre": float(e.mean()) if e.size else math.nan, "sd": float(e.std()) if e.size else math.nan}
    out.update(case_mean_metrics(err))
    for r in thresholds:
        out[f"sdr-{r:g}mm"] = float(100.0 * (e <= r).mean()) if e.size else math.nan
    return out


def case_mean_metrics(errors: np.ndarray) -> dict[str, float]:
    """The paper's convention from radial errors ``(N, L)`` (NaN = missing): ``mre-case``, the
    mean over cases of each case's mean error, and ``sd-case``, the standard deviation of those
    case means with ``N - 1`` (NaN for fewer than two cases); cases without an existing landmark
    are left out."""
    errors = np.asarray(errors, np.float64)
    ok = np.isfinite(errors)
    counts = ok.sum(1)
    means = np.where(ok, errors, 0.0).sum(1)[counts > 0] / counts[counts > 0]
    return {
        "mre-case": float(means.mean()) if means.size else math.nan,
        "sd-case": float(means.std(ddof=1)) if means.size > 1 else math.nan,
    }


def landmark_metrics(errors: np.ndarray, thresholds: tuple[float, ...] = SDR_THRESHOLDS) -> dict[str, float]:
    """Pooled MRE and SD, per-case MRE and SD (``mre-case``, ``sd-case``) and SDR (percent) from
    radial errors ``(N, L)`` (NaN = missing landmark), over all cases and (keys suffixed ``-missing``) over the cases with at least one missing landmark;
    NaN where a subset is empty. Also ``landmarks``: the number of existing landmarks scored."""
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 2:
        raise ValueError(f"errors must be (N, L); got shape {errors.shape}")
    out = _summary(errors, thresholds)
    incomplete = np.isnan(errors).any(1)
    out.update({f"{k}-missing": v for k, v in _summary(errors[incomplete], thresholds).items()})
    out["landmarks"] = float(np.isfinite(errors).sum())
    return out


__all__ = ["SDR_THRESHOLDS", "case_mean_metrics", "landmark_metrics", "radial_errors"]
