"""``brain_mri``: the CME paper's 2D brain-tumour MRI classification (4 classes, section 4.1).

Data come from the synthetic cohort (:mod:`fedsim.data.synthetic_mri`, the default) or a real
image folder (``data_dir``: the Kaggle layout or class-per-folder). The cohort is split once:
``global_test_fraction`` is held out for the server's global test set, the rest is divided among
clients by the partitioner, and every client splits its share into local train/test
(``local_test_fraction``). All splits are seeded by ``cfg.seed`` only, so with the ``identical``
partitioner every client really holds the same data (scenarios 3 and 4).

A node started with its own ``data-dir`` (deployment) uses that whole folder as its share.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim._logging import logger
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.base import LocalResult, Task
from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.clients.training import evaluate_classifier, train_classifier
from fedsim.config import ConfigError, Profile, ResolvedConfig
from fedsim.data.folder import load_images, scan_image_folder
from fedsim.data.partition import PartitionParams, partition, split_train_test
from fedsim.data.synthetic_mri import CLASS_NAMES, apply_site_style, generate_cohort
from fedsim.models import build_model

PROFILES: dict[str, Profile] = {
    "tiny": Profile(image_size=32, num_samples=120, rounds=2, local_epochs=2, batch_size=16, lr=1e-3),
    "quick": Profile(image_size=64, num_samples=960, rounds=6, local_epochs=2, batch_size=16, lr=1e-3),
    "paper": Profile(image_size=224, num_samples=3264, rounds=10, local_epochs=10, batch_size=32, lr=1e-3),
}


@dataclass(frozen=True)
class Split:
    """Cohort indices of the global test set and of each client's train/test share."""

    global_test: np.ndarray
    clients: tuple[tuple[np.ndarray, np.ndarray], ...]


def _labels_only(cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
    if data_dir:
        return scan_image_folder(data_dir).labels
    return np.arange(cfg.num_samples, dtype=np.int64) % len(CLASS_NAMES)


def make_split(cfg: ResolvedConfig, labels: np.ndarray) -> Split:
    """Seeded global-test / partition / local-split of a cohort with these labels."""
    n = len(labels)
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
    n_global = max(1, round(cfg.global_test_fraction * n))
    global_test, pool = np.sort(perm[:n_global]), np.sort(perm[n_global:])
    params = PartitionParams(alpha=cfg.alpha, fractions=cfg.fractions)
    try:
        parts = partition(cfg.partition, labels[pool], cfg.clients, cfg.seed, params)
    except ValueError as exc:
        raise ConfigError(f"cannot partition {len(pool)} training samples among {cfg.clients} clients: {exc}") from exc
    clients = []
    for k, p in enumerate(parts):
        if len(p) < 3:
            raise ConfigError(
                f"client {k} gets only {len(p)} of {len(pool)} samples with partition {cfg.partition!r}; "
                "use fewer clients or more samples (each client needs >= 3 for a train/test split)"
            )
        clients.append(split_train_test(pool[p], cfg.local_test_fraction, cfg.seed))
    return Split(global_test, tuple(clients))


def _local_split(cfg: ResolvedConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 3:
        raise ConfigError(f"the node's data folder holds {n} images; need at least 3")
    return split_train_test(np.arange(n), cfg.local_test_fraction, cfg.seed)


@functools.lru_cache(maxsize=2)
def _cohort(data_dir: str, image_size: int, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels; cached per process purely for speed (deterministic)."""
    if data_dir:
        files = scan_image_folder(data_dir)
        logger.info("reading %d images from %s at %d px", len(files.paths), data_dir, image_size)
        return load_images(files, image_size), files.labels
    logger.info("generating the synthetic cohort: %d images at %d px (seed %d)", num_samples, image_size, seed)
    return generate_cohort(num_samples, image_size, seed)


def cohort(cfg: ResolvedConfig, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.data_dir if data_dir is None else data_dir
    return _cohort(d, cfg.image_size, cfg.num_samples if not d else 0, cfg.seed)


@register_task("brain_mri")
class BrainMRITask(Task):
    """2D brain-tumour classification with the paper's heterogeneous hospital models."""

    profiles = PROFILES
    num_classes = len(CLASS_NAMES)
    in_channels = 1

    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        labels = _labels_only(cfg, cfg.data_dir)
        split = make_split(cfg, labels)
        return [len(tr) + len(te) for tr, te in split.clients]

    def build_model(self, name: str, cfg: ResolvedConfig) -> nn.Module:
        return build_model(name, num_classes=self.num_classes, in_channels=self.in_channels, spatial_dims=2)

    def _client_arrays(self, cfg: ResolvedConfig, partition_id: int, data_dir: str | None) -> tuple[TensorDataset, TensorDataset]:
        images, labels = cohort(cfg, data_dir)
        if data_dir:  # node-local folder: all of it belongs to this client
            train_idx, test_idx = _local_split(cfg, len(labels))
        else:
            train_idx, test_idx = make_split(cfg, labels).clients[partition_id]
        if cfg.site_styles:
            images = apply_site_style(images[np.concatenate([train_idx, test_idx])], partition_id, cfg.seed)
            tr, te = images[: len(train_idx)], images[len(train_idx) :]
        else:
            tr, te = images[train_idx], images[test_idx]
        return _dataset(tr, labels[train_idx]), _dataset(te, labels[test_idx])

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
        train_ds, _ = self._client_arrays(cfg, partition_id, data_dir)
        seed = _seed(cfg.seed, server_round, partition_id)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(train_ds) % cfg.batch_size == 1,  # BatchNorm cannot train on a batch of 1
        )
        info = TrainInfo(server_round, partition_id, cfg.local_epochs, cfg.model_for(partition_id))
        metrics = train_classifier(
            model, loader, cfg.local_epochs, cfg.lr, device, info, callbacks,
            proximal_mu=proximal_mu, anchor=anchor, flip_generator=torch.Generator().manual_seed(seed + 1),
        )  # fmt: skip
        return LocalResult(len(train_ds), metrics)

    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        _, test_ds = self._client_arrays(cfg, partition_id, data_dir)
        return LocalResult(len(test_ds), evaluate_classifier(model, _eval_loader(test_ds), device))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        images, labels = cohort(cfg)
        idx = make_split(cfg, labels).global_test
        ds = _dataset(images[idx], labels[idx])
        return LocalResult(len(ds), evaluate_classifier(model, _eval_loader(ds), device))


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), torch.from_numpy(labels))


def _eval_loader(ds: TensorDataset) -> DataLoader:
    return DataLoader(ds, batch_size=64, shuffle=False)


def _seed(seed: int, server_round: int, partition_id: int) -> int:
    return int(np.random.default_rng([seed, server_round, partition_id]).integers(2**31))
