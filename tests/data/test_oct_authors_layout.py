"""The authors' OCT layout: a recursive ``Glaucomas`` / ``Non-Glaucomas`` tree, labels from the
path component, patient ids from the file names, (128, H, W) B-scan stacks resized per B-scan,
and the raw 8-bit intensities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.data.synthetic_oct import OCTDataError, load_volumes, patient_id, scan_oct_folder


def _tree(root, shape=(8, 20, 12)):
    rng = np.random.default_rng(0)
    files = {
        "Glaucomas/site1/2019/scan-P01-OD.npy": 1,
        "Glaucomas/site2/scan-P02-OS.npy": 1,
        "Non-Glaucomas/site1/deep/er/scan-P03-OD.npy": 0,
        "Non-Glaucomas/scan-P03-OS.npy": 0,
        "Non-Glaucomas/site2/scan-P04-OD.npy": 0,
    }
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.integers(0, 256, shape).astype(np.uint8))
    return files


def test_the_authors_tree_loads_with_labels_and_patients(tmp_path):
    files = _tree(tmp_path)
    found = scan_oct_folder(tmp_path)
    got = {str(p.relative_to(tmp_path)): int(lab) for p, lab in zip(found.paths, found.labels, strict=True)}
    assert got == files
    assert found.groups is not None
    assert (
        dict(zip((str(p.relative_to(tmp_path)) for p in found.paths), found.groups, strict=True))["Non-Glaucomas/scan-P03-OS.npy"] == "P03"
    )
    assert sorted(set(found.groups)) == ["P01", "P02", "P03", "P04"]
    assert patient_id(tmp_path / "vol.npy") is None and patient_id(tmp_path / "a-b.npy") is None


def test_file_names_without_patient_ids_give_no_groups_and_bad_trees_are_named(tmp_path):
    (tmp_path / "Glaucomas").mkdir()
    (tmp_path / "Non-Glaucomas").mkdir()
    np.save(tmp_path / "Glaucomas" / "v1.npy", np.zeros((4, 5, 6), np.uint8))
    np.save(tmp_path / "Non-Glaucomas" / "v2.npy", np.zeros((4, 5, 6), np.uint8))
    assert scan_oct_folder(tmp_path).groups is None
    empty = tmp_path / "empty"
    (empty / "Glaucomas").mkdir(parents=True)
    with pytest.raises(OCTDataError, match="Non-Glaucomas/"):
        scan_oct_folder(empty)


def test_bscan_stacks_are_resized_per_bscan_and_raw_intensities_kept(tmp_path):
    _tree(tmp_path, shape=(8, 20, 12))
    files = scan_oct_folder(tmp_path)
    out = load_volumes(files, (8, 30, 16))
    raw = load_volumes(files, (8, 30, 16), intensity="raw")
    v = np.load(files.paths[0]).astype(np.float32)
    # the authors: each (H, W) B-scan resized on its own (bilinear, pixel centres), the B-scan count unchanged
    per_scan = F.interpolate(torch.from_numpy(v)[:, None], size=(30, 16), mode="bilinear", align_corners=False)[:, 0].numpy()
    trilinear = F.interpolate(torch.from_numpy(v)[None, None], size=(8, 30, 16), mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(trilinear, per_scan, atol=1e-4)  # separable: the same resize
    # after rounding to 8 bits, float noise at .5 may move a value by one level
    assert np.abs(raw[0].astype(int) - np.round(np.clip(per_scan, 0, 255))).max() <= 1
    lo, hi = per_scan.min(), per_scan.max()
    assert np.abs(out[0].astype(int) - np.round((per_scan - lo) / (hi - lo) * 255)).max() <= 1
    assert not np.array_equal(raw[0], out[0])  # raw keeps the scanner's values, minmax stretches them
    with pytest.raises(ValueError, match="valid choices: minmax, raw"):
        load_volumes(files, (8, 30, 16), intensity="hu")
