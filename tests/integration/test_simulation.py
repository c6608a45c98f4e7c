"""Ray simulations through the CLI, as a user runs them (Flower Simulation Engine, Ray backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsim.cme import CMEArchive
from fedsim.data.folder import KAGGLE_CLASSES
from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPECTED_MODELS = {
    1: ["resnet50", "densenet121", "alexnet_skip"],
    2: ["resnet50"] * 3,
    3: ["resnet50", "densenet121", "alexnet_skip"],
    4: ["resnet50"] * 3,
}


def fedsim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def check_outputs(out: Path, rounds: int, models: list[str]) -> list[dict]:
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert [c["model"] for c in r["clients"]] == models
        for c in r["clients"]:
            assert c["num_examples"] > 0 and 0 <= c["train_accuracy"] <= 1 and 0 <= c["test_accuracy"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["client_models"] == models and cfg["rounds"] == rounds
    assert RunDir(out).load_params()  # final global parameters written
    return rows


def test_scenario1_with_cme_then_analyze(tmp_path):
    """The CME issue's acceptance command: record CMEs in scenario 1, then 'fedsim analyze'."""
    out = tmp_path / "s1"
    fedsim("run", "--scenario", "1", "--profile", "tiny", "--rounds", "3", "--cme", "--out", str(out), cwd=tmp_path)
    rows = check_outputs(out, 3, EXPECTED_MODELS[1])
    assert sorted(RunDir(out).load_params()) == sorted(
        ["head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"]
    )
    arch = CMEArchive(out)
    assert arch.clients == [0, 1, 2] and all(arch.rounds(c) == [1, 2, 3] for c in arch.clients)
    assert [arch.model(c) for c in arch.clients] == EXPECTED_MODELS[1]
    assert arch.matrix(2, 3, "head.fc2.weight").shape == (128, 128)
    proc = fedsim("analyze", str(out), cwd=tmp_path)
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert [c["client"] for c in summary["clients"]] == [0, 1, 2]
    for c, row in zip(summary["clients"], rows[-1]["clients"], strict=True):
        assert c["verdict"] in ("weak", "dominant", "learning", "undetermined") and c["reason"] and c["acf_variation"] >= 0
        assert c["saturation_round"] in (None, 1, 2, 3) and c["final_test_accuracy"] == row["test_accuracy"]
        assert (out / "analysis" / f"client{c['client']}_cme.png").stat().st_size > 10_000
    assert "client 2 alexnet_skip" in proc.stdout and (out / "analysis" / "report.md").exists()


@pytest.mark.parametrize("scenario", [2, 3, 4])
def test_scenario_tiny(scenario, tmp_path):
    out = tmp_path / f"s{scenario}"
    proc = fedsim("run", "--scenario", str(scenario), "--profile", "tiny", "--rounds", "2", "--out", str(out), cwd=tmp_path)
    rows = check_outputs(out, 2, EXPECTED_MODELS[scenario])
    assert "2 rounds finished" in proc.stdout
    params = RunDir(out).load_params()
    if scenario in (2, 4):  # whole ResNet50 aggregated -> evaluated on the global test set
        assert all(r["global"] is not None for r in rows) and "backbone.conv1.weight" in params
    else:  # only the standardized head is shared
        assert all(r["global"] is None for r in rows)
        assert sorted(params) == sorted(["head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"])
    sizes = [c["num_examples"] for c in rows[0]["clients"]]
    assert sizes == ([27, 27, 27] if scenario == 2 else [82, 82, 82])  # iid thirds vs identical


def test_same_seed_same_metrics(tmp_path):
    args = ["run", "--profile", "tiny", "--models", "small_cnn,small_cnn,small_cnn", "--rounds", "2", "--strategy", "fedavg"]
    fedsim(*args, "--out", str(tmp_path / "a"), cwd=tmp_path)
    fedsim(*args, "--out", str(tmp_path / "b"), cwd=tmp_path)
    fedsim(*args, "--seed", "1", "--out", str(tmp_path / "c"), cwd=tmp_path)
    a, b, c = (RunDir(tmp_path / x).read_results() for x in "abc")  # all but the wall times
    assert a == b and a != c
    pa, pb = RunDir(tmp_path / "a").load_params(), RunDir(tmp_path / "b").load_params()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_flower_strategies_end_to_end(strategy, tmp_path):
    """Flower's FedProx (clients add the proximal term) and FedAdam run through a whole federation,
    including whole-model sharing with BatchNorm statistics."""
    out = tmp_path / strategy
    fedsim("run", "--profile", "tiny", "--rounds", "2", "--strategy", strategy, "--models",
           "small_cnn,small_cnn,small_cnn", "--out", str(out), cwd=tmp_path)  # fmt: skip
    rows = check_outputs(out, 2, ["small_cnn"] * 3)
    assert all(np.isfinite(c["test_loss"]) for r in rows for c in r["clients"])
    assert all(np.isfinite(r["global"]["loss"]) for r in rows)
    params = RunDir(out).load_params()
    assert all(np.isfinite(v).all() for v in params.values())


def test_real_image_folder(tmp_path):
    """--data-dir with the Kaggle layout trains on those files (48 small synthetic jpg/png files)."""
    rng = np.random.default_rng(0)
    for split, n in (("Training", 9), ("Testing", 3)):
        for c, name in enumerate(KAGGLE_CLASSES):
            for i in range(n):
                arr = (rng.random((28 + i, 36)) * 60 + 50 * c).astype(np.uint8)
                img = Image.fromarray(arr).convert("RGB" if i % 2 else "L")
                (tmp_path / "kaggle" / split / name).mkdir(parents=True, exist_ok=True)
                img.save(tmp_path / "kaggle" / split / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    out = tmp_path / "real"
    fedsim("run", "--data-dir", str(tmp_path / "kaggle"), "--profile", "tiny", "--rounds", "1",
           "--models", "small_cnn,small_cnn,small_cnn", "--out", str(out), cwd=tmp_path)  # fmt: skip
    rows = check_outputs(out, 1, ["small_cnn"] * 3)
    # 48 files: 7 held out for the global test set, 41 split 14/14/13, 20 % local test each
    assert [c["num_examples"] + c["num_test_examples"] for c in rows[0]["clients"]] == [14, 14, 13]


def test_bad_input_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        check=False, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "expected either the Kaggle layout" in proc.stderr
    assert not (tmp_path / "o").exists()
