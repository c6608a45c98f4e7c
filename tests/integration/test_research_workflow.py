"""A researcher's workflow on three tiny runs (two strategies, two seeds): TensorBoard and MLflow
read back equal metrics.jsonl, fedsim export / compare on them, and a run repeated through
``fedsim run --config OLD/config.json`` (Ray) gives the same metrics.

The three runs are made once per module on the in-process grid (bit-identical to Ray with the
torch thread count of a Ray actor: tests/server/test_inprocess.py); the repeat goes through the CLI
and Flower's Simulation Engine, so it also checks that a Ray run records ``epochs`` and ``wall_s``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.cme import CMEArchive
from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
T975_DF1 = 12.7062  # Student's t, 0.975 quantile, 1 degree of freedom (two seeds)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``a``: fedavg seed 0 with CMEs, tracked in TensorBoard; ``b``: fedavg seed 1, tracked in
    MLflow (TensorBoard without the extra); ``c``: equal_avg seed 0, no tracker. 2 rounds x 2
    local epochs, three small CNNs, 120 synthetic images of 32 px."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.clients.app import app
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid, ray_client_threads
    from fedsim.study.federation import quiet_logs

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    root = tmp_path_factory.mktemp("workflow")
    base = RunConfig(profile="tiny", models=("small_cnn",) * 3, strategy="fedavg")
    specs = {
        "a": {"seed": 0, "cme": True, "tracker": "tensorboard"},
        "b": {"seed": 1, "tracker": "mlflow" if HAS_MLFLOW else "tensorboard"},
        "c": {"seed": 0, "strategy": "equal_avg", "tracker": "none"},
    }
    for name, kw in specs.items():
        cfg = resolve_config(dataclasses.replace(base, out=str(root / name), **kw))
        with quiet_logs():
            run_server(InProcessGrid(app, cfg.clients, num_threads=ray_client_threads(cfg.client_cpus)), cfg)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return {name: root / name for name in specs}


def _expected_round_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    """tag -> {round: value}, computed here from metrics.jsonl (not with fedsim.tracking)."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for c in row["clients"]:
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
                out.setdefault(f"client{c['client']}/{key}", {})[row["round"]] = c[key]
        for key, v in row["global"].items():
            out.setdefault(f"global/{key}", {})[row["round"]] = v
        out.setdefault("round/wall_s", {})[row["round"]] = row["wall_s"]
    return out


def _expected_epoch_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for c in row["clients"]:
            for e, metrics in enumerate(c["epochs"]):
                for key, v in metrics.items():
                    out.setdefault(f"client{c['client']}/epoch/train_{key}", {})[(row["round"] - 1) * 2 + e + 1] = v
    return out


def test_metrics_rows_carry_epochs_and_wall_time(runs):
    for row in RunDir(runs["a"]).read_metrics():
        assert row["wall_s"] > 0
        for c in row["clients"]:
            assert len(c["epochs"]) == 2  # tiny: 2 local epochs
            # brain_mri reports its last epoch's train metrics: the per-epoch record ends with them
            assert c["epochs"][-1] == {"loss": c["train_loss"], "accuracy": c["train_accuracy"]}


def test_tensorboard_event_files_hold_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    rows = RunDir(runs["a"]).read_metrics()
    acc = EventAccumulator(str(runs["a"] / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = _expected_round_scalars(rows) | _expected_epoch_scalars(rows)
    arch = CMEArchive(runs["a"])
    for k in arch.clients:  # CME L2 norms of the analysis layer, per epoch
        norms = arch.stats(k, "head.fc2.weight", "l2")  # (rounds, epochs)
        expected[f"client{k}/cme/head.fc2.weight/l2"] = {r * 2 + e + 1: norms[r, e] for r in range(2) for e in range(2)}
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == {step: np.float32(v) for step, v in values.items()}, tag  # TensorBoard stores float32
    content = acc.PluginTagToContent("hparams")
    data = {k: plugin_data_pb2.HParamsPluginData.FromString(v) for k, v in content.items()}
    start = next(d.session_start_info for d in data.values() if d.WhichOneof("data") == "session_start_info")
    config = json.loads((runs["a"] / "config.json").read_text())
    assert start.hparams["seed"].number_value == config["seed"] == 0
    assert start.hparams["strategy"].string_value == "fedavg" and start.hparams["models"].string_value == "small_cnn,small_cnn,small_cnn"
    assert any(d.WhichOneof("data") == "session_end_info" for d in data.values())  # the run finished


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is an optional extra: pip install 'fedsim[mlflow]' (the test extra installs it)")
def test_mlflow_store_holds_metrics_jsonl(runs):
    from mlflow import MlflowClient

    rows = RunDir(runs["b"]).read_metrics()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs['b'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "b"
    assert run.data.params["seed"] == "1" and run.data.params["strategy"] == "fedavg"
    assert run.data.tags["fedsim.version.torch"] == json.loads((runs["b"] / "config.json").read_text())["environment"]["versions"]["torch"]
    expected = _expected_round_scalars(rows) | _expected_epoch_scalars(rows)
    assert set(run.data.metrics) == set(expected)
    for tag, values in expected.items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert got == values, tag  # MLflow keeps float64: exactly the metrics.jsonl values


def test_export_csv_from_the_command_line(runs, capsys):
    assert main(["export", str(runs["c"]), "--csv"]) == 0
    rows = RunDir(runs["c"]).read_metrics()
    with open(runs["c"] / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["round"], r["client"]) for r in table] == [
        ("1", "0"),
        ("1", "1"),
        ("1", "2"),
        ("1", "global"),
        ("2", "0"),
        ("2", "1"),
        ("2", "2"),
        ("2", "global"),
    ]
    for line in rows:
        for c in line["clients"]:
            got = next(r for r in table if r["round"] == str(line["round"]) and r["client"] == str(c["client"]))
            assert all(float(got[k]) == c[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"))
            assert int(got["num_examples"]) == c["num_examples"] and float(got["wall_s"]) == line["wall_s"]
        glob = next(r for r in table if r["round"] == str(line["round"]) and r["client"] == "global")
        assert float(glob["test_accuracy"]) == line["global"]["accuracy"] and glob["model"] == "small_cnn"


def test_compare_two_strategies_two_seeds(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--out", str(out)]) == 0
    assert (out / "compare.png").stat().st_size > 10_000
    md = (out / "compare.md").read_text()
    assert md.strip() == capsys.readouterr().out.split("\n", 1)[1].strip()  # the table is printed too
    finals = {n: RunDir(runs[n]).read_metrics()[-1] for n in "abc"}
    fedavg = next(line for line in md.splitlines() if line.startswith("| fedavg |"))
    equal = next(line for line in md.splitlines() if line.startswith("| equal_avg |"))
    for k in range(3):
        x = [finals[n]["clients"][k]["test_accuracy"] for n in "ab"]
        mean, half = (x[0] + x[1]) / 2, T975_DF1 * abs(x[0] - x[1]) / 2
        assert f"{mean:.3f} ± {half:.3f} (small_cnn)" in fedavg.split(" | ")[4 + k]
        assert f"{finals['c']['clients'][k]['test_accuracy']:.3f} (small_cnn)" == equal.split(" | ")[4 + k]
    g = [finals[n]["global"]["accuracy"] for n in "ab"]
    assert fedavg.endswith(f"| {(g[0] + g[1]) / 2:.3f} ± {T975_DF1 * abs(g[0] - g[1]) / 2:.3f} |")
    assert "| fedavg | 2 | different (iid) | same (small_cnn) |" in md and "| equal_avg | 1 |" in md


def test_a_run_repeated_from_its_config_json_gives_identical_metrics(runs, tmp_path):
    """The repeat goes through the CLI and Ray; flags override the file (here: no tracker)."""
    new = tmp_path / "repeat"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "--config", str(runs["a"] / "config.json"), "--out", str(new), "--tracker", "none"],
        check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    old_rows, new_rows = RunDir(runs["a"]).read_metrics(), RunDir(new).read_metrics()
    assert RunDir(new).read_results() == RunDir(runs["a"]).read_results()
    assert all(r["wall_s"] > 0 for r in new_rows) and len(old_rows) == len(new_rows) == 2
    old, repeat = (json.loads((d / "config.json").read_text()) for d in (runs["a"], new))
    assert repeat["tracker"] == "none" and repeat["out"] == str(new)
    differ = {k for k in old if old[k] != repeat[k]}
    assert differ == {"tracker", "out", "environment"} or differ == {
        "tracker",
        "out",
    }  # environment: same machine, maybe not the same git state
    assert repeat["environment"]["versions"]["flwr"] and repeat["environment"]["machine"]["cpu_count"] >= 1
    assert not (new / "tb").exists() and math.isfinite(new_rows[-1]["global"]["accuracy"])
