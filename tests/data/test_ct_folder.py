"""The authors' CT layout: NRRD + label + spacing round trips, intensity scaling, missing
landmarks, and clear errors naming the bad file."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.ct_folder import (
    CTDataError,
    load_ct_case,
    load_ct_labels,
    scale_intensities,
    scan_ct_folder,
    write_ct_case,
)
from fedsim.data.synthetic_ct import generate_case

SHAPE = (12, 10, 8)


def _landmarks(n: int = 5) -> np.ndarray:
    lm = np.random.default_rng(0).uniform(0, 7, size=(n, 3))
    lm[1] = np.nan
    return lm


def _write(root, case="c1", volume=None, landmarks=None, spacing=(0.5, 0.5, 1.25)):
    vol = np.random.default_rng(1).uniform(-1024, 2400, SHAPE).astype(np.int16) if volume is None else volume
    write_ct_case(root, case, vol, _landmarks() if landmarks is None else landmarks, np.asarray(spacing))
    return vol


def test_round_trip_hu_volume(tmp_path):
    import nrrd

    vol = _write(tmp_path)
    assert scan_ct_folder(tmp_path) == ["c1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1_label.npy", "c1_spacing.npy", "c1_volume.nrrd"]  # no temp files
    case = load_ct_case(tmp_path, "c1", num_landmarks=5)
    assert case.volume.shape == SHAPE and case.volume.dtype == np.float32 and case.name == "c1"
    # HU (min <= -500): window [-1000, 2000] -> [0, 1]
    assert np.allclose(case.volume, np.clip((vol.astype(np.float64) + 1000) / 3000, 0, 1), atol=1e-6)
    assert np.array_equal(case.landmarks, _landmarks(), equal_nan=True) and case.present.tolist() == [1, 0, 1, 1, 1]
    assert case.spacing.tolist() == [0.5, 0.5, 1.25]
    # on disk: the authors' conventions (missing = -1000), spacing also in the NRRD header
    raw = np.load(tmp_path / "c1_label.npy")
    assert raw[1].tolist() == [-1000.0] * 3 and np.array_equal(raw[[0, 2, 3, 4]], _landmarks()[[0, 2, 3, 4]])
    data, header = nrrd.read(str(tmp_path / "c1_volume.nrrd"), index_order="F")
    assert data.shape == SHAPE and data.dtype == np.int16 and np.array_equal(data, vol)
    assert np.allclose(np.diag(header["space directions"]), [0.5, 0.5, 1.25])
    assert np.array_equal(load_ct_labels(tmp_path, "c1"), case.landmarks, equal_nan=True)


def test_round_trip_synthetic_case_is_exact(tmp_path):
    c = generate_case(1, (24, 24, 12), 0)  # an incomplete case, volume already in [0, 1]
    write_ct_case(tmp_path, c.name, c.volume, c.landmarks, c.spacing)
    r = load_ct_case(tmp_path, c.name, 14)
    assert np.array_equal(r.volume, c.volume) and np.array_equal(r.spacing, c.spacing)
    assert np.array_equal(r.landmarks, c.landmarks, equal_nan=True) and not r.present.all()


def test_intensity_rule_and_authors_missing_flag(tmp_path):
    v = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) * 3 + 24  # not HU, not [0, 1]
    out = scale_intensities(v)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32  # min-max
    assert not scale_intensities(np.full(SHAPE, 7.0)).any()
    lm = _landmarks()
    _write(tmp_path, volume=v, landmarks=lm)
    np.save(tmp_path / "c1_label.npy", np.where(np.isnan(lm), -150.0, lm))  # any value < -100 = missing
    assert np.isnan(load_ct_case(tmp_path, "c1").landmarks[1]).all()


def test_scan_errors_name_the_layout_and_missing_file(tmp_path):
    with pytest.raises(CTDataError, match="does not exist"):
        scan_ct_folder(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(CTDataError, match=r"no \*_volume.nrrd files found .*_label.npy"):
        scan_ct_folder(tmp_path)
    _write(tmp_path, "b")
    _write(tmp_path, "a")
    assert scan_ct_folder(tmp_path) == ["a", "b"]
    (tmp_path / "b_label.npy").unlink()
    with pytest.raises(CTDataError, match=r"b_label\.npy"):
        scan_ct_folder(tmp_path)
    (tmp_path / "a_spacing.npy").unlink()  # then the NRRD header's spacing (write_ct_case records it there)
    assert load_ct_case(tmp_path, "a").spacing.tolist() == [0.5, 0.5, 1.25]
    import nrrd

    nrrd.write(str(tmp_path / "a_volume.nrrd"), np.zeros(SHAPE, np.float32), index_order="F")  # a header without spacing
    with pytest.raises(CTDataError, match=r"a_spacing\.npy"):
        load_ct_case(tmp_path, "a")


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("label", np.zeros((5, 2)), r"c1_label.npy holds .* shape \(5, 2\); expected \(L, 3\)"),
        ("label", np.zeros((4, 3)), r"c1_label.npy has 4 landmarks; expected 5"),
        ("label", np.array([[1.0, np.inf, 2.0]] * 5), "c1_label.npy holds infinite"),
        ("label", np.array([[1.0, 2.0, 30.0]] * 5), r"c1_label.npy: 5 landmark\(s\) lie outside the volume"),
        ("spacing", np.array([0.5, 0.5]), r"c1_spacing.npy holds .* shape \(2,\); expected 3 values"),
        ("spacing", np.array([0.5, -1.0, 1.0]), "c1_spacing.npy holds .*positive finite"),
        ("spacing", np.array([0.5, np.nan, 1.0]), "c1_spacing.npy holds .*positive finite"),
    ],
)
def test_bad_label_and_spacing_files(tmp_path, file, content, message):
    _write(tmp_path)
    np.save(tmp_path / f"c1_{file}.npy", content)
    with pytest.raises(CTDataError, match=message):
        load_ct_case(tmp_path, "c1", num_landmarks=5)


def test_bad_volumes(tmp_path):
    import nrrd

    _write(tmp_path)
    path = tmp_path / "c1_volume.nrrd"
    nrrd.write(str(path), np.zeros((4, 5, 6, 2), np.float32), index_order="F")
    with pytest.raises(CTDataError, match=r"c1_volume.nrrd holds a 4-D array .* expected a 3-D"):
        load_ct_case(tmp_path, "c1")
    bad = np.zeros(SHAPE, np.float32)
    bad[1, 2, 3] = np.nan
    nrrd.write(str(path), bad, index_order="F")
    with pytest.raises(CTDataError, match=r"c1_volume\.nrrd holds NaN"):
        load_ct_case(tmp_path, "c1")
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 12 10 8\nencoding: gzip\n\n\x1f\x8b garbage")
    with pytest.raises(CTDataError, match=r"cannot read .*c1_volume\.nrrd as an NRRD volume"):
        load_ct_case(tmp_path, "c1")
    path.write_bytes(b"not an nrrd file at all")
    with pytest.raises(CTDataError, match=r"cannot read .*c1_volume\.nrrd as an NRRD volume"):
        load_ct_case(tmp_path, "c1")
    (tmp_path / "c1_label.npy").write_bytes(b"corrupt")
    with pytest.raises(CTDataError, match=r"cannot read landmark label file .*c1_label\.npy"):
        load_ct_labels(tmp_path, "c1")


def test_write_validates_and_overwrites(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        write_ct_case(tmp_path, "x", np.zeros((4, 4)), _landmarks(), [1, 1, 1])
    with pytest.raises(ValueError, match=r"\(L, 3\)"):
        write_ct_case(tmp_path, "x", np.zeros(SHAPE), np.zeros((3, 2)), [1, 1, 1])
    with pytest.raises(ValueError, match="spacing"):
        write_ct_case(tmp_path, "x", np.zeros(SHAPE), _landmarks(), [1, 0, 1])
    assert not list(tmp_path.iterdir())
    _write(tmp_path, volume=np.zeros(SHAPE, np.float32))
    _write(tmp_path, volume=np.ones(SHAPE, np.float32), spacing=(1, 1, 2))
    case = load_ct_case(tmp_path, "c1")
    assert case.volume.min() == 1.0 and case.spacing.tolist() == [1, 1, 2]
    assert len(list(tmp_path.iterdir())) == 3


def test_scaling_is_bit_identical_to_the_formulas_monai_replaced():
    """scale_intensities goes through MONAI's ScaleIntensityRange / ScaleIntensity; the results must
    equal fedsim's former numpy formulas bit for bit (the task docs' numbers depend on them)."""
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1300, 2600, SHAPE).astype(np.float32)
    np.testing.assert_array_equal(scale_intensities(hu), np.clip((hu - -1000.0) / 3000.0, 0.0, 1.0))
    raw = rng.uniform(90, 4100, SHAPE).astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    out = scale_intensities(raw)
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_array_equal(out, (raw - lo) / (hi - lo))
