"""The study's pure statistics: AUROC against hand-computed values, update geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.study.stats import auroc, summarise_rounds, update_geometry


@pytest.mark.parametrize(
    ("faulty", "healthy", "expected"),
    [
        ([3.0], [1.0, 2.0], 1.0),  # above both
        ([0.0], [1.0, 2.0], 0.0),  # below both
        ([1.0], [1.0, 2.0], 0.25),  # tie (1/2) with 1, below 2: (0.5 + 0) / 2
        ([2.0, 4.0], [1.0, 2.0, 3.0], 0.75),  # 2: 1 + 0.5 + 0; 4: 3 -> 4.5 / 6
        ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5),  # all tied
        ([5.0, 0.0], [1.0, 2.0], 0.5),  # one above both, one below both
        ([math.inf], [1e300, math.inf], 0.75),  # inf is an ordinary value, tied with inf
    ],
)
def test_auroc_hand_computed(faulty, healthy, expected):
    assert auroc(faulty, healthy) == pytest.approx(expected)


def test_auroc_matches_the_mann_whitney_count_on_random_scores():
    rng = np.random.default_rng(0)
    f, h = rng.integers(0, 5, 7).astype(float), rng.integers(0, 5, 9).astype(float)
    u = sum((a > b) + 0.5 * (a == b) for a in f for b in h)
    assert auroc(f, h) == pytest.approx(u / (7 * 9))
    assert auroc(h, f) == pytest.approx(1 - u / (7 * 9))  # swapping the groups mirrors it


def test_auroc_nan_policies_and_empty_groups():
    with pytest.raises(ValueError, match="NaN"):
        auroc([math.nan], [1.0])
    assert auroc([math.nan], [1.0, 2.0], nan="high") == 1.0
    assert auroc([math.nan], [1.0, 2.0], nan="low") == 0.0
    assert auroc([math.nan, 3.0], [1.0, 2.0], nan="omit") == 1.0
    assert auroc([None], [math.inf], nan="high") == 0.5  # NaN ranks with +inf
    assert math.isnan(auroc([], [1.0])) and math.isnan(auroc([1.0], [math.nan], nan="omit"))
    with pytest.raises(ValueError, match="nan must be"):
        auroc([1.0], [2.0], nan="drop")


def test_update_geometry_by_hand():
    g = update_geometry({0: np.array([3.0, 4.0]), 1: np.array([3.0, 4.0]), 2: np.array([-3.0, -4.0])})
    assert g[0]["norm"] == pytest.approx(5.0)
    # mean update = (1, 4/3) ... = [3, 4] / 3: parallel to client 0's
    assert g[0]["cos_mean"] == pytest.approx(1.0) and g[2]["cos_mean"] == pytest.approx(-1.0)
    # others of client 0: mean of [3, 4] and [-3, -4] = 0 -> undefined
    assert math.isnan(g[0]["cos_others"])
    assert g[2]["cos_others"] == pytest.approx(-1.0)  # the others agree with each other, against it


def test_update_geometry_leaves_a_nonfinite_update_out_of_the_means():
    g = update_geometry({0: np.array([1.0, 0.0]), 1: np.array([np.nan, 1.0]), 2: np.array([1.0, 1.0])})
    assert g[1]["finite"] == 0.0 and g[1]["norm"] == math.inf and math.isnan(g[1]["cos_mean"])
    assert g[0]["cos_others"] == pytest.approx(1 / math.sqrt(2))  # to client 2 only
    assert np.isfinite(g[2]["cos_mean"])


def test_summarise_rounds():
    s = summarise_rounds([1.0, math.nan, 3.0, math.inf])
    assert s == {"mean": 2.0, "first": 1.0, "last": math.inf}
    assert summarise_rounds([math.inf, math.inf])["mean"] == math.inf
