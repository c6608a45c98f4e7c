"""The one local-epoch runner and the task scaffold: callbacks always called in order, FedProx in
the optimiser step, seeded splits and per-round seeds; a new task is one class plus decorators."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.clients.tasks import TASKS, get_task, register_task, resolve_config
from fedsim.clients.tasks.base import LocalResult
from fedsim.clients.tasks.scaffold import CohortTask
from fedsim.clients.training import LocalTraining, ProximalTerm, TrainStep, run_local_epochs
from fedsim.config import ConfigError, Profile, ResolvedConfig, RunConfig
from fedsim.data.partition import split_train_test
from fedsim.models import MODELS, register_model


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        self.events.append(("start", info.server_round, info.partition_id))

    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Any) -> None:
        self.events.append(("epoch", epoch, dict(metrics)))

    def on_train_end(self, model: nn.Module, info: TrainInfo) -> None:
        self.events.append(("end", next(model.parameters()).detach().clone()))


def _regression(model: nn.Linear, n: int = 16) -> tuple[LocalTraining, torch.Tensor]:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def epoch(e: int, step: TrainStep) -> dict[str, float]:
        loss = step(((model(x).squeeze(1) - y) ** 2).mean())
        return {"loss": float(loss), "epoch": float(e)}

    return LocalTraining(n, lambda params: torch.optim.SGD(params, lr=0.1), epoch), y


def test_runner_calls_every_callback_in_order_and_reports_the_last_epoch():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    plan, _ = _regression(model)
    rec = Recorder()
    metrics = run_local_epochs(model, plan, TrainInfo(2, 1, 3, "linear"), torch.device("cpu"), [rec])
    assert [e[0] for e in rec.events] == ["start", "epoch", "epoch", "epoch", "end"]
    assert rec.events[0] == ("start", 2, 1)
    losses = [e[2]["loss"] for e in rec.events[1:4]]
    assert losses[2] < losses[0] and metrics == rec.events[3][2]
    assert torch.equal(rec.events[-1][1], model.weight.detach())


def test_finish_runs_before_on_train_end_and_may_restore_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plan, _ = _regression(model)

    def finish(history: list[dict[str, float]]) -> dict[str, float]:
        model.load_state_dict(start)
        return {"epochs": float(len(history))}

    rec = Recorder()
    plan = LocalTraining(plan.num_examples, plan.optimizer, plan.epoch, finish)
    assert run_local_epochs(model, plan, TrainInfo(1, 0, 2, "linear"), torch.device("cpu"), [rec]) == {"epochs": 2.0}
    assert torch.equal(rec.events[-1][1], start["weight"])  # on_train_end sees the restored weights


def test_train_step_adds_the_proximal_term_only_with_mu_and_anchor():
    model = nn.Linear(2, 1)
    anchor = {k: v.detach() + 1.0 for k, v in model.named_parameters()}  # every entry 1 away
    n = sum(p.numel() for p in model.parameters())
    assert not ProximalTerm(model, anchor, 0.0, torch.device("cpu"))
    assert not ProximalTerm(model, None, 0.5, torch.device("cpu"))
    prox = ProximalTerm(model, anchor, 0.5, torch.device("cpu"))
    assert float(prox().detach()) == pytest.approx(0.5 * 0.5 * n)
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.0), prox)
    assert float(step(torch.tensor(2.0, requires_grad=True))) == pytest.approx(2.0 + 0.25 * n)
    assert model.weight.grad is not None and torch.allclose(model.weight.grad, -0.5 * torch.ones_like(model.weight))


def test_task_train_always_goes_through_the_runner():
    task = get_task("brain_mri")
    cfg = resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, local_epochs=2))
    torch.manual_seed(0)
    model = task.build_model("small_cnn", cfg)
    rec = Recorder()
    res = task.train(model, cfg, 1, 3, torch.device("cpu"), callbacks=[rec])
    assert [e[0] for e in rec.events] == ["start", "epoch", "epoch", "end"] and rec.events[0] == ("start", 3, 1)
    assert dict(res.metrics) == rec.events[2][2] and set(res.metrics) == {"loss", "accuracy"}


def test_round_seeds_keep_each_task_s_salt():
    cfg = resolve_config(RunConfig(profile="tiny", seed=7))
    for name, salt in (("brain_mri", []), ("aicnet3d", []), ("h3denet", [3])):
        task = get_task(name)
        assert isinstance(task, CohortTask)
        expected = int(np.random.default_rng([7, 2, 1, *salt]).integers(2**31))
        assert task.round_seed(cfg, 2, 1) == expected


# ---------------------------------------------------------------- a new task in one class
@pytest.fixture
def toy_task():
    """A task and a model registered the way a new one would be, removed again afterwards."""

    @register_model("_toy_linear", tasks=("_toy",))
    def build(features: int = 4) -> nn.Module:
        return nn.Linear(features, 1)

    @register_task("_toy")
    class ToyTask(CohortTask):
        profiles = {"tiny": Profile(image_size=16, num_samples=30, rounds=2, local_epochs=2, batch_size=8, lr=0.05)}  # noqa: RUF012
        default_model = "_toy_linear"
        primary_metric = "loss"
        higher_is_better = False
        cme_layers = ("weight",)

        def strata(self, cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
            return np.arange(cfg.num_samples) % 2

        def split_client(self, cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, ...]:
            if len(idx) < 3:
                raise ConfigError(f"{who} gets only {len(idx)} samples")
            return split_train_test(idx, cfg.local_test_fraction, cfg.seed)

        def _data(self, cfg: ResolvedConfig, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.from_numpy(np.random.default_rng([cfg.seed, 9]).normal(size=(cfg.num_samples, 4))).float()[idx]
            return x, x.sum(1, keepdim=True)

        def local_training(self, model, cfg, partition_id, server_round, device, data_dir) -> LocalTraining:
            _, (train_idx, _) = self.client_split(cfg, partition_id, data_dir)
            x, y = self._data(cfg, train_idx)

            def epoch(e: int, step: TrainStep) -> dict[str, float]:
                return {"loss": float(step(((model(x) - y) ** 2).mean()))}

            return LocalTraining(len(train_idx), lambda params: torch.optim.SGD(params, lr=cfg.lr), epoch)

        def evaluate_local(self, model, cfg, partition_id, device, data_dir=None) -> LocalResult:
            _, (_, test_idx) = self.client_split(cfg, partition_id, data_dir)
            x, y = self._data(cfg, test_idx)
            with torch.no_grad():
                return LocalResult(len(test_idx), {"loss": float(((model(x) - y) ** 2).mean())})

        def evaluate_global(self, model, cfg, device) -> LocalResult | None:
            return None

    yield get_task("_toy")
    TASKS._items.pop("_toy")
    MODELS._items.pop("_toy_linear")


def test_a_new_task_is_one_class_with_register_task(toy_task):
    cfg = resolve_config(RunConfig(task="_toy", profile="tiny", clients=2))
    assert cfg.client_models() == ("_toy_linear",) * 2 and toy_task.model_choices() == ["_toy_linear"]
    sizes = toy_task.check_data(cfg)
    split = toy_task.make_split(cfg, toy_task.strata(cfg, ""))
    assert sizes == [len(tr) + len(te) for tr, te in split.clients] and sum(sizes) + len(split.global_test) == 30
    model = toy_task.build_model("_toy_linear", cfg)
    rec = Recorder()
    res = toy_task.train(model, cfg, 0, 1, torch.device("cpu"), callbacks=[rec])
    assert [e[0] for e in rec.events] == ["start", "epoch", "epoch", "end"]
    assert res.num_examples == len(split.clients[0][0])
    assert toy_task.evaluate_local(model, cfg, 0, torch.device("cpu")).num_examples == len(split.clients[0][1])
    with pytest.raises(ConfigError, match="client 1 gets only"):
        toy_task.check_data(resolve_config(RunConfig(task="_toy", profile="tiny", clients=2, partition="sizes", fractions=(0.95, 0.05))))
