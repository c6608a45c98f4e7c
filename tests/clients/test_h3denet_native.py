"""h3denet on real-layout data at native resolution: a 0.4 mm case is evaluated at 0.4 mm (a
one-voxel error costs 0.4 mm), the crop is the volume's own voxels, only the region crops can
touch is kept, zooming happens only when the landmarks do not fit; recipe options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.h3denet import H3DENetTask, crop_shape
from fedsim.config import ConfigError, RunConfig
from fedsim.data.ct_folder import write_ct_case
from fedsim.models.landmark_heads import LandmarkNet

SPACING = np.array([0.4, 0.4, 0.4])


def _cfg(**kw) -> RunConfig:
    return resolve_config(RunConfig(task="h3denet", profile="tiny", **kw))


class _Oracle(LandmarkNet):
    """Predicts the prepared cases' true landmarks shifted by one voxel along x."""

    def __init__(self, base: LandmarkNet) -> None:
        super().__init__(base.backbone, base.head)
        self.queue: list[np.ndarray] = []

    def decode(self, out):
        n = out.shape[0]
        truth, self.queue = self.queue[:n], self.queue[n:]
        return torch.from_numpy(np.stack(truth) + np.array([1.0, 0.0, 0.0]))


def _write(tmp_path, shape=(160, 150, 90), spread=(10.0, 10.0, 6.0), n=3) -> list[np.ndarray]:
    """``n`` cases: a ramp volume (voxel values identify their position) and 14 landmarks within
    ``spread`` voxels of the volume centre; returns the volumes."""
    rng = np.random.default_rng(0)
    vols = []
    for i in range(n):
        vol = (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) / np.prod(shape)).astype(np.float32)
        centre = (np.asarray(shape) - 1) / 2
        lm = centre + rng.uniform(-1, 1, (14, 3)) * np.asarray(spread)
        write_ct_case(tmp_path, f"c{i}", vol, lm, SPACING)
        vols.append(vol)
    return vols


def test_a_one_voxel_error_costs_the_native_spacing(tmp_path):
    vols = _write(tmp_path)
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg()
    cases = task.cases(cfg, np.arange(3), str(tmp_path))
    crop = crop_shape(cfg.image_size)
    # memory: only the region crops can touch (64 / zoom-min 0.6 ~ 107 voxels plus margins), not the scan
    assert all(c.volume.shape[0] < 160 and c.volume.size < 0.6 * vols[0].size for c in cases)
    prepared = [task.prepare(c, cfg, None, str(tmp_path)) for c in cases]
    for p, c, v in zip(prepared, cases, vols, strict=True):
        assert p.spacing.tolist() == SPACING.tolist() and p.scale.tolist() == [1.0, 1.0, 1.0]
        # the crop is the scan's own voxels, centred on the scan's centre (no resampling)
        start = [round((n - 1) / 2 - (k - 1) / 2) for n, k in zip(v.shape, crop, strict=True)]
        window = v[start[0] : start[0] + crop[0], start[1] : start[1] + crop[1], start[2] : start[2] + crop[2]]
        np.testing.assert_array_equal(p.volume, window)
        assert c.centre is not None
    model = _Oracle(task.build_model("h3denet", cfg))
    model.queue = [p.landmarks for p in prepared]
    metrics = task._evaluate(model, cases, cfg, torch.device("cpu"), str(tmp_path))
    assert metrics["mre"] == pytest.approx(0.4) and metrics["sd"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["mre-case"] == pytest.approx(0.4) and metrics["landmarks"] == 42
    # resolution=fit (the old behaviour) evaluates at the resampled spacing: 160 voxels -> 80 x 0.8
    fit = _cfg(task_options=(("resolution", "fit"),))
    fit_cases = task.cases(fit, np.arange(3), str(tmp_path))
    p_fit = task.prepare(fit_cases[0], fit, None, str(tmp_path))
    assert p_fit.spacing[0] == pytest.approx(0.4 * 160 / 80 * 80 / round(0.8 * 64))


def test_landmarks_that_do_not_fit_are_zoomed_out_just_enough(tmp_path):
    _write(tmp_path, shape=(160, 150, 90), spread=(60.0, 10.0, 6.0), n=2)
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg()
    cases = task.cases(cfg, np.arange(2), str(tmp_path))
    for c in cases:
        p = task.prepare(c, cfg, None, str(tmp_path))
        present = p.landmarks
        assert (present >= -0.5).all() and (present <= np.asarray(crop_shape(cfg.image_size)) - 0.5).all()
        assert p.scale[0] < 1 and np.allclose(p.scale, p.scale[0], atol=0.02)  # paper: one factor for all axes
        assert np.allclose(p.spacing, 0.4 / p.scale)  # errors at the resampled spacing of that case
    # the authors' recipe: centred on the landmarks, per-axis zoom (only x needs it)
    auth = _cfg(task_options=(("recipe", "authors"),))
    p = task.prepare(task.cases(auth, np.arange(2), str(tmp_path))[0], auth, None, str(tmp_path))
    assert p.scale[0] < 1 and p.scale[1] == 1.0 and p.scale[2] == 1.0


def test_training_views_keep_every_landmark_and_recipes_pick_the_items(tmp_path):
    _write(tmp_path, n=2)
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg()
    rng = np.random.default_rng(1)
    case = task.cases(cfg, np.arange(2), str(tmp_path))[0]
    for _ in range(5):
        p = task.prepare(case, cfg, rng, str(tmp_path))
        assert (p.landmarks >= 0).all() and (p.landmarks <= np.asarray(crop_shape(cfg.image_size)) - 1).all()
        assert p.scale.min() >= 0.59 and p.scale.max() <= 1.0  # zoom-min 0.6, up to rounding
    paper, authors = task.plan(cfg, str(tmp_path)), task.plan(_cfg(task_options=(("recipe", "authors"),)), str(tmp_path))
    assert (paper.resolution, paper.head, paper.attention, paper.eval_centre, paper.isotropic) == (
        "native",
        "fedsim",
        "fedsim",
        "volume",
        True,
    )
    assert (authors.resolution, authors.head, authors.attention, authors.eval_centre) == ("native", "authors", "authors", "landmarks")
    assert task.plan(cfg).resolution == "fit"  # the synthetic cohort keeps its working grid
    mixed = _cfg(task_options=(("recipe", "authors"), ("head", "fedsim")))
    assert task.model_config(mixed) == {"size": "tiny", "num_landmarks": 14, "attention": "authors", "head": "fedsim"}
    with pytest.raises(ConfigError, match=r"unknown recipe 'github'; valid choices: paper, authors"):
        _cfg(task_options=(("recipe", "github"),))
    with pytest.raises(ConfigError, match=r"unknown eval-centre 'truth'; valid choices: auto, volume, landmarks"):
        _cfg(task_options=(("eval-centre", "truth"),))
