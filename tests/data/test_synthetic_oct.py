"""The synthetic OCT cohort (determinism, anatomy, class differences) and the .npy loader."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.synthetic_oct import (
    OCTDataError,
    cohort_labels,
    generate_cohort,
    load_volumes,
    scan_oct_folder,
    synth_volume,
    volume_shape,
)

SHAPE = (32, 48, 28)


def test_volume_shape_keeps_the_paper_aspect():
    assert volume_shape(128) == (128, 192, 112)
    assert volume_shape(32) == (32, 48, 28)


def test_cohort_is_deterministic_by_seed():
    a, la = generate_cohort(6, SHAPE, seed=3)
    b, lb = generate_cohort(6, SHAPE, seed=3)
    c, _ = generate_cohort(6, SHAPE, seed=4)
    assert a.dtype == np.uint8 and a.shape == (6, *SHAPE)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert la.tolist() == [1, 1, 0, 0, 0, 1] == cohort_labels(6).tolist()  # 40 % glaucoma


def _pair(seed: int, noise: bool = False):
    """The same subject geometry rendered as normal and as glaucoma (same rng state)."""
    out = []
    for label in (0, 1):
        info: dict = {}
        vol = synth_volume(SHAPE, label, np.random.default_rng(seed), noise=noise, anatomy=info)
        out.append((vol.astype(float) / 255, info))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_glaucoma_anatomy_thinner_rnfl_larger_cup_asymmetry(seed):
    (v0, a0), (v1, a1) = _pair(seed)
    assert a1["cdr"] > a0["cdr"] + 0.1  # larger cup-to-disc ratio (0.4-0.8 vs 0.25-0.55)
    assert a1["rnfl"].mean() < 0.97 * a0["rnfl"].mean()  # thinner nerve-fibre layer
    d = SHAPE[0]
    asym = lambda r: abs(r[: d // 2].mean() - r[d // 2 :].mean()) / r.mean()  # noqa: E731
    assert asym(a1["rnfl"]) > asym(a0["rnfl"])  # superior/inferior asymmetry
    # the rendered cup is deeper: at the disc centre the retina surface (first voxel brighter than
    # the vitreous) lies deeper for glaucoma
    dd, ww = a0["disc"]
    depth = lambda v: int(np.argmax(v[dd, :, ww] > 0.3))  # noqa: E731
    assert depth(v1) > depth(v0)
    assert a0["surface"][dd, ww] > a0["surface"][dd, 2]  # the disc is a depression


def test_layers_rnfl_is_bright_and_fovea_on_the_macula_half():
    (v0, a0), _ = _pair(7)
    d, _h, w = SHAPE
    # an A-scan on the macula half away from the fovea: just below the surface it is bright (RNFL)
    # and darker above (vitreous)
    j = 2
    s = a0["surface"][d // 2, j]
    assert v0[d // 2, int(s) + 2, j] > 0.4 > v0[d // 2, max(int(s) - 3, 0), j]
    # the foveal pit: the surface dips on the macula half near W/4, not at the edge
    fov = a0["surface"][d // 2, w // 4]
    assert fov > a0["surface"][d // 2, 1]


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def test_loader_class_folders_and_resampling(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "normal" / "a.npy", rng.random((8, 12, 7)).astype(np.float32))
    _write(tmp_path / "glaucoma" / "b.npy", rng.random((1, 16, 24, 14)) * 1000)
    files = scan_oct_folder(tmp_path)
    assert [p.name for p in files.paths] == ["b.npy", "a.npy"] and files.labels.tolist() == [1, 0]
    vols = load_volumes(files, (16, 24, 14))
    assert vols.shape == (2, 16, 24, 14) and vols.dtype == np.uint8
    assert vols[0].min() == 0 and vols[0].max() == 255  # per-volume min/max scaling


def test_loader_labels_csv(tmp_path):
    _write(tmp_path / "v" / "x.npy", np.zeros((4, 6, 4)))
    _write(tmp_path / "v" / "y.npy", np.ones((4, 6, 4)))
    (tmp_path / "labels.csv").write_text("file,label\nv/x.npy,glaucoma\nv/y.npy,0\n")
    files = scan_oct_folder(tmp_path)
    assert files.labels.tolist() == [1, 0]


def test_loader_errors_name_the_bad_files(tmp_path):
    _write(tmp_path / "normal" / "ok.npy", np.zeros((4, 6, 4)))
    _write(tmp_path / "glaucoma" / "flat.npy", np.zeros((6, 4)))
    with pytest.raises(OCTDataError, match=r"flat\.npy \(shape \(6, 4\)\)"):
        scan_oct_folder(tmp_path)
    (tmp_path / "glaucoma" / "flat.npy").unlink()
    (tmp_path / "glaucoma" / "broken.npy").write_bytes(b"not a numpy file")
    with pytest.raises(OCTDataError, match=r"broken\.npy"):
        scan_oct_folder(tmp_path)
    (tmp_path / "glaucoma" / "broken.npy").unlink()
    _write(tmp_path / "glaucoma" / "nan.npy", np.full((4, 6, 4), np.nan))
    with pytest.raises(OCTDataError, match=r"nan\.npy contains NaN"):
        load_volumes(scan_oct_folder(tmp_path), (4, 6, 4))


def test_loader_layout_errors(tmp_path):
    with pytest.raises(OCTDataError, match="does not exist"):
        scan_oct_folder(tmp_path / "missing")
    with pytest.raises(OCTDataError, match=r"no \.npy volumes"):
        scan_oct_folder(tmp_path)
    _write(tmp_path / "normal" / "a.npy", np.zeros((4, 6, 4)))
    with pytest.raises(OCTDataError, match="only class 'normal'"):
        scan_oct_folder(tmp_path)
    _write(tmp_path / "sick" / "b.npy", np.zeros((4, 6, 4)))
    with pytest.raises(OCTDataError, match="unknown class 'sick'"):
        scan_oct_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nnormal/a.npy,0\nnope.npy,1\n")
    with pytest.raises(OCTDataError, match=r"do not exist: nope\.npy"):
        scan_oct_folder(tmp_path)
