"""Radial error, MRE/SD and SDR against hand-computed values with anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.metrics.landmarks import landmark_metrics, radial_errors

NAN = math.nan


def test_radial_errors_use_the_anisotropic_spacing_per_axis():
    true = np.array([[[10.0, 10.0, 10.0], [0.0, 0.0, 0.0], [NAN, NAN, NAN]]])
    pred = np.array([[[13.0, 10.0, 12.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]]])
    spacing = np.array([0.5, 0.4, 2.0])
    err = radial_errors(pred, true, spacing)
    # (3 vox * 0.5, 0, 2 vox * 2.0) -> sqrt(1.5^2 + 4^2); (0.5, 0.4, 2.0) -> sqrt(.25 + .16 + 4)
    assert err[0, 0] == pytest.approx(math.sqrt(1.5**2 + 4.0**2))
    assert err[0, 1] == pytest.approx(math.sqrt(0.25 + 0.16 + 4.0))
    assert math.isnan(err[0, 2])  # missing landmark: no error
    # per-case spacing
    err2 = radial_errors(np.repeat(pred, 2, 0), np.repeat(true, 2, 0), np.array([[0.5, 0.4, 2.0], [1.0, 1.0, 1.0]]))
    assert err2[1, 1] == pytest.approx(math.sqrt(3.0))


def test_metrics_exclude_missing_landmarks_and_report_the_incomplete_subset():
    errors = np.array(
        [
            [1.0, 2.0, 3.0, 5.0],  # complete case
            [2.5, NAN, 4.0, 1.5],  # one missing landmark
        ]
    )
    m = landmark_metrics(errors)
    valid = np.array([1.0, 2.0, 3.0, 5.0, 2.5, 4.0, 1.5])
    assert m["mre"] == pytest.approx(valid.mean())
    assert m["sd"] == pytest.approx(np.sqrt(((valid - valid.mean()) ** 2).mean()))
    # <= 2 mm: 1, 2, 1.5 -> 3/7; <= 2.5: + 2.5 -> 4/7; <= 3: + 3 -> 5/7; <= 4: + 4 -> 6/7
    assert [m[f"sdr-{r}mm"] for r in ("2", "2.5", "3", "4")] == pytest.approx([300 / 7, 400 / 7, 500 / 7, 600 / 7])
    assert m["mre-missing"] == pytest.approx((2.5 + 4.0 + 1.5) / 3)
    assert m["sdr-2mm-missing"] == pytest.approx(100 / 3)
    assert m["landmarks"] == 7


def test_metrics_of_empty_subsets_are_nan_and_bad_shapes_raise():
    m = landmark_metrics(np.array([[1.0, 3.0]]))
    assert math.isnan(m["mre-missing"]) and math.isnan(m["sdr-4mm-missing"]) and m["sdr-4mm"] == 100.0
    with pytest.raises(ValueError, match=r"\(N, L, 3\)"):
        radial_errors(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="spacing"):
        radial_errors(np.zeros((2, 1, 3)), np.zeros((2, 1, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        landmark_metrics(np.zeros(3))
