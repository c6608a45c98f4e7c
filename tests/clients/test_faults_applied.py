"""Each injected fault really applies (issue: fault injection), checked through the real task and
ClientApp code on hand-made Messages (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.callbacks import TrainInfo
from fedsim.clients import app as client_app
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.training import LocalTraining, Metrics, TrainStep, run_local_epochs
from fedsim.config import RunConfig
from tests.clients.test_client_app import HEAD_KEYS, _context, _message

pytestmark = pytest.mark.usefixtures("task_identity")


def _cfg(*faults: str, **kw):
    return resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, faults=faults, **kw))


def test_few_data_keeps_its_share_of_the_training_split():
    healthy, faulty = _cfg(), _cfg("1:few-data:0.25")
    task = get_task("brain_mri")
    _, (tr_h, te_h) = task.client_split(healthy, 1)
    _, (tr_f, te_f) = task.client_split(faulty, 1)
    assert len(tr_f) == round(0.25 * len(tr_h)) and set(tr_f) <= set(tr_h)
    np.testing.assert_array_equal(te_f, te_h)  # the local test split is unchanged
    np.testing.assert_array_equal(task.client_split(faulty, 0)[1][0], task.client_split(healthy, 0)[1][0])  # others untouched
    reply = client_app.train(_message(faulty, HEAD_KEYS), _context(1))
    assert reply.content["metrics"]["num-examples"] == len(tr_f)


@pytest.mark.parametrize(("task_name", "level"), [("brain_mri", 0.5), ("aicnet3d", 0.3)])
def test_label_noise_flips_the_share_of_training_labels(task_name, level):
    kw = {} if task_name == "brain_mri" else {"task": task_name, "models": ()}
    cfg = resolve_config(RunConfig(profile="tiny", faults=(f"2:label-noise:{level}",), **kw))
    task = get_task(task_name)
    labels, parts = task.client_split(cfg, 2)
    train_idx = parts[0]
    seen = task.train_labels(cfg, 2, labels, train_idx)
    wrong = np.flatnonzero(seen != labels)
    assert len(wrong) == round(level * len(train_idx)) and set(wrong) <= set(train_idx)
    assert task.train_labels(cfg, 0, labels, parts[0]) is labels  # healthy clients see the truth


def test_label_noise_swaps_landmarks_for_h3denet():
    cfg = resolve_config(RunConfig(task="h3denet", profile="tiny", faults=("0:label-noise:0.5",)))
    task = get_task("h3denet")
    _, (train_idx, _) = task.client_split(cfg, 0)
    cases = task.cases(cfg, train_idx)
    seen = task.train_cases(cfg, 0, cases)
    moved = [i for i, (a, b) in enumerate(zip(cases, seen, strict=True)) if not np.array_equal(a.landmarks, b.landmarks, equal_nan=True)]
    assert len(moved) == round(0.5 * len(cases)) and all(a.volume is b.volume for a, b in zip(cases, seen, strict=True))


def test_lr_scale_multiplies_the_effective_learning_rate():
    """SGD makes the effective step visible: the update with lr_scale s is s times the update."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def update(scale: float) -> torch.Tensor:
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        w0 = model.weight.detach().clone()

        def epoch(_: int, step: TrainStep) -> Metrics:
            return {"loss": float(step(torch.nn.functional.mse_loss(model(x), y)))}

        plan = LocalTraining(8, lambda p: torch.optim.SGD(p, lr=0.1), epoch)
        run_local_epochs(model, plan, TrainInfo(1, 0, 1, "linear"), torch.device("cpu"), lr_scale=scale)
        return model.weight.detach() - w0

    base = update(1.0)
    torch.testing.assert_close(update(0.1), 0.1 * base)
    torch.testing.assert_close(update(0.0), torch.zeros_like(base))


def test_lazy_client_moves_less_than_a_healthy_one():
    def drift(cfg) -> float:
        msg = _message(cfg, HEAD_KEYS)
        sent = msg.content["arrays"]["head.fc2.weight"].numpy().copy()
        reply = client_app.train(msg, _context(1))
        return float(np.linalg.norm(reply.content["arrays"]["head.fc2.weight"].numpy() - sent))

    assert drift(_cfg("1:lazy:0.01")) < 0.1 * drift(_cfg())


def test_free_rider_returns_the_received_weights_plus_tiny_noise():
    cfg = _cfg("0:free-rider:0.001")
    msg = _message(cfg, HEAD_KEYS)
    sent = {k: msg.content["arrays"][k].numpy().copy() for k in HEAD_KEYS}
    reply = client_app.train(msg, _context(0))
    for k in HEAD_KEYS:
        got = reply.content["arrays"][k].numpy()
        noise = got - sent[k]
        assert np.abs(noise).max() <= 0.01 * max(float(sent[k].std()), 1e-12) + 1e-12
        if sent[k].std() > 0 and sent[k].size > 1:
            assert noise.std() == pytest.approx(0.001 * sent[k].std(), rel=0.5)  # small but not zero
    assert reply.content["metrics"]["num-examples"] > 0 and "train-loss" in reply.content["metrics"]


def test_diverging_client_explodes():
    cfg = dataclasses.replace(_cfg("2:diverge:10000"), local_epochs=2)
    msg = _message(cfg, HEAD_KEYS)
    sent = msg.content["arrays"]["head.fc2.weight"].numpy().copy()
    reply = client_app.train(msg, _context(2))
    got = reply.content["arrays"]["head.fc2.weight"].numpy()
    healthy = client_app.train(_message(_cfg(), HEAD_KEYS), _context(2)).content["arrays"]["head.fc2.weight"].numpy()
    exploded = not np.isfinite(got).all() or np.linalg.norm(got - sent) > 100 * np.linalg.norm(healthy - sent)
    assert exploded
