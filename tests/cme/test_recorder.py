"""Eq. 2 on hand-built weight sequences: masking, dead units, non-finite weights, the eq. 1 matrix
layout and the ACF's element groups, each checked against a direct numpy computation."""

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.callbacks import TrainInfo
from fedsim.cme import FIELD, LAG_GROUP_FIELDS, LAG_GROUPS, CMERecorder, CMESettings, as_jacobian
from fedsim.cme.recorder import _group_bounds, recorded_parameters, subsample_indices
from fedsim.config import ConfigError, RunConfig

INFO = TrainInfo(server_round=1, partition_id=0, epochs=2, model_name="toy")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.conv = nn.Conv2d(2, 3, kernel_size=2)


def _run(model, weights, settings, param="fc"):
    """Set <param>.weight to weights[0] (received), then weights[1:] after each local epoch."""
    rec = CMERecorder(settings)
    target = getattr(model, param).weight
    with torch.no_grad():
        target.copy_(torch.tensor(weights[0]))
    rec.on_train_start(model, INFO)
    for epoch, w in enumerate(weights[1:], 1):
        with torch.no_grad():
            target.copy_(torch.tensor(w))
        rec.on_epoch_end(model, INFO, epoch, {})
    rec.on_train_end(model, INFO)
    return rec.result


W0 = [[1.0, 2.0, 0.5], [-2.0, 4.0, 1.0]]
W1 = [[1.5, 1.0, 0.0008], [-1.0, 5.0, 0.5]]  # 0.0008 < threshold 1e-3: masked
W2 = [[3.0, 2.0, 0.25], [-1.0, 4.0, 0.25]]  # [1, 0] unchanged, but its row and column changed: valid, C = 0


def test_eq2_statistics_by_hand():
    res = _run(Toy(), [W0, W1, W2], CMESettings(layers=("fc.weight",), threshold=1e-3))
    st = res.stats["fc.weight"]
    # epoch 1: C = (W1 - W0) / W1 = [[1/3, -1, masked], [-1, 1/5, -1]]
    c1 = np.array([1 / 3, -1.0, -1.0, 0.2, -1.0])
    assert st[0, FIELD["count"]] == 5 and st[0, FIELD["size"]] == 6
    assert st[0, FIELD["masked_fraction"]] == pytest.approx(1 / 6)
    assert st[0, FIELD["dead_fraction"]] == 0 and st[0, FIELD["nonfinite_fraction"]] == 0
    assert st[0, FIELD["mean"]] == pytest.approx(c1.mean())
    assert st[0, FIELD["std"]] == pytest.approx(c1.std())
    assert st[0, FIELD["l2"]] == pytest.approx(np.sqrt((c1**2).sum()))
    assert st[0, FIELD["mean_abs"]] == pytest.approx(np.abs(c1).mean())
    assert st[0, FIELD["jump_fraction"]] == 0  # |C| = 1 is not a jump
    assert st[0, FIELD["lag_count"]] == 0 and st[0, FIELD["lag_sum"]] == 0  # first epoch of the round
    # epoch 2: C = (W2 - W1) / W2 = [[0.5, 0.5, (0.25-0.0008)/0.25], [0, -0.25, -1]]
    c2_full = np.array([[0.5, 0.5, (0.25 - 0.0008) / 0.25], [0.0, -0.25, -1.0]])
    assert st[1, FIELD["count"]] == 6 and st[1, FIELD["mean"]] == pytest.approx(c2_full.mean())
    # lag-1 terms over elements valid in both epochs (all but [0, 2])
    c1_m = np.array([[1 / 3, -1.0, np.nan], [-1.0, 0.2, -1.0]])
    joint = np.array([[1, 1, 0], [1, 1, 1]], bool)
    assert st[1, FIELD["lag_count"]] == 5
    assert st[1, FIELD["lag_sum"]] == pytest.approx((c1_m * c2_full)[joint].sum())
    assert st[1, FIELD["lag_sq_prev"]] == pytest.approx((c1_m[joint] ** 2).sum())
    assert st[1, FIELD["lag_sq_cur"]] == pytest.approx((c2_full[joint] ** 2).sum())
    # the archived matrix: excluded (here: masked) entries are NaN, never 0
    np.testing.assert_allclose(res.matrices["fc.weight"][0], c1_m, rtol=1e-6)
    np.testing.assert_allclose(res.matrices["fc.weight"][1], c2_full, rtol=1e-6)
    # every element is in exactly one class
    for row in st:
        parts = (
            row[FIELD["count"]] / row[FIELD["size"]]
            + row[[FIELD[k] for k in ("masked_fraction", "dead_fraction", "nonfinite_fraction")]].sum()
        )
        assert parts == pytest.approx(1.0)


def test_dead_rows_and_columns_are_excluded_and_reported(rng):
    """A 6 x 8 weight whose row 2 and column 5 do not change (a dead output and a dead input unit),
    with one masked weight inside the dead row and one outside it."""
    w0 = rng.uniform(0.5, 1.5, size=(6, 8)) * rng.choice([-1, 1], size=(6, 8))
    w1 = w0 * (1 + rng.normal(scale=0.1, size=w0.shape))
    w1[2, :] = w0[2, :]
    w1[:, 5] = w0[:, 5]
    w0[2, 1] = w1[2, 1] = 1e-4  # masked (and in the dead row: masked wins)
    w1[4, 3] = 5e-4  # masked, in a live unit
    model = nn.Sequential(nn.Linear(8, 6))
    res = _run(model, [w0, w1], CMESettings(layers=("0.weight",), threshold=1e-3), param="0")
    st = res.stats["0.weight"][0]

    w0_, w1_ = (np.asarray(x, np.float32).astype(np.float64) for x in (w0, w1))
    c = (w1_ - w0_) / w1_
    masked = np.abs(w1_) < 1e-3
    dead = np.zeros_like(masked)
    dead[2, :] = dead[:, 5] = True
    dead &= ~masked
    valid = ~masked & ~dead
    assert st[FIELD["dead_rows"]] == 1 and st[FIELD["dead_cols"]] == 1
    assert st[FIELD["masked_fraction"]] == pytest.approx(2 / 48)
    assert st[FIELD["dead_fraction"]] == pytest.approx(dead.sum() / 48) == pytest.approx((8 + 6 - 1 - 1) / 48)
    assert st[FIELD["count"]] == valid.sum() == 48 - 2 - 12
    assert st[FIELD["mean"]] == pytest.approx(c[valid].mean(), rel=1e-5)
    assert st[FIELD["std"]] == pytest.approx(c[valid].std(), rel=1e-5)
    assert st[FIELD["mean_abs"]] == pytest.approx(np.abs(c[valid]).mean(), rel=1e-5)
    mat = res.matrices["0.weight"][0]
    assert np.isnan(mat[2]).all() and np.isnan(mat[:, 5]).all() and np.isnan(mat[4, 3])
    np.testing.assert_allclose(mat[valid], c[valid], rtol=1e-5)


def test_nonfinite_weights_are_reported_as_such_not_as_masked():
    w1 = [[np.nan, 1.0, 0.5], [-1.0, np.inf, 0.0005]]
    res = _run(Toy(), [W0, w1], CMESettings(layers=("fc.weight",), threshold=1e-3))
    st = res.stats["fc.weight"][0]
    assert st[FIELD["nonfinite_fraction"]] == pytest.approx(2 / 6)
    assert st[FIELD["masked_fraction"]] == pytest.approx(1 / 6)  # only the finite 0.0005
    assert st[FIELD["count"]] == 3 and np.isfinite(st[FIELD["mean"]])
    assert np.isnan(res.matrices["fc.weight"][0][[0, 1, 1], [0, 1, 2]]).all()


def test_a_layer_that_did_not_change_at_all_is_all_dead():
    res = _run(Toy(), [W0, W0], CMESettings(layers=("fc.weight",), threshold=1e-3))
    st = res.stats["fc.weight"][0]
    assert st[FIELD["count"]] == 0 and st[FIELD["dead_fraction"]] == 1 and np.isnan(st[FIELD["mean"]])
    assert st[FIELD["dead_rows"]] == 2 and st[FIELD["dead_cols"]] == 3


def test_threshold_zero_is_refused_with_the_flag_and_a_range():
    with pytest.raises(ValueError, match=r"0 < threshold < 1"):
        CMESettings(threshold=0.0)
    with pytest.raises(ConfigError, match=r"--cme-threshold .* must be in the range 0 < threshold < 1"):
        RunConfig(cme=True, cme_threshold=0.0)
    for bad in (-1e-3, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="--cme-threshold"):
            RunConfig(cme_threshold=bad)
    assert RunConfig(cme_threshold=1e-6).cme_threshold == 1e-6


@pytest.mark.parametrize("shape", [(20, 7), (4, 30), (1, 5)])
def test_lag_groups_are_blocks_of_rows_or_columns_and_sum_to_the_totals(rng, shape):
    w = [rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1, 1], size=shape) for _ in range(3)]  # nothing masked
    model = nn.Sequential(nn.Linear(shape[1], shape[0]))
    res = _run(model, w, CMESettings(layers=("0.weight",), threshold=1e-3), param="0")
    groups = res.lag_groups["0.weight"]
    assert groups.shape == (2, LAG_GROUPS, len(LAG_GROUP_FIELDS))
    assert (groups[0] == 0).all()  # the round's first epoch has no lag terms
    st = res.stats["0.weight"][1]
    np.testing.assert_allclose(groups[1].sum(axis=0), st[[FIELD[k] for k in ("lag_count", "lag_sum", "lag_sq_prev", "lag_sq_cur")]])
    # group g by hand: rows (or columns) [bounds[g-1], bounds[g])
    w32 = [np.asarray(x, np.float32).astype(np.float64) for x in w]
    c1, c2 = (w32[1] - w32[0]) / w32[1], (w32[2] - w32[1]) / w32[2]
    by_rows, bounds = _group_bounds(*shape, LAG_GROUPS)
    edges = [0, *(b // shape[1] if by_rows else b for b in bounds), shape[0] if by_rows else shape[1]]
    for g in range(LAG_GROUPS):
        sl = (slice(edges[g], edges[g + 1]), slice(None)) if by_rows else (slice(None), slice(edges[g], edges[g + 1]))
        assert groups[1, g, 1] == pytest.approx((c1[sl] * c2[sl]).sum(), rel=1e-4, abs=1e-9)
        assert groups[1, g, 0] == c1[sl].size


def test_conv_kernels_are_out_by_in_times_k_matrices():
    torch.manual_seed(0)
    model = Toy()
    rec = CMERecorder(CMESettings(layers=("conv.weight",), threshold=1e-6))
    rec.on_train_start(model, INFO)
    w0 = model.conv.weight.detach().clone()
    with torch.no_grad():
        model.conv.weight.mul_(1.1).add_(0.01)
    rec.on_epoch_end(model, INFO, 1, {})
    rec.on_train_end(model, INFO)
    w1 = model.conv.weight.detach()
    expected = ((w1 - w0) / w1).reshape(3, 8).numpy()
    assert rec.result.matrices["conv.weight"].shape == (1, 3, 8)
    np.testing.assert_allclose(rec.result.matrices["conv.weight"][0], expected, rtol=1e-5)
    assert as_jacobian(torch.zeros(4, 2, 3, 3)).shape == (4, 18)


def test_layer_selection_biases_and_errors():
    model = Toy()
    assert [n for n, _ in recorded_parameters(model)] == ["fc.weight", "conv.weight"]
    assert [n for n, _ in recorded_parameters(model, biases=True)] == ["fc.weight", "fc.bias", "conv.weight", "conv.bias"]
    with pytest.raises(ValueError, match=r"match no weight of model 'toy'"):
        CMERecorder(CMESettings(layers=("head.*",))).on_train_start(model, INFO)


def test_large_matrices_are_subsampled_the_same_way_every_time():
    a = subsample_indices(1000, 64, seed=3, name="x/rows")
    assert len(a) == 64 and np.all(np.diff(a) > 0) and a.max() < 1000
    np.testing.assert_array_equal(a, subsample_indices(1000, 64, seed=3, name="x/rows"))
    assert not np.array_equal(a, subsample_indices(1000, 64, seed=4, name="x/rows"))
    np.testing.assert_array_equal(subsample_indices(10, 64, 0, "y"), np.arange(10))
    model = nn.Sequential(nn.Linear(40, 30))
    rec = CMERecorder(CMESettings(layers=("0.weight",), max_size=8, threshold=1e-6))
    rec.on_train_start(model, INFO)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(0.5)
    rec.on_epoch_end(model, INFO, 1, {})
    rec.on_train_end(model, INFO)
    rows, cols = rec.result.rows["0.weight"], rec.result.cols["0.weight"]
    full = ((model[0].weight.detach() - w0) / model[0].weight.detach()).numpy()
    np.testing.assert_allclose(rec.result.matrices["0.weight"][0], full[np.ix_(rows, cols)], rtol=1e-5)
