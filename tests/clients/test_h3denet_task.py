"""The h3denet task: defaults and options, splits, local training (callbacks, lr decay,
reproducibility), evaluation in mm with the resampled spacing, whole-model sharing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.callbacks import TrainCallback
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.h3denet import H3DENetTask, crop_shape
from fedsim.config import ConfigError, RunConfig
from fedsim.models.h3denet import WIDTHS
from fedsim.models.landmark_heads import LandmarkNet
from fedsim.models.sharing import shared_parameter_names

METRICS = {"loss", "mre", "sd", "mre-case", "sd-case", "sdr-2mm", "sdr-2.5mm", "sdr-3mm", "sdr-4mm", "landmarks"}
METRICS |= {f"{k}-missing" for k in METRICS - {"loss", "landmarks"}}


def _cfg(**kw) -> RunConfig:
    return resolve_config(RunConfig(task="h3denet", profile="tiny", **kw))


def test_defaults_models_and_option_validation():
    task = get_task("h3denet")
    cfg = _cfg()
    assert cfg.client_models() == ("h3denet",) * 3 and cfg.server_model == "h3denet"
    assert task.model_choices() == ["h3denet", "h3denet_heatmap", "unet3d"]
    assert task.primary_metric == "mre" and task.higher_is_better is False
    assert crop_shape(cfg.image_size) == (64, 64, 32) and crop_shape(128) == (128, 128, 64)
    with pytest.raises(ConfigError, match="valid options: zoom-min"):
        _cfg(task_options=(("zoom", "0.5"),))
    with pytest.raises(ConfigError, match="zoom-min <= zoom-max"):
        _cfg(task_options=(("zoom-min", "0.9"), ("zoom-max", "0.7")))
    with pytest.raises(ConfigError, match="multiple of 64"):
        task.check_data(_cfg(image_size=96))
    with pytest.raises(ValueError, match="valid choices: h3denet, h3denet_heatmap, unet3d"):
        _cfg(models=("resnet50",) * 3)


@pytest.mark.parametrize("name", ["h3denet", "h3denet_heatmap", "unet3d"])
def test_every_model_is_shared_whole_and_the_paper_widths_build(name):
    task = get_task("h3denet")
    cfg = _cfg(models=(name,) * 3)
    with torch.device("meta"):
        state = task.build_model(name, cfg).state_dict()
    assert set(shared_parameter_names([name], lambda m: task.build_model(m, cfg))) == set(state)
    paper = resolve_config(RunConfig(task="h3denet", profile="paper", models=(name,) * 3))
    with torch.device("meta"):
        n_paper = sum(p.numel() for p in task.build_model(name, paper).parameters())
    assert n_paper > 10 * sum(v.numel() for v in state.values())  # tiny widths are narrow
    assert WIDTHS["paper"].h3de.widths == (64, 128, 256, 512)


def test_splits_are_disjoint_cover_the_cohort_and_spread_incomplete_cases():
    task = get_task("h3denet")
    cfg = _cfg(num_samples=40)
    strata = task.strata(cfg, "")
    split = task.make_split(cfg, strata)
    parts = [split.global_test] + [p for c in split.clients for p in c]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(set(allidx.tolist())) == 40
    for tr, te in split.clients:
        assert strata[te].any() and strata[tr].any()  # every client trains and tests on incomplete cases
    assert task.check_data(cfg) == [len(tr) + len(te) for tr, te in split.clients]


class _Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list = []

    def on_train_start(self, model, info):
        self.events.append(("start", info.server_round))

    def on_epoch_end(self, model, info, epoch, metrics):
        self.events.append(("epoch", epoch, dict(metrics)))

    def on_train_end(self, model, info):
        self.events.append(("end",))


def test_local_training_calls_callbacks_decays_lr_and_is_reproducible():
    task = get_task("h3denet")
    cfg = _cfg(local_epochs=2, num_samples=24)
    torch.manual_seed(0)
    model = task.build_model("h3denet", cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = _Recorder()
    res = task.train(model, cfg, 0, 2, torch.device("cpu"), callbacks=[rec])
    assert [e[0] for e in rec.events] == ["start", "epoch", "epoch", "end"]
    # round 2 with 2 local epochs: epochs 3 and 4 of the federation -> lr * 0.98^2, lr * 0.98^3
    assert [e[2]["lr"] for e in rec.events[1:3]] == pytest.approx([1e-3 * 0.98**2, 1e-3 * 0.98**3])
    assert set(res.metrics) == {"loss", "mre", "sdr-4mm", "lr"} and res.metrics["mre"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    model2 = task.build_model("h3denet", cfg)
    assert task.train(model2, cfg, 0, 2, torch.device("cpu")).metrics == res.metrics
    ev = task.evaluate_local(model, cfg, 0, torch.device("cpu"))
    assert set(ev.metrics) == METRICS and ev.num_examples > 0


class _Oracle(LandmarkNet):
    """Predicts the prepared cases' true landmarks shifted by one voxel along x."""

    def __init__(self, base: LandmarkNet) -> None:
        super().__init__(base.backbone, base.head)
        self.queue: list[np.ndarray] = []

    def decode(self, out):
        n = out.shape[0]
        truth, self.queue = self.queue[:n], self.queue[n:]
        return torch.from_numpy(np.stack(truth) + np.array([1.0, 0.0, 0.0]))


def test_evaluation_measures_errors_with_the_resampled_spacing():
    """One voxel off along x costs the *resampled* x spacing: spacing_x * native_x / round(zoom * crop_x)."""
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg(num_samples=12)
    _, (_, test_idx) = task.client_split(cfg, 0)
    cases = task.cases(cfg, test_idx)
    model = _Oracle(task.build_model("h3denet", cfg))
    from fedsim.data.landmark_crop import prepare_case

    crop = crop_shape(cfg.image_size)
    model.queue = [prepare_case(c.volume, c.landmarks, c.spacing, crop, 0.8, None).landmarks for c in cases]
    metrics = task._evaluate(model, cases, cfg, torch.device("cpu"))
    per_case = [c.spacing[0] * c.volume.shape[0] / round(0.8 * crop[0]) for c in cases]
    counts = [int(np.isfinite(c.landmarks).all(1).sum()) for c in cases]
    expected = np.repeat(per_case, counts)
    assert metrics["mre"] == pytest.approx(expected.mean())
    assert metrics["sd"] == pytest.approx(expected.std())
    assert metrics["landmarks"] == sum(counts)
    assert metrics["sdr-4mm"] == pytest.approx(100 * (expected <= 4).mean()) and not math.isnan(metrics["loss"])
    assert not np.allclose(per_case, [c.spacing[0] for c in cases])  # the original spacing would be wrong


def test_fedprox_term_keeps_the_weights_near_the_received_ones():
    task = get_task("h3denet")
    cfg = _cfg(local_epochs=1, num_samples=24)
    drift = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        model = task.build_model("h3denet", cfg)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        task.train(model, cfg, 0, 1, torch.device("cpu"), proximal_mu=mu, anchor=anchor)
        drift[mu] = sum(float((p.detach() - anchor[k]).square().sum()) for k, p in model.named_parameters())
    assert drift[100.0] < 0.5 * drift[0.0]


def test_real_layout_folder_trains_and_evaluates_at_the_working_size(tmp_path):
    """With ``resolution=fit``, cases in the authors' layout (any size) are resampled once to
    1.25 x the crop; landmarks keep their physical distances; local training and evaluation run on
    the node's folder."""
    from fedsim.data.ct_folder import write_ct_case
    from fedsim.data.synthetic_ct import generate_case

    for i in range(6):
        c = generate_case(i, (90, 70, 44), seed=3)
        hu = c.volume * 3000.0 - 1000.0  # as HU
        write_ct_case(tmp_path, f"case{i:02d}", hu, c.landmarks, c.spacing)
    task: H3DENetTask = get_task("h3denet")  # type: ignore[assignment]
    cfg = _cfg(local_epochs=1, task_options=(("resolution", "fit"),))
    _, (train_idx, test_idx) = task.client_split(cfg, 0, str(tmp_path))
    assert len(train_idx) + len(test_idx) == 6 and len(test_idx) >= 1
    cases = task.cases(cfg, np.arange(6), str(tmp_path))
    original = generate_case(1, (90, 70, 44), seed=3)  # case 1 is incomplete
    assert cases[1].volume.shape == (80, 80, 40)
    ok = np.isfinite(original.landmarks).all(1)
    assert (np.isfinite(cases[1].landmarks).all(1) == ok).all() and not ok.all()
    a, b = np.flatnonzero(ok)[:2]
    mm = lambda lm, sp: np.linalg.norm((lm[a] - lm[b]) * sp)  # noqa: E731
    assert mm(cases[1].landmarks, cases[1].spacing) == pytest.approx(mm(original.landmarks, original.spacing), rel=1e-6)
    torch.manual_seed(0)
    model = task.build_model("h3denet", cfg)
    res = task.train(model, cfg, 0, 1, torch.device("cpu"), data_dir=str(tmp_path))
    assert res.num_examples == len(train_idx) and math.isfinite(res.metrics["loss"])
    ev = task.evaluate_local(model, cfg, 0, torch.device("cpu"), data_dir=str(tmp_path))
    assert ev.num_examples == len(test_idx) and ev.metrics["landmarks"] > 0


def test_a_wrong_landmark_count_is_refused_before_training(tmp_path):
    from fedsim.data.ct_folder import CTDataError, write_ct_case

    for i in range(3):
        write_ct_case(tmp_path, f"c{i}", np.zeros((8, 8, 8), np.float32), np.full((13, 3), 4.0), np.ones(3))
    with pytest.raises(CTDataError, match=r"c0_label\.npy has 13 landmarks; expected 14"):
        get_task("h3denet").check_data(_cfg(data_dir=str(tmp_path)))
    assert get_task("h3denet").check_data(_cfg(data_dir=str(tmp_path), clients=1, task_options=(("num-landmarks", "13"),))) == [
        2
    ]  # 1 of 3 is the global test set
