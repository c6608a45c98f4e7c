"""Readers for the medical image formats, through the field's own libraries.

* **NIfTI** (``.nii``, ``.nii.gz``) with nibabel: the voxel array with the header's
  ``scl_slope`` / ``scl_inter`` applied, spacing from the header's ``pixdim`` (``get_zooms``);
* **DICOM** with pydicom: a single file (a 2D slice, or a multi-frame volume) or a **series
  folder** (one slice per file, any file names): the slices of one series sorted along the slice
  normal (``ImagePositionPatient`` projected on the normal of ``ImageOrientationPatient``;
  ``InstanceNumber`` when positions are missing), the modality LUT applied (``RescaleSlope`` /
  ``RescaleIntercept``: CT in Hounsfield units), in-plane spacing from ``PixelSpacing`` and the slice
  spacing from the positions (which must be evenly spaced), else ``SpacingBetweenSlices`` /
  ``SliceThickness``;
* **NRRD** (``.nrrd``, ``.nhdr``) with pynrrd: spacing from the header's ``space directions``
  (the length of each axis' direction vector) or ``spacings``;
* ``.npy`` arrays (no spacing).

Every volume comes in one index order, ``(X, Y, Z)`` = (column, row, slice) of the voxel grid:
NIfTI and NRRD (read in Fortran order) store it so, and a DICOM slice's ``(row, column)`` pixel
array is transposed to it. :func:`read_slice` gives a 2D image the usual way round, ``(rows,
columns)``. Nothing is resampled or reoriented to a world frame here: the tasks resample to their
own grid and keep landmarks in voxel coordinates.

A file that cannot be read raises :class:`MedicalImageError` naming it and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.folder import DataLayoutError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: File suffixes of a volume in one file (a DICOM series is a folder instead).
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *NRRD_SUFFIXES, *DICOM_SUFFIXES, ".npy")
#: Slices of a DICOM series may be off even spacing by this fraction of the median spacing.
SLICE_SPACING_TOLERANCE = 0.01


class MedicalImageError(DataLayoutError):
    """A medical image file or DICOM series cannot be read; the message names it."""


@dataclass(frozen=True)
class Volume:
    """A voxel array in ``(X, Y, Z)`` order (float32, rescaled to physical values) and its spacing
    in mm along X, Y, Z (``None`` when the file records none, e.g. ``.npy``)."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    path: Path


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    """Whether ``path``'s name ends in one of ``suffixes`` (case-insensitive; ``.nii.gz`` counts)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def is_dicom_series(path: Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files (checked by the ``DICM`` preamble of the
    first regular, non-hidden file, so series with file names without a suffix count too)."""
    if not path.is_dir():
        return False
    files = _series_files(path)
    return bool(files) and _is_dicom_file(files[0])


def is_volume(path: Path) -> bool:
    """Whether ``path`` is something :func:`read_volume` reads: a file with a volume suffix or a
    DICOM series folder."""
    return (path.is_file() and has_suffix(path, VOLUME_SUFFIXES)) or is_dicom_series(path)


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _fail(path: Path, what: str, exc: BaseException) -> MedicalImageError:
    return MedicalImageError(f"cannot read {path} as {what} ({type(exc).__name__}: {exc}); is the file complete?")


# ---------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, header_only: bool = False) -> tuple[Any, tuple[float, ...]]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError(f"a {type(img).__name__}, not a NIfTI image")
        zooms = tuple(float(z) for z in img.header.get_zooms())
        if header_only:
            return tuple(int(s) for s in img.shape), zooms
        return np.asarray(img.get_fdata(dtype=np.float32)), zooms  # scl_slope / scl_inter applied
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors ... on bad files
        raise _fail(path, "NIfTI", exc) from exc


# ---------------------------------------------------------------- NRRD
def nrrd_spacing(header: dict[str, Any]) -> tuple[float, ...] | None:
    """Spacing of an NRRD header's spatial axes: the length of each ``space directions`` vector
    (rows that are not NaN; non-spatial axes have none), else ``spacings``; ``None`` without both."""
    if header.get("space directions") is not None:
        dirs = np.asarray(header["space directions"], dtype=np.float64)
        spatial = dirs[~np.isnan(dirs).any(axis=1)]
        return tuple(float(n) for n in np.linalg.norm(spatial, axis=1))
    if header.get("spacings") is not None:
        sp = np.asarray(header["spacings"], dtype=np.float64)
        return tuple(float(s) for s in sp[np.isfinite(sp)])
    return None


def _read_nrrd(path: Path, header_only: bool = False) -> tuple[Any, tuple[float, ...] | None]:
    import nrrd

    try:
        if header_only:
            header = nrrd.read_header(str(path))
            return tuple(int(s) for s in header["sizes"]), nrrd_spacing(header)
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, zlib/gzip errors ... on bad files
        raise _fail(path, "an NRRD volume", exc) from exc
    return np.asarray(data), nrrd_spacing(header)


# ---------------------------------------------------------------- DICOM
def _dcmread(path: Path, header_only: bool = False) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ValueError ... on bad files
        raise _fail(path, "DICOM", exc) from exc


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: ``PixelSpacing``, or the enhanced multi-frame
    ``SharedFunctionalGroupsSequence`` pixel measures."""
    ps = ds.get("PixelSpacing")
    if ps is None and "SharedFunctionalGroupsSequence" in ds:
        measures = ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        ps = measures[0].get("PixelSpacing") if measures else None
    return (float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None


def _header_slice_spacing(ds: Any) -> float | None:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(key)
        if value is not None and float(value) > 0:
            return float(value)
    return None


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """The modality-LUT-applied pixels (``RescaleSlope`` / ``RescaleIntercept``), float32."""
    from pydicom.pixels import apply_modality_lut

    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise MedicalImageError(
            f"DICOM file {path} holds colour pixels ({ds.get('PhotometricInterpretation')}); expected a grayscale image"
        )
    try:
        return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    except Exception as exc:  # missing pixel data, an unsupported transfer syntax (needs a decoder plugin) ...
        raise _fail(path, "DICOM pixel data", exc) from exc


def _spacing3(in_plane: tuple[float, float] | None, slice_spacing: float | None) -> tuple[float, float, float] | None:
    if in_plane is None or slice_spacing is None:
        return None
    return in_plane[1], in_plane[0], slice_spacing  # (X = column, Y = row, Z)


def _read_dicom_file(path: Path) -> Volume:
    ds = _dcmread(path)
    px = _pixels(ds, path)
    if px.ndim == 2:
        px = px[None]
    if px.ndim != 3:
        raise MedicalImageError(f"DICOM file {path} holds pixel data of shape {px.shape}; expected one slice or frames of one channel")
    return Volume(px.transpose(2, 1, 0).copy(), _spacing3(_pixel_spacing(ds), _header_slice_spacing(ds)), path)


def _slice_positions(headers: Sequence[Any]) -> np.ndarray | None:
    """Each slice's position along the series' slice normal, or ``None`` if a header lacks it."""
    if any(h.get("ImagePositionPatient") is None or h.get("ImageOrientationPatient") is None for h in headers):
        return None
    o = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(o[:3], o[3:])
    return np.asarray([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=np.float64))) for h in headers])


# Not MONAI's LoadImage/PydicomReader (a wrapper around the same pydicom): on an unevenly spaced series it silently returns the
# mean gap as the spacing (68.3 mm for pydicom's own CT2 folder, slices 202.5 and 1.25 mm apart); this reader refuses it.
def _read_dicom_series(folder: Path) -> Volume:
    files = _series_files(folder)
    if not files:
        raise MedicalImageError(f"DICOM series folder {folder} holds no files")
    headers = [_dcmread(f, header_only=True) for f in files]
    series = sorted({str(h.get("SeriesInstanceUID", "")) for h in headers})
    if len(series) > 1:
        raise MedicalImageError(
            f"DICOM folder {folder} mixes {len(series)} series ({', '.join(series[:5])}); put each series in its own folder"
        )
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(shapes) > 1:
        raise MedicalImageError(f"the slices of DICOM series {folder} differ in size: {sorted(shapes)}")
    positions = _slice_positions(headers)
    if positions is not None:
        order = np.argsort(positions, kind="stable")
    else:
        order = np.argsort([int(h.get("InstanceNumber", 0) or 0) for h in headers], kind="stable")
    slice_spacing = _header_slice_spacing(headers[0])
    if positions is not None and len(files) > 1:
        gaps = np.diff(positions[order])
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > SLICE_SPACING_TOLERANCE * abs(step)) if step > 0 else np.arange(len(gaps))
        if len(bad):
            k = int(bad[0])
            raise MedicalImageError(
                f"the slices of DICOM series {folder} are not evenly spaced: {files[order[k]].name} and "
                f"{files[order[k + 1]].name} lie {gaps[k]:.4g} mm apart, the series' median step is {step:.4g} mm "
                "(a missing or duplicate slice, or two series in one folder); fix the series"
            )
        slice_spacing = step
    slices = [_pixels(_dcmread(files[i]), files[i]) for i in order]
    if any(s.ndim != 2 for s in slices):
        raise MedicalImageError(f"DICOM series {folder} holds multi-frame or multi-channel files; expected one 2-D slice per file")
    vol = np.stack(slices).transpose(2, 1, 0).copy()  # (Z, row, column) -> (X, Y, Z)
    return Volume(vol, _spacing3(_pixel_spacing(headers[0]), slice_spacing), folder)


# ---------------------------------------------------------------- dispatch
def _three(spacing: Sequence[float] | None, ndim: int) -> tuple[float, float, float] | None:
    if spacing is None or len(spacing) < 3 or ndim < 3:
        return None
    sp = tuple(float(s) for s in spacing[:3])
    return (sp[0], sp[1], sp[2]) if all(np.isfinite(s) and s > 0 for s in sp) else None


def read_volume(path: str | Path) -> Volume:
    """Read a 3D volume from a NIfTI, NRRD, DICOM (file or series folder) or ``.npy`` file, in
    ``(X, Y, Z)`` order with its spacing (module docstring). A 2D image becomes one slice
    ``(X, Y, 1)``; a volume with trailing singleton axes is squeezed to 3D."""
    p = Path(path)
    if is_dicom_series(p):
        return _read_dicom_series(p)
    if not p.is_file():
        raise MedicalImageError(f"{p} does not exist (expected a volume file {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder)")
    spacing: Sequence[float] | None
    if has_suffix(p, NIFTI_SUFFIXES):
        arr, spacing = _read_nifti(p)
    elif has_suffix(p, NRRD_SUFFIXES):
        arr, spacing = _read_nrrd(p)
    elif has_suffix(p, DICOM_SUFFIXES) or _is_dicom_file(p):
        return _read_dicom_file(p)
    elif has_suffix(p, (".npy",)):
        try:
            arr, spacing = np.load(p, allow_pickle=False), None
        except (ValueError, OSError, EOFError) as exc:
            raise _fail(p, "a .npy array", exc) from exc
    else:
        raise MedicalImageError(
            f"{p} is not a known volume format; valid suffixes: {', '.join(VOLUME_SUFFIXES)} (or a DICOM series folder)"
        )
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise MedicalImageError(f"{p} holds a {arr.ndim}-D array of shape {arr.shape}; expected a 3-D volume")
    return Volume(arr, _three(spacing, 3), p)


def volume_shape(path: str | Path) -> tuple[int, ...]:
    """The array shape of a volume file or series from its header(s) only (cheap), in the order
    :func:`read_volume` returns (``.npy``: as stored)."""
    p = Path(path)
    if is_dicom_series(p):
        files = _series_files(p)
        h = _dcmread(files[0], header_only=True)
        return int(h.Columns), int(h.Rows), len(files)
    if has_suffix(p, NIFTI_SUFFIXES):
        return tuple(_read_nifti(p, header_only=True)[0])
    if has_suffix(p, NRRD_SUFFIXES):
        return tuple(_read_nrrd(p, header_only=True)[0])
    if has_suffix(p, DICOM_SUFFIXES):
        h = _dcmread(p, header_only=True)
        return int(h.Columns), int(h.Rows), int(h.get("NumberOfFrames", 1) or 1)
    try:
        return tuple(np.load(p, mmap_mode="r").shape)
    except (ValueError, OSError) as exc:
        raise _fail(p, "a .npy array", exc) from exc


def read_slice(path: str | Path) -> np.ndarray:
    """A 2D image ``(rows, columns)`` float32 from a DICOM slice or a NIfTI image; of a volume
    (a multi-frame DICOM, a 3D NIfTI) the middle slice along Z."""
    vol = read_volume(path).array
    return np.ascontiguousarray(vol[:, :, vol.shape[2] // 2].T, dtype=np.float32)


def slice_pixels(path: str | Path) -> int:
    """Pixels of :func:`read_slice`'s image, from the header (to refuse huge files before decoding)."""
    shape = volume_shape(path)
    return int(shape[0]) * int(shape[1])


__all__ = [
    "DICOM_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "VOLUME_SUFFIXES",
    "MedicalImageError",
    "Volume",
    "has_suffix",
    "is_dicom_series",
    "is_volume",
    "nrrd_spacing",
    "read_slice",
    "read_volume",
    "slice_pixels",
    "volume_shape",
]
