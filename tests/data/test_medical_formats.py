"""Real DICOM and NIfTI files (the ones pydicom and nibabel ship in their packages) through
fedsim's loaders: the 3D CT and OCT folders and the 2D MRI image folder, with the spacing and the
rescaled values checked against what pydicom / nibabel read directly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file

from fedsim.data.ct_folder import CTDataError, load_ct_case, scale_intensities, scan_ct_folder
from fedsim.data.folder import KAGGLE_CLASSES, load_images, scan_image_folder
from fedsim.data.medical import MedicalImageError, nrrd_spacing, read_volume
from fedsim.data.synthetic_oct import load_volumes, scan_oct_folder

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))
ANATOMICAL = Path(NIBABEL_DATA) / "anatomical.nii"
#: A real CT series pydicom ships (16 x 16 slices): 17106 at z = -99.48 mm, then 17136, 17166,
#: 17196 at z = 103.02, 104.27, 105.52 mm.
CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "77654033" / "CT2"
CONTIGUOUS = ("17196", "17136", "17166")  # copied out of order: the reader sorts by position


def _hu(path: Path) -> np.ndarray:
    """pydicom's own pixels with the rescale (if any) applied, (rows, columns)."""
    ds = pydicom.dcmread(str(path))
    return ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _series(folder: Path, names=CONTIGUOUS) -> Path:
    folder.mkdir(parents=True)
    for n in names:
        shutil.copy(CT_SERIES / n, folder / n)
    return folder


def _landmarks(shape, n: int = 2) -> np.ndarray:
    return np.array([[0.0, 0.0, 0.0], [s - 1.0 for s in shape]][:n])


def test_ct_small_dicom_file_spacing_and_hounsfield_units():
    ds = pydicom.dcmread(str(CT_SMALL))
    vol = read_volume(CT_SMALL)
    assert vol.spacing == (0.661468, 0.661468, 5.0)  # PixelSpacing (row, column) and SliceThickness
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert vol.array.shape == (128, 128, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], _hu(CT_SMALL).T)  # (X, Y) = (column, row)


def test_dicom_series_through_the_ct_loader(tmp_path):
    case_dir = tmp_path / "ct"
    _series(case_dir / "p1_volume")
    np.save(case_dir / "p1_label.npy", _landmarks((16, 16, 3)))
    assert scan_ct_folder(case_dir) == ["p1"]
    case = load_ct_case(case_dir, "p1", num_landmarks=2)
    # spacing from the headers: PixelSpacing 0.488281 in plane, 1.25 mm between the slice positions
    np.testing.assert_allclose(case.spacing, [0.488281, 0.488281, 1.25], rtol=1e-5)
    hu = np.stack([_hu(CT_SERIES / n) for n in ("17136", "17166", "17196")], axis=-1).transpose(1, 0, 2)
    np.testing.assert_array_equal(read_volume(case_dir / "p1_volume").array, hu)  # slope 1, intercept -1024 applied
    np.testing.assert_array_equal(case.volume, scale_intensities(hu.astype(np.float32)))


def test_unevenly_spaced_series_is_refused_naming_the_gap(tmp_path):
    folder = _series(tmp_path / "series", ("17106", *CONTIGUOUS))
    with pytest.raises(MedicalImageError, match=r"not evenly spaced: 17106 and 17136 lie 202\.5 mm apart"):
        read_volume(folder)


def test_nifti_through_the_ct_loader_with_header_spacing(tmp_path, caplog):
    img = nib.load(str(ANATOMICAL))
    shutil.copy(ANATOMICAL, tmp_path / "a_volume.nii")
    np.save(tmp_path / "a_label.npy", _landmarks(img.shape))
    case = load_ct_case(tmp_path, "a")
    assert case.spacing.tolist() == [float(z) for z in img.header.get_zooms()] == [2.0, 2.0, 2.0]
    np.testing.assert_array_equal(case.volume, scale_intensities(np.asarray(img.dataobj, dtype=np.float32)))
    # a _spacing.npy wins over the header, and a disagreement is logged
    np.save(tmp_path / "a_spacing.npy", np.array([1.0, 2.0, 3.0]))
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        assert load_ct_case(tmp_path, "a").spacing.tolist() == [1.0, 2.0, 3.0]
    assert "a_spacing.npy says spacing [1.0, 2.0, 3.0] mm, the volume's header [2.0, 2.0, 2.0] mm" in caplog.text


def test_nrrd_spacing_from_its_header(tmp_path):
    import nrrd

    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    sp = np.array([0.7, 0.9, 2.5])
    nrrd.write(
        str(tmp_path / "r_volume.nrrd"),
        np.zeros((5, 6, 7), np.int16),
        {"space": "left-posterior-superior", "space directions": rot * sp[:, None]},
        index_order="F",
    )
    np.save(tmp_path / "r_label.npy", _landmarks((5, 6, 7)))
    np.testing.assert_allclose(load_ct_case(tmp_path, "r").spacing, sp)  # the length of each (rotated) axis vector
    assert nrrd_spacing({"spacings": np.array([0.5, np.nan, 3.0])}) == (0.5, 3.0)
    assert nrrd_spacing({"space directions": np.array([[np.nan] * 3, [0, 2.0, 0], [0, 0, 4.0]])}) == (2.0, 4.0)


def test_ct_case_without_any_spacing_is_refused(tmp_path):
    shutil.copy(MR_SMALL, tmp_path / "m_volume.dcm")
    np.save(tmp_path / "m_label.npy", _landmarks((64, 64, 1)))
    assert load_ct_case(tmp_path, "m").spacing.tolist() == [0.3125, 0.3125, 0.8]  # MR_small's PixelSpacing, SliceThickness
    (tmp_path / "bad_volume.nii").write_bytes(b"\x00" * 100)
    np.save(tmp_path / "bad_label.npy", _landmarks((2, 2, 2)))
    with pytest.raises(CTDataError, match=r"cannot read .*bad_volume\.nii as NIfTI"):
        load_ct_case(tmp_path, "bad")


def test_nifti_and_dicom_series_through_the_oct_loader(tmp_path):
    (tmp_path / "normal").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "normal" / "eye1.nii")
    _series(tmp_path / "glaucoma" / "eye2")  # a DICOM series folder inside the class folder
    files = scan_oct_folder(tmp_path)
    assert [p.name for p in files.paths] == ["eye2", "eye1.nii"] and files.labels.tolist() == [1, 0]

    def minmax_u8(v: np.ndarray) -> np.ndarray:
        return np.round((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)

    nifti = np.asarray(nib.load(str(ANATOMICAL)).dataobj, dtype=np.float32).transpose(2, 1, 0)  # (X, Y, Z) -> (D, H, W)
    one = type(files)(files.paths[1:], files.labels[1:])
    np.testing.assert_array_equal(load_volumes(one, nifti.shape)[0], minmax_u8(nifti))
    series = np.stack([_hu(CT_SERIES / n) for n in ("17136", "17166", "17196")]).astype(np.float32)  # (D, rows, columns)
    one = type(files)(files.paths[:1], files.labels[:1])
    np.testing.assert_array_equal(load_volumes(one, series.shape)[0], minmax_u8(series))


def test_dicom_and_nifti_slices_through_the_mri_folder(tmp_path):
    for cls, src in zip(KAGGLE_CLASSES[:3], (MR_SMALL, CT_SMALL, ANATOMICAL), strict=True):
        (tmp_path / cls).mkdir()
        shutil.copy(src, tmp_path / cls / src.name)
    files = scan_image_folder(tmp_path, KAGGLE_CLASSES)
    assert [p.name for p in files.paths] == ["MR_small.dcm", "CT_small.dcm", "anatomical.nii"]
    images = load_images(files, 64)
    from PIL import Image

    def expected(img: np.ndarray) -> np.ndarray:
        u8 = np.round((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(u8).resize((64, 64), Image.Resampling.BILINEAR))

    anat = np.asarray(nib.load(str(ANATOMICAL)).dataobj, dtype=np.float64)
    np.testing.assert_array_equal(images[0], expected(_hu(MR_SMALL)))
    np.testing.assert_array_equal(images[1], expected(_hu(CT_SMALL)))
    np.testing.assert_array_equal(images[2], expected(anat[:, :, anat.shape[2] // 2].T))  # the middle slice, rows = Y


def test_colour_dicom_is_refused_naming_the_file(tmp_path):
    rgb = Path(get_testdata_file("ExplVR_BigEnd.dcm"))  # an RGB secondary capture pydicom ships
    assert pydicom.dcmread(str(rgb)).SamplesPerPixel == 3
    with pytest.raises(MedicalImageError, match=r"ExplVR_BigEnd\.dcm holds colour pixels \(RGB\); expected a grayscale image"):
        read_volume(rgb)
