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
* **Masking, dead units, non-finite values.** Where ``|w_i| < threshold`` (default ``1e-3``; it
  must be > 0) the ratio is dominated by the tiny denominator, so those elements are *masked*.
  Rows (output neurons) and columns (incoming connections) of the eq. 1 matrix in which *no* weight
  changed during the epoch are *dead units* (a ReLU unit that never fired gets no gradient; in the
  brain-MRI head up to 70 % of ``head.fc2.weight`` lies in such rows and columns): their C is 0
  not because the unit learned nothing new but because it did not take part, so it is excluded as
  well. Elements where ``w_i`` or ``C_i`` is NaN or infinite are *non-finite*. Each element falls in
  exactly one class (non-finite, masked, dead, valid; see :mod:`fedsim.cme.schema`); only valid
  elements enter the statistics, the ACF terms and the archived matrices, which hold NaN elsewhere.
  The three excluded fractions are recorded separately.
* **What is kept** (per layer and epoch): the number of valid elements, mean, standard deviation
  (population), L2 norm and mean absolute value of the valid C values, the fraction of them with
  ``|C| > 1`` (the weight moved by more than its own size), the masked, dead and non-finite
  fractions, the numbers of dead rows and columns, and the lag-1 terms of the ACF (eq. 4) between
  this epoch and the previous epoch *of the same round*: over elements valid in both, their count,
  ``sum C_i C_{i-1}``, ``sum C_{i-1}^2`` and ``sum C_i^2`` (the last two give the normalised ACF).
  The lag-1 terms are also kept per element group (:data:`~fedsim.cme.schema.LAG_GROUPS` contiguous
  blocks of rows of the eq. 1 matrix; of columns when it has fewer rows), so the analysis can estimate
  the sampling noise of the ACF by a jackknife. The full C matrix is kept only for the *analysis
  layers* (name patterns; default the task's, e.g. the 128 x 128 ``head.fc2.weight``); a matrix larger than ``max_size``
  rows or columns is subsampled to that size with row/column indices drawn from a generator seeded
  by (seed, layer name), so every client, round and epoch keeps the same entries. Dead units are
  found on the full matrix, before subsampling.

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
from fedsim.cme.schema import LAG_GROUP_FIELDS, LAG_GROUPS, CMESettings, EpochCME


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


def _group_bounds(rows: int, cols: int, groups: int) -> tuple[bool, list[int]]:
    """Split points of the element groups: contiguous blocks of rows of the eq. 1 matrix (as flat
    offsets) when it has at least ``groups`` rows, else contiguous blocks of columns."""
    if rows >= groups:
        return True, [(rows * g // groups) * cols for g in range(1, groups)]
    return False, [cols * g // groups for g in range(1, groups)]


def group_dots(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int], groups: int = LAG_GROUPS) -> list[torch.Tensor]:
    """``sum a * b`` per element group (see :func:`_group_bounds`) of two tensors with the same
    eq. 1 matrix ``shape``; bool tensors give the count of elements true in both."""
    by_rows, bounds = _group_bounds(*shape, groups)
    if a.dtype == torch.bool:
        both = (a & b).reshape(-1)
        if by_rows:
            return [torch.count_nonzero(x) for x in both.tensor_split(bounds)]
        return [x.sum() for x in both.reshape(shape).sum(dim=0).tensor_split(bounds)]
    a, b = a.reshape(-1), b.reshape(-1)
    if by_rows:
        return [torch.dot(x, y) for x, y in zip(a.tensor_split(bounds), b.tensor_split(bounds), strict=True)]
    return [x.sum() for x in (a * b).reshape(shape).sum(dim=0).tensor_split(bounds)]


def classify(w: torch.Tensor, prev: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Eq. 2 and the element classes of :mod:`fedsim.cme.schema` for one tensor.

    Returns ``(c, abs_c, valid, n_masked, n_dead, n_nonfinite, dead_rows, dead_cols)``: ``c`` is
    eq. 2 with 0 wherever the element is not valid (``abs_c`` its absolute value, as the eq. 1
    matrix), ``valid`` a mask of the tensor's shape, the ``n_*``
    0-d counts, and ``dead_rows`` / ``dead_cols`` flag the rows/columns of the eq. 1 matrix in
    which no element changed. A fast path skips the full masks when nothing is dead or non-finite.
    """
    big = w.abs() >= threshold  # False for NaN
    c = torch.sub(w, prev).div_(torch.where(big, w, 1.0))  # masked elements: w - prev (0 iff unchanged)
    ac = as_jacobian(c).abs()
    row_max, col_max = ac.amax(dim=1), ac.amax(dim=0)  # NaN and inf propagate
    dead_rows, dead_cols = row_max == 0, col_max == 0
    all_finite = bool(torch.isfinite(row_max).all())
    if all_finite and not bool(dead_rows.any()) and not bool(dead_cols.any()):
        valid = big
        zero = torch.zeros((), dtype=torch.int64, device=w.device)
        n_masked, n_dead, n_nonfinite = w.numel() - torch.count_nonzero(big), zero, zero
        return c.mul_(big), ac.mul_(as_jacobian(big)), valid, n_masked, n_dead, n_nonfinite, dead_rows, dead_cols
    finite = torch.isfinite(c)  # w or prev NaN/inf -> c NaN/inf
    in_dead_unit = (dead_rows[:, None] | dead_cols[None, :]).reshape(w.shape)
    masked = finite & ~big
    dead = finite & big & in_dead_unit
    valid = finite & big & ~in_dead_unit
    c = c.masked_fill_(~valid, 0.0)
    ac = ac.masked_fill_(as_jacobian(~valid), 0.0)
    return c, ac, valid, torch.count_nonzero(masked), torch.count_nonzero(dead), torch.count_nonzero(~finite), dead_rows, dead_cols


class CMERecorder(TrainCallback):
    """Records eq. 2 CMEs after every local epoch (see the module docstring for the choices)."""

    def __init__(self, settings: CMESettings) -> None:
        self.settings = settings
        self._params: list[tuple[str, nn.Parameter]] = []
        self._prev_w: dict[str, torch.Tensor] = {}
        self._prev_c: dict[str, torch.Tensor] = {}
        self._prev_valid: dict[str, torch.Tensor] = {}
        self._stats: dict[str, list[np.ndarray]] = {}
        self._lags: dict[str, list[np.ndarray]] = {}
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
        self._lags = {n: [] for n, _ in self._params}
        self._mats = {n: [] for n in self._idx}
        self.result = None

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, info: TrainInfo, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, p in self._params:
            w = p.detach()
            prev = self._prev_w[name]
            c, absc, valid, n_masked, n_dead, n_nonfinite, dead_rows, dead_cols = classify(w, prev, self.settings.threshold)
            flat = c.reshape(-1)
            terms = [torch.count_nonzero(valid), flat.sum(), torch.dot(flat, flat), absc.sum(), torch.count_nonzero(absc > 1),
                     n_masked, n_dead, n_nonfinite, dead_rows.sum(), dead_cols.sum()]  # fmt: skip
            if name in self._prev_c:
                pc, pvalid = self._prev_c[name], self._prev_valid[name]
                pcv = pc * valid  # C_{i-1} on elements valid in both epochs (pc is 0 where it was not valid)
                cpv = c * pvalid  # C_i likewise
                rows_, cols_ = as_jacobian(c).shape
                shape = (int(rows_), int(cols_))
                terms += group_dots(valid, pvalid, shape)
                terms += group_dots(c, pc, shape)
                terms += group_dots(pcv, pcv, shape)
                terms += group_dots(cpv, cpv, shape)
            vals = torch.stack([t.double() for t in terms]).tolist()  # one device sync per tensor
            count, total, sq, abs_sum, jumps = int(vals[0]), vals[1], vals[2], vals[3], vals[4]
            n_masked, n_dead, n_nonfinite, n_dead_rows, n_dead_cols = vals[5:10]
            size = w.numel()
            mean = total / count if count else float("nan")
            var = max(sq / count - mean * mean, 0.0) if count else float("nan")
            if len(vals) > 10:
                lag_groups = np.array(vals[10:], dtype=np.float64).reshape(len(LAG_GROUP_FIELDS), LAG_GROUPS).T
            else:
                lag_groups = np.zeros((LAG_GROUPS, len(LAG_GROUP_FIELDS)))
            row = [count, size, mean, var**0.5, sq**0.5,
                   abs_sum / count if count else float("nan"), jumps / count if count else float("nan"),
                   n_masked / size, n_dead / size, n_nonfinite / size, n_dead_rows, n_dead_cols,
                   *lag_groups.sum(axis=0)]  # fmt: skip
            self._stats[name].append(np.array(row, dtype=np.float64))
            self._lags[name].append(lag_groups)
            if name in self._idx:
                rows, cols = self._idx[name]
                mat = as_jacobian(c.masked_fill(~valid, float("nan")))
                if mat.shape != (len(rows), len(cols)):  # subsample on the device, copy only the kept entries
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
            lag_groups={n: np.stack(v) for n, v in self._lags.items() if v},
        )
        self._prev_w, self._prev_c, self._prev_valid = {}, {}, {}
