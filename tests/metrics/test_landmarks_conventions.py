"""Both MRE conventions on a hand-computed 3-case example: pooled (all landmarks as one sample,
population SD) and the paper's per-case (mean of case means, SD of case means with N - 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.metrics.landmarks import case_mean_metrics, landmark_metrics

NAN = math.nan
# case means: (1 + 2 + 3) / 3 = 2; (4 + 6) / 2 = 5 (one missing); 8 / 1 = 8 (two missing)
ERRORS = np.array([[1.0, 2.0, 3.0], [4.0, NAN, 6.0], [NAN, 8.0, NAN]])


def test_per_case_and_pooled_conventions_by_hand():
    m = landmark_metrics(ERRORS)
    # per case: mean(2, 5, 8) = 5; SD with N - 1 = sqrt(((-3)^2 + 0 + 3^2) / 2) = 3
    assert m["mre-case"] == pytest.approx(5.0) and m["sd-case"] == pytest.approx(3.0)
    # pooled: the six errors 1, 2, 3, 4, 6, 8: mean 4, population SD sqrt((9 + 4 + 1 + 0 + 4 + 16) / 6)
    assert m["mre"] == pytest.approx(4.0) and m["sd"] == pytest.approx(math.sqrt(34 / 6))
    # incomplete subset (cases 2 and 3): case means 5 and 8 -> 6.5 +/- sqrt(4.5); pooled 4, 6, 8 -> 6
    assert m["mre-case-missing"] == pytest.approx(6.5) and m["sd-case-missing"] == pytest.approx(math.sqrt(4.5))
    assert m["mre-missing"] == pytest.approx(6.0) and m["sd-missing"] == pytest.approx(math.sqrt(8 / 3))
    assert m["sdr-4mm"] == pytest.approx(100 * 4 / 6) and m["landmarks"] == 6


def test_per_case_edge_cases():
    assert math.isnan(case_mean_metrics(np.array([[1.0, 3.0]]))["sd-case"])  # one case: no SD
    assert case_mean_metrics(np.array([[1.0, 3.0]]))["mre-case"] == 2.0
    out = case_mean_metrics(np.array([[NAN, NAN], [1.0, 3.0], [5.0, NAN]]))  # an all-missing case is left out
    assert out == {"mre-case": 3.5, "sd-case": pytest.approx(math.sqrt(4.5))}
    empty = case_mean_metrics(np.zeros((0, 3)))
    assert math.isnan(empty["mre-case"]) and math.isnan(empty["sd-case"])
