"""Eq. 3 against numpy.cov, eq. 4 against a direct computation, saturation and labels."""

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.analysis.cme import (
    DOMINANT,
    LEARNING,
    acf_from_stats,
    acf_variation,
    characterise,
    covariance_map,
    map_similarity,
    saturation_round,
)
from fedsim.callbacks import TrainInfo
from fedsim.cme import FIELD, CMERecorder, CMESettings


def test_covariance_map_equals_numpy_cov(rng):
    c = rng.normal(size=(16, 40)) * rng.uniform(0.1, 3, size=(16, 1))
    cov = covariance_map(c)
    assert cov.shape == (16, 16)
    np.testing.assert_allclose(cov, np.cov(c), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=">= 2 columns"):
        covariance_map(np.ones((3, 1)))


def test_acf_from_recorder_stats_equals_direct_computation(rng):
    """Eq. 4 from the recorder's lag terms == mean over consecutive epoch pairs and jointly valid
    elements of C_i * C_{i+1}, computed here straight from the weight sequence."""
    weights = [rng.normal(size=(5, 7)) for _ in range(4)]  # received + 3 local epochs
    weights[2][0, 0] = 1e-5  # masked in epoch 2
    model = nn.Linear(7, 5)
    info = TrainInfo(1, 0, 3, "lin")
    rec = CMERecorder(CMESettings(layers=("weight",), threshold=1e-3))
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weights[0]))
    rec.on_train_start(model, info)
    for e, w in enumerate(weights[1:], 1):
        with torch.no_grad():
            model.weight.copy_(torch.tensor(w))
        rec.on_epoch_end(model, info, e, {})
    rec.on_train_end(model, info)
    st = rec.result.stats["weight"]
    raw, norm = acf_from_stats(st[:, FIELD["lag_count"]], st[:, FIELD["lag_sum"]], st[:, FIELD["lag_sq_prev"]], st[:, FIELD["lag_sq_cur"]])

    w = [np.asarray(x, np.float32).astype(np.float64) for x in weights]
    cs = [(w[i] - w[i - 1]) / w[i] for i in range(1, 4)]
    valid = [np.abs(w[i]) >= 1e-3 for i in range(1, 4)]
    prods, sq_a, sq_b = [], 0.0, 0.0
    for i in range(2):
        joint = valid[i] & valid[i + 1]
        prods.extend((cs[i] * cs[i + 1])[joint])
        sq_a += (cs[i][joint] ** 2).sum()
        sq_b += (cs[i + 1][joint] ** 2).sum()
    assert len(prods) == 2 * 35 - 2  # element [0, 0] is masked in epoch 2, so out of both pairs
    assert raw == pytest.approx(np.mean(prods), rel=1e-5)
    assert norm == pytest.approx(np.sum(prods) / np.sqrt(sq_a * sq_b), rel=1e-5)


def test_acf_is_nan_without_epoch_pairs():
    raw, norm = acf_from_stats(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    assert np.isnan(raw).all() and np.isnan(norm).all()


def _noise_then_pattern(rng, n_rounds, stable_from, size=12):
    base = rng.normal(size=(size, 30))
    pattern = covariance_map(base)
    maps = []
    for r in range(1, n_rounds + 1):
        if r < stable_from:
            maps.append(covariance_map(rng.normal(size=(size, 30))))
        else:  # same pattern, shrinking scale, small noise
            maps.append(pattern * 0.5**r + 0.01 * 0.5**r * covariance_map(rng.normal(size=(size, 30))))
    return maps


@pytest.mark.parametrize("stable_from", [3, 6])
def test_saturation_round_found_where_maps_stabilise(rng, stable_from):
    maps = _noise_then_pattern(rng, 10, stable_from)
    assert saturation_round(maps, threshold=0.9, patience=2) == stable_from
    assert saturation_round(maps, rounds=range(11, 21)) == 10 + stable_from  # reports the given round numbers


def test_no_saturation_when_maps_keep_changing(rng):
    maps = _noise_then_pattern(rng, 8, stable_from=99)
    assert saturation_round(maps) is None
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=6), patience=2) == 6
    # stable from round 7 of 8: only one similar pair follows, patience 2 cannot be confirmed
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=7), patience=2) is None
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=7), patience=1) == 7


def test_map_similarity_is_scale_free():
    a = np.array([[2.0, 1.0], [1.0, 3.0]])
    assert map_similarity(a, 10 * a) == pytest.approx(1.0)
    assert map_similarity(a, -a) == pytest.approx(-1.0)
    # upper triangles [2, 1, 3] vs [1, 2, 3]: Pearson r = 0.5 by hand
    assert map_similarity(a, np.array([[1.0, 2.0], [2.0, 3.0]])) == pytest.approx(0.5)


def test_acf_variation_and_labels_by_hand():
    nacf = np.array([[0.5, 0.2], [0.7, 0.2], [0.7, 0.1]])
    assert acf_variation(nacf) == pytest.approx((0.2 + 0.0 + 0.0 + 0.1) / 4)
    assert acf_variation(np.array([[0.5, np.nan], [0.6, np.nan]])) == pytest.approx(0.1)
    assert np.isnan(acf_variation(nacf[:1]))
    assert characterise(0.05, threshold=0.1) == DOMINANT
    assert characterise(0.15, threshold=0.1) == LEARNING
    assert characterise(float("nan")).startswith("undetermined")
