"""h3denet end to end: ``fedsim run --task h3denet --profile tiny --rounds 2 --cme`` with 3 clients
(Ray simulation through the CLI), then ``fedsim analyze``: CME figures of the head layer and the
task's landmark figures."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUMMARY = ("mre", "sd", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm")


def test_tiny_run_writes_per_client_mm_metrics_and_landmark_figures(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "--task", "h3denet", "--profile", "tiny", "--rounds", "2",
           "--cme", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["clients"]) == 3
        for c in r["clients"]:
            assert c["model"] == "h3denet" and c["num_examples"] > 0 and c["num_test_examples"] > 0
            for key in SUMMARY:
                for suffix in ("", "_missing"):
                    v = c[f"test_{key}{suffix}"]
                    assert isinstance(v, float) and v >= 0 and (not key.startswith("sdr") or v <= 100)
            assert c["test_landmarks"] > 0 and math.isfinite(c["train_loss"])
        assert r["global"] is not None and r["global"]["mre"] > 0 and r["global"]["mre-missing"] > 0
    params = RunDir(out).load_params()
    assert "backbone.stages.0.0.attn.qkv.weight" in params or any(".attn." in k for k in params)
    assert "head.conv.weight" in params  # whole model aggregated
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "analyze", str(out)], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    figs = out / "analysis"
    task_figs = sorted(figs.glob("h3denet_landmarks_*.png"))
    assert len(task_figs) == 4 and all(p.stat().st_size > 1000 for p in task_figs)
    assert {p.name for p in figs.glob("client*_cme.png")} == {"client0_cme.png", "client1_cme.png", "client2_cme.png"}
    assert '"layer": "head.conv.weight"' in (figs / "summary.json").read_text()
    assert "h3denet_landmarks_0" in (figs / "report.md").read_text()
    # fedsim compare leads with the task's primary metric (MRE in mm): final per-client and global values
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "compare", str(out), "--out", str(tmp_path / "cmp")],
                          cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    cells = [f"{c['test_mre']:.3f} (h3denet)" for c in rows[-1]["clients"]]
    assert f"| {' | '.join(cells)} | {rows[-1]['global']['mre']:.3f} |" in table and "`test_mre`" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
