"""``brain_mri``: the CME paper's 2D brain-tumour MRI classification (4 classes, section 4.1).

Data come from the synthetic cohort (:mod:`fedsim.data.synthetic_mri`, the default) or a real
image folder (``data_dir``: the Kaggle layout or class-per-folder). The cohort is split once:
``global_test_fraction`` is held out for the server's global test set, the rest is divided among
clients by the partitioner, and every client splits its share into local train/test
(``local_test_fraction``). All splits are seeded by ``cfg.seed`` only, so with the ``identical``
partitioner every client really holds the same data (scenarios 3 and 4).

A node started with its own ``data-dir`` (deployment) uses that whole folder as its share (the
split handling is :class:`~fedsim.clients.tasks.scaffold.CohortTask`'s).

Two task options exist for studies of convergence (the saturation ground truth of
``docs/cme-validation.md``); their defaults leave training exactly as in the paper:

* ``lr-decay``: the learning rate of federation epoch ``t`` (round ``r``, local epoch ``e``:
  ``t = (r - 1) * local_epochs + e - 1``) is ``lr * lr-decay ** t``; 1 (default) = constant, so a
  value well below 1 drives the learning rate to ~0 (a run that must saturate);
* ``shift-round``: with ``--site-styles``, from this round on every client's *training* images
  take the next client's scanner style (a data shift at a known round; its local test images keep
  their style); 0 (default) = no shift.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim._logging import logger
from fedsim.clients.tasks.base import LocalResult
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.scaffold import CohortTask
from fedsim.clients.training import LocalTraining, Metrics, TrainStep, classifier_epoch, evaluate_classifier
from fedsim.config import ConfigError, Profile, ResolvedConfig
from fedsim.data.folder import KAGGLE_CLASSES, load_images, scan_image_folder
from fedsim.data.partition import split_train_test
from fedsim.data.synthetic_mri import CLASS_NAMES, apply_site_style, generate_cohort

PROFILES: dict[str, Profile] = {
    "tiny": Profile(image_size=32, num_samples=120, rounds=2, local_epochs=2, batch_size=16, lr=1e-3),
    "quick": Profile(image_size=64, num_samples=960, rounds=6, local_epochs=2, batch_size=16, lr=1e-3),
    "paper": Profile(image_size=224, num_samples=3264, rounds=10, local_epochs=10, batch_size=32, lr=1e-3),
}


@dataclass(frozen=True)
class BrainMRIOptions:
    """Task options (``--task-option key=value``); see the module docstring.

    * ``lr-decay``: per-federation-epoch learning-rate factor in (0, 1] (1 = constant);
    * ``shift-round``: round from which training images take the next client's site style (0 = never);
    * ``received-eval``: also report ``received-loss`` / ``received-accuracy`` every round: the
      model as received, before local training, on (up to :data:`RECEIVED_EVAL_LIMIT` of) the
      client's training images with the labels it holds (``train_received_loss`` in
      ``metrics.jsonl``). Off by default: a forward pass more per round. The CME validation study
      records it as a candidate label statistic (docs/cme-validation.md).
    """

    lr_decay: float = 1.0
    shift_round: int = 0
    received_eval: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.shift_round < 0:
            raise ValueError(f"shift-round must be >= 0 (0 = no shift), got {self.shift_round}")


@functools.lru_cache(maxsize=2)
def _cohort(data_dir: str, image_size: int, num_samples: int, seed: int, sites: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels; cached per process purely for speed (deterministic).
    ``sites``: ``data_dir`` holds one folder per site (pooled site by site)."""
    if data_dir:
        files = scan_image_folder(data_dir, KAGGLE_CLASSES, sites=sites)
        logger.info("reading %d images from %s at %d px", len(files.paths), data_dir, image_size)
        return load_images(files, image_size), files.labels
    logger.info("generating the synthetic cohort: %d images at %d px (seed %d)", num_samples, image_size, seed)
    return generate_cohort(num_samples, image_size, seed)


def cohort(cfg: ResolvedConfig, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.data_dir if data_dir is None else data_dir
    sites = cfg.partition == "sites" and bool(d) and d == cfg.data_dir
    return _cohort(d, cfg.image_size, cfg.num_samples if not d else 0, cfg.seed, sites)


@register_task("brain_mri")
class BrainMRITask(CohortTask):
    """2D brain-tumour classification with the paper's heterogeneous hospital models."""

    profiles = PROFILES
    num_classes = len(CLASS_NAMES)
    in_channels = 1
    options_type = BrainMRIOptions

    def check_config(self, cfg: ResolvedConfig) -> None:
        opts: BrainMRIOptions = self.options(cfg)
        if opts.shift_round and not cfg.site_styles:
            raise ConfigError("task option shift-round switches site styles, so it needs --site-styles")

    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        """The split check, and with a data folder every image decoded once (naming the first bad
        file) before Ray starts; the images stay cached for the server's global test set."""
        sizes = super().check_data(cfg)
        if cfg.data_dir:
            cohort(cfg)
        return sizes

    def strata(self, cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
        """Class labels (synthetic: index ``i`` has class ``i % 4``; a folder: its class folders)."""
        if data_dir:
            return scan_image_folder(data_dir, KAGGLE_CLASSES, sites=self.reads_sites(cfg, data_dir)).labels
        return np.arange(cfg.num_samples, dtype=np.int64) % len(CLASS_NAMES)

    def site_layout(self, cfg: ResolvedConfig, data_dir: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        """``DATA_DIR/<site>/<class>/...`` (or each site in the Kaggle layout)."""
        files = scan_image_folder(data_dir, KAGGLE_CLASSES, sites=True)
        assert files.site_of is not None
        return files.sites, files.site_of

    def split_client(self, cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, ...]:
        """A seeded random ``(train, test)`` split (``local_test_fraction``)."""
        if len(idx) < 3:
            raise ConfigError(
                f"{who} gets only {len(idx)} images with partition {cfg.partition!r}; "
                "use fewer clients or more samples (each client needs >= 3 for a train/test split)"
            )
        return split_train_test(idx, cfg.local_test_fraction, cfg.seed)

    def model_config(self, cfg: ResolvedConfig) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "spatial_dims": 2}

    def _client_datasets(
        self, cfg: ResolvedConfig, partition_id: int, data_dir: str | None, server_round: int = 0
    ) -> tuple[TensorDataset, TensorDataset]:
        images, labels = cohort(cfg, data_dir)
        _, (train_idx, test_idx) = self.client_split(cfg, partition_id, data_dir)
        if cfg.site_styles:
            styled = apply_site_style(images[np.concatenate([train_idx, test_idx])], partition_id, cfg.seed)
            tr, te = styled[: len(train_idx)], styled[len(train_idx) :]
            shift = self.options(cfg).shift_round
            if shift and server_round >= shift:  # the training images' scanner changed
                tr = apply_site_style(images[train_idx], (partition_id + 1) % cfg.clients, cfg.seed)
        else:
            tr, te = images[train_idx], images[test_idx]
        train_labels = self.train_labels(cfg, partition_id, labels, train_idx)
        return _dataset(tr, train_labels[train_idx]), _dataset(te, labels[test_idx])

    def local_training(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, server_round: int, device: torch.device, data_dir: str | None
    ) -> LocalTraining:
        """Adam and cross-entropy with seeded shuffling and random left-right flips."""
        train_ds, _ = self._client_datasets(cfg, partition_id, data_dir, server_round)
        seed = self.round_seed(cfg, server_round, partition_id)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(train_ds) % cfg.batch_size == 1,  # BatchNorm cannot train on a batch of 1
        )
        epoch = classifier_epoch(model, loader, device, flip_generator=torch.Generator().manual_seed(seed + 1))
        decay = self.options(cfg).lr_decay
        if decay != 1.0:
            first = (max(server_round, 1) - 1) * cfg.local_epochs
            constant_epoch = epoch

            def epoch(e: int, step: TrainStep) -> Metrics:
                for g in step.optimizer.param_groups:
                    g["lr"] = cfg.lr * decay ** (first + e - 1)
                return constant_epoch(e, step)

        received = _evenly_spaced(train_ds, RECEIVED_EVAL_LIMIT) if self.options(cfg).received_eval else None
        return LocalTraining(
            num_examples=len(train_ds),
            optimizer=lambda params: torch.optim.Adam(params, lr=cfg.lr, foreach=True),  # multi-tensor: faster on CPU too
            epoch=epoch,
            received=None if received is None else lambda: evaluate_classifier(model, _eval_loader(received, private=True), device),
        )

    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        _, test_ds = self._client_datasets(cfg, partition_id, data_dir)
        return LocalResult(len(test_ds), evaluate_classifier(model, _eval_loader(test_ds), device))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        images, labels = cohort(cfg)
        _, idx = self.global_test(cfg)
        ds = _dataset(images[idx], labels[idx])
        return LocalResult(len(ds), evaluate_classifier(model, _eval_loader(ds), device))


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), torch.from_numpy(labels))


def _eval_loader(ds: TensorDataset, private: bool = False) -> DataLoader:
    """Batches of 64 in order. ``private``: iterating draws its worker seed from a generator of its
    own, not from torch's global one (which dropout during training uses)."""
    return DataLoader(ds, batch_size=64, shuffle=False, generator=torch.Generator() if private else None)


#: The received model is evaluated on at most this many training images per round (evenly spaced
#: over the training split, which is in cohort order): a forward pass only, so its cost stays
#: bounded on large clients, and a mean over 256 images is precise enough to compare clients.
RECEIVED_EVAL_LIMIT = 256


def _evenly_spaced(ds: TensorDataset, n: int) -> TensorDataset:
    """At most ``n`` samples of ``ds``, evenly spaced."""
    if len(ds) <= n:
        return ds
    idx = torch.from_numpy(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))
    return TensorDataset(*(t[idx] for t in ds.tensors))
