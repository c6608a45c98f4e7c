"""``benchmarks/cme_label_entropy.py``: the loss beyond predictive entropy and the margins it
tabulates, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.cme_label_entropy import label_statistics, margins


def test_label_statistics_by_hand():
    # p = (3/4, 1/4) for both images; labels 0 and 1
    logits = np.array([[math.log(3), 0.0], [math.log(3), 0.0]])
    s = label_statistics(logits, np.array([0, 1]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["CE"] == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    assert s["H"] == pytest.approx(h)
    assert s["CE - H"] == pytest.approx(s["CE"] - h)
    assert s["error"] == 0.5
    # labels drawn as the model predicts (3 of 4 the likelier class): CE equals H exactly
    four = np.repeat(logits[:1], 4, axis=0)
    assert label_statistics(four, np.array([0, 0, 0, 1]))["CE - H"] == pytest.approx(0.0, abs=1e-12)


def test_margins():
    assert margins([1.0, 3.0, 2.0], ["m", "m", "m"], 1) == pytest.approx(1.0)  # noisy client 1 above the highest peer
    assert margins([1.0, 3.0, 2.0], ["m", "m", "m"], 0) == pytest.approx(-2.0)
    assert margins([1.0, 3.0, 2.0], ["m", "m", "m"], None) == pytest.approx(1.0)  # highest minus second highest
    assert margins([5.0, 3.0, 2.0], ["a", "b", "b"], None) == pytest.approx(1.0)  # within the largest group only
    assert margins([5.0, 3.0, 2.0], ["a", "b", "b"], 0) is None  # no peer of its model
