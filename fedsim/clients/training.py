"""Local training and evaluation loops for classification tasks, with composable callbacks.

Cross-cutting concerns (progress logging, timing, CME recording) hook in as
:class:`fedsim.callbacks.TrainCallback` objects instead of flags inside the loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsim.callbacks import TrainCallback, TrainInfo


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


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on ``device``."""
    return x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def train_classifier(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    device: torch.device,
    info: TrainInfo,
    callbacks: Sequence[TrainCallback] = (),
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
    flip_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Train with Adam and cross-entropy for ``epochs`` epochs; return last-epoch loss/accuracy.

    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_anchor||^2`` is added over the
    parameters named in ``anchor`` (the weights received from the server this round).
    ``flip_generator`` enables random left-right flips (seeded) as augmentation.
    """
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)  # multi-tensor: faster on CPU too
    loss_fn = nn.CrossEntropyLoss()
    prox = ProximalTerm(model, anchor, proximal_mu, device)
    for cb in callbacks:
        cb.on_train_start(model, info)
    metrics: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        total, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            x, y = to_input(xb, device), yb.to(device)
            if flip_generator is not None:
                flip = (torch.rand(len(x), generator=flip_generator) < 0.5).to(device)
                x[flip] = x[flip].flip(-1)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            if prox:
                loss = loss + prox()
            loss.backward()
            opt.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
        metrics = {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}
        for cb in callbacks:
            cb.on_epoch_end(model, info, epoch, metrics)
    for cb in callbacks:
        cb.on_train_end(model, info)
    return metrics


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
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
