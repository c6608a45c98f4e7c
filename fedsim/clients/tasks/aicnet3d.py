"""``aicnet3d``: 3D OCT glaucoma classification with AI-CNet3D (Kenia, Li, Srivastava, Thakoor,
MELBA 2025, arXiv 2510.00882) as a federated client task.

Data: the synthetic widefield-OCT cohort (:mod:`fedsim.data.synthetic_oct`, default) or real
``.npy`` volumes (``data_dir``: class folders or ``labels.csv``). ``image_size`` is the number of
B-scans ``D``; the volume is ``D x 1.5 D x 0.875 D`` (the paper's 128 x 192 x 112 aspect), so
``--image-size`` overrides work for any value >= 16. The cohort is split once by ``cfg.seed``:
a global test set for the server, the rest partitioned among clients; every client splits its
share, stratified by class, into train / local test (``local_test_fraction``) and, with early
stopping, a validation part of its training data (``val-fraction``).

Training recipe (paper section 3.4):

* stage 1: class-weighted BCE on the softmax output (for two classes this equals the weighted
  cross-entropy, which is how it is computed);
* stage 2: fine-tuning from the stage-1 model with ``L = (1 - w) BCE + w MSE(Grad-CAM, CARE)``,
  ``w = 0.75``. In a federation the stage is chosen per round: with ``finetune-rounds=k`` the
  last ``k`` rounds run stage 2 (they start from the global model of the stage-1 rounds);
  ``k = 0`` (default) is stage 1 only;
* NAdam at the profile's ``lr`` (1e-4 in the paper profile), batch 4 in the paper profile;
* augmentation (seeded): brightness / contrast / gamma jitter, zoom 1-1.25 then crop, lateral
  flip, superior/inferior flip, each with p = 0.5;
* classes balanced by subsampling the majority class (a new subsample every round, so over the
  rounds all volumes are used), with BCE class weights from the remaining counts;
* early stopping on validation loss: the paper stops stage-level training when the validation
  loss stops improving. A federated round has only ``local_epochs`` epochs and the number of
  rounds is fixed by the server, so within each round the client keeps the weights of its best
  local epoch on its own validation split (unweighted BCE) and sends those; disable with
  ``early-stopping=false`` (then no validation split is held out).

Metrics: ``loss``, ``accuracy``, ``sensitivity`` (glaucoma = positive), ``specificity``, ``f1``,
``auc`` (true ROC AUC from the glaucoma probability, ties count one half) and
``balanced-accuracy`` (the authors' "AUROC", computed on rounded predictions, equals
(sensitivity + specificity) / 2). Undefined values (e.g. sensitivity without positives) are NaN.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim._logging import logger
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.base import LocalResult, Task
from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.clients.training import ProximalTerm
from fedsim.config import ConfigError, Profile, ResolvedConfig
from fedsim.metrics.classification import binary_metrics
from fedsim.data.partition import PartitionParams, partition, stratified_split
from fedsim.data.synthetic_oct import (
    CLASS_NAMES,
    VolumeFiles,
    cohort_labels,
    generate_volumes,
    load_volumes,
    scan_oct_folder,
    volume_shape,
)
from fedsim.models import build_model
from fedsim.models.aicnet3d import DEFAULT_MODEL, AICNet3D, care_map, consistency_loss, gradcam_map

#: ``image_size`` = number of B-scans D (volume D x 1.5D x 0.875D, see :func:`volume_shape`).
PROFILES: dict[str, Profile] = {
    "tiny": Profile(image_size=16, num_samples=48, rounds=2, local_epochs=2, batch_size=4, lr=1e-3),
    "quick": Profile(image_size=32, num_samples=360, rounds=10, local_epochs=2, batch_size=4, lr=5e-4),
    "paper": Profile(image_size=128, num_samples=1200, rounds=20, local_epochs=5, batch_size=4, lr=1e-4),
}

#: Per-profile extras: evaluation batch size (3D volumes are large at paper size).
EVAL_BATCH = {"tiny": 16, "quick": 16, "paper": 4}


@dataclass(frozen=True)
class AICNet3DOptions:
    """Task options (``--task-option key=value``).

    * ``finetune-rounds``: the last k rounds run stage 2 (consistency fine-tuning); 0 = none;
    * ``consistency-weight``: ``w`` in ``(1 - w) BCE + w MSE(Grad-CAM, CARE)`` (paper: 0.75);
    * ``early-stopping``: keep the best local epoch on the client's validation split;
    * ``val-fraction``: share of each client's training data held out for that;
    * ``balance``: subsample the majority class each round;
    * ``augment``: the paper's augmentation.
    """

    finetune_rounds: int = 0
    consistency_weight: float = 0.75
    early_stopping: bool = True
    val_fraction: float = 0.2
    balance: bool = True
    augment: bool = True

    def __post_init__(self) -> None:
        if self.finetune_rounds < 0:
            raise ValueError(f"finetune-rounds must be >= 0 (the last k rounds run stage 2), got {self.finetune_rounds}")
        if not 0.0 <= self.consistency_weight <= 1.0:
            raise ValueError(f"consistency-weight must be in [0, 1], got {self.consistency_weight}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val-fraction must be in (0, 1), got {self.val_fraction}")


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    """Cohort indices: global test set and each client's (train, validation, test)."""

    global_test: np.ndarray
    clients: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]


def make_split(cfg: ResolvedConfig, labels: np.ndarray, val_fraction: float | None) -> Split:
    n = len(labels)
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
    n_global = max(2, round(cfg.global_test_fraction * n))
    global_test, pool = np.sort(perm[:n_global]), np.sort(perm[n_global:])
    try:
        parts = partition(cfg.partition, labels[pool], cfg.clients, cfg.seed, PartitionParams(alpha=cfg.alpha, fractions=cfg.fractions))
    except ValueError as exc:
        raise ConfigError(f"cannot partition {len(pool)} training volumes among {cfg.clients} clients: {exc}") from exc
    clients = []
    for k, p in enumerate(parts):
        clients.append(_client_split(cfg, pool[p], labels, val_fraction, f"client {k}"))
    return Split(global_test, tuple(clients))


def _client_split(cfg: ResolvedConfig, idx: np.ndarray, labels: np.ndarray, val_fraction: float | None, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    need = 4 if val_fraction else 3
    if len(idx) < need:
        raise ConfigError(f"{who} gets only {len(idx)} volumes; need at least {need} (use fewer clients or more samples)")
    train, test = stratified_split(idx, labels, cfg.local_test_fraction, cfg.seed)
    val = np.zeros(0, np.int64)
    if val_fraction:
        train, val = stratified_split(train, labels, val_fraction, cfg.seed + 17)
    if len(train) < 2 or len(test) < 1:
        raise ConfigError(f"{who}'s {len(idx)} volumes are too few for train/test splits; use more samples")
    return train, val, test


def task_shape(cfg: ResolvedConfig) -> tuple[int, int, int]:
    return volume_shape(cfg.image_size)


@functools.lru_cache(maxsize=2)
def _scan(data_dir: str) -> VolumeFiles:
    return scan_oct_folder(data_dir)


@functools.lru_cache(maxsize=6)
def _volumes(data_dir: str, shape: tuple[int, int, int], seed: int, indices: tuple[int, ...]) -> np.ndarray:
    """Volumes ``(len(indices), D, H, W)`` uint8 of these cohort indices. Only the volumes a
    process needs are generated / read (a synthetic volume is a pure function of (seed, index)),
    so at paper size no process holds the whole cohort; cached per process for speed."""
    if data_dir:
        files = _scan(data_dir)
        sub = VolumeFiles(tuple(files.paths[i] for i in indices), files.labels[list(indices)])
        logger.info("reading %d OCT volumes from %s at %s", len(indices), data_dir, shape)
        return load_volumes(sub, shape)
    logger.info("generating %d synthetic OCT volumes of %s (seed %d)", len(indices), shape, seed)
    return generate_volumes(indices, shape, seed)


def volumes(cfg: ResolvedConfig, idx: np.ndarray, data_dir: str | None = None) -> np.ndarray:
    d = cfg.data_dir if data_dir is None else data_dir
    return _volumes(d, task_shape(cfg), cfg.seed, tuple(int(i) for i in idx))


def cohort_labels_for(cfg: ResolvedConfig, data_dir: str | None = None) -> np.ndarray:
    """Labels of the whole cohort (cheap: no volume is decoded or generated)."""
    d = cfg.data_dir if data_dir is None else data_dir
    if d:
        return _scan(d).labels
    return cohort_labels(cfg.num_samples)


def _seed(seed: int, server_round: int, partition_id: int) -> int:
    return int(np.random.default_rng([seed, server_round, partition_id]).integers(2**31))


def balance_indices(idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subsample every class down to the smallest class's count (classes balanced, paper 3.5)."""
    classes = [idx[labels[idx] == c] for c in np.unique(labels[idx])]
    m = min(len(c) for c in classes)
    return np.sort(np.concatenate([rng.choice(c, m, replace=False) for c in classes]))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's augmentation on a batch ``(B, 1, D, H, W)`` of intensities in [0, 1]; each
    transform is applied with p = 0.5, parameters drawn from ``gen`` (reproducible)."""
    out = []
    shape = x.shape[2:]
    for v in x:
        r = torch.rand(11, generator=gen)
        if r[0] < 0.5:  # brightness
            v = v + (r[1] - 0.5) * 0.2
        if r[2] < 0.5:  # contrast around the mean
            v = (v - v.mean()) * (0.75 + 0.5 * r[3]) + v.mean()
        if r[4] < 0.5:  # gamma
            v = v.clamp(0, 1) ** (0.7 + 0.8 * r[5])
        if r[6] < 0.5:  # zoom 1-1.25, then a random crop back to the original size
            s = 1.0 + 0.25 * float(r[7])
            big = [max(n, math.ceil(n * s)) for n in shape]
            v = F.interpolate(v[None], size=big, mode="trilinear", align_corners=False)[0]
            off = [int(torch.randint(0, b - n + 1, (1,), generator=gen)) for b, n in zip(big, shape, strict=True)]
            v = v[:, off[0] : off[0] + shape[0], off[1] : off[1] + shape[1], off[2] : off[2] + shape[2]]
        if r[8] < 0.5:  # lateral flip (macula <-> nerve side, like a fellow eye)
            v = v.flip(-1)
        if r[9] < 0.5:  # superior <-> inferior flip
            v = v.flip(-3)
        out.append(v.clamp(0, 1))
    return torch.stack(out)


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 volumes ``(B, D, H, W)`` -> float ``(B, 1, D, H, W)`` in [0, 1] on ``device``."""
    return x.to(device).float().div_(255.0).unsqueeze(1)


def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0  # network input in [-1, 1]


def _bce(logits: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted BCE on the two-class softmax output. With one-hot targets,
    mean_c BCE(p_c, t_c) = -(log p_y + log(1 - p_other)) / 2 = -log p_y, i.e. cross-entropy."""
    loss = F.cross_entropy(logits, y, reduction="none")
    if class_weight is not None:
        loss = loss * class_weight[y]
    return loss.mean()


# ---------------------------------------------------------------- the task
@register_task("aicnet3d")
class AICNet3DTask(Task):
    """3D OCT glaucoma classification with AI-CNet3D; every client and the server use one
    variant (``--models``), so the whole model (incl. BatchNorm statistics) is aggregated."""

    profiles = PROFILES
    default_model = DEFAULT_MODEL
    primary_metric = "auc"
    higher_is_better = True
    # conv5 is the Grad-CAM layer (32x32x3x3x3): the last conv, next to the output, moderate
    # size; it is where the stage-2 consistency loss acts most directly. fc.weight (2x32) is
    # too small to be informative.
    cme_layers = ("conv5.0.weight",)
    options_type = AICNet3DOptions

    def build_model(self, name: str, cfg: ResolvedConfig) -> nn.Module:
        return build_model(name, input_shape=task_shape(cfg))

    def _val_fraction(self, cfg: ResolvedConfig) -> float | None:
        opts: AICNet3DOptions = self.options(cfg)
        return opts.val_fraction if opts.early_stopping else None

    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        if cfg.image_size is not None and cfg.image_size < 16:
            raise ConfigError(f"image_size (B-scans) must be >= 16 for aicnet3d, got {cfg.image_size}")
        split = make_split(cfg, cohort_labels_for(cfg), self._val_fraction(cfg))
        return [len(tr) + len(va) + len(te) for tr, va, te in split.clients]

    def _client_indices(self, cfg: ResolvedConfig, partition_id: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cohort labels and this client's (train, validation, test) cohort indices."""
        labels = cohort_labels_for(cfg, data_dir)
        vf = self._val_fraction(cfg)
        if data_dir:  # node-local folder: all of it belongs to this client
            tr, va, te = _client_split(cfg, np.arange(len(labels)), labels, vf, f"node data folder {data_dir}")
        else:
            tr, va, te = make_split(cfg, labels, vf).clients[partition_id]
        return labels, tr, va, te

    def stage(self, cfg: ResolvedConfig, server_round: int) -> int:
        """1 (BCE) or 2 (consistency fine-tuning) for ``server_round`` (the last k rounds are stage 2)."""
        opts: AICNet3DOptions = self.options(cfg)
        return 2 if opts.finetune_rounds and server_round > cfg.rounds - opts.finetune_rounds else 1

    def train(
        self,
        model: nn.Module,
        cfg: ResolvedConfig,
        partition_id: int,
        server_round: int,
        device: torch.device,
        callbacks: Sequence[TrainCallback] = (),
        proximal_mu: float = 0.0,
        data_dir: str | None = None,
        anchor: dict[str, torch.Tensor] | None = None,
    ) -> LocalResult:
        assert isinstance(model, AICNet3D)
        opts: AICNet3DOptions = self.options(cfg)
        labels, train_idx, val_idx, _ = self._client_indices(cfg, partition_id, data_dir)
        x_all, y_all = torch.from_numpy(volumes(cfg, train_idx, data_dir)), torch.from_numpy(labels[train_idx])
        seed = _seed(cfg.seed, server_round, partition_id)
        torch.manual_seed(seed)  # dropout
        rng = np.random.default_rng(seed)
        pos = np.arange(len(train_idx))  # positions in this client's training volumes
        if opts.balance and len(np.unique(labels[train_idx])) == 2:
            pos = balance_indices(pos, labels[train_idx], rng)
        counts = np.bincount(labels[train_idx][pos], minlength=2).astype(np.float64)
        class_weight = torch.tensor(len(pos) / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        stage = self.stage(cfg, server_round)
        w = opts.consistency_weight if stage == 2 else 0.0
        shuffle_gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator().manual_seed(seed + 1)

        model.to(device).train()
        opt = torch.optim.NAdam(model.parameters(), lr=cfg.lr)
        prox = ProximalTerm(model, anchor, proximal_mu, device)
        info = TrainInfo(server_round, partition_id, cfg.local_epochs, cfg.model_for(partition_id))
        for cb in callbacks:
            cb.on_train_start(model, info)
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        history: list[dict[str, float]] = []
        n = len(pos)
        bs = cfg.batch_size
        for epoch in range(1, cfg.local_epochs + 1):
            model.train()
            order = pos[torch.randperm(n, generator=shuffle_gen).numpy()]
            batches = [order[i : i + bs] for i in range(0, n, bs)]
            if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one volume
                batches = batches[:-1]
            loss_sum = cons_sum = 0.0
            total = 0
            seen_y: list[np.ndarray] = []
            seen_p: list[np.ndarray] = []
            for b in batches:
                x = to_input(x_all[b], device)
                if opts.augment:
                    x = augment(x.cpu(), aug_gen).to(device)
                y = y_all[b].to(device)
                opt.zero_grad(set_to_none=True)
                out = model.forward_features(_scale(x))
                loss = _bce(out.logits, y, class_weight)
                if w > 0:
                    cons = consistency_loss(gradcam_map(out.logits, out.gradcam_features), care_map(out.care_features))
                    loss = (1 - w) * loss + w * cons
                    cons_sum += float(cons.detach()) * len(b)
                if prox:
                    loss = loss + prox()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(b)
                total += len(b)
                seen_y.append(y.cpu().numpy())
                seen_p.append(out.logits.detach().softmax(1)[:, 1].cpu().numpy())
            # training metrics from the (augmented) batches as they were seen during the epoch
            ys, ps = np.concatenate(seen_y), np.concatenate(seen_p)
            metrics = {"loss": loss_sum / max(total, 1), **binary_metrics(ys, ps, (ps > 0.5).astype(np.int64))}
            if w > 0:
                metrics["consistency"] = cons_sum / max(total, 1)
            if len(val_idx):
                val_loss = self._evaluate(model, volumes(cfg, val_idx, data_dir), labels[val_idx], device, cfg)["loss"]
                metrics["val-loss"] = val_loss
                if best is None or val_loss < best[0]:
                    best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
            history.append(metrics)
            for cb in callbacks:
                cb.on_epoch_end(model, info, epoch, metrics)
        result = dict(history[-1])
        if best is not None and opts.early_stopping:
            model.load_state_dict(best[2])
            result = dict(history[best[1] - 1])
            result["best-epoch"] = float(best[1])
        result["stage"] = float(stage)
        for cb in callbacks:
            cb.on_train_end(model, info)
        return LocalResult(len(pos), result)

    @torch.no_grad()
    def _predict(self, model: nn.Module, vols: np.ndarray, device: torch.device, cfg: ResolvedConfig) -> np.ndarray:
        """Logits ``(N, 2)`` of the volumes, in evaluation mode."""
        model.to(device).eval()
        bs = EVAL_BATCH.get(cfg.profile, 8)
        x = torch.from_numpy(vols)
        out = [model(_scale(to_input(x[i : i + bs], device))).float().cpu() for i in range(0, len(vols), bs)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)

    def _evaluate(self, model: nn.Module, vols: np.ndarray, labels: np.ndarray, device: torch.device, cfg: ResolvedConfig) -> dict[str, float]:
        was_training = model.training
        logits = torch.from_numpy(self._predict(model, vols, device, cfg))
        y = torch.from_numpy(labels)
        metrics = {"loss": float(F.cross_entropy(logits, y))}
        probs = logits.softmax(1)[:, 1].numpy()
        metrics.update(binary_metrics(labels, probs, logits.argmax(1).numpy()))
        model.train(was_training)
        return metrics

    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        labels, _, _, test_idx = self._client_indices(cfg, partition_id, data_dir)
        return LocalResult(len(test_idx), self._evaluate(model, volumes(cfg, test_idx, data_dir), labels[test_idx], device, cfg))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        labels = cohort_labels_for(cfg)
        idx = make_split(cfg, labels, self._val_fraction(cfg)).global_test
        return LocalResult(len(idx), self._evaluate(model, volumes(cfg, idx), labels[idx], device, cfg))

    # ------------------------------------------------------------ figures
    def analysis_figures(self, run_dir: Path, cfg: ResolvedConfig, out_dir: Path, num_volumes: int = 4) -> list[Path]:
        """CARE and Grad-CAM of the final global model on a few global-test volumes (both classes
        when possible): per volume, the central B-scan and an en-face projection (mean over depth)
        with each map (upsampled to the volume, trilinear) overlaid."""
        import matplotlib.pyplot as plt

        from fedsim.rundir import RunDir

        params = RunDir(run_dir).load_params()
        model = self.build_model(cfg.server_model or DEFAULT_MODEL, cfg)
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
        model.load_state_dict(state, strict=False)
        model.eval()
        labels = cohort_labels_for(cfg)
        idx = make_split(cfg, labels, self._val_fraction(cfg)).global_test
        chosen = [i for c in (1, 0) for i in idx[labels[idx] == c][: (num_volumes + 1) // 2]][:num_volumes]
        vols = volumes(cfg, np.asarray(chosen))
        x = _scale(to_input(torch.from_numpy(vols), torch.device("cpu")))
        out = model.forward_features(x)
        gcam = gradcam_map(out.logits, out.gradcam_features).detach()
        care = care_map(out.care_features).detach()
        probs = out.logits.softmax(1)[:, 1].detach().numpy()
        size = vols.shape[1:]
        up = lambda m: F.interpolate(m[:, None], size=size, mode="trilinear", align_corners=False)[:, 0].numpy()  # noqa: E731
        gcam_v, care_v = up(gcam), up(care)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for j, i in enumerate(chosen):
            v = vols[j].astype(np.float32) / 255.0
            mid = v.shape[0] // 2
            fig, axes = plt.subplots(2, 2, figsize=(9, 7))
            for col, (name, m) in enumerate((("CARE", care_v[j]), ("Grad-CAM", gcam_v[j]))):
                axes[0, col].imshow(v[mid], cmap="gray", aspect="auto")
                axes[0, col].imshow(m[mid], cmap="jet", alpha=0.4, vmin=0, vmax=1, aspect="auto")
                axes[0, col].set_title(f"{name}: central B-scan (depth x lateral)")
                axes[1, col].imshow(v.mean(1), cmap="gray", aspect="auto")
                axes[1, col].imshow(m.max(1), cmap="jet", alpha=0.4, vmin=0, vmax=1, aspect="auto")
                axes[1, col].set_title(f"{name}: en face (B-scan x lateral)")
            for ax in axes.flat:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"global-test volume {i}: {CLASS_NAMES[labels[i]]}, P(glaucoma) = {probs[j]:.2f}")
            fig.tight_layout()
            p = out_dir / f"aicnet3d_care_gradcam_{j}_{CLASS_NAMES[labels[i]]}.png"
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(p)
        return paths


__all__ = ["PROFILES", "AICNet3DOptions", "AICNet3DTask"]
