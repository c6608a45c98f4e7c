"""Loaders for real image folders: the Kaggle brain-tumour layout and any class-per-folder tree.

Kaggle "Brain Tumor Classification (MRI)" (the CME paper's data set, section 4.1)::

    DATA_DIR/Training/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/*.jpg
    DATA_DIR/Testing/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/*.jpg

Both splits are merged (3,264 images), as in the paper. Any other ``DATA_DIR/<class>/<image>``
tree works too; a task that knows its classes passes them (``classes``) and then every class
folder must be one of them (labels follow the task's order, so a missing class shifts nothing).
Images may have mixed sizes and be grayscale or RGB (jpg/png/bmp/tif); they are converted to
grayscale and resized to a square ``image_size``. MRI slices may also be DICOM (``.dcm``, read with
pydicom, rescale slope/intercept applied) or NIfTI (``.nii``/``.nii.gz``, nibabel; of a 3D volume
the middle slice along Z) files (:mod:`fedsim.data.medical`); their values are scaled by the
image's own min/max to 0-255 before the same bilinear resize. An image that is empty, truncated, not an image,
or larger than :data:`MAX_IMAGE_PIXELS` (a decompression bomb) is refused naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: Medical 2D formats read through :mod:`fedsim.data.medical` (pydicom, nibabel).
MEDICAL_SLICE_SUFFIXES = (".dcm", ".nii", ".nii.gz")
KAGGLE_SPLITS = ("Training", "Testing")
KAGGLE_CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")
#: Larger images are refused before they are decoded (64 megapixels, e.g. 8000 x 8000).
MAX_IMAGE_PIXELS = 64_000_000

EXPECTED_LAYOUT = (
    "expected either the Kaggle layout DATA_DIR/Training/<class>/ and DATA_DIR/Testing/<class>/ "
    f"(classes {', '.join(KAGGLE_CLASSES)}) or one folder per class DATA_DIR/<class>/ holding "
    f"images ({', '.join(sorted(IMAGE_SUFFIXES))}, {', '.join(MEDICAL_SLICE_SUFFIXES)})"
)


class DataLayoutError(ValueError):
    """The data folder does not have a layout fedsim can read."""


class BadImageError(DataLayoutError):
    """One image file cannot be used (empty, truncated, not an image, too large); names the file."""


@dataclass(frozen=True)
class FileList:
    """Image paths with integer labels; ``class_names[label]`` names the folder. A multi-site
    folder (``sites=True``) also gives the site names and each image's site index."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sites: tuple[str, ...] = ()
    site_of: np.ndarray | None = None


def _is_medical(path: Path) -> bool:
    return path.name.lower().endswith(MEDICAL_SLICE_SUFFIXES)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or _is_medical(p)))


def scan_image_folder(data_dir: str | Path, classes: Sequence[str] | None = None, sites: bool = False) -> FileList:
    """List the images under ``data_dir`` (Kaggle layout or class-per-folder) without reading them.

    Cheap, so that the CLI can validate a data folder before any training starts. With
    ``classes`` (the task's class names, in label order) every class folder must be one of them,
    and ``labels`` index into ``classes``; otherwise the sorted folder names are the classes.
    With ``sites``, ``data_dir`` holds one such folder per site (:mod:`fedsim.data.sites`): the
    sites' images are listed one site after the other, and every site must hold the same classes.
    """
    if sites:
        return _scan_sites(data_dir, classes)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataLayoutError(f"data folder {root} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    splits = [root / s for s in KAGGLE_SPLITS if (root / s).is_dir()]
    roots = splits if splits else [root]
    found = sorted({d.name for r in roots for d in r.iterdir() if d.is_dir()})
    if classes is not None:
        unexpected = [n for n in found if n not in classes]
        if unexpected:
            missing = [c for c in classes if c not in found]
            raise DataLayoutError(
                f"the class folders of {root} are {', '.join(found)}, but the task's classes are {', '.join(classes)} "
                f"(unexpected: {', '.join(unexpected)}; missing: {', '.join(missing) or 'none'}); rename the folders to the task's classes"
            )
    if len(found) < 2:
        raise DataLayoutError(f"{root} has {len(found)} class folder(s); {EXPECTED_LAYOUT}")
    class_names = list(classes) if classes is not None else found
    paths: list[Path] = []
    labels: list[int] = []
    for r in roots:
        for label, name in enumerate(class_names):
            if (r / name).is_dir():
                files = _images_in(r / name)
                paths += files
                labels += [label] * len(files)
    empty = [n for n in found if labels.count(class_names.index(n)) == 0]
    if empty:
        raise DataLayoutError(f"class folder(s) {', '.join(empty)} under {root} hold no images; {EXPECTED_LAYOUT}")
    return FileList(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(class_names))


def _scan_sites(data_dir: str | Path, classes: Sequence[str] | None) -> FileList:
    from fedsim.data.sites import scan_sites, site_index

    per_site = scan_sites(data_dir, lambda d: scan_image_folder(d, classes), lambda f: {f.class_names[i] for i in np.unique(f.labels)})
    names = tuple(name for name, _ in per_site)
    lists = [f for _, f in per_site]
    return FileList(
        tuple(p for f in lists for p in f.paths),
        np.concatenate([f.labels for f in lists]),
        lists[0].class_names,
        names,
        site_index([len(f.paths) for f in lists]),
    )


def load_images(files: FileList, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read every image as grayscale, resized to ``image_size`` square: uint8 (N, H, W).

    The first unusable file (empty, truncated, not an image, more than ``max_pixels`` pixels)
    raises :class:`BadImageError` naming it; the size is checked from the header, before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files.paths), image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(files.paths):
        if _is_medical(path):
            out[i] = _load_medical_slice(path, image_size, max_pixels)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.width * im.height > max_pixels:
                        raise BadImageError(
                            f"image {path} is {im.width} x {im.height} pixels, more than fedsim's limit of {max_pixels / 1e6:g} megapixels; "
                            "downscale or remove it"
                        )
                    out[i] = np.asarray(im.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            reason = "the file is empty" if path.stat().st_size == 0 else str(exc)
            raise BadImageError(f"cannot read image {path}: {reason}; fix or remove the file") from exc
    return out


def _load_medical_slice(path: Path, image_size: int, max_pixels: int) -> np.ndarray:
    """A DICOM / NIfTI slice as uint8 ``image_size`` square: min-max to 0-255 (a constant image
    becomes 0), then PIL's bilinear resize as for the other images."""
    from PIL import Image

    from fedsim.data.medical import read_slice, slice_pixels

    if (pixels := slice_pixels(path)) > max_pixels:
        raise BadImageError(
            f"image {path} has {pixels} pixels, more than fedsim's limit of {max_pixels / 1e6:g} megapixels; downscale or remove it"
        )
    img = read_slice(path)
    if not np.isfinite(img).all():
        raise BadImageError(f"image {path} holds NaN or infinite values; fix or remove the file")
    lo, hi = float(img.min()), float(img.max())
    u8 = np.round((img - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((image_size, image_size), Image.Resampling.BILINEAR))
