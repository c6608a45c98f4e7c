"""aicnet3d end to end: ``fedsim run --task aicnet3d --profile tiny --rounds 2`` with 3 clients
(Ray simulation through the CLI), then the task's CARE / Grad-CAM figures from the run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.clients.tasks import get_task
from fedsim.config import RunConfig
from fedsim.server.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT_METRICS = ("accuracy", "sensitivity", "specificity", "f1", "auc", "balanced_accuracy", "loss")


def _config_from_run(out: Path) -> RunConfig:
    d = json.loads((out / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"extra"}
    kw = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return RunConfig(**kw)


def test_tiny_run_writes_per_client_metrics_and_figures(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "--task", "aicnet3d", "--profile", "tiny", "--rounds", "2",
           "--task-option", "finetune-rounds=1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["clients"]) == 3
        for c in r["clients"]:
            assert c["model"] == "aicnet3d_hemiretinal" and c["num_examples"] > 0
            for key in CLIENT_METRICS:
                v = c[f"test_{key}"]
                assert isinstance(v, float) and (math.isnan(v) or (0 <= v <= 1 if key != "loss" else v > 0))
            assert c["train_stage"] == float(r["round"])  # finetune-rounds=1: round 2 is stage 2
        assert r["global"] is not None and 0 <= r["global"]["auc"] <= 1
    assert "consistency" in " ".join(rows[1]["clients"][0]) and "train_consistency" not in rows[0]["clients"][0]
    params = RunDir(out).load_params()
    assert "att1.attn.0.q.weight" in params and "conv5.0.weight" in params  # whole model aggregated
    cfg = _config_from_run(out)
    paths = get_task("aicnet3d").analysis_figures(out, cfg, tmp_path / "figs")
    assert len(paths) == 4 and all(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)
