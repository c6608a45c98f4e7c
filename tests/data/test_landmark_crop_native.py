"""Native-resolution crops by hand: the authors' fit rule, a window of the volume's own voxels
(no resampling at zoom 1), per-axis zoom and spacing, random windows keep the landmarks, and the
kept region covers every crop."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.landmark_crop import fit_zoom, landmark_centre, native_region, prepare_native

NAN = np.nan


def test_fit_zoom_by_hand():
    lm = np.array([[10.0, 20.0, 5.0], [110.0, 40.0, 45.0], [NAN, NAN, NAN]])
    # spans 100, 20, 40 in a 64 x 64 x 32 crop: min(1, 64/100 - 0.02), min(1, 64/20 - 0.02), min(1, 32/40 - 0.04)
    np.testing.assert_allclose(fit_zoom(lm, (64, 64, 32)), [0.62, 1.0, 0.76])
    # centred on (60, 30, 25): largest deviation 50, 10, 20 -> (c - 1) / (2 dev) = 0.63, 3.15 -> 1, 0.775
    np.testing.assert_allclose(fit_zoom(lm, (64, 64, 32), np.array([60.0, 30.0, 25.0])), [0.63, 1.0, 0.775])
    assert fit_zoom(np.full((2, 3), NAN), (64, 64, 32)).tolist() == [1.0, 1.0, 1.0]
    assert landmark_centre(lm).tolist() == [60.0, 30.0, 25.0] and landmark_centre(np.full((1, 3), NAN)) is None


def test_zoom_1_is_a_window_of_the_volume_itself():
    vol = np.arange(40 * 30 * 20, dtype=np.float32).reshape(40, 30, 20)
    lm = np.array([[20.0, 15.0, 10.0], [NAN, NAN, NAN]])
    out = prepare_native(vol, lm, np.array([0.4, 0.4, 0.8]), (16, 16, 8), (1.0, 1.0, 1.0), None)
    # centred on the volume centre (19.5, 14.5, 9.5): start round(19.5 - 7.5) = 12, round(14.5 - 7.5) = 7, round(9.5 - 3.5) = 6
    np.testing.assert_array_equal(out.volume, vol[12:28, 7:23, 6:14])
    assert out.landmarks[0].tolist() == [8.0, 8.0, 4.0] and np.isnan(out.landmarks[1]).all()
    assert out.spacing.tolist() == [0.4, 0.4, 0.8]
    # centred elsewhere, kept inside the volume: a centre at x = 38 gives start 40 - 16 = 24
    out = prepare_native(vol, lm, np.array([0.4, 0.4, 0.8]), (16, 16, 8), 1.0, None, centre=np.array([38.0, 14.5, 9.5]))
    assert out.offset.tolist() == [-24.0, -7.0, -6.0]


def test_per_axis_zoom_and_spacing():
    vol = np.zeros((40, 30, 20), np.float32)
    lm = np.array([[20.0, 10.0, 4.0]])
    out = prepare_native(vol, lm, np.array([0.4, 0.5, 1.0]), (16, 16, 16), (0.5, 1.0, 0.5), None)
    # sizes round(0.5 * 40) = 20 > 16: a window; 30 > 16: a window; 10 <= 16: padded at (16 - 10) // 2 = 3
    assert out.scale.tolist() == [0.5, 1.0, 0.5] and out.spacing.tolist() == [0.8, 0.5, 2.0]
    zoomed = (lm[0] + 0.5) * np.array([0.5, 1.0, 0.5]) - 0.5
    np.testing.assert_allclose(out.landmarks[0], zoomed + out.offset)
    assert out.offset[2] == 3.0
    np.testing.assert_allclose(out.to_original(out.landmarks), lm)
    with pytest.raises(ValueError, match="zoom must be a positive finite number"):
        prepare_native(vol, lm, np.ones(3), (16, 16, 16), (1.0, 0.0, 1.0), None)


def test_random_windows_keep_the_landmarks_and_the_region_covers_them():
    rng = np.random.default_rng(0)
    shape = (200, 180, 90)
    lm = np.array([[90.0, 80.0, 40.0], [120.0, 100.0, 50.0], [NAN, NAN, NAN]])
    crop = (64, 64, 32)
    centre = (np.asarray(shape) - 1) / 2
    eval_zoom = np.full(3, fit_zoom(lm, crop, centre).min())
    start, stop = native_region(shape, lm, crop, 0.6, eval_zoom, centre)
    assert ((stop - start) < np.asarray(shape)).all()  # bounded by the crop, not the scan
    assert ((stop - start) >= np.ceil(np.asarray(crop) / 0.6)).all()
    roi = np.zeros(tuple(stop - start), np.float32)
    for _ in range(20):
        out = prepare_native(roi, lm - start, np.ones(3), crop, rng.uniform(0.6, 1.0, 3), rng)
        present = out.landmarks[:2]
        assert (present >= 0).all() and (present <= np.asarray(crop) - 1).all()
