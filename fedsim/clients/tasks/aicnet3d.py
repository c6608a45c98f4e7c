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
* augmentation (seeded; fedsim's own scheme, ``augmentation=authors`` for the release's):
  brightness / contrast / gamma jitter, zoom 1-1.25 then crop, lateral flip, superior/inferior
  flip, each with p = 0.5;
* classes balanced by subsampling the majority class (a new subsample every round, so over the
  rounds all volumes are used), with BCE class weights from the remaining counts;
* early stopping on validation loss: the paper stops stage-level training when the validation
  loss stops improving. A federated round has only ``local_epochs`` epochs and the number of
  rounds is fixed by the server, so within each round the client keeps the weights of its best
  local epoch on its own validation split (unweighted BCE) and sends those; disable with
  ``early-stopping=false`` (then no validation split is held out).

Recipes (``--task-option recipe=paper|authors``, default ``paper``, which is the behaviour
described above): ``authors`` switches each item to the released code (AI4VSLab/AI-CNet3D),
quirks included; every item can be set on its own (``auto`` = from the recipe), and
``docs/task-fidelity.md`` lists every difference:

* ``pooling``: ``global`` average (the paper's text) or ``authors`` (``AvgPool3d(min(s),
  stride=s)``, the first ``min(s)``-cube corner of the last map; :mod:`fedsim.models.aicnet3d`);
* ``gradcam``: ``fedsim`` (gradient of the predicted class's logit, maps divided by their exact
  maximum) or ``authors`` (gradient of its softmax probability, Grad-CAM and CARE divided by
  ``max + 1e-5``), in stage 2 and in the figures;
* ``augmentation``: ``fedsim`` (:func:`fedsim.data.augment.augment_oct`, each step with p = 0.5)
  or ``authors`` (:func:`augment_oct_authors`: grey levels always, nearest zoom 1-1.25 skipped
  below 1.02, lateral and superior/inferior flips with p = 0.5, 8-bit truncation);
* ``input``: ``fedsim`` (per-volume min-max to 0-255, network input in [-1, 1]) or ``authors``
  (the raw 0-255 values, clipped, as the network input);
* ``balanced-cohort``: ``yes`` drops majority-class volumes (seeded) before any split, so the
  global and local test sets are balanced 50:50 as the authors' (``data_weight: same``); ``no``
  keeps the cohort's 40 % glaucoma.

Real data whose file names carry patient ids (``<prefix>-<patient>-<rest>.npy``) are split by
patient: the global test set, the clients' shares and each client's test / validation parts hold
whole patients (both eyes on one side). Batch 4, NAdam and the learning rate are the same in both
recipes (the profile's).

Metrics: ``loss``, ``accuracy``, ``sensitivity`` (glaucoma = positive), ``specificity``, ``f1``,
``auc`` (true ROC AUC from the glaucoma probability, ties count one half) and
``balanced-accuracy`` (the authors' "AUROC", computed on rounded predictions, equals
(sensitivity + specificity) / 2). Undefined values (e.g. sensitivity without positives) are NaN.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim._logging import logger
from fedsim.clients.tasks.base import LocalResult
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.scaffold import CohortSplit, CohortTask
from fedsim.clients.training import LocalTraining, Metrics, TrainStep
from fedsim.config import ConfigError, Profile, ResolvedConfig, parse_options
from fedsim.data.augment import augment_oct
from fedsim.data.partition import PartitionParams, partition, stratified_split
from fedsim.data.synthetic_oct import CLASS_NAMES, VolumeFiles, cohort_labels, generate_volumes, load_volumes, scan_oct_folder, volume_shape
from fedsim.metrics.classification import binary_metrics
from fedsim.models.aicnet3d import AUTHORS_EPS, DEFAULT_MODEL, AICNet3D, care_map, consistency_loss, gradcam_map
from fedsim.rundir import RunDir

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
    * ``augment``: augment the training volumes, with the ``augmentation`` item's scheme (fedsim's
      own, each step with p = 0.5, or the release's);
    * ``recipe``: ``paper`` (default) or ``authors``; ``pooling``, ``gradcam``, ``augmentation``,
      ``input``, ``balanced-cohort``: one item each, ``auto`` = from the recipe (module docstring).
    """

    finetune_rounds: int = 0
    consistency_weight: float = 0.75
    early_stopping: bool = True
    val_fraction: float = 0.2
    balance: bool = True
    augment: bool = True
    recipe: str = "paper"
    pooling: str = "auto"
    gradcam: str = "auto"
    augmentation: str = "auto"
    input: str = "auto"
    balanced_cohort: str = "auto"

    def __post_init__(self) -> None:
        for name, valid in _CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"unknown {name.replace('_', '-')} {value!r}; valid choices: {', '.join(valid)}")
        if self.finetune_rounds < 0:
            raise ValueError(f"finetune-rounds must be >= 0 (the last k rounds run stage 2), got {self.finetune_rounds}")
        if not 0.0 <= self.consistency_weight <= 1.0:
            raise ValueError(f"consistency-weight must be in [0, 1], got {self.consistency_weight}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val-fraction must be in (0, 1), got {self.val_fraction}")

    def plan(self) -> AICPlan:
        """The concrete choice of every item (``auto`` resolved by the recipe)."""
        authors = self.recipe == "authors"
        pick = lambda v, paper, auth: (auth if authors else paper) if v == "auto" else v  # noqa: E731
        return AICPlan(
            pooling=pick(self.pooling, "global", "authors"),
            gradcam=pick(self.gradcam, "fedsim", "authors"),
            augmentation=pick(self.augmentation, "fedsim", "authors"),
            input=pick(self.input, "fedsim", "authors"),
            balanced_cohort=pick(self.balanced_cohort, "no", "yes") == "yes",
        )


_CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": ("paper", "authors"),
    "pooling": ("auto", "global", "authors"),
    "gradcam": ("auto", "fedsim", "authors"),
    "augmentation": ("auto", "fedsim", "authors"),
    "input": ("auto", "fedsim", "authors"),
    "balanced_cohort": ("auto", "yes", "no"),
}


@dataclass(frozen=True)
class AICPlan:
    """Resolved recipe items (see the module docstring)."""

    pooling: str
    gradcam: str
    augmentation: str
    input: str
    balanced_cohort: bool

    @property
    def map_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`gradcam_map` (``score``, ``eps``) for this plan."""
        return {"score": "probability", "eps": AUTHORS_EPS} if self.gradcam == "authors" else {"score": "logit", "eps": 0.0}

    @property
    def map_eps(self) -> float:
        return AUTHORS_EPS if self.gradcam == "authors" else 0.0


def augment_oct_authors(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The released augmentation (``OCT_dataloader.transform`` with ``aug_type: fgzs`` and
    ``transforms.py``) on a batch ``(B, 1, D, H, W)`` in [0, 1], every draw from ``gen``:

    * grey levels, always: ``x * a`` (contrast, ``a`` in [0.85, 1.15]), ``clip(x + b, 0, 1)``
      (brightness, ``b`` in [0, 0.15]), ``x ** g`` (gamma, ``g = 2 ** u``, ``u`` in [-1, 1]);
    * zoom by ``z`` in [1, 1.25] with nearest-neighbour interpolation, skipped when ``z < 1.02``,
      then a random crop back to the original size;
    * lateral flip (``W``), then superior/inferior flip (``D``), each with p = 0.5;
    * back to 8 bits by truncation (``(x * 255).astype(int)``), returned as ``/ 255``.

    (The release uses scipy's nearest zoom, whose grid differs from ``F.interpolate``'s nearest by
    at most one voxel at the edges of each run.)"""
    # Not MONAI's transforms: this reproduces the authors' release step by step (their draws, order and 8-bit truncation).
    out = []
    shape = x.shape[2:]
    for volume in x:
        r = torch.rand(3, generator=gen)
        alpha, beta, gamma = 1 + (float(r[0]) - 0.5) * 0.3, float(r[1]) / 2 * 0.3, 2.0 ** (float(r[2]) * 2 - 1)
        v = (volume * alpha + beta).clamp(0, 1) ** gamma
        z = 1.0 + 0.25 * float(torch.rand(1, generator=gen))
        if z >= 1.02:
            big = [round(n * z) for n in shape]
            v = F.interpolate(v[None], size=big, mode="nearest")[0]
            off = [int(torch.randint(0, max(1, b - n), (1,), generator=gen)) for b, n in zip(big, shape, strict=True)]
            v = v[:, off[0] : off[0] + shape[0], off[1] : off[1] + shape[1], off[2] : off[2] + shape[2]]
        if float(torch.rand(1, generator=gen)) > 0.5:
            v = v.flip(-1)
        if float(torch.rand(1, generator=gen)) > 0.5:
            v = v.flip(-3)
        out.append(torch.floor(v * 255) / 255)
    return torch.stack(out)


# ---------------------------------------------------------------- data
def task_shape(cfg: ResolvedConfig) -> tuple[int, int, int]:
    return volume_shape(cfg.image_size)


@functools.lru_cache(maxsize=2)
def _scan(data_dir: str, sites: bool = False) -> VolumeFiles:
    return scan_oct_folder(data_dir, sites)


@functools.lru_cache(maxsize=6)
def _volumes(
    data_dir: str, shape: tuple[int, int, int], seed: int, indices: tuple[int, ...], intensity: str = "minmax", sites: bool = False
) -> np.ndarray:
    """Volumes ``(len(indices), D, H, W)`` uint8 of these cohort indices. Only the volumes a
    process needs are generated / read (a synthetic volume is a pure function of (seed, index)),
    so at paper size no process holds the whole cohort; cached per process for speed. ``sites``:
    ``data_dir`` holds one folder per site."""
    if data_dir:
        files = _scan(data_dir, sites)
        sub = VolumeFiles(tuple(files.paths[i] for i in indices), files.labels[list(indices)])
        logger.info("reading %d OCT volumes from %s at %s", len(indices), data_dir, shape)
        return load_volumes(sub, shape, intensity)
    logger.info("generating %d synthetic OCT volumes of %s (seed %d)", len(indices), shape, seed)
    return generate_volumes(indices, shape, seed)


def volumes(cfg: ResolvedConfig, idx: np.ndarray, data_dir: str | None = None) -> np.ndarray:
    d = cfg.data_dir if data_dir is None else data_dir
    opts = parse_options(AICNet3DOptions, cfg.task_options, "task", "aicnet3d")
    intensity = "raw" if opts is not None and opts.plan().input == "authors" else "minmax"
    sites = cfg.partition == "sites" and bool(d) and d == cfg.data_dir
    return _volumes(d, task_shape(cfg), cfg.seed, tuple(int(i) for i in idx), intensity, sites)


def balanced_subset(strata: np.ndarray, seed: int) -> np.ndarray:
    """Sorted cohort indices with every class cut (seeded) to the smallest class's count: the
    authors' ``data_weight: same``, applied before any split."""
    return balance_indices(np.arange(len(strata)), strata, np.random.default_rng([seed, 5]))


def _group_split(idx: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held)``: whole groups (patients) of ``idx``, seeded, held out until they hold at
    least ``fraction`` of ``idx`` (at least one group when there are two)."""
    uniq = np.unique(groups[idx])
    order = np.random.default_rng([seed, 9]).permutation(len(uniq))
    target = fraction * len(idx)
    held_groups: list[int] = []
    count = 0
    for g in uniq[order]:
        if count >= target or len(held_groups) == len(uniq) - 1:
            break
        held_groups.append(int(g))
        count += int((groups[idx] == g).sum())
    held = np.isin(groups[idx], held_groups)
    return np.sort(idx[~held]), np.sort(idx[held])


def balance_indices(idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subsample every class down to the smallest class's count (classes balanced, paper 3.5)."""
    classes = [idx[labels[idx] == c] for c in np.unique(labels[idx])]
    m = min(len(c) for c in classes)
    return np.sort(np.concatenate([rng.choice(c, m, replace=False) for c in classes]))


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 volumes ``(B, D, H, W)`` -> float ``(B, 1, D, H, W)`` in [0, 1] on ``device``."""
    return x.to(device).float().div_(255.0).unsqueeze(1)


def _scale(x: torch.Tensor, plan: AICPlan | None = None) -> torch.Tensor:
    """Network input from intensities in [0, 1]: [-1, 1] (fedsim) or the 0-255 values (the authors')."""
    if plan is not None and plan.input == "authors":
        return x * 255.0
    return x * 2.0 - 1.0


def _bce(logits: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted BCE on the two-class softmax output. With one-hot targets,
    mean_c BCE(p_c, t_c) = -(log p_y + log(1 - p_other)) / 2 = -log p_y, i.e. cross-entropy."""
    loss = F.cross_entropy(logits, y, reduction="none")
    if class_weight is not None:
        loss = loss * class_weight[y]
    return loss.mean()


@dataclass(frozen=True)
class SaliencyExample:
    """CARE and Grad-CAM of the final global model on one global-test volume, for
    :class:`fedsim.analysis.task_figures.SaliencyOverlayDisplay`.

    ``volume`` is ``(D, H, W)`` in [0, 1]; ``maps`` holds each map upsampled (trilinear) to the
    volume, in [0, 1]; ``probability`` is P(glaucoma).
    """

    index: int
    label: str
    probability: float
    volume: np.ndarray
    maps: dict[str, np.ndarray]


# ---------------------------------------------------------------- the task
@register_task("aicnet3d")
class AICNet3DTask(CohortTask):
    """3D OCT glaucoma classification with AI-CNet3D; every client and the server use one
    variant (``--models``), so the whole model (incl. BatchNorm statistics) is aggregated."""

    num_classes = 2
    profiles = PROFILES
    default_model = DEFAULT_MODEL
    primary_metric = "auc"
    higher_is_better = True
    # conv5 is the Grad-CAM layer (32x32x3x3x3): the last conv, next to the output, moderate
    # size; it is where the stage-2 consistency loss acts most directly. fc.weight (2x32) is
    # too small to be informative.
    cme_layers = ("conv5.0.weight",)
    options_type = AICNet3DOptions
    unit = "volumes"
    min_global_test = 2

    def model_config(self, cfg: ResolvedConfig) -> dict[str, Any]:
        plan = self.plan(cfg)
        return {"input_shape": task_shape(cfg), "pooling": plan.pooling}

    def plan(self, cfg: ResolvedConfig) -> AICPlan:
        opts: AICNet3DOptions = self.options(cfg)
        return opts.plan()

    def groups(self, data_dir: str, cfg: ResolvedConfig | None = None) -> np.ndarray | None:
        """Patient index per cohort volume (real data whose file names carry patient ids), else ``None``."""
        if not data_dir:
            return None
        files = _scan(data_dir, cfg is not None and self.reads_sites(cfg, data_dir))
        return None if files.groups is None else np.unique(np.asarray(files.groups), return_inverse=True)[1]

    def make_split(self, cfg: ResolvedConfig, strata: np.ndarray) -> CohortSplit:
        """The scaffold's split, with two additions: ``balanced-cohort`` first cuts every class to
        the smallest one (the authors' balanced sets), and with patient ids whole patients go to the
        global test set, to one client and to one side of each client's splits."""
        groups = self.groups(cfg.data_dir, cfg)
        if groups is None:
            return super().make_split(cfg, strata)
        keep = balanced_subset(strata, cfg.seed) if self.plan(cfg).balanced_cohort else np.arange(len(strata))
        pool, global_test = _group_split(keep, groups, cfg.global_test_fraction, cfg.seed + 101)
        uniq = np.unique(groups[pool])
        g_label = np.array([strata[pool][groups[pool] == g].max() for g in uniq])
        g_site: tuple[int, ...] = ()
        if cfg.partition == "sites":  # patient ids carry their site, so each patient lies in one site
            site_of = self.sites_of(cfg)[1]
            g_site = tuple(int(site_of[pool][groups[pool] == g][0]) for g in uniq)
        try:
            params = PartitionParams(alpha=cfg.alpha, fractions=cfg.fractions, sites=g_site)
            parts = partition(cfg.partition, g_label, cfg.clients, cfg.seed, params)
        except ValueError as exc:
            raise ConfigError(f"cannot partition {len(uniq)} training patients among {cfg.clients} clients: {exc}") from exc
        shares = [np.sort(pool[np.isin(groups[pool], uniq[p])]) for p in parts]
        return CohortSplit(
            global_test, tuple(self.split_client(cfg, share, strata, self.client_name(cfg, k)) for k, share in enumerate(shares))
        )

    def hold_out_global(self, cfg: ResolvedConfig, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scaffold's random global test set; with ``balanced-cohort`` a class-stratified one
        of the balanced subset (the dropped majority volumes are used nowhere)."""
        if not self.plan(cfg).balanced_cohort:
            return super().hold_out_global(cfg, strata)
        pool, global_test = stratified_split(balanced_subset(strata, cfg.seed), strata, cfg.global_test_fraction, cfg.seed + 101)
        return global_test, pool

    def check_config(self, cfg: ResolvedConfig) -> None:
        if cfg.image_size < 16:
            raise ConfigError(f"image_size (B-scans) must be >= 16 for aicnet3d, got {cfg.image_size}")

    def strata(self, cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
        """Class labels of the whole cohort (cheap: no volume is decoded or generated)."""
        if data_dir:
            return _scan(data_dir, self.reads_sites(cfg, data_dir)).labels
        return cohort_labels(cfg.num_samples)

    def site_layout(self, cfg: ResolvedConfig, data_dir: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        """``DATA_DIR/<site>/`` each in one of the task's layouts (class folders, ``labels.csv``, the authors' tree)."""
        files = _scan(data_dir, True)
        assert files.site_of is not None
        return files.sites, files.site_of

    def _val_fraction(self, cfg: ResolvedConfig) -> float | None:
        opts: AICNet3DOptions = self.options(cfg)
        return opts.val_fraction if opts.early_stopping else None

    def split_client(self, cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, ...]:
        """``(train, validation, test)``, stratified by class; the validation part is empty
        without early stopping."""
        val_fraction = self._val_fraction(cfg)
        need = 4 if val_fraction else 3
        if len(idx) < need:
            raise ConfigError(f"{who} gets only {len(idx)} volumes; need at least {need} (use fewer clients or more samples)")
        groups = self.groups(cfg.data_dir, cfg)
        split = stratified_split if groups is None else lambda i, _s, f, seed: _group_split(i, groups, f, seed)
        train, test = split(idx, strata, cfg.local_test_fraction, cfg.seed)
        val = np.zeros(0, np.int64)
        if val_fraction:
            train, val = split(train, strata, val_fraction, cfg.seed + 17)
        if len(train) < 2 or len(test) < 1:
            raise ConfigError(f"{who}'s {len(idx)} volumes are too few for train/test splits; use more samples")
        return train, val, test

    def stage(self, cfg: ResolvedConfig, server_round: int) -> int:
        """1 (BCE) or 2 (consistency fine-tuning) for ``server_round`` (the last k rounds are stage 2)."""
        opts: AICNet3DOptions = self.options(cfg)
        return 2 if opts.finetune_rounds and server_round > cfg.rounds - opts.finetune_rounds else 1

    def local_training(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, server_round: int, device: torch.device, data_dir: str | None
    ) -> LocalTraining:
        """NAdam on the (balanced, augmented) training volumes; stage-2 rounds add the consistency
        loss; with a validation split the best local epoch is kept (see the module docstring)."""
        if not isinstance(model, AICNet3D):
            raise TypeError(f"aicnet3d trains AICNet3D models, got {type(model).__name__}")
        opts: AICNet3DOptions = self.options(cfg)
        labels, (train_idx, val_idx, _) = self.client_split(cfg, partition_id, data_dir)
        labels = self.train_labels(cfg, partition_id, labels, train_idx)  # validation labels stay true
        x_all, y_all = torch.from_numpy(volumes(cfg, train_idx, data_dir)), torch.from_numpy(labels[train_idx])
        seed = self.round_seed(cfg, server_round, partition_id)
        torch.manual_seed(seed)  # dropout
        rng = np.random.default_rng(seed)
        pos = np.arange(len(train_idx))  # positions in this client's training volumes
        if opts.balance and len(np.unique(labels[train_idx])) == 2:
            pos = balance_indices(pos, labels[train_idx], rng)
        counts = np.bincount(labels[train_idx][pos], minlength=2).astype(np.float64)
        class_weight = torch.tensor(len(pos) / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        plan = self.plan(cfg)
        stage = self.stage(cfg, server_round)
        w = opts.consistency_weight if stage == 2 else 0.0
        shuffle_gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator().manual_seed(seed + 1)
        best: list[tuple[float, int, dict[str, torch.Tensor]]] = []  # the best epoch so far, on validation loss

        def epoch(e: int, step: TrainStep) -> Metrics:
            model.train()
            order = pos[torch.randperm(len(pos), generator=shuffle_gen).numpy()]
            batches = [order[i : i + cfg.batch_size] for i in range(0, len(pos), cfg.batch_size)]
            if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one volume
                batches = batches[:-1]
            loss_sum = cons_sum = 0.0
            total = 0
            seen_y: list[np.ndarray] = []
            seen_p: list[np.ndarray] = []
            for b in batches:
                x = to_input(x_all[b], device)
                if opts.augment:
                    augment = augment_oct_authors if plan.augmentation == "authors" else augment_oct
                    x = augment(x.cpu(), aug_gen).to(device)
                y = y_all[b].to(device)
                out = model.forward_features(_scale(x, plan))
                loss = _bce(out.logits, y, class_weight)
                if w > 0:
                    cam = gradcam_map(out.logits, out.gradcam_features, **plan.map_kwargs)
                    cons = consistency_loss(cam, care_map(out.care_features, plan.map_eps))
                    loss = (1 - w) * loss + w * cons
                    cons_sum += float(cons.detach()) * len(b)
                loss_sum += float(step(loss)) * len(b)
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
                if not best or val_loss < best[0][0]:
                    best[:] = [(val_loss, e, copy.deepcopy(model.state_dict()))]
            return metrics

        def finish(history: list[Metrics]) -> Metrics:
            result = dict(history[-1])
            if best and opts.early_stopping:
                model.load_state_dict(best[0][2])
                result = dict(history[best[0][1] - 1])
                result["best-epoch"] = float(best[0][1])
            result["stage"] = float(stage)
            return result

        return LocalTraining(len(pos), lambda params: torch.optim.NAdam(params, lr=cfg.lr), epoch, finish)

    @torch.no_grad()
    def _predict(self, model: nn.Module, vols: np.ndarray, device: torch.device, cfg: ResolvedConfig) -> np.ndarray:
        """Logits ``(N, 2)`` of the volumes, in evaluation mode."""
        model.to(device).eval()
        bs = EVAL_BATCH.get(cfg.profile, 8)
        x = torch.from_numpy(vols)
        plan = self.plan(cfg)
        out = [model(_scale(to_input(x[i : i + bs], device), plan)).float().cpu() for i in range(0, len(vols), bs)]
        return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)

    def _evaluate(self, model: nn.Module, vols: np.ndarray, labels: np.ndarray, device: torch.device, cfg: ResolvedConfig) -> Metrics:
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
        labels, (_, _, test_idx) = self.client_split(cfg, partition_id, data_dir)
        return LocalResult(len(test_idx), self._evaluate(model, volumes(cfg, test_idx, data_dir), labels[test_idx], device, cfg))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        labels, idx = self.global_test(cfg)
        return LocalResult(len(idx), self._evaluate(model, volumes(cfg, idx), labels[idx], device, cfg))

    # ------------------------------------------------------------ figures
    def figure_arrays(self, run_dir: Path, cfg: ResolvedConfig, num_volumes: int = 4) -> list[SaliencyExample]:
        """CARE and Grad-CAM of the final global model on a few global-test volumes (both classes
        when possible), each map upsampled to its volume (trilinear)."""
        params = RunDir(run_dir).load_params()
        model = self.build_model(cfg.server_model or DEFAULT_MODEL, cfg)
        if not isinstance(model, AICNet3D):
            raise TypeError(f"aicnet3d figures need an AICNet3D model, got {type(model).__name__}")
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, strict=False)
        model.eval()
        labels, idx = self.global_test(cfg)
        chosen = [i for c in (1, 0) for i in idx[labels[idx] == c][: (num_volumes + 1) // 2]][:num_volumes]
        vols = volumes(cfg, np.asarray(chosen))
        plan = self.plan(cfg)
        out = model.forward_features(_scale(to_input(torch.from_numpy(vols), torch.device("cpu")), plan))
        maps = {
            "CARE": care_map(out.care_features, plan.map_eps).detach(),
            "Grad-CAM": gradcam_map(out.logits, out.gradcam_features, **plan.map_kwargs).detach(),
        }
        up = {
            k: F.interpolate(m[:, None], size=vols.shape[1:], mode="trilinear", align_corners=False)[:, 0].numpy() for k, m in maps.items()
        }
        probs = out.logits.softmax(1)[:, 1].detach().numpy()
        return [
            SaliencyExample(
                int(i), CLASS_NAMES[labels[i]], float(probs[j]), vols[j].astype(np.float32) / 255.0, {k: m[j] for k, m in up.items()}
            )
            for j, i in enumerate(chosen)
        ]


__all__ = [
    "PROFILES",
    "AICNet3DOptions",
    "AICNet3DTask",
    "AICPlan",
    "SaliencyExample",
    "augment_oct_authors",
    "balance_indices",
    "balanced_subset",
]
