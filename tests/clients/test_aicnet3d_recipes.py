"""aicnet3d recipes: the authors' items are selected by ``recipe=authors`` (pooling, Grad-CAM,
augmentation, raw input, balanced cohort) and one by one; the balanced cohort makes the test
sets 50:50; real data with patient ids are split by patient; the authors' augmentation by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.aicnet3d import AICNet3DTask, augment_oct_authors
from fedsim.config import ConfigError, RunConfig
from fedsim.models.aicnet3d import AICNet3D


def _cfg(**kw) -> RunConfig:
    return resolve_config(RunConfig(task="aicnet3d", profile="tiny", **kw))


AUTHORS = (("recipe", "authors"),)


def test_recipes_pick_the_items_and_the_model_pooling():
    task: AICNet3DTask = get_task("aicnet3d")  # type: ignore[assignment]
    paper, authors = task.plan(_cfg()), task.plan(_cfg(task_options=AUTHORS))
    assert (paper.pooling, paper.gradcam, paper.augmentation, paper.input, paper.balanced_cohort) == (
        "global",
        "fedsim",
        "fedsim",
        "fedsim",
        False,
    )
    assert (authors.pooling, authors.gradcam, authors.augmentation, authors.input, authors.balanced_cohort) == (
        "authors", "authors", "authors", "authors", True,
    )  # fmt: skip
    mixed = _cfg(task_options=(*AUTHORS, ("pooling", "global")))
    model = task.build_model("aicnet3d_hemiretinal", _cfg(task_options=AUTHORS))
    assert isinstance(model, AICNet3D) and model.pooling == "authors"
    assert task.model_config(mixed)["pooling"] == "global"
    with pytest.raises(ConfigError, match=r"unknown gradcam 'hook'; valid choices: auto, fedsim, authors"):
        _cfg(task_options=(("gradcam", "hook"),))


def test_the_balanced_cohort_gives_50_50_test_sets():
    task: AICNet3DTask = get_task("aicnet3d")  # type: ignore[assignment]
    cfg = _cfg(num_samples=60, task_options=AUTHORS)
    labels, global_idx = task.global_test(cfg)
    assert np.bincount(labels[global_idx], minlength=2).tolist() == [4, 4]  # round(15 % of 24) per class of the 48 kept
    split = task.make_split(cfg, labels)
    used = np.concatenate([global_idx, *[np.concatenate(parts) for parts in split.clients]])
    assert len(used) == len(np.unique(used)) == 48 and np.bincount(labels[used]).tolist() == [24, 24]
    for _train, _val, test in split.clients:
        counts = np.bincount(labels[test], minlength=2)
        assert abs(int(counts[0]) - int(counts[1])) <= 1
    # the paper recipe keeps the cohort's 40 % glaucoma
    paper = _cfg(num_samples=60)
    lab, idx = task.global_test(paper)
    assert sum(len(np.concatenate(p)) for p in task.make_split(paper, lab).clients) + len(idx) == 60


def test_real_volumes_with_patient_ids_are_split_by_patient(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(16):  # 16 patients, both eyes each
        cls = "Glaucomas" if k % 2 else "Non-Glaucomas"
        for eye in ("OD", "OS"):
            path = tmp_path / cls / f"site{k % 3}" / f"scan-P{k:02d}-{eye}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, rng.integers(0, 256, (16, 24, 14)).astype(np.uint8))
    task: AICNet3DTask = get_task("aicnet3d")  # type: ignore[assignment]
    cfg = _cfg(data_dir=str(tmp_path), clients=2)
    patients = task.groups(str(tmp_path))
    assert patients is not None and len(np.unique(patients)) == 16
    labels, global_idx = task.global_test(cfg)
    parts = [global_idx, *[p for parts in task.make_split(cfg, labels).clients for p in parts if len(p)]]
    owner = {}
    for j, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(int(patients[i]), j) == j  # a patient's two eyes are never split
    assert sum(len(p) for p in parts) == 32


def test_authors_augmentation_by_hand():
    x = torch.full((1, 1, 8, 12, 6), 0.5)
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = augment_oct_authors(x, gen)
    r = torch.rand(3, generator=ref)
    alpha, beta, gamma = 1 + (float(r[0]) - 0.5) * 0.3, float(r[1]) / 2 * 0.3, 2.0 ** (float(r[2]) * 2 - 1)
    expected = math.floor(min(1.0, 0.5 * alpha + beta) ** gamma * 255) / 255  # a constant volume: zoom and flips keep it
    assert 0.85 <= alpha <= 1.15 and 0 <= beta <= 0.15 and 0.5 <= gamma <= 2
    torch.testing.assert_close(out, torch.full_like(x, expected))
    # a ramp along W: flips and zoom move voxels but keep 8-bit levels and the shape
    ramp = torch.linspace(0, 1, 6).expand(2, 1, 8, 12, 6).contiguous()
    y = augment_oct_authors(ramp, torch.Generator().manual_seed(0))
    assert y.shape == ramp.shape and torch.equal(torch.round(y * 255), y * 255)
    assert torch.equal(y, augment_oct_authors(ramp, torch.Generator().manual_seed(0)))  # seeded


def test_local_training_with_the_authors_recipe_runs_stage_2():
    task = get_task("aicnet3d")
    cfg = _cfg(rounds=1, local_epochs=1, num_samples=36, task_options=(*AUTHORS, ("finetune-rounds", "1")))
    torch.manual_seed(0)
    model = task.build_model("aicnet3d_hemiretinal", cfg)
    res = task.train(model, cfg, 0, 1, torch.device("cpu"))
    assert res.metrics["stage"] == 2 and math.isfinite(res.metrics["consistency"]) and math.isfinite(res.metrics["loss"])
    ev = task.evaluate_local(model, cfg, 0, torch.device("cpu"))
    assert math.isfinite(ev.metrics["loss"])
