"""Eq. 3 against numpy.cov (also on the valid entries only), eq. 4 against a direct computation,
the null references against independent computations, saturation, and the verdict rule."""

import dataclasses
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.analysis.agreement import label_tests, rank_sum_band
from fedsim.analysis.cme import (
    DIVERGED,
    DOMINANT,
    EXPLODING_UPDATE_RATIO,
    LABEL_STATISTIC,
    LEARNING,
    MIN_SAME_MODEL_PEERS,
    UNDETERMINED,
    VERDICTS,
    WEAK,
    ClientStatistics,
    Verdict,
    acf_change_null,
    acf_changes,
    acf_from_stats,
    acf_jackknife_se,
    acf_variation,
    band,
    ceiling_bands,
    consecutive_similarities,
    correlation_map,
    covariance_map,
    decide_verdict,
    decide_verdicts,
    exploding_round,
    head_layers,
    magnitude_rank_test,
    map_similarity,
    saturation_round,
    similarity_bands,
    similarity_ceiling,
    similarity_null,
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


def test_covariance_map_uses_only_the_valid_entries(rng):
    """Masked entries (NaN) and a dead row: each entry is numpy.cov of the two rows over the columns
    valid in both; the dead unit's row and column are NaN; a masked 0 would have biased it."""
    c = rng.normal(loc=0.3, size=(6, 12))
    c[rng.random(c.shape) < 0.2] = np.nan
    c[4] = np.nan  # dead unit
    cov = covariance_map(c)
    for a in range(6):
        for b in range(6):
            ok = np.isfinite(c[a]) & np.isfinite(c[b])
            if ok.sum() < 2:
                assert np.isnan(cov[a, b])
            else:
                assert cov[a, b] == pytest.approx(np.cov(c[a, ok], c[b, ok])[0, 1], rel=1e-10, abs=1e-14)
    assert np.isnan(cov[4]).all() and np.isnan(cov[:, 4]).all()
    assert np.allclose(cov, cov.T, equal_nan=True)
    zero_filled = covariance_map(np.nan_to_num(c))
    assert not np.allclose(zero_filled[:4, :4], cov[:4, :4])  # the old behaviour was different


def test_correlation_map(rng):
    c = rng.normal(size=(5, 30))
    np.testing.assert_allclose(correlation_map(covariance_map(c)), np.corrcoef(c), rtol=1e-10)


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


def test_jackknife_se_equals_a_direct_leave_one_group_out(rng):
    sizes = [5, 7, 6, 4, 0, 8]  # one empty group: left out
    a = [rng.normal(size=n) for n in sizes]
    b = [0.6 * x + rng.normal(size=len(x)) for x in a]
    groups = np.array([[len(x), (x * y).sum(), (x * x).sum(), (y * y).sum()] for x, y in zip(a, b, strict=True)])
    loo = []
    for g in range(len(sizes)):
        if sizes[g] == 0:
            continue
        x = np.concatenate([a[k] for k in range(len(sizes)) if k != g])
        y = np.concatenate([b[k] for k in range(len(sizes)) if k != g])
        loo.append((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
    k = len(loo)
    expected = np.sqrt((k - 1) / k * ((np.array(loo) - np.mean(loo)) ** 2).sum())
    assert acf_jackknife_se(groups) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(acf_jackknife_se(groups[:1]))  # one group: no jackknife
    stacked = acf_jackknife_se(np.stack([groups, groups]))  # leading axes broadcast
    np.testing.assert_allclose(stacked, [expected, expected])


def test_acf_change_null_matches_the_half_normal():
    """One layer, one round pair, se 0.03 in both rounds: |N(0, 2 * 0.03^2)| quantiles."""
    nacf = np.array([[0.5], [0.6]])
    se = np.full((2, 1), 0.03)
    per_pair, overall = acf_change_null(nacf, se, samples=40_000, coverage=0.9, seed=1)
    expect = [NormalDist(0, np.sqrt(2) * 0.03).inv_cdf((1 + p) / 2) for p in (0.05, 0.95)]  # half-normal quantiles
    np.testing.assert_allclose(per_pair[0], expect, rtol=0.03)
    np.testing.assert_allclose(overall, expect, rtol=0.03)
    assert acf_change_null(nacf, np.zeros((2, 1)))[1] == (0.0, 0.0)
    assert np.isnan(acf_change_null(nacf, np.full((2, 1), np.nan))[1]).all()  # no se: no band
    assert np.isnan(acf_change_null(nacf[:1], se[:1])[1]).all()  # one round: no change


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
    assert saturation_round(maps, rounds=range(11, 21), threshold=0.9) == 10 + stable_from  # reports the given round numbers
    bands = similarity_bands(maps, samples=50)
    assert saturation_round(maps, threshold=0.9, null_upper=bands[:, 1]) == stable_from
    # a null band above the similarity vetoes saturation
    assert saturation_round(maps, threshold=0.0, null_upper=np.full(9, 1.01)) is None


def test_no_saturation_when_maps_keep_changing(rng):
    maps = _noise_then_pattern(rng, 8, stable_from=99)
    assert saturation_round(maps, threshold=0.9) is None
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=6), threshold=0.9, patience=2) == 6
    # stable from round 7 of 8: only one similar pair follows, patience 2 cannot be confirmed
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=7), threshold=0.9, patience=2) is None
    assert saturation_round(_noise_then_pattern(rng, 8, stable_from=7), threshold=0.9, patience=1) == 7


def _structured_cme(rng, loadings, columns=200, noise=0.5):
    """A CME-like matrix whose rows share a low-rank structure (``loadings``: rows x factors)."""
    return loadings @ rng.normal(size=(loadings.shape[1], columns)) + noise * rng.normal(size=(loadings.shape[0], columns))


def test_noise_ceiling_holds_two_estimates_of_one_map_and_not_a_changed_one(rng):
    a, b = rng.normal(size=(16, 3)), rng.normal(size=(16, 3))
    c1, c2, c3 = _structured_cme(rng, a), _structured_cme(rng, a), _structured_cme(rng, b)
    lo, _ = band(similarity_ceiling(c1, samples=100, seed=1), 0.9)
    same = map_similarity(covariance_map(c1), covariance_map(c2))  # same structure, new draw
    changed = map_similarity(covariance_map(c1), covariance_map(c3))
    assert 0.5 < lo <= same and changed < lo
    np.testing.assert_array_equal(similarity_ceiling(c1, 10, seed=2), similarity_ceiling(c1, 10, seed=2))
    bands = ceiling_bands([c1, c2, c3], samples=40, seed=3)
    assert bands.shape == (2, 2) and np.all(bands[:, 0] < bands[:, 1])


def test_saturation_with_the_calibrated_references_and_no_fixed_threshold(rng):
    """Rounds 1-4 change structure every round, from round 5 the structure stays: saturation at 5,
    found by the permutation null and the noise ceiling alone (default threshold: none)."""
    cmes = [_structured_cme(rng, rng.normal(size=(16, 3))) for _ in range(4)]
    stable = rng.normal(size=(16, 3))
    cmes += [_structured_cme(rng, stable) for _ in range(4)]
    maps = [covariance_map(c) for c in cmes]
    ceiling = ceiling_bands(cmes, samples=40, seed=0)
    null = similarity_bands(maps, samples=50)
    sat = saturation_round(maps, rounds=np.arange(1, 9), null_upper=null[:, 1], ceiling_lower=ceiling[:, 0])
    assert sat == 5 and type(sat) is int  # a plain int: it goes into summary.json
    # the changing pairs sit below the ceiling's lower edge, the stable ones at or above it
    sims = consecutive_similarities(maps)
    assert np.all(sims[:3] < ceiling[:3, 0]) and np.all(sims[4:] >= ceiling[4:, 0])


def test_map_similarity_off_and_on_the_diagonal():
    a = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 2.0], [0.0, 2.0, 9.0]])
    b = np.array([[5.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 1.0]])
    assert map_similarity(a, 10 * a) == pytest.approx(1.0)
    assert map_similarity(a, -a) == pytest.approx(-1.0)
    # off the diagonal: [1, 0, 2] vs [0, 1, 2] -> Pearson r = 0.5 by hand
    assert map_similarity(a, b) == pytest.approx(0.5)
    assert map_similarity(a, b, diagonal=True) == pytest.approx(np.corrcoef(a[np.triu_indices(3)], b[np.triu_indices(3)])[0, 1])
    c = b.copy()
    c[0, 2] = c[2, 0] = np.nan  # entries NaN in either map are left out: [1, 2] vs [0, 2]
    assert map_similarity(a, c) == pytest.approx(np.nan, nan_ok=True)  # < 3 entries
    assert np.isnan(map_similarity(np.eye(3), np.eye(3)))  # constant off-diagonal: undefined


def test_off_diagonal_similarity_of_noise_sits_in_its_permutation_null(rng):
    """The issue's finding: independent noise maps correlate strongly *with* the diagonal and not
    at all without it; the permutation null band is centred on 0 and contains them."""
    maps = [covariance_map(rng.normal(size=(64, 40))) for _ in range(4)]
    with_diag = consecutive_similarities(maps, diagonal=True)
    off = consecutive_similarities(maps)
    bands = similarity_bands(maps, samples=200, coverage=0.98, seed=3)
    assert np.all(with_diag > 0.4) and np.all(np.abs(off) < 0.1)
    assert np.all((bands[:, 0] < off) & (off < bands[:, 1])) and np.all(np.abs(bands).max() < 0.15)
    # a map against itself is far above its permutation null
    assert map_similarity(maps[0], maps[0]) == pytest.approx(1.0)
    assert similarity_null(maps[0], maps[0], 100).max() < 0.2
    np.testing.assert_array_equal(similarity_null(maps[0], maps[1], 20, seed=5), similarity_null(maps[0], maps[1], 20, seed=5))


def test_acf_variation_head_only_and_changes_by_hand():
    nacf = np.array([[0.5, 0.2, 0.9], [0.7, 0.2, 0.1], [0.7, 0.1, 0.1]])
    assert acf_variation(nacf[:, :2]) == pytest.approx((0.2 + 0.0 + 0.0 + 0.1) / 4)
    assert acf_variation(nacf, columns=[0, 1]) == acf_variation(nacf[:, :2])
    assert acf_variation(nacf) == pytest.approx((0.2 + 0 + 0.8 + 0 + 0.1 + 0) / 6)
    np.testing.assert_allclose(acf_changes(nacf, [0, 1]), [0.1, 0.05])
    assert acf_variation(np.array([[0.5, np.nan], [0.6, np.nan]])) == pytest.approx(0.1)
    assert np.isnan(acf_variation(nacf[:1]))


def test_head_layers():
    layers = ["backbone.0.weight", "head.fc1.weight", "head.fc2.weight", "fc2.weight"]
    assert head_layers(layers) == ["head.fc1.weight", "head.fc2.weight"]
    assert head_layers(["conv.weight", "fc2.weight"], fallback=["fc2.weight"]) == ["fc2.weight"]


# ---------------------------------------------------------------------------- the verdict rule
def make_stats(client=0, rounds=4, epochs=2, magnitude=0.05, variation=0.05, vband=(0.01, 0.1), nonfinite=0.0, jump=0.01):
    n = rounds
    rr = np.arange(1, n + 1)
    full = np.full(n, np.nan)
    bands = np.full((n, 2), np.nan)
    return ClientStatistics(
        client=client, model="m", layer="head.fc2.weight", head=("head.fc2.weight",), rounds=rr, epochs=np.full(n, epochs),
        nonfinite_fraction=np.full(n, nonfinite), nonfinite_layer=("head.fc2.weight",) * n, jump_fraction=np.full(n, jump),
        magnitude=np.broadcast_to(np.asarray(magnitude, dtype=float), (n,)).copy(), norm=full, masked_fraction=full,
        dead_fraction=full, dead_unit_fraction=full, similarity=full, similarity_band=bands, ceiling_band=bands, similarity_with_diagonal=full,
        acf_change_head=full, acf_change_head_band=bands, acf_change_all=full, acf_change_all_band=bands,
        acf_variation_head=variation, acf_variation_head_band=vband, acf_variation_all=variation, acf_variation_all_band=vband,
        saturation_round=None,
    )  # fmt: skip


def test_nan_weights_are_diverged_never_a_healthy_label():
    v = decide_verdict(make_stats(nonfinite=0.25, variation=0.5))
    assert v.verdict == DIVERGED and "non-finite" in v.reason and "25.0%" in v.reason
    v = decide_verdict(make_stats(jump=0.8))
    assert v.verdict == DIVERGED and "exploding" in v.reason and v.value == 0.8
    # even in a run too short for anything else
    assert decide_verdict(make_stats(rounds=1, nonfinite=1.0)).verdict == DIVERGED


@pytest.mark.parametrize(("rounds", "epochs"), [(2, 2), (5, 1)])
def test_too_short_runs_are_undetermined_and_say_what_is_missing(rounds, epochs):
    v = decide_verdict(make_stats(rounds=rounds, epochs=epochs))
    assert v.verdict == UNDETERMINED
    assert v.reason.startswith("needs >= 3 rounds with >= 2 local epochs") and f"has {rounds} rounds" in v.reason


def _alike(n=2, model="m"):
    """``n`` same-model peers that move alike (clients 1..n)."""
    return [dataclasses.replace(make_stats(client=k, magnitude=[0.05, 0.04, 0.06, 0.05]), model=model) for k in range(1, n + 1)]


def test_learning_and_dominant_come_from_the_noise_band():
    peers = _alike()
    v = decide_verdict(make_stats(variation=0.2, vband=(0.02, 0.1)), peers)
    assert (v.verdict, v.statistic, v.value, v.band) == (LEARNING, "acf_variation_head", 0.2, (0.02, 0.1))
    assert "above its noise band [0.02, 0.1]" in v.reason
    v = decide_verdict(make_stats(variation=0.08, vband=(0.02, 0.1)), peers)
    assert v.verdict == DOMINANT and "within its noise band" in v.reason
    assert decide_verdict(make_stats(vband=(np.nan, np.nan)), peers).verdict == UNDETERMINED


@pytest.mark.parametrize(("peers", "has"), [((), 0), (_alike(1), 1), (_alike(2, model="other"), 0)])
def test_without_two_same_model_peers_the_contribution_is_undetermined(peers, has):
    """A client is judged only against clients of its own architecture, and the null of those
    tests is the gap between two of them; with fewer the verdict says so (and what the ACF shows)."""
    v = decide_verdict(make_stats(variation=0.2, vband=(0.02, 0.1)), list(peers))
    assert (v.verdict, v.statistic, v.value) == (UNDETERMINED, "same_model_peers", has)
    assert v.reason.startswith(f"needs >= {MIN_SAME_MODEL_PEERS} other clients with the same model (m)") and f"has {has}" in v.reason
    assert "head ACF variation 0.2 is above its noise band [0.02, 0.1]" in v.reason
    # the absolute rules need no peer
    assert decide_verdict(make_stats(jump=0.8), list(peers)).verdict == DIVERGED
    assert decide_verdict(make_stats(magnitude=0.0), list(peers)).verdict == WEAK


def test_weak_when_the_magnitude_ranks_lowest_more_often_than_chance():
    peers = [make_stats(client=1, magnitude=[0.05, 0.04, 0.06, 0.05]), make_stats(client=2, magnitude=[0.03, 0.05, 0.04, 0.06])]
    weak = make_stats(client=0, magnitude=[0.01, 0.02, 0.01, 0.02], variation=0.5)
    v = decide_verdict(weak, peers)
    # lowest of 3 clients in all 4 rounds: rank sum 12, p = (1/3)^4 = 0.012 <= 0.05 / 2
    assert v.verdict == WEAK and v.statistic == "magnitude_rank_sum" and v.value == 12
    assert "lowest of 3 m clients in 4 of 4 rounds" in v.reason and "p = 0.012" in v.reason
    assert v.band == rank_sum_band(3, 4, 0.9)
    # lowest in 3 rounds, second in one: rank sum 11, p = 5/81 + 1/81 = 0.074 > 0.025: the ACF rule decides
    almost = make_stats(client=0, magnitude=[0.01, 0.02, 0.045, 0.02], variation=0.5)
    assert decide_verdict(almost, peers).verdict == LEARNING
    # one same-model peer: not judged (undetermined); magnitudes of other architectures are not compared
    assert decide_verdict(weak, peers[:1]).verdict == UNDETERMINED
    other_arch = [dataclasses.replace(p, model="other") for p in peers]
    assert decide_verdict(weak, other_arch).verdict == UNDETERMINED
    # a much lower magnitude in a 3-client run whose peers are another architecture: still not weak
    assert decide_verdict(weak, [*other_arch, dataclasses.replace(make_stats(client=3), model="other")]).verdict == UNDETERMINED
    # nothing changed at all: weak without any peer
    v = decide_verdict(make_stats(magnitude=0.0))
    assert v.verdict == WEAK and "contributes nothing" in v.reason
    verdicts = decide_verdicts([weak, *peers])
    assert verdicts[0].verdict == WEAK and verdicts[1].verdict == DOMINANT


def test_the_magnitude_guard_compares_ratios():
    """A client ~3x below both same-model peers in every round is weak although, in the last round,
    one peer dropped so that on a linear scale the gap (0.017) is smaller than the peers' spread
    (0.020); as ratios it is 2x below the nearer peer, which is 1.6x below the other."""
    peers = [
        make_stats(client=1, magnitude=[0.071, 0.060, 0.066, 0.034]),
        make_stats(client=2, magnitude=[0.070, 0.059, 0.063, 0.054]),
    ]
    weak = make_stats(client=0, magnitude=[0.027, 0.022, 0.019, 0.017], variation=0.5)
    test = magnitude_rank_test(weak, peers)
    assert test is not None and test.statistic == "log_magnitude" and test.rank_sum == 12
    np.testing.assert_allclose(np.exp(test.own), weak.magnitude)
    v = decide_verdict(weak, peers)
    # medians on the log scale: sqrt(0.022 x 0.019) = 0.0204; peers sqrt(0.059 x 0.063) = 0.0610, sqrt(0.060 x 0.066) = 0.0629
    assert v.verdict == WEAK and "head CME magnitude 0.0204 (median)" in v.reason and "(others 0.061-0.0629)" in v.reason
    # lowest in every round too, but on average only a ratio of exp(0.059) below the nearer peer
    # (per round 0.070/0.068, 0.059/0.057, 0.063/0.060, 0.034/0.030), while the peers are on average
    # exp(0.135) apart (0.071/0.070, 0.060/0.059, 0.066/0.063, 0.054/0.034): not weak
    close = make_stats(client=0, magnitude=[0.068, 0.057, 0.060, 0.030], variation=0.5)
    close_test = magnitude_rank_test(close, peers)
    assert close_test is not None and close_test.rank_sum == 12
    v = decide_verdict(close, peers)
    assert v.verdict == LEARNING
    # the reason keeps the near miss visible: lowest in 4 of 4 rounds has p = (1/3)^4 = 1/81
    assert "not weak: head CME magnitude p = 0.0123 but not clear of the spread (needs p <= 0.025" in v.reason
    # 1.4x below the nearer peer in every round (log 0.34 on average > 0.135) is weak, though in the
    # last round the peers are 1.6x apart: the guard looks at the run, not at its last round
    assert decide_verdict(make_stats(client=0, magnitude=[0.05, 0.042, 0.045, 0.024], variation=0.5), peers).verdict == WEAK


def test_weak_when_its_training_labels_disagree_with_its_model():
    """The label-agreement test (metrics.jsonl) flags a client whose statistic is the highest of
    the run in every round; the CME statistics alone would call it healthy."""
    train = {0: [1.30, 1.25, 1.20, 1.15], 1: [1.38, 1.37, 1.36, 1.36], 2: [1.31, 1.24, 1.18, 1.10]}
    test = {0: [1.31, 1.27, 1.24, 1.20], 1: [1.33, 1.30, 1.27, 1.22], 2: [1.32, 1.27, 1.22, 1.19]}
    rows = [
        {"round": r + 1, "clients": [{"client": k, "train_loss": train[k][r], "test_loss": test[k][r]} for k in range(3)]} for r in range(4)
    ]
    stats = [make_stats(client=k, variation=0.05) for k in range(3)]
    assert {v.verdict for v in decide_verdicts(stats).values()} == {DOMINANT}
    verdicts = decide_verdicts(stats, metrics_rows=rows)
    v = verdicts[1]
    # the label test weighs round i by i: rank 3 in rounds 1-4 sums to 3 x (1 + 2 + 3 + 4) = 30
    assert v.verdict == WEAK and v.statistic.startswith(LABEL_STATISTIC) and v.value == 360
    assert "highest of 3 clients in 4 of 4 rounds" in v.reason and "train loss 1.36 in round 4 (others 1.1-1.15)" in v.reason
    assert verdicts[0].verdict == DOMINANT and verdicts[2].verdict == DOMINANT
    # client 2 (tested for the highest loss) is in the middle in round 1 and the lowest in rounds 2-4:
    # weighted rank sum 1x2 + (2+3+4)x1 = 11; only rank 1 everywhere (sum 10, probability 1/81) is smaller
    assert f"train loss p = {1 - 1 / 81:.3g}" in verdicts[2].reason and "but not clear" not in verdicts[2].reason
    # a diverged client stays diverged whatever its labels
    assert decide_verdict(make_stats(client=1, nonfinite=0.5), stats, labels=label_tests(rows, LABEL_STATISTIC)[1]).verdict == DIVERGED


def test_verdicts_come_from_the_fixed_vocabulary():
    assert VERDICTS == ("weak", "dominant", "learning", "diverged", "undetermined")
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("dominant (stable ACF)", "x", None, None, "")


def test_exploding_relative_to_the_others_gap_is_diverged():
    # others: magnitudes 0.05 / 0.04 (largest log gap |log 0.05 - log 0.04| = 0.223 in round 1);
    # jump fractions 0.01 / 0.02 (gap log 2 = 0.693)
    peers = [
        make_stats(client=1, magnitude=[0.05, 0.05, 0.05, 0.05], jump=0.01),
        make_stats(client=2, magnitude=[0.04, 0.045, 0.05, 0.05], jump=0.02),
    ]
    boom = make_stats(client=0, magnitude=[0.05, 0.5, 0.05, 0.05], jump=0.1)  # jump 0.1: log(0.1/0.02) = 1.61 > 0.693
    hit = exploding_round(boom, peers)
    assert hit is not None and hit[0] == 2
    assert hit[1] == pytest.approx(np.log(0.5 / 0.05)) and hit[2] == pytest.approx(np.log(0.05 / 0.04))
    v = decide_verdict(boom, peers)
    assert v.verdict == DIVERGED and v.statistic == "magnitude_excess" and "round 2" in v.reason
    # a large magnitude alone (jump fraction like the others') is not exploding
    assert exploding_round(make_stats(client=0, magnitude=[0.05, 0.5, 0.05, 0.05], jump=0.015), peers) is None
    # an excess within the others' own gap is not exploding either
    assert exploding_round(make_stats(client=0, magnitude=[0.055, 0.055, 0.055, 0.055], jump=0.1), peers) is None
    # one other client gives no gap: no test
    assert exploding_round(boom, peers[:1]) is None


def test_the_exploding_gap_counts_only_the_rounds_so_far():
    """A client that explodes in round 1 disturbs the aggregate, after which its peers may differ
    a lot from each other; that later spread must not hide round 1."""
    peers = [
        make_stats(client=1, magnitude=[0.05, 0.05, 0.0005, 0.0005], jump=0.01),
        make_stats(client=2, magnitude=[0.05, 0.05, 0.05, 0.05], jump=0.01),  # log gap 4.6 from round 3 on
    ]
    boom = make_stats(client=0, magnitude=[0.5, 0.05, 0.05, 0.05], jump=[0.3, 0.01, 0.01, 0.01])
    hit = exploding_round(boom, peers)
    # round 1: log(0.5 / 0.05) = 2.30 above the larger peer, the peers 0 apart so far (jump: log 30 > 0)
    assert hit is not None and hit[0] == 1 and hit[1] == pytest.approx(np.log(10)) and hit[2] == 0.0
    # the same excess in round 3 is within the gap seen by then
    late = make_stats(client=0, magnitude=[0.05, 0.05, 0.5, 0.05], jump=[0.01, 0.01, 0.3, 0.01])
    assert exploding_round(late, peers) is None


def test_another_model_groups_spread_widens_the_exploding_gap():
    peers = [make_stats(client=1, magnitude=0.05, jump=0.01), make_stats(client=2, magnitude=0.045, jump=0.01)]
    boom = make_stats(client=0, magnitude=[0.05, 0.2, 0.05, 0.05], jump=[0.01, 0.05, 0.01, 0.01])
    assert exploding_round(boom, peers) is not None  # log 4 = 1.39 > log(0.05 / 0.045) = 0.105
    # two clients of another model, 8x apart in magnitude and jump fraction: healthy clients can be that far apart
    other = [dataclasses.replace(make_stats(client=3, magnitude=0.01, jump=0.01), model="o"),
             dataclasses.replace(make_stats(client=4, magnitude=0.08, jump=0.08), model="o")]  # fmt: skip
    assert exploding_round(boom, peers, [other]) is None
    assert decide_verdict(boom, [*peers, *other]).verdict != DIVERGED


def test_the_update_norm_must_corroborate_an_exploding_head():
    peers = [make_stats(client=1, magnitude=0.05, jump=0.01), make_stats(client=2, magnitude=0.045, jump=0.012)]
    boom = make_stats(client=0, magnitude=[0.05, 0.5, 0.05, 0.05], jump=[0.01, 0.3, 0.01, 0.01])
    calm = {0: {1: 1.0, 2: 1.1, 3: 1.0, 4: 1.0}, 1: dict.fromkeys(range(1, 5), 1.0), 2: dict.fromkeys(range(1, 5), 0.9)}
    # the head's CME moved 10x, but its update (1.1) exceeds the larger peer's (1.0) by log 1.1 = 0.095 < log(1 / 0.9) = 0.105
    assert exploding_round(boom, peers, update_norms=calm) is None
    assert decide_verdict(boom, peers, update_norms=calm).verdict != DIVERGED
    # beyond the peers' gap but not an order of magnitude: 5x the larger peer's update is no explosion
    somewhat = {**calm, 0: {1: 1.0, 2: 5.0, 3: 1.0, 4: 1.0}}
    assert EXPLODING_UPDATE_RATIO == 10 and exploding_round(boom, peers, update_norms=somewhat) is None
    assert exploding_round(boom, peers, update_norms={**calm, 0: {1: 1.0, 2: 10.0, 3: 1.0, 4: 1.0}}) is not None
    wild = {**calm, 0: {1: 1.0, 2: 1e4, 3: 1.0, 4: 1.0}}
    hit = exploding_round(boom, peers, update_norms=wild)
    assert hit is not None and hit[0] == 2 and hit.statistics == ("magnitude", "jump_fraction", "update_norm")
    v = decide_verdict(boom, peers, update_norms=wild)
    assert v.verdict == DIVERGED and "in round 2" in v.reason and "its jump fraction and its update norm" in v.reason
    # update norms that do not cover every client are not used
    assert exploding_round(boom, peers, update_norms={0: calm[0]}) is not None


def test_weak_by_the_update_norm_when_the_run_recorded_it():
    """metrics.jsonl's update_norm replaces the head CME magnitude in the weak test: a client whose
    update is ~3x smaller than both peers' in every round is weak although its head CME moves like
    theirs; without update norms the magnitude decides (here: alike, so not weak)."""
    stats = [make_stats(client=k, magnitude=[0.05, 0.04, 0.06, 0.05], variation=0.05) for k in range(3)]
    norms = {0: [0.30, 0.25, 0.22, 0.20], 1: [0.10, 0.09, 0.08, 0.07], 2: [0.32, 0.26, 0.21, 0.19]}
    rows = [{"round": r + 1, "clients": [{"client": k, "model": "m", "update_norm": norms[k][r]} for k in range(3)]} for r in range(4)]
    verdicts = decide_verdicts(stats, metrics_rows=rows)
    v = verdicts[1]
    assert v.verdict == WEAK and v.statistic == "update_norm_rank_sum" and v.value == 12
    # the median of 0.09 and 0.08 on the log scale: sqrt(0.0072) = 0.0849
    assert "update norm 0.0849 (median) lowest of 3 m clients in 4 of 4 rounds" in v.reason
    assert verdicts[0].verdict == DOMINANT and verdicts[2].verdict == DOMINANT
    no_norms = [{"round": r["round"], "clients": [{"client": c["client"], "model": "m"} for c in r["clients"]]} for r in rows]
    assert decide_verdicts(stats, metrics_rows=no_norms)[1].verdict == DOMINANT
