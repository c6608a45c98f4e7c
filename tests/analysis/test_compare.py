"""fedsim compare and fedsim export on hand-made run directories (pure functions, no training):
conditions, the t-interval over seeds, the Table-2-shaped markdown and the long CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from fedsim.analysis.compare import compare_curves, compare_runs, final_table, group_conditions, load_run, mean_interval, t_quantile
from fedsim.analysis.runs import write_csv
from fedsim.config import ConfigError, RunConfig
from fedsim.rundir import RunDir

#: Student's t 0.975 quantiles from a printed table (df 1, 2, 4, 30).
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 30: 2.0423}


def test_t_quantile_matches_the_printed_table():
    for df, t in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)


def test_mean_interval_over_runs():
    values = np.array([[0.2, 0.5, np.nan], [0.4, 0.5, 0.9], [0.3, 0.8, np.nan]])
    mean, low, high = mean_interval(values)
    assert mean[0] == pytest.approx(0.3) and mean[2] == pytest.approx(0.9)
    assert high[0] - mean[0] == pytest.approx(T975[2] * 0.1 / math.sqrt(3), abs=1e-4)  # sd 0.1, n 3
    assert math.isnan(low[2]) and math.isnan(high[2])  # one run: no interval


def _run(root, name: str, strategy: str, seed: int, finals: list[float], glob: float | None, rounds: int = 3, **cfg):
    rd = RunDir(root / name).create()
    config = RunConfig(profile="tiny", models=("small_cnn",) * len(finals), strategy=strategy, seed=seed, **cfg).to_json_dict()
    rd.write_config(config | {"partition": "iid", "out": str(rd.path), "server_model": "small_cnn"})
    for r in range(1, rounds + 1):
        clients = [
            {"client": k, "model": "small_cnn", "test_accuracy": v * r / rounds, "train_loss": 1.0 / r} for k, v in enumerate(finals)
        ]
        rd.append_metrics(
            {"round": r, "clients": clients, "global": None if glob is None else {"accuracy": glob * r / rounds}, "wall_s": 0.5}
        )
    return rd.path


@pytest.fixture
def three_runs(tmp_path):
    return [
        _run(tmp_path, "a", "fedavg", 0, [0.6, 0.3, 0.9], 0.5),
        _run(tmp_path, "b", "fedavg", 1, [0.8, 0.5, 0.7], 0.7),
        _run(tmp_path, "c", "fedprox", 0, [0.4, 0.4, 0.4], None),
    ]


def test_runs_differing_only_by_seed_form_one_condition(three_runs):
    runs = [load_run(p) for p in three_runs]
    groups = group_conditions(runs, "strategy")
    assert [(label, [r.path.name for r in g]) for label, g in groups] == [("fedavg", ["a", "b"]), ("fedprox", ["c"])]
    curves = {(c.label, c.series): c for c in compare_curves(runs, "test_accuracy", "strategy")}
    assert set(curves) == {("fedavg", "clients (mean)"), ("fedavg", "global model"), ("fedprox", "clients (mean)")}
    fed = curves[("fedavg", "clients (mean)")]
    per_run = np.array([[np.mean([0.6, 0.3, 0.9]) * r / 3 for r in (1, 2, 3)], [np.mean([0.8, 0.5, 0.7]) * r / 3 for r in (1, 2, 3)]])
    np.testing.assert_allclose(fed.mean, per_run.mean(axis=0))
    half = T975[1] * np.abs(per_run[0] - per_run[1]) / 2  # sd = |x1 - x2| / sqrt(2), over sqrt(2)
    np.testing.assert_allclose(fed.high - fed.mean, half, atol=1e-3)
    np.testing.assert_allclose(curves[("fedavg", "global model")].mean, [0.6 * r / 3 for r in (1, 2, 3)])
    by_model = compare_curves(runs, "test_accuracy", "model")
    assert {c.label for c in by_model} == {"small_cnn (strategy=fedavg)", "global model (strategy=fedavg)", "small_cnn (strategy=fedprox)"}


def test_table_has_the_final_metric_per_client_and_the_global_model(three_runs, tmp_path):
    res = compare_runs(three_runs, tmp_path / "cmp", metric="accuracy")
    assert res.figure.stat().st_size > 10_000 and res.table.read_text() == res.markdown
    fedavg, fedprox = final_table([load_run(p) for p in three_runs], "test_accuracy", "strategy")
    assert [round(m, 6) for _, m, _ in fedavg.clients] == [0.7, 0.4, 0.8]
    assert fedavg.clients[0][2] == pytest.approx(T975[1] * 0.2 / 2, abs=1e-3) and fedavg.global_model[0] == pytest.approx(0.6)
    assert fedprox.global_model is None and fedprox.runs == 1
    lines = res.markdown.splitlines()
    assert lines[0] == "| condition | runs | data at clients | models at clients | client 0 | client 1 | client 2 | global model |"
    assert lines[2].startswith("| fedavg | 2 | different (iid) | same (small_cnn) | 0.700 ± 1.271 (small_cnn) | 0.400 ± 1.271 (small_cnn)")
    assert (
        lines[3] == "| fedprox | 1 | different (iid) | same (small_cnn) | 0.400 (small_cnn) | 0.400 (small_cnn) | 0.400 (small_cnn) | - |"
    )


def test_bad_compare_input_is_refused_by_name(three_runs, tmp_path):
    with pytest.raises(ConfigError, match="unknown --by 'lr'; valid choices: strategy, scenario, model"):
        compare_runs(three_runs, tmp_path / "x", by="lr")
    with pytest.raises(ConfigError, match="no run reports 'test_auc'; metrics in these runs: test_accuracy, train_loss"):
        compare_runs(three_runs, tmp_path / "x", metric="auc")
    other = _run(tmp_path, "d", "fedavg", 0, [0.5], 0.5, task="aicnet3d", clients=1)
    with pytest.raises(ConfigError, match="different tasks"):
        compare_runs([three_runs[0], other], tmp_path / "x")


def test_export_csv_is_long_format(three_runs):
    out = write_csv(three_runs[0])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = RunDir(three_runs[0]).read_metrics()
    assert len(rows) == sum(len(line["clients"]) + 1 for line in lines)  # every client + the global model, per round
    assert list(rows[0]) == ["round", "client", "model", "test_accuracy", "train_loss", "wall_s"]  # metrics in first-seen order
    by_key = {(r["round"], r["client"]): r for r in rows}
    for line in lines:
        for c in line["clients"]:
            got = by_key[(str(line["round"]), str(c["client"]))]
            assert float(got["test_accuracy"]) == c["test_accuracy"] and float(got["train_loss"]) == c["train_loss"]
        glob = by_key[(str(line["round"]), "global")]
        assert float(glob["test_accuracy"]) == line["global"]["accuracy"] and glob["train_loss"] == "" and glob["model"] == "small_cnn"


def test_by_scenario_labels_conditions_by_scenario(tmp_path):
    paths = [_run(tmp_path, f"s{n}", "fedavg", 0, [0.5, 0.5, 0.5], None, scenario=n) for n in (2, 4)]
    groups = group_conditions([load_run(p) for p in paths], "scenario")
    assert [label for label, _ in groups] == ["scenario 2", "scenario 4"]
