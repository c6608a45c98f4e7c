import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fedsim.analysis import ClientCurvesDisplay, client_curves

ROWS = [
    {
        "round": 1,
        "clients": [
            {"client": 0, "model": "resnet50", "train_accuracy": 0.3, "test_accuracy": 0.25, "train_loss": 1.4, "test_loss": 1.5},
            {"client": 1, "model": "densenet121", "train_accuracy": 0.4, "test_accuracy": 0.5, "train_loss": 1.2, "test_loss": 1.1},
        ],
    },
    {
        "round": 2,
        "clients": [
            {"client": 1, "model": "densenet121", "train_accuracy": 0.6, "test_accuracy": 0.7, "train_loss": 0.9, "test_loss": 0.8},
            {"client": 0, "model": "resnet50", "train_accuracy": 0.5},
        ],
    },
]


def test_client_curves_arrays():
    c = client_curves(ROWS)
    assert c.clients == (0, 1) and c.models == ("resnet50", "densenet121")
    np.testing.assert_array_equal(c.rounds, [1, 2])
    np.testing.assert_array_equal(c.values["train_accuracy"], [[0.3, 0.5], [0.4, 0.6]])
    assert np.isnan(c.values["test_accuracy"][0, 1]) and c.values["test_accuracy"][1, 1] == 0.7
    with pytest.raises(ValueError, match="no rounds to plot"):
        client_curves([])


def test_display_draws_the_computed_arrays():
    c = client_curves(ROWS)
    fig = ClientCurvesDisplay(c).plot()
    acc_ax, loss_ax = fig.axes
    test_line = acc_ax.lines[2]  # client 1, test accuracy
    np.testing.assert_array_equal(test_line.get_xdata(), c.rounds)
    np.testing.assert_array_equal(test_line.get_ydata(), c.values["test_accuracy"][1])
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), c.values["train_loss"][0])


def test_null_metrics_stay_nan():
    rows = [{"round": 1, "clients": [{"client": 0, "model": "m", "test_auc": None, "train_auc": 0.5}]}]
    c = client_curves(rows)
    assert np.isnan(c.values["train_auc"][0, 0]) is np.False_ and c.values["train_auc"][0, 0] == 0.5
    assert "test_auc" not in c.values or np.isnan(c.values["test_auc"][0, 0])
