"""The synthetic head-CT cohort: determinism, shapes, spacing, the missing-landmark rule, and
landmarks at their anatomical points (on the drawn bone surface, bright bone in the image,
no bone around a missing one)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import synthetic_ct as sct
from fedsim.data.synthetic_ct import (
    LANDMARK_DEFINITIONS,
    LANDMARK_NAMES,
    NUM_LANDMARKS,
    cases_with_missing,
    generate_case,
    generate_cases,
    landmark_positions,
    missing_landmarks,
)

SMALL = (40, 40, 24)
FINE = (96, 96, 64)  # fine enough (~2.4 x 2.4 x 4.5 mm) to look at the anatomy
BONE, SOFT_MAX = 0.55, 0.5  # soft tissue <= ~0.45 (with bias and noise), bone >= ~0.6


def _near(case, point: np.ndarray, radius_mm: float) -> np.ndarray:
    """Intensities of the voxels within ``radius_mm`` of ``point`` (voxel coordinates)."""
    lo = np.maximum(np.floor(point - radius_mm / case.spacing), 0).astype(int)
    hi = np.minimum(np.ceil(point + radius_mm / case.spacing) + 1, case.volume.shape).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    box = case.volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return box[np.linalg.norm((grid - point) * case.spacing, axis=-1) <= radius_mm]


def test_constants():
    assert len(LANDMARK_NAMES) == NUM_LANDMARKS == 14 == len(set(LANDMARK_NAMES))
    assert set(LANDMARK_DEFINITIONS) == set(LANDMARK_NAMES)


def test_cases_are_deterministic_by_seed_and_index():
    a, b = generate_case(4, SMALL, 7), generate_case(4, SMALL, 7)
    assert a.volume.tobytes() == b.volume.tobytes() and a.name == b.name
    assert np.array_equal(a.landmarks, b.landmarks, equal_nan=True) and np.array_equal(a.spacing, b.spacing)
    assert not np.array_equal(a.volume, generate_case(4, SMALL, 8).volume)
    assert not np.array_equal(a.volume, generate_case(5, SMALL, 7).volume)
    (c,) = generate_cases([4], SMALL, 7)
    assert np.array_equal(c.volume, a.volume)


def test_shapes_dtypes_range_and_anisotropic_spacing():
    for i in range(3):
        c = generate_case(i, SMALL, 0)
        assert c.volume.shape == SMALL and c.volume.dtype == np.float32
        assert c.volume.min() >= 0.0 and c.volume.max() <= 1.0 and c.volume.std() > 0.1
        assert c.volume[0, 0, 0] < 0.1  # air in the corner
        assert c.landmarks.shape == (NUM_LANDMARKS, 3) and c.landmarks.dtype == np.float64
        assert c.spacing.shape == (3,) and c.spacing.dtype == np.float64
        assert c.spacing[0] == c.spacing[1] and c.spacing[2] > 1.4 * c.spacing[0]
        assert c.present.dtype == bool and c.present.tolist() == (~np.isnan(c.landmarks).any(1)).tolist()
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, (40, 40), 0)  # type: ignore[arg-type]


def test_head_fits_the_field_of_view():
    for i in range(200):
        p = landmark_positions(i, SMALL, 3)  # all 14, also the missing ones; nothing rendered
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= np.array(SMALL) - 1).all()


def test_missing_landmark_rule():
    n = 1000
    flags = cases_with_missing(n)
    assert flags.mean() == pytest.approx(0.3) and flags[:10].tolist() == [i in (1, 4, 7) for i in range(10)]
    for seed in (0, 1):
        counts = np.array([len(missing_landmarks(i, seed)) for i in range(n)])
        assert ((counts > 0) == flags).all() and counts.max() <= 4 and set(counts[flags]) >= {1, 2, 3}
    assert [missing_landmarks(i, 0) for i in range(40)] != [missing_landmarks(i, 1) for i in range(40)]
    assert all((8 in m) == (9 in m) for m in (missing_landmarks(i, 0) for i in range(n)))  # 8 and 9 go missing together
    for i in (1, 4, 7, 2):  # the NaN rows of the generated case are exactly the rule's
        c = generate_case(i, SMALL, 0)
        assert np.flatnonzero(~c.present).tolist() == list(missing_landmarks(i, 0))
        assert np.allclose(c.landmarks[c.present], landmark_positions(i, SMALL, 0)[c.present])


@pytest.mark.parametrize("jaw", [0.92, 1.0, 1.08])
def test_landmarks_lie_on_the_drawn_bone_surface(jaw):
    """In the head frame, every landmark is exactly on the surface of the hard tissue."""
    lms = sct._nominal_landmarks(jaw)
    piv = np.asarray(sct._PIVOT)
    p = tuple(lms[:, i].astype(np.float32) for i in range(3))
    pj = tuple((piv + (lms - piv) / jaw)[:, i].astype(np.float32) for i in range(3))
    tissue = sct._anatomy(p, pj, (), lms)
    assert np.abs(np.minimum(tissue["bone"], tissue["teeth"])).max() < 1e-3


@pytest.mark.parametrize("index", range(8))
def test_landmarks_are_at_bone_and_missing_ones_have_none(index):
    c = generate_case(index, FINE, 2)
    where = landmark_positions(index, FINE, 2)
    reach = max(6.0, 1.05 * c.spacing.max())  # the next slice, which may be ~7 mm away
    for k, name in enumerate(LANDMARK_NAMES):
        if c.present[k]:  # bright bone nearby, but not only bone: the landmark is on a bone surface
            assert _near(c, where[k], reach).max() > BONE, name
            assert _near(c, where[k], reach + 1.5).min() < SOFT_MAX, name
        else:  # all bone within 10 mm of a missing landmark was removed
            assert _near(c, where[k], 6.0).max() < SOFT_MAX, name
    assert index % 10 not in (1, 4, 7) or not c.present.all()
