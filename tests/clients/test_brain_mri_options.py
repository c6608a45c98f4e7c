"""brain_mri's study options: learning-rate decay and a site-style shift at a known round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.clients.tasks import get_task, resolve_config
from fedsim.clients.tasks.brain_mri import cohort
from fedsim.config import ConfigError, RunConfig
from fedsim.data.synthetic_mri import apply_site_style

TASK = get_task("brain_mri")


def _cfg(**kw):
    return resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, **kw))


def test_lr_decay_sets_the_learning_rate_per_federation_epoch():
    cfg = _cfg(task_options=(("lr-decay", "0.5"),))
    model = TASK.build_model("small_cnn", cfg)
    plan = TASK.local_training(model, cfg, 0, 3, torch.device("cpu"), None)  # round 3: epochs t = 4, 5
    seen = []

    class Step:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

        def __call__(self, loss):
            seen.append(self.optimizer.param_groups[0]["lr"])
            return loss.detach()

    plan.epoch(1, Step())
    plan.epoch(2, Step())
    assert seen[0] == pytest.approx(cfg.lr * 0.5**4) and seen[-1] == pytest.approx(cfg.lr * 0.5**5)


def test_shift_round_switches_training_images_to_the_next_site_style():
    cfg = _cfg(site_styles=True, task_options=(("shift-round", "3"),))
    before, test_before = TASK._client_datasets(cfg, 1, None, server_round=2)
    after, test_after = TASK._client_datasets(cfg, 1, None, server_round=3)
    images, _ = cohort(cfg)
    _, (train_idx, _) = TASK.client_split(cfg, 1)
    np.testing.assert_array_equal(after.tensors[0][:, 0].numpy(), apply_site_style(images[train_idx], 2, cfg.seed))
    assert not torch.equal(before.tensors[0], after.tensors[0])
    assert torch.equal(test_before.tensors[0], test_after.tensors[0])  # local test images keep their style
    assert torch.equal(before.tensors[1], after.tensors[1])  # same labels


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match=r"lr-decay must be in \(0, 1\]"):
        _cfg(task_options=(("lr-decay", "1.5"),))
    with pytest.raises(ConfigError, match="shift-round switches site styles, so it needs --site-styles"):
        TASK.check_data(dataclasses.replace(_cfg(), task_options=(("shift-round", "2"),)))


def test_received_eval_reports_the_received_models_loss_and_leaves_training_unchanged():
    """``received-eval``: the model as received, on the client's training images and labels,
    before the first step; training (weights, metrics, the global RNG stream that dropout draws
    from) is exactly what it is without the option."""
    from fedsim.clients.training import evaluate_classifier

    base, on = _cfg(), _cfg(task_options=(("received-eval", "true"),))
    torch.manual_seed(0)
    initial = TASK.build_model("small_cnn", base).state_dict()
    train_ds, _ = TASK._client_datasets(base, 1, None)
    runs = {}
    for name, cfg in (("off", base), ("on", on)):
        model = TASK.build_model("small_cnn", cfg)
        model.load_state_dict(initial)
        expected = evaluate_classifier(model, torch.utils.data.DataLoader(train_ds, batch_size=7), torch.device("cpu"))
        torch.manual_seed(123)
        result = TASK.train(model, cfg, 1, 1, torch.device("cpu"))
        runs[name] = (result.metrics, model.state_dict(), torch.rand(1), expected)
    (m_off, w_off, rng_off, _), (m_on, w_on, rng_on, expected) = runs["off"], runs["on"]
    assert "received-loss" not in m_off
    assert m_on["received-loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert m_on["received-accuracy"] == pytest.approx(expected["accuracy"])
    assert {k: v for k, v in m_on.items() if not k.startswith("received-")} == m_off
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_off) and torch.equal(rng_on, rng_off)


def test_received_eval_uses_evenly_spaced_images_of_a_large_client():
    from fedsim.clients.tasks.brain_mri import _evenly_spaced

    ds = torch.utils.data.TensorDataset(torch.arange(10), torch.arange(10) * 2)
    sub = _evenly_spaced(ds, 4)
    assert sub.tensors[0].tolist() == [0, 3, 6, 9] and sub.tensors[1].tolist() == [0, 6, 12, 18]  # linspace(0, 9, 4) rounded
    assert _evenly_spaced(ds, 10) is ds
