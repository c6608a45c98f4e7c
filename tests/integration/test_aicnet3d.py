"""aicnet3d end to end: ``fedsim run --task aicnet3d --profile tiny --rounds 2 --cme`` with 3
clients (Ray simulation through the CLI), then ``fedsim analyze``: CME figures of the task's
default layer and the task's CARE / Grad-CAM figures."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT_METRICS = ("accuracy", "sensitivity", "specificity", "f1", "auc", "balanced_accuracy", "loss")


def test_tiny_run_writes_per_client_metrics_and_figures(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "--task", "aicnet3d", "--profile", "tiny", "--rounds", "2",
           "--task-option", "finetune-rounds=1", "--cme", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
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
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "analyze", str(out)], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    figs = out / "analysis"
    task_figs = sorted(figs.glob("aicnet3d_care_gradcam_*.png"))
    assert len(task_figs) == 4 and all(p.stat().st_size > 1000 for p in task_figs)
    assert {p.name for p in figs.glob("client*_cme.png")} == {"client0_cme.png", "client1_cme.png", "client2_cme.png"}
    assert '"layer": "conv5.0.weight"' in (figs / "summary.json").read_text()
    # fedsim compare leads with the task's primary metric (AUC): final per-client and global values
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "compare", str(out), "--out", str(tmp_path / "cmp")],
                          cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    cells = [f"{c['test_auc']:.3f} (aicnet3d_hemiretinal)" if math.isfinite(c["test_auc"]) else "-" for c in rows[-1]["clients"]]
    assert f"| {' | '.join(cells)} | {rows[-1]['global']['auc']:.3f} |" in table and "`test_auc`" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
