"""The aicnet3d task: metrics, options, stages, splits, balancing, augmentation, local training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.callbacks import TrainCallback
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.aicnet3d import AICNet3DOptions, balance_indices
from fedsim.config import ConfigError, RunConfig
from fedsim.data.partition import stratified_split
from fedsim.metrics.classification import binary_metrics, roc_auc


def test_binary_metrics_against_a_hand_computed_confusion_matrix():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    # TP 3, FN 1, TN 4, FP 2
    m = binary_metrics(labels, preds.astype(float), preds)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced-accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # rounded predictions as scores: the authors' "AUROC" equals the balanced accuracy
    assert m["auc"] == pytest.approx(m["balanced-accuracy"])


def test_binary_metrics_all_correct_and_undefined_values():
    m = binary_metrics(np.array([0, 1]), np.array([0.2, 0.9]), np.array([0, 1]))
    assert m == {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "f1": 1.0, "auc": 1.0, "balanced-accuracy": 1.0}
    m = binary_metrics(np.array([0, 0]), np.array([0.2, 0.9]), np.array([0, 1]))
    assert m["specificity"] == 0.5 and math.isnan(m["sensitivity"]) and math.isnan(m["auc"]) and m["f1"] == 0.0


def test_auc_with_ties_by_hand():
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.8, 0.4, 0.4, 0.4, 0.1])
    # positive pairs (pos, neg): 0.8 beats all 3 (3); 0.4 ties two 0.4s (2 * 0.5) and beats 0.1 (1)
    assert roc_auc(labels, scores) == pytest.approx((3 + 1 + 1) / 6)
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0


def _cfg(**kw) -> RunConfig:
    return resolve_config(RunConfig(task="aicnet3d", profile="tiny", **kw))


def test_defaults_models_and_option_validation():
    task = get_task("aicnet3d")
    cfg = _cfg()
    assert cfg.client_models() == ("aicnet3d_hemiretinal",) * 3 and cfg.server_model == "aicnet3d_hemiretinal"
    assert "aicnet3d_epa" in task.model_choices() and "resnet50" not in task.model_choices()
    assert task.options(cfg) == AICNet3DOptions()
    opts = task.options(_cfg(task_options=(("finetune-rounds", "1"), ("early-stopping", "false"))))
    assert opts.finetune_rounds == 1 and not opts.early_stopping
    with pytest.raises(ConfigError, match="finetune-rounds must be >= 0"):
        _cfg(task_options=(("finetune-rounds", "-1"),))
    with pytest.raises(ConfigError, match="consistency-weight must be in"):
        _cfg(task_options=(("consistency-weight", "2"),))
    with pytest.raises(ValueError, match=r"unknown model .resnet50. for task .aicnet3d."):
        _cfg(models=("resnet50",) * 3)


def test_finetune_rounds_select_the_last_rounds():
    task = get_task("aicnet3d")
    cfg = _cfg(rounds=5, task_options=(("finetune-rounds", "2"),))
    assert [task.stage(cfg, r) for r in range(1, 6)] == [1, 1, 1, 2, 2]
    assert [task.stage(_cfg(rounds=3), r) for r in (1, 2, 3)] == [1, 1, 1]


def test_splits_are_disjoint_stratified_and_cover_the_cohort():
    task = get_task("aicnet3d")
    cfg = _cfg()
    from fedsim.data.synthetic_oct import cohort_labels

    labels = cohort_labels(cfg.num_samples)
    assert np.array_equal(task.strata(cfg, ""), labels)
    split = task.make_split(cfg, labels)  # val-fraction 0.2 (default)
    parts = [split.global_test] + [p for c in split.clients for p in c]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(set(allidx.tolist())) == cfg.num_samples
    for _, va, te in split.clients:
        assert set(labels[te]) == {0, 1} and set(labels[va]) == {0, 1}  # stratified
    assert task.check_data(cfg) == [len(tr) + len(va) + len(te) for tr, va, te in split.clients]


def test_stratified_split_and_balancing():
    labels = np.array([0] * 6 + [1] * 4)
    rest, held = stratified_split(np.arange(10), labels, 0.25, seed=0)
    assert sorted(labels[held].tolist()) == [0, 0, 1] and len(rest) == 7
    bal = balance_indices(np.arange(10), labels, np.random.default_rng(0))
    assert np.bincount(labels[bal]).tolist() == [4, 4] and set(np.flatnonzero(labels == 1)) <= set(bal.tolist())


class _Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list = []

    def on_train_start(self, model, info):
        self.events.append(("start", info.server_round))

    def on_epoch_end(self, model, info, epoch, metrics):
        self.events.append(("epoch", epoch, metrics["val-loss"], {k: v.clone() for k, v in model.state_dict().items()}))

    def on_train_end(self, model, info):
        self.events.append(("end", {k: v.clone() for k, v in model.state_dict().items()}))


@pytest.mark.parametrize("finetune", [0, 1])
def test_local_training_calls_callbacks_and_keeps_the_best_epoch(finetune):
    task = get_task("aicnet3d")
    cfg = _cfg(rounds=1, local_epochs=3, num_samples=36, task_options=(("finetune-rounds", str(finetune)),))
    torch.manual_seed(0)
    model = task.build_model("aicnet3d_hemiretinal", cfg)
    rec = _Recorder()
    res = task.train(model, cfg, 0, 1, torch.device("cpu"), callbacks=[rec])
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start", "epoch", "epoch", "epoch", "end"]
    epochs = rec.events[1:4]
    best = int(np.argmin([e[2] for e in epochs]))
    assert res.metrics["best-epoch"] == best + 1 and res.metrics["stage"] == 1 + finetune
    assert res.metrics["val-loss"] == pytest.approx(epochs[best][2])
    final = rec.events[-1][1]
    assert all(torch.equal(final[k], epochs[best][3][k]) for k in final)  # weights of the best epoch
    assert ("consistency" in res.metrics) == bool(finetune)
    ev = task.evaluate_local(model, cfg, 0, torch.device("cpu"))
    assert set(ev.metrics) == {"loss", "accuracy", "sensitivity", "specificity", "f1", "auc", "balanced-accuracy"}
    # reproducible: same seed, round and client -> same result
    torch.manual_seed(0)
    model2 = task.build_model("aicnet3d_hemiretinal", cfg)
    assert task.train(model2, cfg, 0, 1, torch.device("cpu")).metrics == res.metrics
