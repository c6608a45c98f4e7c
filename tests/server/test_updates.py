"""Server-side update statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.server.updates import update_stats


def test_norms_and_cosines_by_hand():
    sent = {"w": np.array([1.0, 1.0], np.float32), "steps": np.array([5], np.int64)}  # int arrays are ignored
    returned = {
        0: {"w": np.array([2.0, 1.0]), "steps": np.array([6])},  # u0 = (1, 0)
        1: {"w": np.array([1.0, 3.0]), "steps": np.array([6])},  # u1 = (0, 2)
        2: {"w": np.array([1.0, 1.0]), "steps": np.array([6])},  # u2 = (0, 0): a free-rider
    }
    s = update_stats(sent, returned)
    assert s[0]["update_norm"] == pytest.approx(1.0) and s[1]["update_norm"] == pytest.approx(2.0) and s[2]["update_norm"] == 0.0
    # u0 vs mean(u1, u2) = (0, 1): orthogonal; u1 vs mean(u0, u2) = (0.5, 0): orthogonal
    assert s[0]["update_cosine"] == pytest.approx(0.0) and s[1]["update_cosine"] == pytest.approx(0.0)
    assert math.isnan(s[2]["update_cosine"])  # a zero update has no direction
    assert all(v["update_finite"] for v in s.values())


def test_cosine_of_aligned_and_opposed_updates():
    sent = {"w": np.zeros(3)}
    s = update_stats(
        sent, {0: {"w": np.array([1.0, 2.0, 3.0])}, 1: {"w": np.array([2.0, 4.0, 6.0])}, 2: {"w": np.array([-1.0, -2.0, -3.0])}}
    )
    # u0 vs mean(u1, u2) = (0.5, 1, 1.5): +1; u2 vs mean(u0, u1) = (1.5, 3, 4.5): -1
    assert s[0]["update_cosine"] == pytest.approx(1.0) and s[2]["update_cosine"] == pytest.approx(-1.0)


def test_non_finite_updates_are_flagged_and_left_out_of_the_others_mean():
    sent = {"w": np.zeros(2)}
    s = update_stats(sent, {0: {"w": np.array([np.nan, 1.0])}, 1: {"w": np.array([1.0, 0.0])}, 2: {"w": np.array([1.0, 0.0])}})
    assert not s[0]["update_finite"] and s[0]["update_norm"] == math.inf and math.isnan(s[0]["update_cosine"])
    assert s[1]["update_finite"] and s[1]["update_cosine"] == pytest.approx(1.0)  # vs client 2 only
    single = update_stats(sent, {0: {"w": np.array([1.0, 0.0])}})
    assert math.isnan(single[0]["update_cosine"])
