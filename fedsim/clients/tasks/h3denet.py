"""``h3denet``: 3D CT landmark detection with H3DE-Net (arXiv 2502.14221) as a federated client task.

Data: the synthetic head-CT cohort (:mod:`fedsim.data.synthetic_ct`, default) or the authors'
real layout (``data_dir``: ``<case>_volume.nrrd``, ``<case>_label.npy``, ``<case>_spacing.npy``;
:mod:`fedsim.data.ct_folder`). ``image_size`` ``s`` gives the network's crop ``s x s x s/2``
(the paper's 128 x 128 x 64); ``s`` must be a multiple of 64 so that every axis is divisible by
the encoder's stride 32. Synthetic cases are generated at 1.25 x the crop and zoomed into it.

Cohort split (by ``cfg.seed`` only): a global test set for the server, the rest partitioned
among clients; each client splits its share into train / local test (``local_test_fraction``).
The global and local test sets are stratified by "has a missing landmark", so they hold
incomplete cases whenever there are at least two to split.

Recipes (``--task-option recipe=paper|authors``, default ``paper``): ``paper`` is fedsim's own
reading of the paper (its anchor loss, heads and scale, isotropic zoom, an evaluation crop that
does not look at the true landmarks); ``authors`` switches every item below to the behaviour of
the released code (ECNUACRush/H3DE-Net), quirks included. Each item can also be set on its own
(``auto`` = from the recipe); ``docs/task-fidelity.md`` lists every difference.

* ``resolution``: ``native`` (real data: crops at the case's own spacing, zoomed out only when the
  landmarks do not fit the crop, as the authors do; memory bounded by the crop: only the region
  crops can touch is kept, :func:`fedsim.data.landmark_crop.native_region`) or ``fit`` (the whole
  volume resampled to 1.25 x the crop, then zoomed by ``zoom-min``..``zoom-max`` / ``eval-zoom``
  relative to fitting it into the crop: :func:`fedsim.data.landmark_crop.prepare_case`). ``auto``:
  ``native`` for real data, ``fit`` for the synthetic cohort (generated at 1.25 x the crop, which
  is its native grid).
* ``head``: ``fedsim`` or ``authors`` targets / loss / decoding of the anchor head
  (:mod:`fedsim.models.landmark_heads`); ``attention``: ``fedsim`` or ``authors`` BRA heads and
  scale (:mod:`fedsim.models.h3denet`).
* ``eval-centre`` (native resolution): ``volume`` (the evaluation crop is centred on the scan's
  centre; the zoom is the largest <= 1 at which that crop holds the landmarks) or ``landmarks``
  (the authors' ``CenterCrop``: centred on the true landmarks, a leak of the answer into the
  input, kept only to reproduce their numbers).
* training zoom at native resolution: ``paper`` draws one factor in ``[zoom-min, min(zoom-max,
  fit)]`` for all axes; ``authors`` one per axis (their ``RandomCrop``).
* ``early-stopping``: ``yes`` holds out ``val-fraction`` of each client's training cases and, within
  every round, keeps and sends the best local epoch by validation loss (the authors: best
  checkpoint over up to 200 epochs, patience 20; a federation has a fixed number of rounds);
  ``lr-floor``: the authors stop the 0.98 decay once the rate is no longer above 3 % of the start.

Errors are measured in mm with the spacing of the evaluated crop: the native spacing wherever the
case was not zoomed, the resampled one otherwise. Metrics report both conventions: pooled
(``mre``, ``sd``) and the paper's per-case (``mre-case``, ``sd-case``; :mod:`fedsim.metrics.landmarks`).
The recipe does not change the profile's batch size (the authors use 4: pass ``--batch-size 4``).

Training (paper section 4.1): Adam, lr from the profile (1e-3), betas (0.9, 0.98), weight decay
5e-4, learning rate decayed by 0.98 per epoch, counted over the federation's epochs (round r,
local epoch e is epoch ``(r - 1) * local_epochs + e``). The model's own loss (anchor or heatmap
head, :mod:`fedsim.models.landmark_heads`).

Models (:mod:`fedsim.models.h3denet`, registered for this task; every client uses the same one, so
the whole model is aggregated): ``h3denet`` (default: BRA encoder + decoder + anchor-ball head),
``h3denet_heatmap`` (same backbone, heatmap head: the paper's baseline head) and ``unet3d`` (a
plain 3D U-Net with the heatmap head at full resolution). Widths depend on the profile (``size``:
narrow for ``tiny``/``quick``, the paper's for ``paper``).

Metrics (:mod:`fedsim.metrics.landmarks`): ``loss``, ``mre``, ``sd`` (pooled), ``mre-case``,
``sd-case`` (per-case means, the paper's convention), ``sdr-2mm``, ``sdr-2.5mm``, ``sdr-3mm``,
``sdr-4mm`` over existing landmarks, the same suffixed ``-missing`` over cases with missing
landmarks, and ``landmarks`` (how many were scored).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim._logging import logger
from fedsim.clients.tasks.base import LocalResult
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.scaffold import CohortTask
from fedsim.clients.training import LocalTraining, Metrics, TrainStep
from fedsim.config import ConfigError, Profile, ResolvedConfig
from fedsim.data.ct_folder import ct_sites, load_ct_case, load_ct_labels, scan_ct_folder
from fedsim.data.landmark_crop import PreparedCase, fit_zoom, landmark_centre, native_region, prepare_case, prepare_native
from fedsim.data.partition import stratified_split
from fedsim.data.synthetic_ct import NUM_LANDMARKS, CTCase, generate_case, missing_landmarks
from fedsim.faults import fault_of, swapped_targets
from fedsim.metrics.landmarks import landmark_metrics, radial_errors
from fedsim.models.landmark_heads import LandmarkNet
from fedsim.rundir import RunDir

#: ``image_size`` = crop side ``s``; the crop is ``s x s x s/2``.
PROFILES: dict[str, Profile] = {
    "tiny": Profile(image_size=64, num_samples=40, rounds=2, local_epochs=2, batch_size=2, lr=1e-3),
    "quick": Profile(image_size=64, num_samples=240, rounds=20, local_epochs=2, batch_size=2, lr=1e-3),
    "paper": Profile(image_size=128, num_samples=400, rounds=20, local_epochs=5, batch_size=2, lr=1e-3),
}


#: Synthetic cases are generated at this multiple of the crop, then zoomed into it.
NATIVE_SCALE = 1.25


@dataclass(frozen=True)
class H3DENetOptions:
    """Task options (``--task-option key=value``).

    * ``zoom-min``, ``zoom-max``: range of the random training zoom (paper: 0.6-1, zoom-out);
    * ``eval-zoom``: the deterministic zoom of evaluation (the middle of the training range);
    * ``lr-decay``: exponential learning-rate decay per epoch (0.98);
    * ``weight-decay``: Adam's weight decay (5e-4);
    * ``num-landmarks``: landmarks per case (14, as in the authors' dataset and the synthetic cohort);
    * ``recipe``: ``paper`` (default) or ``authors`` (see the module docstring);
    * ``resolution``, ``head``, ``attention``, ``eval-centre``, ``early-stopping``: one item each,
      ``auto`` = from the recipe;
    * ``val-fraction``: share of a client's training cases held out for early stopping (0.2);
    * ``lr-floor``: the decay stops once the learning rate is no longer above this share of the
      start (the authors: 0.03; ``-1`` = from the recipe, ``paper``: 0 = never).
    """

    zoom_min: float = 0.6
    zoom_max: float = 1.0
    eval_zoom: float = 0.8
    lr_decay: float = 0.98
    weight_decay: float = 5e-4
    num_landmarks: int = NUM_LANDMARKS
    recipe: str = "paper"
    resolution: str = "auto"
    head: str = "auto"
    attention: str = "auto"
    eval_centre: str = "auto"
    early_stopping: str = "auto"
    val_fraction: float = 0.2
    lr_floor: float = -1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr_floor != -1.0 and not 0.0 <= self.lr_floor < 1.0:
            raise ValueError(f"lr-floor must be in [0, 1) (a share of the start lr) or -1 (from the recipe), got {self.lr_floor}")
        for name, valid in _CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"unknown {name.replace('_', '-')} {value!r}; valid choices: {', '.join(valid)}")
        if not 0 < self.zoom_min <= self.zoom_max:
            raise ValueError(f"need 0 < zoom-min <= zoom-max, got {self.zoom_min} and {self.zoom_max}")
        if self.eval_zoom <= 0:
            raise ValueError(f"eval-zoom must be > 0, got {self.eval_zoom}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.num_landmarks < 1:
            raise ValueError(f"num-landmarks must be >= 1, got {self.num_landmarks}")

    def plan(self, real_data: bool) -> H3DEPlan:
        """The concrete choice of every item for this data source (``auto`` resolved by the recipe)."""
        authors = self.recipe == "authors"
        pick = lambda v, paper, auth: (auth if authors else paper) if v == "auto" else v  # noqa: E731
        default_resolution = "native" if real_data else "fit"
        return H3DEPlan(
            resolution=pick(self.resolution, default_resolution, default_resolution),
            head=pick(self.head, "fedsim", "authors"),
            attention=pick(self.attention, "fedsim", "authors"),
            eval_centre=pick(self.eval_centre, "volume", "landmarks"),
            isotropic=not authors,
            early_stopping=pick(self.early_stopping, "no", "yes") == "yes",
            lr_floor=(AUTHORS_LR_FLOOR if authors else 0.0) if self.lr_floor == -1.0 else self.lr_floor,
        )


_CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": ("paper", "authors"),
    "resolution": ("auto", "native", "fit"),
    "head": ("auto", "fedsim", "authors"),
    "attention": ("auto", "fedsim", "authors"),
    "eval_centre": ("auto", "volume", "landmarks"),
    "early_stopping": ("auto", "yes", "no"),
}
#: The release decays the learning rate only while it is above this share of the start
#: (``main_yolol.py``: ``if lr > args.lr * 0.03: scheduler.step()``).
AUTHORS_LR_FLOOR = 0.03


@dataclass(frozen=True)
class H3DEPlan:
    """Resolved recipe items: ``resolution`` (native / fit), ``head`` and ``attention`` schemes
    (fedsim / authors), ``eval_centre`` (volume / landmarks), ``isotropic`` training zoom."""

    resolution: str
    head: str
    attention: str
    eval_centre: str
    isotropic: bool
    early_stopping: bool = False
    lr_floor: float = 0.0

    def learning_rate(self, lr: float, decay: float, epoch: int) -> float:
        """The learning rate of federation epoch ``epoch`` (0-based): ``lr * decay ** epoch``, held
        once it is no longer above ``lr_floor * lr`` (the release's rule; ``lr_floor`` 0 = never)."""
        if self.lr_floor <= 0 or decay >= 1:
            return lr * decay**epoch
        stop = math.ceil(math.log(self.lr_floor) / math.log(decay))  # first epoch with decay ** t <= floor
        return lr * decay ** min(epoch, stop)


def crop_shape(image_size: int) -> tuple[int, int, int]:
    """The network's crop for ``image_size`` ``s``: ``(s, s, s/2)``; 128 -> (128, 128, 64)."""
    return image_size, image_size, image_size // 2


# ---------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def _scan(data_dir: str, sites: bool = False) -> tuple[str, ...]:
    """Case ids; ``sites``: ``data_dir`` holds one folder per site, ids ``<site>/<case>``."""
    return tuple(scan_ct_folder(data_dir, sites))


@functools.lru_cache(maxsize=2)
def _real_strata(data_dir: str, num_landmarks: int, sites: bool = False) -> np.ndarray:
    return np.array([np.isnan(load_ct_labels(data_dir, c, num_landmarks)).any() for c in _scan(data_dir, sites)], np.int64)


@functools.lru_cache(maxsize=6)
def _cases(
    data_dir: str, native: tuple[int, int, int], seed: int, indices: tuple[int, ...], num_landmarks: int, sites: bool = False
) -> tuple[CTCase, ...]:
    """The cases of these cohort indices at the working size ``native`` (1.25 x the crop),
    generated or read once per process (only those a process needs: no process holds the whole
    cohort). Real volumes are resampled to it once, with their landmarks and spacing (exact, see
    :func:`prepare_case`), so memory does not grow with the scanner's resolution."""
    if data_dir:
        ids = _scan(data_dir, sites)
        logger.info("reading %d CT cases from %s, resampled to %s", len(indices), data_dir, native)
        out = []
        for i in indices:
            c = load_ct_case(data_dir, ids[i], num_landmarks)
            p = prepare_case(c.volume, c.landmarks, c.spacing, native, 1.0, None)
            out.append(CTCase(p.volume, p.landmarks, p.spacing, c.name))
        return tuple(out)
    logger.info("generating %d synthetic CT cases of %s (seed %d)", len(indices), native, seed)
    return tuple(generate_case(i, native, seed) for i in indices)


@functools.lru_cache(maxsize=6)
def _native_cases(
    data_dir: str,
    crop: tuple[int, int, int],
    indices: tuple[int, ...],
    num_landmarks: int,
    zoom_min: float,
    eval_centre: str,
    sites: bool = False,
) -> tuple[CTCase, ...]:
    """Real cases at their native spacing: each volume is read, and only the region that the
    training crops (zoom down to ``zoom_min``) and the evaluation crop can touch is kept
    (:func:`native_region`), with the scan's centre in its coordinates."""
    ids = _scan(data_dir, sites)
    logger.info("reading %d CT cases from %s at native resolution (crop %s)", len(indices), data_dir, crop)
    out = []
    for i in indices:
        c = load_ct_case(data_dir, ids[i], num_landmarks)
        centre = (np.asarray(c.volume.shape, dtype=np.float64) - 1) / 2
        zoom, eval_ctr = _eval_view(c.landmarks, centre, crop, eval_centre, isotropic=True)  # the widest window of both
        start, stop = native_region(c.volume.shape, c.landmarks, crop, zoom_min, zoom, eval_ctr)
        roi = np.ascontiguousarray(c.volume[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]])
        out.append(CTCase(roi, c.landmarks - start, c.spacing, c.name, centre - start))
    return tuple(out)


def _eval_view(
    landmarks: np.ndarray, centre: np.ndarray, crop: tuple[int, int, int], eval_centre: str, isotropic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Zoom ``(3,)`` and centre of a native-resolution evaluation crop: centred on the scan's
    ``centre`` with the largest zoom <= 1 at which it holds the landmarks (``volume``), or the
    authors' ``CenterCrop`` (``landmarks``: centred on the landmarks' box, ``fit_zoom``)."""
    if eval_centre == "landmarks":
        ctr = landmark_centre(landmarks)
        zoom = fit_zoom(landmarks, crop)
        ctr = centre if ctr is None else ctr
    else:
        ctr, zoom = centre, fit_zoom(landmarks, crop, centre)
    if isotropic:
        zoom = np.full(3, zoom.min())
    return zoom, ctr


def _train_zoom(
    landmarks: np.ndarray, crop: tuple[int, int, int], opts: H3DENetOptions, isotropic: bool, rng: np.random.Generator
) -> np.ndarray:
    """A random native-resolution training zoom ``(3,)``: uniform in ``[zoom-min, min(zoom-max,
    fit)]`` with ``fit`` the authors' landmark-fitting zoom, one factor for all axes (isotropic) or
    one per axis (the authors' ``RandomCrop``); ``fit`` itself where it is below ``zoom-min``."""
    fit = fit_zoom(landmarks, crop)
    if isotropic:
        hi = min(opts.zoom_max, float(fit.min()))
        return np.full(3, hi if hi <= opts.zoom_min else float(rng.uniform(opts.zoom_min, hi)))
    if (fit < opts.zoom_min).any():
        return fit
    return np.array([float(rng.uniform(opts.zoom_min, min(opts.zoom_max, f))) for f in fit])


def _stack(prepared: Sequence[PreparedCase], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Network input ``(B, 1, X, Y, Z)``, landmarks ``(B, L, 3)`` (NaN = missing), spacings ``(B, 3)``."""
    x = torch.from_numpy(np.stack([p.volume for p in prepared]))[:, None].to(device)
    lm = torch.from_numpy(np.stack([p.landmarks for p in prepared])).float().to(device)
    return x, lm, np.stack([p.spacing for p in prepared])


@dataclass(frozen=True)
class LandmarkExample:
    """Predicted vs true landmarks of the final global model on one global-test case, for
    :class:`fedsim.analysis.task_figures.LandmarkProjectionDisplay`: the prepared (evaluation)
    ``volume`` ``(X, Y, Z)``, ``true`` and ``pred`` voxel coordinates ``(L, 3)`` (``true`` is NaN
    for missing landmarks) and the radial ``errors`` in mm ``(L,)`` (NaN where missing)."""

    case: int
    volume: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    errors: np.ndarray


# ---------------------------------------------------------------- the task
@register_task("h3denet")
class H3DENetTask(CohortTask):
    """3D CT landmark detection; every client and the server use one model (``--models``), so the
    whole model is aggregated."""

    profiles = PROFILES
    default_model = "h3denet"
    primary_metric = "mre"
    higher_is_better = False
    # the head's 1x1x1 convolution: (anchors * (3 + L)) x 64 for h3denet, next to the output
    cme_layers = ("head.conv.weight",)
    options_type = H3DENetOptions
    unit = "cases"
    seed_salt = (3,)

    def model_config(self, cfg: ResolvedConfig) -> dict[str, Any]:
        plan = self.plan(cfg)
        opts: H3DENetOptions = self.options(cfg)
        return {"size": cfg.profile, "num_landmarks": opts.num_landmarks, "attention": plan.attention, "head": plan.head}

    def plan(self, cfg: ResolvedConfig, data_dir: str | None = None) -> H3DEPlan:
        """The recipe's concrete items for this run's data source."""
        opts: H3DENetOptions = self.options(cfg)
        return opts.plan(bool(self.data_source(cfg, data_dir)))

    def prepare(self, case: CTCase, cfg: ResolvedConfig, rng: np.random.Generator | None, data_dir: str | None = None) -> PreparedCase:
        """One case in the network's crop: a training view with ``rng`` (random zoom and
        placement), the deterministic evaluation view without."""
        opts: H3DENetOptions = self.options(cfg)
        plan = self.plan(cfg, data_dir)
        crop = crop_shape(cfg.image_size)
        if plan.resolution == "fit":
            factor = float(rng.uniform(opts.zoom_min, opts.zoom_max)) if rng is not None else opts.eval_zoom
            return prepare_case(case.volume, case.landmarks, case.spacing, crop, factor, rng)
        centre = (np.asarray(case.volume.shape, dtype=np.float64) - 1) / 2 if case.centre is None else case.centre
        if rng is not None:
            return prepare_native(
                case.volume, case.landmarks, case.spacing, crop, _train_zoom(case.landmarks, crop, opts, plan.isotropic, rng), rng
            )
        zoom, ctr = _eval_view(case.landmarks, centre, crop, plan.eval_centre, plan.isotropic)
        return prepare_native(case.volume, case.landmarks, case.spacing, crop, zoom, None, ctr)

    def check_config(self, cfg: ResolvedConfig) -> None:
        if cfg.image_size % 64:
            raise ConfigError(
                f"image_size must be a multiple of 64 for h3denet (crop s x s x s/2, every axis divisible by "
                f"the encoder's stride 32), got {cfg.image_size}; e.g. 64 or 128"
            )

    def strata(self, cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
        """0/1 per cohort case: has at least one missing landmark (cheap: no volume is read). For a
        real folder every label file is read (once per process) and checked for ``num-landmarks``,
        so a wrong count is refused before any training."""
        opts: H3DENetOptions = self.options(cfg)
        if data_dir:
            return _real_strata(data_dir, opts.num_landmarks, self.reads_sites(cfg, data_dir))
        return np.array([len(missing_landmarks(i, cfg.seed)) > 0 for i in range(cfg.num_samples)], np.int64)

    def site_layout(self, cfg: ResolvedConfig, data_dir: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        """``DATA_DIR/<site>/`` each in the authors' layout (``<case>_volume.nrrd`` ...)."""
        return ct_sites(_scan(data_dir, True))

    def hold_out_global(self, cfg: ResolvedConfig, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stratified by "has a missing landmark", so the global test set holds incomplete cases."""
        pool, global_test = stratified_split(np.arange(len(strata)), strata, cfg.global_test_fraction, cfg.seed + 101)
        return global_test, pool

    def split_client(self, cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, ...]:
        """``(train, test)``, stratified by "has a missing landmark"; with early stopping
        ``(train, validation, test)``, the validation part ``val-fraction`` of the training cases."""
        early = self.plan(cfg).early_stopping
        need = 3 if early else 2
        if len(idx) < need:
            raise ConfigError(f"{who} gets only {len(idx)} cases; need at least {need} (use fewer clients or more samples)")
        train, test = stratified_split(idx, strata, cfg.local_test_fraction, cfg.seed)
        if len(train) < 1 or len(test) < 1:
            raise ConfigError(f"{who}'s {len(idx)} cases are too few for a train/test split; use more samples")
        if not early:
            return train, test
        opts: H3DENetOptions = self.options(cfg)
        train, val = stratified_split(train, strata, opts.val_fraction, cfg.seed + 17)
        if len(train) < 1 or len(val) < 1:
            raise ConfigError(f"{who}'s {len(idx)} cases are too few for train/validation/test splits; use more samples")
        return train, val, test

    def cases(self, cfg: ResolvedConfig, idx: np.ndarray, data_dir: str | None = None) -> tuple[CTCase, ...]:
        """The cases of cohort indices ``idx``: at the working size (1.25 x the crop), or for real
        data at native resolution the region of each scan that crops can touch."""
        crop = crop_shape(cfg.image_size)
        native = (round(NATIVE_SCALE * crop[0]), round(NATIVE_SCALE * crop[1]), round(NATIVE_SCALE * crop[2]))
        opts: H3DENetOptions = self.options(cfg)
        source, indices = self.data_source(cfg, data_dir), tuple(int(i) for i in idx)
        plan = self.plan(cfg, data_dir)
        sites = self.reads_sites(cfg, source)
        if source and plan.resolution == "native":
            return _native_cases(source, crop, indices, opts.num_landmarks, opts.zoom_min, plan.eval_centre, sites)
        return _cases(source, native, cfg.seed, indices, opts.num_landmarks, sites)

    def local_training(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, server_round: int, device: torch.device, data_dir: str | None
    ) -> LocalTraining:
        """Adam (betas 0.9/0.98, weight decay) with the learning rate decayed per federation
        epoch (held at the recipe's floor), random zoom-out crops, the model's own loss; training
        MRE and SDR at 4 mm. With early stopping the client keeps and sends its best local epoch
        by validation loss (the release keeps its best checkpoint over all epochs)."""
        if not isinstance(model, LandmarkNet):
            raise TypeError(f"h3denet trains LandmarkNet models, got {type(model).__name__}")
        opts: H3DENetOptions = self.options(cfg)
        plan = self.plan(cfg, data_dir)
        _, parts = self.client_split(cfg, partition_id, data_dir)
        train_idx = parts[0]
        val_cases = self.cases(cfg, parts[1], data_dir) if len(parts) == 3 else ()
        cases = self.train_cases(cfg, partition_id, self.cases(cfg, train_idx, data_dir))
        seed = self.round_seed(cfg, server_round, partition_id)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        first_epoch = (max(server_round, 1) - 1) * cfg.local_epochs

        best: list[tuple[float, int, dict[str, torch.Tensor]]] = []  # the best epoch so far, on validation loss

        def epoch(e: int, step: TrainStep) -> Metrics:
            lr = plan.learning_rate(cfg.lr, opts.lr_decay, first_epoch + e - 1)
            for g in step.optimizer.param_groups:
                g["lr"] = lr
            order = rng.permutation(len(cases))
            loss_sum, errors = 0.0, []
            for i in range(0, len(order), cfg.batch_size):
                prepared = [self.prepare(cases[j], cfg, rng, data_dir) for j in order[i : i + cfg.batch_size]]
                x, lm, spacing = _stack(prepared, device)
                out = model(x)
                loss_sum += float(step(model.loss(out, lm))) * len(prepared)
                errors.append(radial_errors(model.decode(out.detach()).cpu().numpy(), lm.cpu().numpy(), spacing))
            m = landmark_metrics(np.concatenate(errors))
            metrics = {"loss": loss_sum / len(cases), "mre": m["mre"], "sdr-4mm": m["sdr-4mm"], "lr": lr}
            if val_cases:
                val_loss = self._evaluate(model, val_cases, cfg, device, data_dir)["loss"]
                model.train()
                metrics["val-loss"] = val_loss
                if not best or val_loss < best[0][0]:
                    best[:] = [(val_loss, e, copy.deepcopy(model.state_dict()))]
            return metrics

        def finish(history: list[Metrics]) -> Metrics:
            if not best:
                return dict(history[-1])
            model.load_state_dict(best[0][2])
            return {**history[best[0][1] - 1], "best-epoch": float(best[0][1])}

        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=opts.weight_decay)

        return LocalTraining(len(cases), optimizer, epoch, finish)

    def train_cases(self, cfg: ResolvedConfig, partition_id: int, cases: tuple[CTCase, ...]) -> tuple[CTCase, ...]:
        """The training cases as the client sees them: with a ``label-noise`` fault (landmarks are
        not classes), a seeded share of the cases carry another training case's landmarks."""
        fault = fault_of(cfg.fault_specs(), partition_id, "label-noise")
        if fault is None:
            return cases
        perm = swapped_targets(len(cases), fault.level, cfg.seed, partition_id)
        return tuple(CTCase(c.volume, cases[p].landmarks, c.spacing, c.name, c.centre) for c, p in zip(cases, perm, strict=True))

    @torch.no_grad()
    def predict(
        self, model: nn.Module, cases: Sequence[CTCase], cfg: ResolvedConfig, device: torch.device, data_dir: str | None = None
    ) -> tuple[list[PreparedCase], np.ndarray, float]:
        """Evaluation-mode predictions: the prepared cases (the deterministic evaluation view of
        :meth:`prepare`), predicted voxel coordinates ``(N, L, 3)`` in them, and the mean loss."""
        if not isinstance(model, LandmarkNet):
            raise TypeError(f"h3denet predicts with LandmarkNet models, got {type(model).__name__}")
        was_training = model.training
        model.to(device).eval()
        prepared = [self.prepare(c, cfg, None, data_dir) for c in cases]
        preds, loss_sum = [], 0.0
        for i in range(0, len(prepared), cfg.batch_size):
            x, lm, _ = _stack(prepared[i : i + cfg.batch_size], device)
            out = model(x)
            loss_sum += float(model.loss(out, lm)) * len(x)
            preds.append(model.decode(out).cpu().numpy())
        model.train(was_training)
        return prepared, np.concatenate(preds), loss_sum / max(len(prepared), 1)

    def _evaluate(
        self, model: nn.Module, cases: Sequence[CTCase], cfg: ResolvedConfig, device: torch.device, data_dir: str | None = None
    ) -> Metrics:
        prepared, pred, loss = self.predict(model, cases, cfg, device, data_dir)
        true = np.stack([p.landmarks for p in prepared])
        errors = radial_errors(pred, true, np.stack([p.spacing for p in prepared]))
        return {"loss": loss, **landmark_metrics(errors)}

    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        test_idx = self.client_split(cfg, partition_id, data_dir)[1][-1]
        return LocalResult(len(test_idx), self._evaluate(model, self.cases(cfg, test_idx, data_dir), cfg, device, data_dir))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        _, idx = self.global_test(cfg)
        return LocalResult(len(idx), self._evaluate(model, self.cases(cfg, idx), cfg, device))

    # ------------------------------------------------------------ figures
    def figure_arrays(self, run_dir: Path, cfg: ResolvedConfig, num_cases: int = 4) -> list[LandmarkExample]:
        """Predicted vs true landmarks of the final global model on a few global-test cases
        (incomplete ones first), in the prepared evaluation volumes, with their errors in mm."""
        params = RunDir(run_dir).load_params()
        model = self.build_model(cfg.server_model or self.default_model or "h3denet", cfg)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, strict=False)
        strata, idx = self.global_test(cfg)
        chosen = [*idx[strata[idx] == 1][: num_cases // 2], *idx[strata[idx] == 0]][:num_cases]
        chosen += [i for i in idx if i not in chosen][: num_cases - len(chosen)]
        prepared, pred, _ = self.predict(model, self.cases(cfg, np.asarray(chosen)), cfg, torch.device("cpu"))
        return [
            LandmarkExample(int(case), p.volume, p.landmarks, pred[j], radial_errors(pred[j][None], p.landmarks[None], p.spacing)[0])
            for j, (case, p) in enumerate(zip(chosen, prepared, strict=True))
        ]


__all__ = ["PROFILES", "H3DENetOptions", "H3DENetTask", "H3DEPlan", "LandmarkExample", "crop_shape"]
