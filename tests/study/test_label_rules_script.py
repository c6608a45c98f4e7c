"""``benchmarks/cme_label_rules.py`` scores variants of the weak tests on a study folder: checked on
hand-made runs (a label-noise client above its peers in the later rounds; a few-data client whose
update is far below its peers' on average but not in the last round; a free rider; fault-free runs)."""

from __future__ import annotations

import json

from benchmarks.cme_label_rules import load, main, score, score_contribution


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


def _norm_run(root, name, norms):
    d = root / "runs" / name
    d.mkdir(parents=True)
    rows = [
        {"round": r + 1, "clients": [{"client": k, "model": "m", "train_loss": 1.0, "update_norm": v[r]} for k, v in norms.items()]}
        for r in range(5)
    ]
    (d / "study_record.json").write_text(json.dumps({"metrics": rows}))


def test_scores_the_contribution_guards(tmp_path, capsys):
    # client 0 has half its peers' update in rounds 1-4 and 0.95 of the smaller one in round 5:
    # lowest in every round (p = 3^-5 = 0.004); in the last round log(1/0.95) = 0.051 below the
    # nearer peer, less than the peers' log range log(1.1) = 0.095; on average
    # (4 x log 2 + 0.051) / 5 = 0.56 below, more than the mean range 0.095
    few = {0: [0.5, 0.5, 0.5, 0.5, 0.95], 1: [1.0] * 5, 2: [1.1] * 5}
    _norm_run(tmp_path, "mixed-s0-c0-few-data-0.1", few)
    _norm_run(tmp_path, "mixed-s0-c0-free-rider-0.01", {0: [1e-4] * 5, 1: [1.0] * 5, 2: [1.1] * 5})
    _norm_run(tmp_path, "mixed-s0-fault-free", {0: [1.0, 1.1, 1.0, 1.1, 1.0], 1: [1.1, 1.0, 1.1, 1.0, 1.1], 2: [1.05] * 5})
    runs = load(tmp_path, range(1))
    last = score_contribution(runs, "clear_outlier")
    avg = score_contribution(runs, "outlier_on_average")
    assert last[("mixed", "few-data")] == [0, 1] and avg[("mixed", "few-data")] == [1, 1]
    assert last[("mixed", "free-rider")] == avg[("mixed", "free-rider")] == [1, 1]
    assert avg[("mixed", "healthy")] == [0, 7]  # 2 + 2 peers of the faulty clients + 3 fault-free clients
    assert score_contribution(runs, "outlier_overall")[("mixed", "few-data")] == [1, 1]
    assert main([str(tmp_path), "--seeds", "0-0", "--test", "contribution"]) == 0
    out = capsys.readouterr().out
    assert "| clear_outlier | - | - | - | 0/1 | 1/1 | 0/7 |" in out and "| outlier_on_average | - | - | - | 1/1 | 1/1 | 0/7 |" in out
