"""Eq. 2 on hand-built weight sequences, including masking and the eq. 1 matrix layout."""

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.cme import FIELD, CMERecorder, CMESettings, as_jacobian
from fedsim.cme.recorder import recorded_parameters, subsample_indices
from fedsim.callbacks import TrainInfo

INFO = TrainInfo(server_round=1, partition_id=0, epochs=2, model_name="toy")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.conv = nn.Conv2d(2, 3, kernel_size=2)


def _run(model, weights, settings):
    """Set fc.weight to weights[0] (received), then weights[1:] after each local epoch."""
    rec = CMERecorder(settings)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(weights[0]))
    rec.on_train_start(model, INFO)
    for epoch, w in enumerate(weights[1:], 1):
        with torch.no_grad():
            model.fc.weight.copy_(torch.tensor(w))
        rec.on_epoch_end(model, INFO, epoch, {})
    rec.on_train_end(model, INFO)
    return rec.result


W0 = [[1.0, 2.0, 0.5], [-2.0, 4.0, 1.0]]
W1 = [[1.5, 1.0, 0.0008], [-1.0, 5.0, 0.5]]  # 0.0008 < threshold 1e-3: masked
W2 = [[3.0, 2.0, 0.25], [-1.0, 4.0, 0.25]]


def test_eq2_statistics_by_hand():
    res = _run(Toy(), [W0, W1, W2], CMESettings(layers=("fc.weight",), threshold=1e-3))
    st = res.stats["fc.weight"]
    # epoch 1: C = (W1 - W0) / W1 = [[1/3, -1, masked], [-1, 1/5, -1]]
    c1 = np.array([1 / 3, -1.0, -1.0, 0.2, -1.0])
    assert st[0, FIELD["count"]] == 5 and st[0, FIELD["size"]] == 6
    assert st[0, FIELD["masked_fraction"]] == pytest.approx(1 / 6)
    assert st[0, FIELD["mean"]] == pytest.approx(c1.mean())
    assert st[0, FIELD["std"]] == pytest.approx(c1.std())
    assert st[0, FIELD["l2"]] == pytest.approx(np.sqrt((c1**2).sum()))
    assert st[0, FIELD["lag_count"]] == 0 and st[0, FIELD["lag_sum"]] == 0  # first epoch of the round
    # epoch 2: C = (W2 - W1) / W2 = [[0.5, 0.5, (0.25-0.0008)/0.25], [0, -0.25, -1]]
    c2_full = np.array([[0.5, 0.5, (0.25 - 0.0008) / 0.25], [0.0, -0.25, -1.0]])
    assert st[1, FIELD["count"]] == 6 and st[1, FIELD["mean"]] == pytest.approx(c2_full.mean())
    # lag-1 terms over elements valid in both epochs (all but [0, 2])
    c1_m = np.array([[1 / 3, -1.0, 0.0], [-1.0, 0.2, -1.0]])
    joint = np.array([[1, 1, 0], [1, 1, 1]], bool)
    assert st[1, FIELD["lag_count"]] == 5
    assert st[1, FIELD["lag_sum"]] == pytest.approx((c1_m * c2_full)[joint].sum())
    assert st[1, FIELD["lag_sq_prev"]] == pytest.approx((c1_m[joint] ** 2).sum())
    assert st[1, FIELD["lag_sq_cur"]] == pytest.approx((c2_full[joint] ** 2).sum())
    # the archived matrix: masked entries are 0 (the paper's zero-initialised C)
    np.testing.assert_allclose(res.matrices["fc.weight"][0], c1_m, rtol=1e-6)
    np.testing.assert_allclose(res.matrices["fc.weight"][1], c2_full, rtol=1e-6)


def test_threshold_zero_masks_only_exact_zeros():
    w1 = [[1.5, 1.0, 0.0], [-1.0, 5.0, 0.5]]
    res = _run(Toy(), [W0, w1], CMESettings(layers=("fc.weight",), threshold=0.0))
    assert res.stats["fc.weight"][0, FIELD["count"]] == 5
    assert np.isfinite(res.matrices["fc.weight"]).all()


def test_conv_kernels_are_out_by_in_times_k_matrices():
    torch.manual_seed(0)
    model = Toy()
    rec = CMERecorder(CMESettings(layers=("conv.weight",), threshold=0.0))
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
    rec = CMERecorder(CMESettings(layers=("0.weight",), max_size=8, threshold=0.0))
    rec.on_train_start(model, INFO)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(0.5)
    rec.on_epoch_end(model, INFO, 1, {})
    rec.on_train_end(model, INFO)
    rows, cols = rec.result.rows["0.weight"], rec.result.cols["0.weight"]
    full = ((model[0].weight.detach() - w0) / model[0].weight.detach()).numpy()
    np.testing.assert_allclose(rec.result.matrices["0.weight"][0], full[np.ix_(rows, cols)], rtol=1e-5)
