"""The one local-epoch runner every task trains through, and the classification epoch of ``brain_mri``.

:func:`run_local_epochs` owns what is the same in every task: moving the model to the device, the
optimiser, FedProx's proximal term, the optimiser step (:class:`TrainStep`) and the training
callbacks (:class:`fedsim.callbacks.TrainCallback`: progress logging, CME recording, ...), which it
always calls, in order: ``on_train_start``, ``on_epoch_end`` after every epoch, ``on_train_end``.
A task supplies a :class:`LocalTraining` plan: its optimiser, one epoch (its batches, loss and
metrics; it calls ``step(loss)`` once per batch) and, optionally, what to report at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsim.callbacks import TrainCallback, TrainInfo

Metrics = dict[str, float]


class ProximalTerm:
    """FedProx's ``mu/2 * ||w - w_anchor||^2`` over the parameters named in ``anchor`` (the weights
    received from the server this round); false (and never evaluated) when ``mu == 0`` or there is
    no anchor, so plain strategies pay nothing. ``loss = loss + prox()`` where ``if prox:``."""

    def __init__(self, model: nn.Module, anchor: Mapping[str, torch.Tensor] | None, mu: float, device: torch.device) -> None:
        params = dict(model.named_parameters())
        self.mu = mu
        self.pairs = [(params[k], v.to(device)) for k, v in (anchor or {}).items() if k in params] if mu > 0 else []

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __call__(self) -> torch.Tensor:
        return 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in self.pairs)  # type: ignore[return-value]


class TrainStep:
    """One optimiser step on a batch's loss: adds the proximal term (FedProx), back-propagates and
    steps. A task's epoch calls it once per batch; ``optimizer`` is exposed for schedules (e.g. a
    per-epoch learning rate).

    ``lr_scale`` multiplies every parameter group's learning rate for the step itself (the
    ``lazy``, ``diverge`` and ``free-rider`` faults of :mod:`fedsim.faults`), on top of whatever
    schedule the task sets; 1 (no fault) leaves the optimiser untouched."""

    def __init__(self, optimizer: torch.optim.Optimizer, prox: ProximalTerm, lr_scale: float = 1.0) -> None:
        self.optimizer = optimizer
        self.prox = prox
        self.lr_scale = lr_scale

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """Optimise ``loss`` (+ the proximal term); return the loss that was optimised, detached."""
        if self.prox:
            loss = loss + self.prox()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.lr_scale == 1.0:
            self.optimizer.step()
        else:
            groups = self.optimizer.param_groups
            scheduled = [g["lr"] for g in groups]
            for g, lr in zip(groups, scheduled, strict=True):
                g["lr"] = lr * self.lr_scale
            self.optimizer.step()
            for g, lr in zip(groups, scheduled, strict=True):
                g["lr"] = lr
        return loss.detach()


@dataclass(frozen=True)
class LocalTraining:
    """A task's plan for one round of local training (see :func:`run_local_epochs`).

    * ``num_examples``: what the client reports (e.g. its training-split size);
    * ``optimizer``: builds the optimiser for the model's parameters (on the device);
    * ``epoch``: ``epoch(e, step)`` runs local epoch ``e`` (1-based), calling ``step(loss)`` once
      per batch, and returns the epoch's metrics;
    * ``finish``: ``finish(history)`` returns the metrics to report from the per-epoch ones (and may
      restore other weights, e.g. the best epoch's); default: the last epoch's.
    * ``received``: optional; ``received()`` evaluates the model *as received*, before the first
      local step, on the client's training split with the labels the client holds, and returns
      e.g. ``{"loss": ..., "accuracy": ...}`` (reported as ``received-loss``, ...): the global
      model's loss on the client's own labels, the statistic Power-of-Choice client selection
      ranks clients by. Where the whole model is shared it does not depend on how far the
      client's own training got; as a label-noise statistic the validation study found it no
      better than the train loss, and useless where only the head is shared
      (docs/cme-validation.md). It must not touch the global random generators (training stays
      bit-identical).
    """

    num_examples: int
    optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
    epoch: Callable[[int, TrainStep], Metrics]
    finish: Callable[[list[Metrics]], Metrics] | None = None
    received: Callable[[], Metrics] | None = None


def run_local_epochs(
    model: nn.Module,
    plan: LocalTraining,
    info: TrainInfo,
    device: torch.device,
    callbacks: Sequence[TrainCallback] = (),
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    lr_scale: float = 1.0,
) -> Metrics:
    """Run ``info.epochs`` local epochs of ``plan`` on ``model``; return the reported metrics.

    With ``proximal_mu > 0`` every step adds FedProx's ``mu/2 * ||w - w_anchor||^2`` over the
    parameters named in ``anchor`` (the weights received from the server this round);
    ``lr_scale`` multiplies the learning rate of every step (fault injection). The
    callbacks are always called: ``on_train_start`` before the first epoch, ``on_epoch_end`` after
    each, ``on_train_end`` after ``plan.finish``. ``plan.received`` (if any) runs first; its
    metrics are reported with a ``received-`` prefix.
    """
    received = plan.received() if plan.received is not None else {}
    model.to(device).train()
    step = TrainStep(plan.optimizer(model.parameters()), ProximalTerm(model, anchor, proximal_mu, device), lr_scale)
    for cb in callbacks:
        cb.on_train_start(model, info)
    history: list[Metrics] = []
    for epoch in range(1, info.epochs + 1):
        metrics = plan.epoch(epoch, step)
        history.append(metrics)
        for cb in callbacks:
            cb.on_epoch_end(model, info, epoch, metrics)
    result = plan.finish(history) if plan.finish is not None else dict(history[-1]) if history else {}
    result.update({f"received-{k}": v for k, v in received.items()})
    for cb in callbacks:
        cb.on_train_end(model, info)
    return result


# ---------------------------------------------------------------- classification (brain_mri)
def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on ``device``."""
    return x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def classifier_epoch(
    model: nn.Module, loader: DataLoader, device: torch.device, flip_generator: torch.Generator | None = None
) -> Callable[[int, TrainStep], Metrics]:
    """One epoch of cross-entropy classification over ``loader`` (uint8 images); returns the
    epoch's mean loss and accuracy. ``flip_generator`` enables random left-right flips (seeded)."""
    loss_fn = nn.CrossEntropyLoss()

    def epoch(_: int, step: TrainStep) -> Metrics:
        total, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            x, y = to_input(xb, device), yb.to(device)
            if flip_generator is not None:
                flip = (torch.rand(len(x), generator=flip_generator) < 0.5).to(device)
                x[flip] = x[flip].flip(-1)
            logits = model(x)
            loss = step(loss_fn(logits, y))
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss) * len(y)
        return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}

    return epoch


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device) -> Metrics:
    """Mean cross-entropy loss and accuracy over ``loader``."""
    model.to(device).eval()
    total, correct, loss_sum = 0, 0, 0.0
    for xb, yb in loader:
        x, y = to_input(xb, device), yb.to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}
