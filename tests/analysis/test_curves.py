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


def _drawn(ax) -> set[tuple[tuple[float, ...], tuple[float, ...]]]:
    return {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines if len(line.get_xdata())}


def test_display_draws_the_computed_arrays():
    c = client_curves(ROWS)
    fig = ClientCurvesDisplay(c).plot()
    acc_ax, loss_ax = fig.axes
    assert ((1.0, 2.0), (0.5, 0.7)) in _drawn(acc_ax)  # client 1, test accuracy
    assert ((1.0, 2.0), (0.3, 0.5)) in _drawn(acc_ax)  # client 0, train accuracy
    assert ((1.0,), (0.25,)) in _drawn(acc_ax)  # client 0's test accuracy: round 2 missing, a gap
    assert ((1.0, 2.0), (1.2, 0.9)) in _drawn(loss_ax)  # client 1, train loss
    assert len(_drawn(acc_ax)) == 4
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert "client 0 (resnet50)" in labels and "client 1 (densenet121)" in labels


def test_display_long_form_breaks_lines_at_missing_rounds():
    rows = [{"round": r, "clients": [{"client": 0, "model": "m", "test_loss": v}]} for r, v in ((1, 1.0), (2, None), (3, 0.5), (4, 0.4))]
    data = ClientCurvesDisplay(client_curves(rows)).long_form("loss")
    assert data["round"] == [1, 3, 4] and data["loss"] == [1.0, 0.5, 0.4] and data["segment"] == [1, 2, 2]


def test_null_metrics_stay_nan():
    rows = [{"round": 1, "clients": [{"client": 0, "model": "m", "test_auc": None, "train_auc": 0.5}]}]
    c = client_curves(rows)
    assert np.isnan(c.values["train_auc"][0, 0]) is np.False_ and c.values["train_auc"][0, 0] == 0.5
    assert "test_auc" not in c.values or np.isnan(c.values["test_auc"][0, 0])
