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
