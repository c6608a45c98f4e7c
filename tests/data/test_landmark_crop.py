"""Zoom + crop: landmark coordinates by hand, bright blobs land where the landmarks say, the
resampled spacing keeps distances in mm, random placement keeps landmarks inside, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.landmark_crop import prepare_case, zoomed_size


def _blob(shape, centre, sigma=1.2) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) / (2 * sigma**2)).astype(np.float32)


def _centroid(vol: np.ndarray) -> np.ndarray:
    w = np.clip(vol - 0.2 * vol.max(), 0, None)  # the blob's peak, not the interpolation's tails
    grid = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    return np.array([(g * w).sum() / w.sum() for g in grid])


def test_hand_computed_coordinates_and_spacing():
    vol = np.zeros((10, 10, 10), np.float32)
    lm = np.array([[2.0, 0.0, 9.0], [np.nan, np.nan, np.nan]])
    out = prepare_case(vol, lm, np.array([1.0, 1.0, 3.0]), (20, 20, 20), 1.0, None)
    # zoom 1 fits 10 voxels into the crop of 20: factor 2, p' = (p + 0.5) * 2 - 0.5
    assert out.landmarks[0].tolist() == [4.5, 0.5, 18.5] and np.isnan(out.landmarks[1]).all()
    assert out.spacing.tolist() == [0.5, 0.5, 1.5] and out.volume.shape == (20, 20, 20) and out.volume.dtype == np.float32
    # zoom 0.5: n = 10 (no resampling), centred at offset (20 - 10) // 2 = 5
    out = prepare_case(vol, lm, np.array([1.0, 1.0, 3.0]), (20, 20, 20), 0.5, None)
    assert out.landmarks[0].tolist() == [7.0, 5.0, 14.0] and out.spacing.tolist() == [1.0, 1.0, 3.0]
    # per axis: n_i = round(zoom * crop_i); spacing scales by shape / n
    assert zoomed_size((64, 64, 32), 0.8) == (51, 51, 26)
    out = prepare_case(np.zeros((80, 70, 40)), np.zeros((1, 3)), np.array([2.0, 2.0, 5.0]), (64, 64, 32), 0.8, None)
    assert np.allclose(out.spacing, [2.0 * 80 / 51, 2.0 * 70 / 51, 5.0 * 40 / 26])
    assert np.allclose(out.to_original(out.landmarks), 0.0)


@pytest.mark.parametrize(
    ("shape", "crop", "zoom", "random"),
    [
        ((10, 12, 8), (20, 24, 16), 1.0, False),  # upsampling x2, fits exactly
        ((30, 24, 20), (16, 16, 16), 0.7, True),  # zoom out, random offset
        ((20, 20, 12), (16, 16, 8), 1.6, True),  # zoom in, random crop
        ((20, 20, 12), (16, 16, 8), 1.6, False),  # zoom in, centre crop
    ],
)
def test_a_bright_blob_lands_on_its_landmark(shape, crop, zoom, random):
    centre = np.array(shape) * np.array([0.45, 0.55, 0.5]) + 0.3
    rng = np.random.default_rng(0) if random else None
    out = prepare_case(_blob(shape, centre), centre[None], np.ones(3), crop, zoom, rng)
    assert out.volume.shape == crop
    peak = np.array(np.unravel_index(np.argmax(out.volume), crop))
    assert np.abs(peak - out.landmarks[0]).max() <= 0.5 + 1e-9  # the brightest voxel is the nearest one
    assert np.abs(_centroid(out.volume) - out.landmarks[0]).max() < 0.25


def test_distances_in_mm_are_preserved():
    rng = np.random.default_rng(3)
    shape, spacing = (50, 40, 30), np.array([0.8, 0.8, 2.5])
    lm = rng.uniform(5, 25, size=(6, 3))
    before = np.abs(lm[:, None] - lm[None]) * spacing  # per-axis distances in mm
    for zoom in (0.6, 0.83, 1.0, 1.4):
        for r in (None, rng):
            out = prepare_case(np.zeros(shape, np.float32), lm, spacing, (32, 32, 16), zoom, r)
            after = np.abs(out.landmarks[:, None] - out.landmarks[None]) * out.spacing
            assert np.allclose(after, before, rtol=1e-12, atol=1e-9)


def test_random_crops_keep_present_landmarks_inside():
    rng = np.random.default_rng(1)
    shape, crop = (40, 40, 20), (16, 16, 8)
    lm = np.array([[12.0, 20.0, 8.0], [25.0, 28.0, 11.0], [np.nan] * 3, [np.nan] * 3])  # NaN: no constraint
    starts = set()
    for _ in range(200):
        out = prepare_case(np.zeros(shape), lm, np.ones(3), crop, 1.5, rng)  # 24 x 24 x 12 resampled
        inside = out.landmarks[[0, 1]]
        assert (inside >= 0).all() and (inside <= np.array(crop) - 1).all()
        assert np.isnan(out.landmarks[[2, 3]]).all()
        starts.add(tuple(out.offset))
    assert len(starts) > 10  # the crop really is random
    # landmarks that cannot all fit: the crop is centred on their bounding box
    far = np.array([[0.0, 0.0, 0.0], [39.0, 39.0, 19.0]])
    out = prepare_case(np.zeros(shape), far, np.ones(3), crop, 1.5, rng)
    assert np.allclose(out.landmarks.mean(0), (np.array(crop) - 1) / 2, atol=0.6)


def test_zoom_out_offsets_are_random_in_range_and_centred_without_rng():
    vol = _blob((30, 30, 30), (15.0, 15.0, 15.0))
    a = prepare_case(vol, np.zeros((1, 3)), np.ones(3), (20, 20, 20), 0.6, None)
    b = prepare_case(vol, np.zeros((1, 3)), np.ones(3), (20, 20, 20), 0.6, None)
    assert np.array_equal(a.volume, b.volume) and a.offset.tolist() == [4, 4, 4]  # (20 - 12) // 2
    rng = np.random.default_rng(5)
    offsets = {tuple(prepare_case(vol, np.zeros((1, 3)), np.ones(3), (20, 20, 20), 0.6, rng).offset) for _ in range(50)}
    assert len(offsets) > 5 and all(0 <= o <= 8 for off in offsets for o in off)
    assert not a.volume[:4].any() and not a.volume[16:].any()  # padded with air (0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zoom": 0.0}, "zoom must be a positive"),
        ({"zoom": -1.0}, "zoom must be a positive"),
        ({"zoom": float("nan")}, "zoom must be a positive"),
        ({"crop": (16, 0, 8)}, "crop must be three positive integers"),
        ({"crop": (16, 16)}, "crop must be three positive integers"),
        ({"crop": (16, 16, 8.5)}, "crop must be three positive integers"),
        ({"landmarks": np.zeros((14, 2))}, r"landmarks must be \(L, 3\)"),
        ({"volume": np.zeros((10, 10))}, "volume must be a non-empty 3-D"),
        ({"spacing": np.array([1.0, 0.0, 1.0])}, "spacing must be 3 positive"),
    ],
)
def test_errors(kwargs, message):
    args = {"volume": np.zeros((10, 10, 10)), "landmarks": np.zeros((14, 3)), "spacing": np.ones(3)}
    args |= {"crop": (16, 16, 8), "zoom": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        prepare_case(rng=None, **args)
