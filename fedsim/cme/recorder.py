"""The CME recorder: a training callback that archives conversational memory elements.

CME paper (Kumar et al., ICPR 2024), section 3.1. After every local epoch ``i`` the recorder
computes, for every weight tensor of the client's model, the relative weight change

    C_i = (w_i - w_{i-1}) / w_i                                            (eq. 2)

element by element. A convolution kernel ``(out, in, k...)`` is arranged as the matrix
``out x (in * prod(k))`` and a linear weight is ``out x in``: the "Jacobian structure" of eq. 1
(one row per output neuron, one column per incoming connection).

Choices the paper leaves open, and what fedsim does:

* **First epoch of a round.** ``w_0`` is the model the client holds when local training starts:
  the parameters it just received from the server plus its private (unshared) tensors. So
  ``C_1`` measures what local training changed relative to the aggregated model, and the paper's
  ``i in [2, epochs]`` becomes ``i in [1, epochs]``.
* **Masking.** Where ``|w_i| < threshold`` (default ``1e-3``) the ratio is dominated by the
  tiny denominator, so those elements are *masked*: they are excluded from every statistic and set
  to 0 in archived matrices (the paper initialises C to zero), and the masked fraction is recorded.
* **What is kept** (per layer and epoch): the number of valid elements, mean, standard deviation
  (population) and L2 norm of the valid C values, the masked fraction, and the lag-1 terms of the
  ACF (eq. 4) between this epoch and the previous epoch *of the same round*: over elements valid in
  both, their count, ``sum C_i C_{i-1}``, ``sum C_{i-1}^2`` and ``sum C_i^2`` (the last two give
  the normalised ACF). The full C matrix is kept only for the *analysis layers* (name patterns;
  default the task's, e.g. the 128 x 128 ``head.fc2.weight``); a matrix larger than ``max_size``
  rows or columns is subsampled to that size with row/column indices drawn from a generator seeded
  by (seed, layer name), so every client, round and epoch keeps the same entries.

Everything is computed on the training device in one pass per tensor; recording is off unless the
run sets ``cme`` (the callback is then simply not installed).
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedsim.callbacks import TrainCallback, TrainInfo
from fedsim.cme.schema import FIELD, STAT_FIELDS, CMESettings, EpochCME

def as_jacobian(weight: torch.Tensor) -> torch.Tensor:
    """Arrange a weight tensor as the eq. 1 matrix: ``out x (in * prod(kernel))``; 1-D stays a row."""
    return weight.reshape(1, -1) if weight.dim() == 1 else weight.reshape(weight.shape[0], -1)


def recorded_parameters(model: nn.Module, biases: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The tensors CMEs are computed for: every weight with >= 2 dims (convolutions, linear
    layers), plus 1-D ``*.bias`` vectors when ``biases``; in the model's own order (input first)."""
    out = []
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.dim() >= 2 or (biases and p.dim() == 1 and name.endswith("bias")):
            out.append((name, p))
    return out


def matching_layers(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Names matching any ``fnmatch`` pattern, in ``names`` order."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def subsample_indices(n: int, max_size: int, seed: int, name: str) -> np.ndarray:
    """All of ``range(n)``, or ``max_size`` sorted indices drawn without replacement from a
    generator seeded by (seed, layer name): identical for every client, round and epoch."""
    if n <= max_size:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=max_size, replace=False))


class CMERecorder(TrainCallback):
    """Records eq. 2 CMEs after every local epoch (see the module docstring for the choices)."""

    def __init__(self, settings: CMESettings) -> None:
        self.settings = settings
        self._params: list[tuple[str, nn.Parameter]] = []
        self._prev_w: dict[str, torch.Tensor] = {}
        self._prev_c: dict[str, torch.Tensor] = {}
        self._prev_valid: dict[str, torch.Tensor] = {}
        self._stats: dict[str, list[np.ndarray]] = {}
        self._mats: dict[str, list[np.ndarray]] = {}
        self._idx: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.result: EpochCME | None = None

    def on_train_start(self, model: nn.Module, info: TrainInfo) -> None:
        self._params = recorded_parameters(model, self.settings.biases)
        if not self._params:
            raise ValueError("CME recording found no weight tensors in the model")
        names = [n for n, _ in self._params]
        analysed = matching_layers(names, self.settings.layers)
        if self.settings.layers and not analysed:
            raise ValueError(
                f"CME layer patterns {list(self.settings.layers)} match no weight of model {info.model_name!r}; "
                f"its weights are e.g. {', '.join(names[-4:])}"
            )
        self._idx = {}
        for name, p in self._params:
            if name in analysed:
                rows, cols = as_jacobian(p).shape
                s = self.settings
                self._idx[name] = (
                    subsample_indices(rows, s.max_size, s.seed, name + "/rows"),
                    subsample_indices(cols, s.max_size, s.seed, name + "/cols"),
                )
        self._prev_w = {n: p.detach().clone() for n, p in self._params}
        self._prev_c, self._prev_valid = {}, {}
        self._stats = {n: [] for n, _ in self._params}
        self._mats = {n: [] for n in self._idx}
        self.result = None

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        thr = self.settings.threshold
        for name, p in self._params:
            w = p.detach()
            prev = self._prev_w[name]
            valid = w.abs() >= thr
            if thr == 0:
                valid &= w != 0
            # eq. 2 in place on the difference buffer; masked entries -> 0 (no inf/nan from 1/w)
            c = torch.sub(w, prev).div_(torch.where(valid, w, 1.0)).masked_fill_(~valid, 0.0)
            flat = c.reshape(-1)
            terms = [valid.sum(), flat.sum(), torch.dot(flat, flat)]
            if name in self._prev_c:
                pc, pvalid = self._prev_c[name].reshape(-1), self._prev_valid[name].reshape(-1)
                v = valid.reshape(-1)
                pcv = pc.masked_fill(~v, 0.0)  # C_{i-1} on elements valid in both epochs
                cpv = flat.masked_fill(~pvalid, 0.0)  # C_i on elements valid in both epochs
                terms += [(v & pvalid).sum(), torch.dot(flat, pc), torch.dot(pcv, pcv), torch.dot(cpv, cpv)]
            vals = torch.stack([t.double() for t in terms]).tolist()  # one device sync per tensor
            count, total, sq = int(vals[0]), vals[1], vals[2]
            mean = total / count if count else float("nan")
            var = max(sq / count - mean * mean, 0.0) if count else float("nan")
            lag = [int(vals[3]), *vals[4:7]] if len(vals) > 3 else [0, 0.0, 0.0, 0.0]
            row = [count, w.numel(), mean, var**0.5, sq**0.5, 1.0 - count / w.numel(), *lag]
            self._stats[name].append(np.array(row, dtype=np.float64))
            if name in self._idx:
                rows, cols = self._idx[name]
                mat = as_jacobian(c)  # subsample on the device, copy only the kept entries
                if mat.shape != (len(rows), len(cols)):
                    mat = mat[torch.as_tensor(rows, device=c.device)][:, torch.as_tensor(cols, device=c.device)]
                self._mats[name].append(mat.float().cpu().numpy())
            self._prev_c[name], self._prev_valid[name] = c, valid
            prev.copy_(w)

    def on_train_end(self, model: nn.Module, info: TrainInfo) -> None:
        names = tuple(n for n, _ in self._params)
        self.result = EpochCME(
            layers=names,
            shapes={n: tuple(p.shape) for n, p in self._params},
            stats={n: np.stack(v) for n, v in self._stats.items() if v},
            matrices={n: np.stack(v) for n, v in self._mats.items() if v},
            rows={n: r for n, (r, _) in self._idx.items()},
            cols={n: c for n, (_, c) in self._idx.items()},
        )
        self._prev_w, self._prev_c, self._prev_valid = {}, {}, {}
