"""Task figures: the tasks compute arrays, display classes draw exactly those arrays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from fedsim.analysis.task_figures import LandmarkProjectionDisplay, SaliencyOverlayDisplay, task_figure_displays
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.aicnet3d import SaliencyExample
from fedsim.clients.tasks.h3denet import LandmarkExample
from fedsim.config import RunConfig
from fedsim.rundir import RunDir


def test_saliency_display_draws_the_volume_and_maps_it_holds():
    rng = np.random.default_rng(0)
    vol, care, gcam = rng.random((6, 5, 4)), rng.random((6, 5, 4)), rng.random((6, 5, 4))
    fig = SaliencyOverlayDisplay(vol, {"CARE": care, "Grad-CAM": gcam}, title="t").plot()
    axes = fig.axes
    assert len(axes) == 4 and fig._suptitle.get_text() == "t"
    top_care, top_gcam, bottom_care = axes[0], axes[1], axes[2]
    assert np.array_equal(top_care.images[0].get_array(), vol[3]) and np.array_equal(top_care.images[1].get_array(), care[3])
    assert np.array_equal(top_gcam.images[1].get_array(), gcam[3])
    assert np.allclose(bottom_care.images[0].get_array(), vol.mean(1)) and np.array_equal(bottom_care.images[1].get_array(), care.max(1))
    assert top_gcam.get_title().startswith("Grad-CAM: central B-scan")
    plt.close(fig)
    with pytest.raises(ValueError, match="volume's shape"):
        SaliencyOverlayDisplay(vol, {"CARE": care[:3]})


def test_landmark_display_draws_projections_and_markers_into_given_axes():
    rng = np.random.default_rng(1)
    vol = rng.random((8, 7, 5))
    true = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan], [4.0, 5.0, 1.0]])
    pred = true + 0.5
    pred[1] = [2.0, 2.0, 2.0]
    fig, axes = plt.subplots(1, 3)
    assert LandmarkProjectionDisplay(vol, true, pred).plot(axes) is fig
    axial = axes[0]  # max over z, x horizontal, y vertical
    assert np.array_equal(axial.images[0].get_array(), vol.max(2).T)
    true_pts, pred_pts, missing_pts = (c.get_offsets() for c in axial.collections)
    assert np.array_equal(true_pts, true[[0, 2]][:, :2]) and np.array_equal(pred_pts, pred[[0, 2]][:, :2])
    assert np.array_equal(missing_pts, pred[[1]][:, :2])
    assert len(axial.lines) == 2  # truth -> prediction for the two existing landmarks
    plt.close(fig)


class _FakeTask:
    name = "fake"

    def __init__(self, arrays: list[object]) -> None:
        self.arrays = arrays

    def figure_arrays(self, run_dir, cfg):
        return self.arrays


def test_each_kind_of_arrays_gets_its_display_and_file_name(tmp_path):
    vol = np.zeros((4, 4, 4))
    sal = SaliencyExample(7, "glaucoma", 0.9, vol, {"CARE": vol})
    lm = LandmarkExample(3, vol, np.ones((2, 3)), np.ones((2, 3)), np.array([1.0, 3.0]))
    out = task_figure_displays(_FakeTask([sal, lm]), tmp_path, None)  # type: ignore[arg-type]
    assert [n for n, _ in out] == ["fake_care_gradcam_0_glaucoma.png", "fake_landmarks_1_case3.png"]
    assert isinstance(out[0][1], SaliencyOverlayDisplay) and out[0][1].title == "global-test volume 7: glaucoma, P(glaucoma) = 0.90"
    assert out[1][1].title == "global-test case 3: MRE 2.00 mm over 2 landmarks (0 missing)"
    with pytest.raises(TypeError, match="no display for task figure arrays of type str"):
        task_figure_displays(_FakeTask(["x"]), tmp_path, None)  # type: ignore[arg-type]
    assert task_figure_displays(get_task("brain_mri"), tmp_path, None) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "kind"), [("aicnet3d", SaliencyExample), ("h3denet", LandmarkExample)])
def test_3d_tasks_compute_their_figure_arrays_from_the_final_parameters(tmp_path, name, kind):
    task = get_task(name)
    cfg = resolve_config(RunConfig(task=name, profile="tiny"))
    torch.manual_seed(0)
    model = task.build_model(cfg.server_model, cfg)
    RunDir(tmp_path).create().save_params({k: v.numpy() for k, v in model.state_dict().items()}, {})
    arrays = task.figure_arrays(tmp_path, cfg)
    assert len(arrays) == 4 and all(isinstance(a, kind) for a in arrays)
    a = arrays[0]
    if isinstance(a, SaliencyExample):
        assert set(a.maps) == {"CARE", "Grad-CAM"} and all(m.shape == a.volume.shape for m in a.maps.values())
        assert a.volume.min() >= 0 and a.volume.max() <= 1 and {x.label for x in arrays} == {"glaucoma", "normal"}
    else:
        assert a.true.shape == a.pred.shape and a.errors.shape == (len(a.true),)
        assert np.isnan(a.errors).any()  # incomplete cases come first
    for _, display in task_figure_displays(task, tmp_path, cfg):
        plt.close(display.plot())
