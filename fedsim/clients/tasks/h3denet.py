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

Preprocessing (:func:`fedsim.data.landmark_crop.prepare_case`): training zooms every case by a
random factor in ``[zoom-min, zoom-max]`` (0.6-1: zoom-out) and places / crops it at random so all
landmarks stay inside; evaluation uses the deterministic ``eval-zoom`` (0.8) and a centred
placement. Errors are measured with the **resampled** voxel spacing.

Training (paper section 4.1): Adam, lr from the profile (1e-3), betas (0.9, 0.98), weight decay
5e-4, learning rate decayed by 0.98 per epoch, counted over the federation's epochs (round r,
local epoch e is epoch ``(r - 1) * local_epochs + e``). The model's own loss (anchor or heatmap
head, :mod:`fedsim.models.landmark_heads`).

Models (:mod:`fedsim.models.h3denet`, registered for this task; every client uses the same one, so
the whole model is aggregated): ``h3denet`` (default: BRA encoder + decoder + anchor-ball head),
``h3denet_heatmap`` (same backbone, heatmap head: the paper's baseline head) and ``unet3d`` (a
plain 3D U-Net with the heatmap head at full resolution). Widths depend on the profile (``size``:
narrow for ``tiny``/``quick``, the paper's for ``paper``).

Metrics (:mod:`fedsim.metrics.landmarks`): ``loss``, ``mre``, ``sd``, ``sdr-2mm``,
``sdr-2.5mm``, ``sdr-3mm``, ``sdr-4mm`` over existing landmarks, the same suffixed ``-missing``
over cases with missing landmarks, and ``landmarks`` (how many were scored).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim._logging import logger
from fedsim.metrics.landmarks import landmark_metrics, radial_errors
from fedsim.clients.tasks.registry import register_task
from fedsim.clients.tasks.base import LocalResult, Task
from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.clients.training import ProximalTerm
from fedsim.config import ConfigError, Profile, ResolvedConfig
from fedsim.data.ct_folder import load_ct_case, load_ct_labels, scan_ct_folder
from fedsim.data.landmark_crop import PreparedCase, prepare_case
from fedsim.data.partition import PartitionParams, partition, stratified_split
from fedsim.data.synthetic_ct import NUM_LANDMARKS, CTCase, generate_case, missing_landmarks
from fedsim.models import build_model
from fedsim.models.landmark_heads import LandmarkNet

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
    * ``num-landmarks``: landmarks per case (14, as in the authors' dataset and the synthetic cohort).
    """

    zoom_min: float = 0.6
    zoom_max: float = 1.0
    eval_zoom: float = 0.8
    lr_decay: float = 0.98
    weight_decay: float = 5e-4
    num_landmarks: int = NUM_LANDMARKS

    def __post_init__(self) -> None:
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


def crop_shape(image_size: int) -> tuple[int, int, int]:
    """The network's crop for ``image_size`` ``s``: ``(s, s, s/2)``; 128 -> (128, 128, 64)."""
    return image_size, image_size, image_size // 2


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    """Cohort indices: the global test set and each client's (train, test)."""

    global_test: np.ndarray
    clients: tuple[tuple[np.ndarray, np.ndarray], ...]


def _incomplete(cfg: ResolvedConfig, data_dir: str, num_landmarks: int = NUM_LANDMARKS) -> np.ndarray:
    """0/1 per cohort case: has at least one missing landmark (cheap: no volume is read). For a
    real folder every label file is read (once per process) and checked for ``num_landmarks``, so
    a wrong count is refused before any training."""
    if data_dir:
        return _real_strata(data_dir, num_landmarks)
    return np.array([len(missing_landmarks(i, cfg.seed)) > 0 for i in range(cfg.num_samples)], np.int64)


def _client_split(cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    if len(idx) < 2:
        raise ConfigError(f"{who} gets only {len(idx)} cases; need at least 2 (use fewer clients or more samples)")
    train, test = stratified_split(idx, strata, cfg.local_test_fraction, cfg.seed)
    if len(train) < 1 or len(test) < 1:
        raise ConfigError(f"{who}'s {len(idx)} cases are too few for a train/test split; use more samples")
    return train, test


def make_split(cfg: ResolvedConfig, strata: np.ndarray) -> Split:
    pool, global_test = stratified_split(np.arange(len(strata)), strata, cfg.global_test_fraction, cfg.seed + 101)
    try:
        parts = partition(cfg.partition, strata[pool], cfg.clients, cfg.seed, PartitionParams(alpha=cfg.alpha, fractions=cfg.fractions))
    except ValueError as exc:
        raise ConfigError(f"cannot partition {len(pool)} training cases among {cfg.clients} clients: {exc}") from exc
    return Split(global_test, tuple(_client_split(cfg, pool[p], strata, f"client {k}") for k, p in enumerate(parts)))


@functools.lru_cache(maxsize=2)
def _scan(data_dir: str) -> tuple[str, ...]:
    return tuple(scan_ct_folder(data_dir))


@functools.lru_cache(maxsize=2)
def _real_strata(data_dir: str, num_landmarks: int) -> np.ndarray:
    return np.array([np.isnan(load_ct_labels(data_dir, c, num_landmarks)).any() for c in _scan(data_dir)], np.int64)


@functools.lru_cache(maxsize=6)
def _cases(data_dir: str, native: tuple[int, int, int], seed: int, indices: tuple[int, ...], num_landmarks: int) -> tuple[CTCase, ...]:
    """The cases of these cohort indices at the working size ``native`` (1.25 x the crop),
    generated or read once per process (only those a process needs: no process holds the whole
    cohort). Real volumes are resampled to it once, with their landmarks and spacing (exact, see
    :func:`prepare_case`), so memory does not grow with the scanner's resolution."""
    if data_dir:
        ids = _scan(data_dir)
        logger.info("reading %d CT cases from %s, resampled to %s", len(indices), data_dir, native)
        out = []
        for i in indices:
            c = load_ct_case(data_dir, ids[i], num_landmarks)
            p = prepare_case(c.volume, c.landmarks, c.spacing, native, 1.0, None)
            out.append(CTCase(p.volume, p.landmarks, p.spacing, c.name))
        return tuple(out)
    logger.info("generating %d synthetic CT cases of %s (seed %d)", len(indices), native, seed)
    return tuple(generate_case(i, native, seed) for i in indices)


def _seed(seed: int, server_round: int, partition_id: int) -> int:
    return int(np.random.default_rng([seed, server_round, partition_id, 3]).integers(2**31))


def _stack(prepared: Sequence[PreparedCase], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Network input ``(B, 1, X, Y, Z)``, landmarks ``(B, L, 3)`` (NaN = missing), spacings ``(B, 3)``."""
    x = torch.from_numpy(np.stack([p.volume for p in prepared]))[:, None].to(device)
    lm = torch.from_numpy(np.stack([p.landmarks for p in prepared])).float().to(device)
    return x, lm, np.stack([p.spacing for p in prepared])


# ---------------------------------------------------------------- the task
@register_task("h3denet")
class H3DENetTask(Task):
    """3D CT landmark detection; every client and the server use one model (``--models``), so the
    whole model is aggregated."""

    profiles = PROFILES
    default_model = "h3denet"
    primary_metric = "mre"
    higher_is_better = False
    # the head's 1x1x1 convolution: (anchors * (3 + L)) x 64 for h3denet, next to the output
    cme_layers = ("head.conv.weight",)
    options_type = H3DENetOptions

    def build_model(self, name: str, cfg: ResolvedConfig) -> nn.Module:
        opts: H3DENetOptions = self.options(cfg)
        return build_model(name, size=cfg.profile, num_landmarks=opts.num_landmarks)

    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        if cfg.image_size % 64:
            raise ConfigError(
                f"image_size must be a multiple of 64 for h3denet (crop s x s x s/2, every axis divisible by "
                f"the encoder's stride 32), got {cfg.image_size}; e.g. 64 or 128"
            )
        split = make_split(cfg, _incomplete(cfg, cfg.data_dir, self.options(cfg).num_landmarks))
        return [len(tr) + len(te) for tr, te in split.clients]

    def _client_indices(self, cfg: ResolvedConfig, partition_id: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
        d = cfg.data_dir if data_dir is None else data_dir
        strata = _incomplete(cfg, d, self.options(cfg).num_landmarks)
        if data_dir:  # node-local folder: all of it belongs to this client
            return _client_split(cfg, np.arange(len(strata)), strata, f"node data folder {data_dir}")
        return make_split(cfg, strata).clients[partition_id]

    def cases(self, cfg: ResolvedConfig, idx: np.ndarray, data_dir: str | None = None) -> tuple[CTCase, ...]:
        d = cfg.data_dir if data_dir is None else data_dir
        native = tuple(round(NATIVE_SCALE * n) for n in crop_shape(cfg.image_size))
        opts: H3DENetOptions = self.options(cfg)
        return _cases(d, native, cfg.seed, tuple(int(i) for i in idx), opts.num_landmarks)  # type: ignore[arg-type]

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
        assert isinstance(model, LandmarkNet)
        opts: H3DENetOptions = self.options(cfg)
        train_idx, _ = self._client_indices(cfg, partition_id, data_dir)
        cases = self.cases(cfg, train_idx, data_dir)
        crop = crop_shape(cfg.image_size)
        seed = _seed(cfg.seed, server_round, partition_id)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        first_epoch = (max(server_round, 1) - 1) * cfg.local_epochs

        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=opts.weight_decay)
        prox = ProximalTerm(model, anchor, proximal_mu, device)
        info = TrainInfo(server_round, partition_id, cfg.local_epochs, cfg.model_for(partition_id))
        for cb in callbacks:
            cb.on_train_start(model, info)
        metrics: dict[str, float] = {}
        for epoch in range(1, cfg.local_epochs + 1):
            lr = cfg.lr * opts.lr_decay ** (first_epoch + epoch - 1)
            for g in opt.param_groups:
                g["lr"] = lr
            order = rng.permutation(len(cases))
            loss_sum, errors = 0.0, []
            for i in range(0, len(order), cfg.batch_size):
                prepared = [
                    prepare_case(c.volume, c.landmarks, c.spacing, crop, float(rng.uniform(opts.zoom_min, opts.zoom_max)), rng)
                    for c in (cases[j] for j in order[i : i + cfg.batch_size])
                ]
                x, lm, spacing = _stack(prepared, device)
                opt.zero_grad(set_to_none=True)
                out = model(x)
                loss = model.loss(out, lm)
                if prox:
                    loss = loss + prox()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(prepared)
                errors.append(radial_errors(model.decode(out.detach()).cpu().numpy(), lm.cpu().numpy(), spacing))
            m = landmark_metrics(np.concatenate(errors))
            metrics = {"loss": loss_sum / len(cases), "mre": m["mre"], "sdr-4mm": m["sdr-4mm"], "lr": lr}
            for cb in callbacks:
                cb.on_epoch_end(model, info, epoch, metrics)
        for cb in callbacks:
            cb.on_train_end(model, info)
        return LocalResult(len(cases), metrics)

    @torch.no_grad()
    def predict(self, model: nn.Module, cases: Sequence[CTCase], cfg: ResolvedConfig, device: torch.device) -> tuple[list[PreparedCase], np.ndarray, float]:
        """Evaluation-mode predictions: the prepared cases (``eval-zoom``, centred), predicted
        voxel coordinates ``(N, L, 3)`` in the prepared volumes, and the mean loss."""
        assert isinstance(model, LandmarkNet)
        opts: H3DENetOptions = self.options(cfg)
        crop = crop_shape(cfg.image_size)
        was_training = model.training
        model.to(device).eval()
        prepared = [prepare_case(c.volume, c.landmarks, c.spacing, crop, opts.eval_zoom, None) for c in cases]
        preds, loss_sum = [], 0.0
        for i in range(0, len(prepared), cfg.batch_size):
            x, lm, _ = _stack(prepared[i : i + cfg.batch_size], device)
            out = model(x)
            loss_sum += float(model.loss(out, lm)) * len(x)
            preds.append(model.decode(out).cpu().numpy())
        model.train(was_training)
        return prepared, np.concatenate(preds), loss_sum / max(len(prepared), 1)

    def _evaluate(self, model: nn.Module, cases: Sequence[CTCase], cfg: ResolvedConfig, device: torch.device) -> dict[str, float]:
        prepared, pred, loss = self.predict(model, cases, cfg, device)
        true = np.stack([p.landmarks for p in prepared])
        errors = radial_errors(pred, true, np.stack([p.spacing for p in prepared]))
        return {"loss": loss, **landmark_metrics(errors)}

    def evaluate_local(
        self, model: nn.Module, cfg: ResolvedConfig, partition_id: int, device: torch.device, data_dir: str | None = None
    ) -> LocalResult:
        _, test_idx = self._client_indices(cfg, partition_id, data_dir)
        return LocalResult(len(test_idx), self._evaluate(model, self.cases(cfg, test_idx, data_dir), cfg, device))

    def evaluate_global(self, model: nn.Module, cfg: ResolvedConfig, device: torch.device) -> LocalResult:
        idx = make_split(cfg, _incomplete(cfg, cfg.data_dir, self.options(cfg).num_landmarks)).global_test
        return LocalResult(len(idx), self._evaluate(model, self.cases(cfg, idx), cfg, device))

    # ------------------------------------------------------------ figures
    def analysis_figures(self, run_dir: Path, cfg: ResolvedConfig, out_dir: Path, num_cases: int = 4) -> list[Path]:
        """Predicted vs true landmarks of the final global model on a few global-test cases
        (incomplete ones first): per case the maximum-intensity projections along the three axes
        with true landmarks (green circles), predictions (red crosses, joined to their truth) and
        predictions of missing landmarks (grey crosses)."""
        import matplotlib.pyplot as plt

        from fedsim.rundir import RunDir

        params = RunDir(run_dir).load_params()
        model = self.build_model(cfg.server_model or self.default_model, cfg)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, strict=False)
        strata = _incomplete(cfg, cfg.data_dir, self.options(cfg).num_landmarks)
        idx = make_split(cfg, strata).global_test
        chosen = [*idx[strata[idx] == 1][: num_cases // 2], *idx[strata[idx] == 0]][:num_cases]
        chosen += [i for i in idx if i not in chosen][: num_cases - len(chosen)]
        prepared, pred, _ = self.predict(model, self.cases(cfg, np.asarray(chosen)), cfg, torch.device("cpu"))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        views = (("axial (max over z)", 2, (0, 1)), ("coronal (max over y)", 1, (0, 2)), ("sagittal (max over x)", 0, (1, 2)))
        paths = []
        for j, case in enumerate(chosen):
            p, t = pred[j], prepared[j].landmarks
            err = radial_errors(p[None], t[None], prepared[j].spacing)[0]
            fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
            for ax, (title, axis, (a, b)) in zip(axes, views, strict=True):
                ax.imshow(prepared[j].volume.max(axis).T, cmap="gray", origin="lower", aspect="auto")
                ok = np.isfinite(t).all(1)
                for k in np.flatnonzero(ok):
                    ax.plot([t[k, a], p[k, a]], [t[k, b], p[k, b]], "y-", lw=0.8)
                ax.scatter(t[ok, a], t[ok, b], s=40, facecolors="none", edgecolors="lime", label="true")
                ax.scatter(p[ok, a], p[ok, b], s=30, c="red", marker="x", label="predicted")
                if (~ok).any():
                    ax.scatter(p[~ok, a], p[~ok, b], s=30, c="0.6", marker="x", label="predicted (truth missing)")
                ax.set_title(title)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0].legend(loc="lower right", fontsize=7)
            fig.suptitle(f"global-test case {case}: MRE {np.nanmean(err):.2f} mm over {int(ok.sum())} landmarks ({int((~ok).sum())} missing)")
            fig.tight_layout()
            path = out_dir / f"h3denet_landmarks_{j}_case{case}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            paths.append(path)
        return paths


__all__ = ["PROFILES", "H3DENetOptions", "H3DENetTask", "crop_shape", "make_split"]
