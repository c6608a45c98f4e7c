"""Rank-sum tests and label agreement (fedsim.analysis.agreement), checked against enumeration
and hand-made metrics rows."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from fedsim.analysis.agreement import (
    clear_outlier,
    client_series,
    label_tests,
    outlier_in_last_round,
    outlier_on_average,
    outlier_overall,
    pooled_spread,
    rank_sum_band,
    rank_sum_pvalue,
    rank_sum_test,
    round_weights,
    update_tests,
)


@pytest.mark.parametrize(("clients", "rounds"), [(2, 5), (3, 4), (4, 3)])
def test_rank_sum_pvalue_and_band_match_enumeration(clients, rounds):
    sums = np.array([sum(c) for c in itertools.product(range(1, clients + 1), repeat=rounds)])
    for s in range(rounds, clients * rounds + 1):
        assert rank_sum_pvalue(s, clients, rounds) == pytest.approx(np.mean(sums >= s))
    assert rank_sum_pvalue(rounds - 3, clients, rounds) == 1.0
    assert rank_sum_pvalue(clients * rounds + 1, clients, rounds) == 0.0
    lo, hi = rank_sum_band(clients, rounds, coverage=0.8)
    assert np.mean(sums < lo) <= 0.1 < np.mean(sums <= lo)
    assert np.mean(sums > hi) <= 0.1 < np.mean(sums >= hi)


@pytest.mark.parametrize(("clients", "weights"), [(3, (1, 2, 3, 4)), (2, (1, 2, 3, 4, 5)), (4, (2, 1, 3))])
def test_weighted_rank_sum_pvalue_and_band_match_enumeration(clients, weights):
    sums = np.array([np.dot(weights, c) for c in itertools.product(range(1, clients + 1), repeat=len(weights))])
    for s in np.unique(sums):
        assert rank_sum_pvalue(s, clients, len(weights), weights) == pytest.approx(np.mean(sums >= s))
        assert rank_sum_pvalue(s - 0.5, clients, len(weights), weights) == pytest.approx(np.mean(sums >= s))  # rounded up
    lo, hi = rank_sum_band(clients, len(weights), 0.8, weights)
    assert np.mean(sums < lo) <= 0.1 < np.mean(sums <= lo)
    assert np.mean(sums > hi) <= 0.1 < np.mean(sums >= hi)
    with pytest.raises(ValueError, match="positive integer weights"):
        rank_sum_pvalue(5, clients, len(weights), [0] * len(weights))


def test_linear_weighting_counts_the_later_rounds_more():
    np.testing.assert_array_equal(round_weights(4, "linear"), [1, 2, 3, 4])
    np.testing.assert_array_equal(round_weights(3), [1, 1, 1])
    with pytest.raises(ValueError, match="valid: flat, linear, quadratic"):
        round_weights(3, "late")
    # bottom in rounds 1-2, top in rounds 3-5: flat sum 1+1+3+3+3 = 11; linear 1+2+9+12+15 = 39
    own, peers = [0.0, 0.0, 3.0, 3.0, 3.0], [[1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]]
    flat, linear = rank_sum_test(own, peers), rank_sum_test(own, peers, weighting="linear")
    assert flat is not None and linear is not None
    assert flat.rank_sum == 11 and linear.rank_sum == 39 and linear.weighting == "linear"
    assert linear.p_value == pytest.approx(7 / 81) and flat.p_value == pytest.approx(32 / 81)  # enumerated by the test above
    assert linear.band(0.8) == rank_sum_band(3, 5, 0.8, [1, 2, 3, 4, 5])


def test_quadratic_weighting_is_i_squared_for_8_rounds_and_capped_for_long_runs():
    np.testing.assert_array_equal(round_weights(8, "quadratic"), np.arange(1, 9) ** 2)
    np.testing.assert_array_equal(round_weights(4, "quadratic"), [4, 16, 36, 64])  # 64 i^2 / 16
    long = round_weights(200, "quadratic")
    assert long.max() == 64 and long.min() == 1 and np.all(np.diff(long) >= 0)
    # bottom in rounds 1-2, top in rounds 3-5; weights round(64 i^2 / 25) = 3, 10, 23, 41, 64
    own, peers = [0.0, 0.0, 3.0, 3.0, 3.0], [[1.0] * 5, [2.0] * 5]
    t = rank_sum_test(own, peers, weighting="quadratic")
    assert t is not None and t.weighting == "quadratic"
    w = np.array([3, 10, 23, 41, 64])
    assert t.rank_sum == 3 + 10 + 3 * (23 + 41 + 64)
    sums = np.array([w @ np.array(r) for r in itertools.product([1, 2, 3], repeat=5)])  # every ranking, enumerated
    assert t.p_value == pytest.approx(np.mean(sums >= t.rank_sum))


def test_rank_sum_pvalue_refuses_degenerate_input():
    with pytest.raises(ValueError, match="2 clients"):
        rank_sum_pvalue(3, 1, 3)


def test_rank_sum_test_by_hand():
    t = rank_sum_test([3.0, 3.0, 3.0], [[1.0, 2.0, 1.0], [2.0, 1.0, 2.0]])
    assert t is not None
    np.testing.assert_array_equal(t.ranks, [3, 3, 3])
    assert t.rank_sum == 9 and t.top_rounds == 3 and t.p_value == pytest.approx((1 / 3) ** 3)
    # "low": the smallest value gets the top rank
    low = rank_sum_test([0.1, 0.5], [[0.2, 0.4]], direction="low")
    assert low is not None
    np.testing.assert_array_equal(low.ranks, [2, 1])
    np.testing.assert_array_equal(low.own, [0.1, 0.5])
    # ties count half; rounds with a non-finite value are left out
    tie = rank_sum_test([1.0, 1.0, np.nan], [[1.0, 0.0, 0.0]], rounds=[4, 5, 6])
    assert tie is not None
    np.testing.assert_array_equal(tie.ranks, [1.5, 2])
    np.testing.assert_array_equal(tie.rounds, [4, 5])
    assert tie.p_value == pytest.approx(0.25)  # P(S >= 4) for two rounds of two clients
    assert rank_sum_test([np.nan], [[1.0]]) is None
    assert rank_sum_test([1.0], np.empty((0, 1))) is None
    with pytest.raises(ValueError, match="direction"):
        rank_sum_test([1.0], [[0.0]], direction="up")


def _rows(train_losses: dict[int, list[float | None]], test_losses: dict[int, list[float]]) -> list[dict]:
    rounds = len(next(iter(train_losses.values())))
    return [
        {"round": r + 1, "clients": [{"client": k, "train_loss": train_losses[k][r], "test_loss": test_losses[k][r]} for k in train_losses]}
        for r in range(rounds)
    ]


def test_label_gap_and_its_test_find_the_client_with_disagreeing_labels():
    train = {0: [1.2, 1.1, 1.0, 0.9], 1: [1.3, 1.3, 1.35, 1.3], 2: [1.25, 1.05, 0.95, None]}
    test = {0: [1.2, 1.15, 1.1, 1.0], 1: [1.2, 1.15, 1.1, 1.05], 2: [1.2, 1.1, 1.0, 1.0]}
    gaps = client_series(_rows(train, test), "label_gap")
    np.testing.assert_allclose(gaps[1][1], [0.1, 0.15, 0.25, 0.25])
    assert np.isnan(gaps[2][1][3])  # a missing loss is NaN, not 0
    tests = label_tests(_rows(train, test), "label_gap")
    t1 = tests[1]
    assert t1 is not None and t1.statistic == "label_gap"
    # round 4 is left out (client 2 has no train loss); client 1 has the highest gap in rounds 1-3
    np.testing.assert_array_equal(t1.rounds, [1, 2, 3])
    assert t1.rank_sum == 9 and t1.p_value == pytest.approx((1 / 3) ** 3)
    t0 = tests[0]
    assert t0 is not None and t0.p_value > 0.5


def test_last_round_outlier_guard_by_hand():
    # last round: 1.36 vs others 1.15 and 1.10: 0.21 above the largest, the others 0.05 apart
    t = rank_sum_test([1.3, 1.36], [[1.2, 1.15], [1.2, 1.10]])
    assert t is not None and outlier_in_last_round(t)
    # a persistent but small lead: 1.16 vs 1.15 / 1.10 is not further from them than they are apart
    small = rank_sum_test([1.3, 1.16], [[1.2, 1.15], [1.2, 1.10]])
    assert small is not None and not outlier_in_last_round(small)
    # "low" mirrors it: 0.01 below 0.05 / 0.06 by 0.04 > 0.01
    low = rank_sum_test([0.01], [[0.05], [0.06]], direction="low")
    assert low is not None and outlier_in_last_round(low)
    # with one peer there is no spread to compare with
    one = rank_sum_test([5.0], [[1.0]])
    assert one is not None and not outlier_in_last_round(one)


def test_clear_outlier_needs_the_last_round_and_the_median_by_hand():
    # medians over 3 rounds: own 1.28, others 1.20 / 1.10 -> 0.08 above, others 0.10 apart: not clear
    # (last round 1.36 vs 1.15 / 1.10 alone would pass)
    t = rank_sum_test([1.28, 1.25, 1.36], [[1.20, 1.25, 1.15], [1.10, 1.05, 1.10]])
    assert t is not None and outlier_in_last_round(t) and not outlier_overall(t) and not clear_outlier(t)
    # own medians 1.40 vs 1.20 / 1.15: 0.20 above, others 0.05 apart; and the last round passes too
    t = rank_sum_test([1.40, 1.42, 1.36], [[1.20, 1.25, 1.15], [1.15, 1.05, 1.10]])
    assert t is not None and outlier_overall(t) and clear_outlier(t)
    # the median alone is not enough: last round 1.16 vs 1.15 / 1.10
    t = rank_sum_test([1.40, 1.42, 1.16], [[1.20, 1.25, 1.15], [1.15, 1.05, 1.10]])
    assert t is not None and outlier_overall(t) and not clear_outlier(t)
    # "low" mirrors it
    low = rank_sum_test([0.01, 0.02, 0.01], [[0.05, 0.05, 0.05], [0.06, 0.06, 0.06]], direction="low")
    assert low is not None and clear_outlier(low)


def test_outlier_on_average_weighs_the_rounds_like_its_test_by_hand():
    # per round: own - largest other = -0.05, 0.00, 0.25; others' range = 0.05, 0.05, 0.05
    own, peers = [1.35, 1.30, 1.40], [[1.40, 1.30, 1.15], [1.35, 1.25, 1.10]]
    # flat: mean excess 0.2 / 3 = 0.067 > mean range 0.05
    flat = rank_sum_test(own, peers)
    assert flat is not None and outlier_on_average(flat)
    # linear: (-0.05 + 0 + 3 x 0.25) / 6 = 0.117 > 0.05 as well; a last round only 0.05 above is not
    weak = rank_sum_test([1.35, 1.30, 1.20], peers, weighting="linear")
    assert weak is not None and not outlier_on_average(weak)  # (-0.05 + 0 + 3 x 0.05) / 6 = 0.017 < 0.05
    # the widest range of another model group counts per round: 0.5 apart in every round
    wide = dataclasses.replace(flat, spread_groups=(np.array([[2.0, 2.0, 2.0], [2.5, 2.5, 2.5]]),))
    assert not outlier_on_average(wide)
    # an early-round lead that fades is not an outlier under linear weights, but is under flat ones
    # excess 0.25, 0.00, -0.05 with ranges 0.05: flat (0.25 + 0 - 0.05) / 3 = 0.067 > 0.05,
    # linear (0.25 + 0 - 0.15) / 6 = 0.017 < 0.05
    fading = ([1.45, 1.15, 1.10], [[1.20, 1.15, 1.15], [1.15, 1.10, 1.10]])
    f, lin = rank_sum_test(*fading), rank_sum_test(*fading, weighting="linear")
    assert f is not None and lin is not None
    assert outlier_on_average(f) and not outlier_on_average(lin)
    # with one peer there is no spread to compare with
    one = rank_sum_test([5.0], [[1.0]])
    assert one is not None and not outlier_on_average(one)


def test_outlier_on_average_low_is_below_the_smallest_other_by_hand():
    # log update norms: own - smallest other = -0.7, -0.7, -0.2 (a last round only 0.2 below)
    own, peers = [-1.0, -1.0, -0.5], [[-0.3, -0.2, -0.3], [-0.2, -0.3, -0.25]]
    t = rank_sum_test(own, peers, direction="low")
    assert t is not None
    # below the smallest other by (0.7 + 0.7 + 0.2) / 3 = 0.533 > mean range (0.1 + 0.1 + 0.05) / 3 = 0.083
    assert outlier_on_average(t)
    # the last-round guard of clear_outlier needs 0.2 > 0.05 there too, but not with a wider last round
    wide_last = rank_sum_test(own, [[-0.3, -0.2, -0.3], [-0.2, -0.3, 0.0]], direction="low")
    assert wide_last is not None and outlier_on_average(wide_last) and not clear_outlier(wide_last)
    # another model group 1.2 apart in every round: pooled spread (0.1 + 1.2) / 2, 0.65, (0.05 + 1.2) / 2,
    # mean 0.642 > 0.533 -> not an outlier
    wide = dataclasses.replace(t, spread_groups=(np.array([[0.0, 0.0, 0.0], [1.2, 1.2, 1.2]]),))
    assert not outlier_on_average(wide)
    # the highest client is not below anyone
    high = rank_sum_test([0.5, 0.5, 0.5], peers, direction="low")
    assert high is not None and not outlier_on_average(high)


def test_another_model_groups_spread_makes_the_guard_more_conservative():
    # 0.8 vs peers 1.0 / 1.05: 0.2 below, peers 0.05 apart -> an outlier among its own model
    t = rank_sum_test([0.8, 0.8, 0.8], [[1.0, 1.0, 1.0], [1.05, 1.05, 1.05]], direction="low")
    assert t is not None and clear_outlier(t)
    # another model's clients are 0.5 apart: pooled with the peers' 0.05, healthy clients are
    # (0.05 + 0.5) / 2 = 0.275 apart, more than the client's 0.2
    wide = dataclasses.replace(t, spread_groups=(np.array([[2.0, 2.0, 2.0], [2.5, 2.5, 2.5], [2.1, 2.1, 2.1]]),))
    assert not outlier_in_last_round(wide) and not outlier_overall(wide) and not clear_outlier(wide)
    # the spreads are pooled (mean), not the largest taken: 0.3 apart gives (0.05 + 0.3) / 2 = 0.175 < 0.2
    mid = dataclasses.replace(t, spread_groups=(np.array([[2.0, 2.0, 2.0], [2.3, 2.3, 2.3]]),))
    assert clear_outlier(mid)
    np.testing.assert_allclose(pooled_spread(np.array([[1.0, 2.0], [1.05, 2.5]]), [np.array([0.3, 0.1])]), [0.175, 0.3])
    narrow = dataclasses.replace(t, spread_groups=(np.array([[2.0, 2.0, 2.0], [2.1, 2.1, 2.1]]),))
    assert clear_outlier(narrow)


def test_update_tests_on_the_log_scale_with_the_other_models_spread():
    norms = {0: [0.3, 0.3, 0.3], 1: [0.1, 0.1, 0.1], 2: [0.32, 0.3, 0.31], 3: [1.0, 1.0, 1.0], 4: [2.0, 1.0, 1.5], 5: [0.0, 0.0, 0.0]}
    models = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}
    rows = [{"round": r + 1, "clients": [{"client": k, "model": models[k], "update_norm": norms[k][r]} for k in norms]} for r in range(3)]
    tests = update_tests(rows)
    t1 = tests[1]
    assert t1 is not None and t1.direction == "low" and t1.statistic == "update_norm" and t1.rank_sum == 9
    np.testing.assert_allclose(t1.own, np.log([0.1, 0.1, 0.1]))
    # the spread of model "b" (two clients) on the same rounds and log scale; "c" has one client: no spread
    (b,) = t1.spread_groups
    np.testing.assert_allclose(b, np.log([[1.0, 1.0, 1.0], [2.0, 1.0, 1.5]]))
    # log(0.3 / 0.1) = 1.10 below the nearer peer; model b's last-round spread log 1.5 = 0.41, medians log 1.5 too
    assert clear_outlier(t1)
    assert tests[5] is None  # no other client of model "c"
    # a zero update (a client that returned what it got) is the lowest, not undefined
    zero = update_tests([{"round": 1, "clients": [{"client": k, "model": "a", "update_norm": v} for k, v in enumerate([0.0, 0.2, 0.3])]}])[
        0
    ]
    assert zero is not None and zero.rank_sum == 3 and zero.own[0] == pytest.approx(np.log(1e-12))
