"""Real CT landmark cases in the H3DE-Net authors' layout (arXiv 2502.14221): read and write.

One folder holds three files per case::

    DATA_DIR/<case>_volume.nrrd    the CT volume (read with pynrrd, index order F -> (X, Y, Z))
    DATA_DIR/<case>_label.npy      (L, 3) landmark voxel coordinates, same axis order;
                                   a missing landmark has coordinates < -100 (written as -1000)
    DATA_DIR/<case>_spacing.npy    3 values: mm per voxel along X, Y, Z

The volume may also be ``<case>_volume.nii`` / ``.nii.gz`` (NIfTI, nibabel), ``<case>_volume.dcm``
(a multi-frame DICOM file) or a folder ``<case>_volume/`` holding one DICOM series (pydicom; the
slices sorted along their normal, rescale slope/intercept applied, so CT values are Hounsfield
units), all in the same ``(X, Y, Z)`` voxel order (:mod:`fedsim.data.medical`). The spacing comes
from ``_spacing.npy`` when the case has one (the authors' files; a header that disagrees is logged
as a warning), else from the volume's header (NRRD ``space directions``, NIfTI ``pixdim``, DICOM
``PixelSpacing`` and the slice positions); a case with neither is refused.

Loaded cases are :class:`fedsim.data.synthetic_ct.CTCase`: missing landmarks become NaN rows and
the intensities are scaled to [0, 1] by :func:`scale_intensities`:

* the volume looks like Hounsfield units (its minimum is <= -500, i.e. it holds air at about
  -1000 HU): clipped to the CT window [-1000, 2000] HU and mapped linearly (air 0, water 1/3,
  dense bone and teeth towards 1);
* it already lies in [0, 1] (e.g. written from a synthetic case): kept unchanged;
* otherwise (e.g. unsigned data with an offset): min-max scaled (a constant volume becomes 0).

Every problem raises :class:`CTDataError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedsim._logging import logger
from fedsim.data.folder import DataLayoutError
from fedsim.data.medical import MedicalImageError, is_dicom_series, read_volume
from fedsim.data.synthetic_ct import CTCase

VOLUME_SUFFIX, LABEL_SUFFIX, SPACING_SUFFIX = "_volume.nrrd", "_label.npy", "_spacing.npy"
#: Other volume files a case may have instead of ``_volume.nrrd`` (a ``<case>_volume/`` DICOM
#: series folder works too).
OTHER_VOLUME_SUFFIXES = ("_volume.nii.gz", "_volume.nii", "_volume.dcm")
#: Header and ``_spacing.npy`` spacings further apart than this (relative) are logged.
SPACING_MISMATCH = 1e-3
#: The authors flag a missing landmark by coordinates below this; we write MISSING_VALUE.
MISSING_BELOW, MISSING_VALUE = -100.0, -1000.0
HU_WINDOW = (-1000.0, 2000.0)
#: Present landmarks may lie this many voxels outside the volume's extent [-0.5, n - 0.5].
LANDMARK_TOLERANCE = 1.0
EXPECTED_LAYOUT = (
    f"expected DATA_DIR/<case>{VOLUME_SUFFIX} (the CT volume; or <case>_volume.nii[.gz], <case>_volume.dcm, "
    f"a DICOM series folder <case>_volume/) with DATA_DIR/<case>{LABEL_SUFFIX} "
    f"((L, 3) landmark voxel coordinates, missing landmarks < {MISSING_BELOW:g}) and, unless the volume's header "
    f"records the spacing, DATA_DIR/<case>{SPACING_SUFFIX} (3 values, mm per voxel along X, Y, Z)"
)


class CTDataError(DataLayoutError):
    """A CT data folder or one of its files cannot be used; the message names them."""


def ct_sites(case_ids: list[str] | tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """Site names and each case's site index of :func:`scan_ct_folder`'s ``sites=True`` ids."""
    prefixes = [c.split("/", 1)[0] for c in case_ids]
    names, site_of = np.unique(np.asarray(prefixes), return_inverse=True)
    return tuple(str(n) for n in names), site_of.astype(np.int64)


def _paths(data_dir: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    root = Path(data_dir)
    return root / f"{case_id}{VOLUME_SUFFIX}", root / f"{case_id}{LABEL_SUFFIX}", root / f"{case_id}{SPACING_SUFFIX}"


def volume_path(data_dir: str | Path, case_id: str) -> Path:
    """The case's volume: ``<case>_volume.nrrd`` if it exists, else the first of the other formats
    that does (``.nii.gz``, ``.nii``, ``.dcm``, the ``<case>_volume/`` series folder); the NRRD
    name when none exists (so errors name the authors' file)."""
    root = Path(data_dir)
    nrrd_path = root / f"{case_id}{VOLUME_SUFFIX}"
    if nrrd_path.is_file():
        return nrrd_path
    for suffix in OTHER_VOLUME_SUFFIXES:
        if (p := root / f"{case_id}{suffix}").is_file():
            return p
    series = root / f"{case_id}_volume"
    return series if series.is_dir() else nrrd_path


def _case_id(path: Path) -> str | None:
    name = path.name
    for suffix in (VOLUME_SUFFIX, *OTHER_VOLUME_SUFFIXES):
        if name.endswith(suffix) and path.is_file():
            return name[: -len(suffix)]
    if name.endswith("_volume") and is_dicom_series(path):
        return name[: -len("_volume")]
    return None


def scan_ct_folder(data_dir: str | Path, sites: bool = False) -> list[str]:
    """Sorted case ids of ``data_dir`` (one per volume file or series folder); checks that every
    volume has its label file (only names are looked at, and the first bytes of one file per
    folder: cheap). A missing ``_spacing.npy`` is looked for in the header when the case is read.
    With ``sites``, ``data_dir`` holds one such folder per site (:mod:`fedsim.data.sites`) and the
    ids are ``<site>/<case>`` (so ``DATA_DIR / id`` still names the case's files), site by site."""
    if sites:
        from fedsim.data.sites import scan_sites

        return [f"{name}/{case}" for name, cases in scan_sites(data_dir, scan_ct_folder) for case in cases]
    root = Path(data_dir)
    if not root.is_dir():
        raise CTDataError(f"CT data folder {root} does not exist; {EXPECTED_LAYOUT}")
    ids = sorted({c for p in root.iterdir() if (c := _case_id(p)) is not None})
    if not ids:
        raise CTDataError(f"no *{VOLUME_SUFFIX} files found in {root} (nor NIfTI / DICOM volumes); {EXPECTED_LAYOUT}")
    missing = [str(p) for c in ids if not (p := _paths(root, c)[1]).is_file()]
    if missing:
        raise CTDataError(f"CT cases in {root} lack their label file: missing {', '.join(missing[:10])}; {EXPECTED_LAYOUT}")
    return ids


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CTDataError(f"{what} file {path} does not exist; {EXPECTED_LAYOUT}")
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise CTDataError(f"cannot read {what} file {path} as a .npy array: {exc}") from exc


def load_ct_labels(data_dir: str | Path, case_id: str, num_landmarks: int | None = None) -> np.ndarray:
    """Landmarks ``(L, 3)`` float64 voxel coordinates of a case, missing ones (any coordinate
    < -100, or NaN) as NaN rows; cheap (the volume is not read)."""
    path = _paths(data_dir, case_id)[1]
    lm = _load_npy(path, "landmark label")
    if lm.ndim != 2 or lm.shape[1] != 3 or len(lm) == 0 or not np.issubdtype(lm.dtype, np.number):
        raise CTDataError(f"landmark label file {path} holds a {lm.dtype} array of shape {lm.shape}; expected (L, 3) voxel coordinates")
    if num_landmarks is not None and len(lm) != num_landmarks:
        raise CTDataError(f"landmark label file {path} has {len(lm)} landmarks; expected {num_landmarks}")
    lm = lm.astype(np.float64)
    missing = np.isnan(lm).any(axis=1) | (lm < MISSING_BELOW).any(axis=1)
    if not np.isfinite(lm[~missing]).all():
        raise CTDataError(f"landmark label file {path} holds infinite coordinates")
    lm[missing] = np.nan
    return lm


def load_ct_spacing(data_dir: str | Path, case_id: str) -> np.ndarray:
    """The case's voxel spacing ``(3,)`` float64 in mm (X, Y, Z)."""
    path = _paths(data_dir, case_id)[2]
    sp = _load_npy(path, "spacing")
    if sp.size != 3 or not np.issubdtype(sp.dtype, np.number):
        raise CTDataError(f"spacing file {path} holds a {sp.dtype} array of shape {sp.shape}; expected 3 values (mm along X, Y, Z)")
    sp = sp.astype(np.float64).reshape(3)
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise CTDataError(f"spacing file {path} holds {sp.tolist()}; expected 3 positive finite values (mm along X, Y, Z)")
    return sp


def _read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """The volume's array (NRRD: its own dtype) and its header's spacing (``None`` if it has none)."""
    if not (path.is_file() or path.is_dir()):
        raise CTDataError(f"volume file {path} does not exist; {EXPECTED_LAYOUT}")
    try:
        vol = read_volume(path)
    except MedicalImageError as exc:
        raise CTDataError(str(exc)) from exc
    return vol.array, vol.spacing


def scale_intensities(volume: np.ndarray) -> np.ndarray:
    """Float32 in [0, 1] by the module's rule: HU window [-1000, 2000] if the minimum is <= -500,
    unchanged if already in [0, 1], else min-max."""
    # MONAI's intensity transforms (imported here: only real CT pays MONAI's import); bit-identical
    # to the formulas they replaced, clip((v + 1000) / 3000, 0, 1) and (v - lo) / (hi - lo).
    from monai.transforms import ScaleIntensity, ScaleIntensityRange

    v = np.asarray(volume, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    if lo <= -500.0:
        return np.asarray(ScaleIntensityRange(a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)(v), dtype=np.float32)
    if lo >= 0.0 and hi <= 1.0:
        return v
    return np.asarray(ScaleIntensity(minv=0.0, maxv=1.0)(v), dtype=np.float32)  # a constant volume becomes 0


def load_ct_case(data_dir: str | Path, case_id: str, num_landmarks: int | None = None) -> CTCase:
    """Read one case (volume, landmarks, spacing) and check it: the volume is 3-D and finite, the
    labels are ``(L, 3)`` (``L == num_landmarks`` if given), the spacing is 3 positive values and
    every present landmark lies inside the volume (+- :data:`LANDMARK_TOLERANCE` voxels)."""
    vol_path = volume_path(data_dir, case_id)
    landmarks = load_ct_labels(data_dir, case_id, num_landmarks)
    vol, header_spacing = _read_volume(vol_path)
    spacing_path = _paths(data_dir, case_id)[2]
    if spacing_path.is_file() or header_spacing is None:
        spacing = load_ct_spacing(data_dir, case_id)
        if header_spacing is not None and not np.allclose(header_spacing, spacing, rtol=SPACING_MISMATCH, atol=0.0):
            logger.warning(
                "CT case %s: %s says spacing %s mm, the volume's header %s mm; using %s",
                case_id,
                spacing_path.name,
                spacing.tolist(),
                list(header_spacing),
                spacing_path.name,
            )
    else:
        spacing = np.asarray(header_spacing, dtype=np.float64)
    if vol.ndim != 3:
        raise CTDataError(f"volume file {vol_path} holds a {vol.ndim}-D array of shape {vol.shape}; expected a 3-D CT volume (X, Y, Z)")
    if not np.issubdtype(vol.dtype, np.number) or not np.isfinite(vol).all():
        raise CTDataError(f"volume file {vol_path} holds NaN, infinite or non-numeric values")
    present = ~np.isnan(landmarks).any(axis=1)
    upper = np.asarray(vol.shape) - 0.5 + LANDMARK_TOLERANCE
    outside = present & ((landmarks < -0.5 - LANDMARK_TOLERANCE) | (landmarks > upper)).any(axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise CTDataError(
            f"landmark label file {_paths(data_dir, case_id)[1]}: {int(outside.sum())} landmark(s) lie outside the volume "
            f"{vol.shape} of {vol_path}, e.g. landmark {k} at {landmarks[k].tolist()}; are the coordinates in voxels, "
            f"in the volume's (X, Y, Z) order?"
        )
    return CTCase(scale_intensities(vol), landmarks, spacing, str(case_id))


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` to a temporary file next to ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    _replace_atomically(path, write)


def write_ct_case(data_dir: str | Path, case_id: str, volume: np.ndarray, landmarks: np.ndarray, spacing: np.ndarray) -> None:
    """Write a case in the authors' layout: ``<case>_volume.nrrd`` (the volume's own dtype, gzip,
    with the spacing in its ``space directions``), ``<case>_label.npy`` (float64, NaN rows
    written as -1000) and ``<case>_spacing.npy`` (float64). Each file is written to a temporary
    name and renamed, the volume last, so an interrupted write leaves no half-written file and
    no volume without its labels."""
    import nrrd

    vol = np.asarray(volume)
    lm = np.array(landmarks, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (X, Y, Z), got shape {vol.shape}")
    if lm.ndim != 2 or lm.shape[1] != 3:
        raise ValueError(f"landmarks must be (L, 3) voxel coordinates, got shape {lm.shape}")
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing must be 3 positive finite values (mm), got {np.asarray(spacing).tolist()}")
    if vol.dtype == np.bool_ or vol.dtype == np.float16:
        vol = vol.astype(np.uint8 if vol.dtype == np.bool_ else np.float32)
    lm[np.isnan(lm).any(axis=1)] = MISSING_VALUE

    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    vol_path, lm_path, sp_path = _paths(root, case_id)
    _save_npy(sp_path, sp)
    _save_npy(lm_path, lm)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(sp),
        "space origin": np.zeros(3),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    _replace_atomically(vol_path, lambda tmp: nrrd.write(str(tmp), vol, header, index_order="F"))
