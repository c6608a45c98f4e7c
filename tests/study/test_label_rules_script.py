"""``benchmarks/cme_label_rules.py`` scores label-test variants on a study folder: checked on two
hand-made runs (a label-noise client above its peers in the later rounds, and a fault-free run)."""

from __future__ import annotations

import json

from benchmarks.cme_label_rules import load, main, score


def _run(root, name, losses):
    d = root / "runs" / name
    d.mkdir(parents=True)
    rows = [{"round": r + 1, "clients": [{"client": k, "model": "m", "train_loss": v[r]} for k, v in losses.items()]} for r in range(5)]
    (d / "study_record.json").write_text(json.dumps({"metrics": rows}))


def test_scores_the_label_noise_client_and_the_healthy_ones(tmp_path, capsys):
    # client 0 is at chance in rounds 1-2 (middle rank), then clearly the highest: flat rank sum
    # 2+2+3+3+3 = 13, p = 7/81 > 0.025; linear 2+4+9+12+15 = 42, p = 6/243 <= 0.025
    noisy = {0: [1.38, 1.36, 1.34, 1.33, 1.32], 1: [1.39, 1.37, 1.20, 1.10, 1.00], 2: [1.37, 1.35, 1.22, 1.12, 1.02]}
    _run(tmp_path, "same-model-s0-c0-label-noise-0.5", noisy)
    _run(
        tmp_path,
        "same-model-s0-fault-free",
        {0: [1.2, 1.1, 1.0, 0.9, 0.8], 1: [1.21, 1.12, 1.0, 0.92, 0.8], 2: [1.19, 1.1, 1.01, 0.9, 0.81]},
    )
    _run(tmp_path, "same-model-s0-c1-lazy-0.1", noisy)  # not a bar condition: left out
    runs = load(tmp_path, range(1))
    assert sorted(runs) == ["same-model-s0-c0-label-noise-0.5", "same-model-s0-fault-free"]
    flat = score(runs, "train_loss", "flat", "outlier_on_average")
    linear = score(runs, "train_loss", "linear", "outlier_on_average")
    assert flat[("same-model", "label-noise")] == [0, 1] and linear[("same-model", "label-noise")] == [1, 1]
    assert linear[("same-model", "healthy")] == [0, 5]  # 2 peers of the label-noise client + 3 fault-free clients
    assert main([str(tmp_path), "--seeds", "0-0"]) == 0
    assert "| train_loss | linear | outlier_on_average | 1/1 | 0/5 | - | - |" in capsys.readouterr().out
