"""Loaders for real image folders: the Kaggle brain-tumour layout and any class-per-folder tree.

Kaggle "Brain Tumor Classification (MRI)" (the CME paper's data set, section 4.1)::

    DATA_DIR/Training/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/*.jpg
    DATA_DIR/Testing/{glioma_tumor,meningioma_tumor,no_tumor,pituitary_tumor}/*.jpg

Both splits are merged (3,264 images), as in the paper. Any other ``DATA_DIR/<class>/<image>``
tree works too. Images may have mixed sizes and be grayscale or RGB (jpg/png/bmp/tif); they are
converted to grayscale and resized to a square ``image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
KAGGLE_SPLITS = ("Training", "Testing")
KAGGLE_CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")

EXPECTED_LAYOUT = (
    "expected either the Kaggle layout DATA_DIR/Training/<class>/ and DATA_DIR/Testing/<class>/ "
    f"(classes {', '.join(KAGGLE_CLASSES)}) or one folder per class DATA_DIR/<class>/ holding "
    f"images ({', '.join(sorted(IMAGE_SUFFIXES))})"
)


class DataLayoutError(ValueError):
    """The data folder does not have a layout fedsim can read."""


@dataclass(frozen=True)
class FileList:
    """Image paths with integer labels; ``class_names[label]`` names the folder."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_image_folder(data_dir: str | Path) -> FileList:
    """List the images under ``data_dir`` (Kaggle layout or class-per-folder) without reading them.

    Cheap, so that the CLI can validate a data folder before any training starts.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataLayoutError(f"data folder {root} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    splits = [root / s for s in KAGGLE_SPLITS if (root / s).is_dir()]
    roots = splits if splits else [root]
    class_names = sorted({d.name for r in roots for d in r.iterdir() if d.is_dir()})
    if len(class_names) < 2:
        raise DataLayoutError(f"{root} has {len(class_names)} class folder(s); {EXPECTED_LAYOUT}")
    paths: list[Path] = []
    labels: list[int] = []
    for r in roots:
        for label, name in enumerate(class_names):
            if (r / name).is_dir():
                files = _images_in(r / name)
                paths += files
                labels += [label] * len(files)
    empty = [n for n in class_names if labels.count(class_names.index(n)) == 0]
    if empty:
        raise DataLayoutError(f"class folder(s) {', '.join(empty)} under {root} hold no images; {EXPECTED_LAYOUT}")
    return FileList(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(class_names))


def load_images(files: FileList, image_size: int) -> np.ndarray:
    """Read every image as grayscale, resized to ``image_size`` square: uint8 (N, H, W).

    An unreadable file raises ``ValueError`` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files.paths), image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(files.paths):
        try:
            with Image.open(path) as im:
                out[i] = np.asarray(im.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}; fix or remove the file") from exc
    return out
