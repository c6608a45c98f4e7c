import numpy as np
import pytest
from PIL import Image

from fedsim.data.folder import KAGGLE_CLASSES, DataLayoutError, load_images, scan_image_folder


def _img(path, size, mode="L", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture
def kaggle_dir(tmp_path):
    """A miniature Kaggle layout: mixed sizes, grayscale and RGB, jpg and png."""
    root = tmp_path / "kaggle"
    for split, n in (("Training", 3), ("Testing", 1)):
        for c, name in enumerate(KAGGLE_CLASSES):
            for i in range(n):
                mode = "RGB" if i % 2 else "L"
                ext = ".jpg" if (i + c) % 2 else ".png"
                _img(root / split / name / f"{split}_{i}{ext}", (40 + 7 * i, 30 + 5 * c), mode, value=40 * c + 10)
    return root


def test_kaggle_layout_merges_training_and_testing(kaggle_dir):
    files = scan_image_folder(kaggle_dir)
    assert files.class_names == KAGGLE_CLASSES
    assert len(files.paths) == 16 and np.bincount(files.labels).tolist() == [4, 4, 4, 4]
    images = load_images(files, 24)
    assert images.shape == (16, 24, 24) and images.dtype == np.uint8
    # each class was written with a known grey value (40*c + 10); jpg may shift it slightly
    for c in range(4):
        assert abs(images[files.labels == c].mean() - (40 * c + 10)) < 3


def test_class_per_folder_tree(tmp_path):
    for name in ("benign", "malignant"):
        for i in range(2):
            _img(tmp_path / name / f"{i}.png", (20, 20))
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    files = scan_image_folder(tmp_path)
    assert files.class_names == ("benign", "malignant") and len(files.paths) == 4


def test_wrong_layout_names_the_expected_one(tmp_path):
    (tmp_path / "only_one_class").mkdir()
    with pytest.raises(DataLayoutError, match="expected either the Kaggle layout DATA_DIR/Training/<class>/"):
        scan_image_folder(tmp_path)
    with pytest.raises(DataLayoutError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "second").mkdir()
    with pytest.raises(DataLayoutError, match=r"only_one_class, second under .* hold no images"):
        scan_image_folder(tmp_path)


def test_unreadable_image_names_the_file(kaggle_dir):
    bad = kaggle_dir / "Training" / "no_tumor" / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        load_images(scan_image_folder(kaggle_dir), 16)
