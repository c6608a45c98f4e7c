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
    vols = _write(tmp_path, shape=(120, 110, 60), n=2)
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg(task_options=(("zoom-min", "0.9"),))
    cases = task.cases(cfg, np.arange(2), str(tmp_path))
    crop = crop_shape(cfg.image_size)
    # memory: only the region crops can touch (64 / zoom-min 0.9 ~ 71 voxels plus margins), not the scan
    assert all(c.volume.shape[0] < 80 and c.volume.size < 0.35 * vols[0].size for c in cases)
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
    assert metrics["mre-case"] == pytest.approx(0.4) and metrics["landmarks"] == 28
    # resolution=fit (the old behaviour) evaluates at the resampled spacing: 120 voxels -> 80 x 0.8
    fit = _cfg(task_options=(("resolution", "fit"),))
    fit_cases = task.cases(fit, np.arange(2), str(tmp_path))
    p_fit = task.prepare(fit_cases[0], fit, None, str(tmp_path))
    assert p_fit.spacing[0] == pytest.approx(0.4 * 120 / 80 * 80 / round(0.8 * 64))


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


def test_authors_recipe_holds_the_learning_rate_at_its_floor_and_holds_out_a_validation_split():
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg(num_samples=8, clients=1, local_epochs=2, task_options=(("recipe", "authors"),))
    plan = task.plan(cfg)
    # the release: lr x 0.98 per epoch while lr > 3 % of the start: 0.98^173 = 0.0303 > 0.03 >= 0.98^174
    assert plan.learning_rate(1e-3, 0.98, 173) == pytest.approx(1e-3 * 0.98**173)
    assert plan.learning_rate(1e-3, 0.98, 174) == plan.learning_rate(1e-3, 0.98, 500) == pytest.approx(1e-3 * 0.98**174)
    assert task.plan(_cfg()).learning_rate(1e-3, 0.98, 500) == pytest.approx(1e-3 * 0.98**500)  # paper: no floor
    _, parts = task.client_split(cfg, 0)
    assert len(parts) == 3 and all(len(p) for p in parts) and not set(parts[0]) & set(parts[1])
    assert len(task.client_split(_cfg(num_samples=8, clients=1), 0)[1]) == 2  # paper: no validation split
    with pytest.raises(ConfigError, match=r"val-fraction must be in \(0, 1\)"):
        _cfg(task_options=(("val-fraction", "1.5"),))


@pytest.mark.slow
def test_authors_recipe_keeps_the_best_local_epoch():
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg(num_samples=8, clients=1, local_epochs=2, task_options=(("recipe", "authors"),))
    torch.manual_seed(0)
    model = task.build_model("h3denet", cfg)
    states = []

    class _Keep:  # records the weights after every epoch
        def on_train_start(self, m, info):
            pass

        def on_epoch_end(self, m, info, epoch, metrics):
            states.append((metrics["val-loss"], {k: v.clone() for k, v in m.state_dict().items()}))

        def on_train_end(self, m, info):
            pass

    res = task.train(model, cfg, 0, 1, torch.device("cpu"), callbacks=[_Keep()])  # type: ignore[list-item]
    best = int(np.argmin([s[0] for s in states]))
    assert res.metrics["best-epoch"] == best + 1 and res.metrics["val-loss"] == pytest.approx(states[best][0])
    assert all(torch.equal(v, states[best][1][k]) for k, v in model.state_dict().items())
