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


def test_misses_report_lists_undetected_faulty_and_flagged_healthy_clients(tmp_path, capsys):
    from fedsim.analysis.agreement import rank_sum_pvalue, round_weights

    noisy = {0: [1.38, 1.36, 1.34, 1.33, 1.32], 1: [1.39, 1.37, 1.20, 1.10, 1.00], 2: [1.37, 1.35, 1.22, 1.12, 1.02]}
    _run(tmp_path, "same-model-s0-c0-label-noise-0.5", noisy)
    _run(tmp_path, "same-model-s0-fault-free", {k: [1.0] * 5 for k in range(3)})
    columns = "style,seed,condition,fault_kind,fault_level,client,model,is_faulty,cme_verdict,cme_verdict_statistic"
    verdicts = [
        "same-model,0,same-model-s0-c0-label-noise-0.5,label-noise,0.5,0,m,True,dominant,acf_variation_head",
        "same-model,0,same-model-s0-c0-label-noise-0.5,label-noise,0.5,1,m,False,weak,train_loss_rank_sum",
        "same-model,0,same-model-s0-c0-label-noise-0.5,label-noise,0.5,2,m,False,learning,acf_variation_head",
        "same-model,0,same-model-s0-fault-free,none,0,0,m,False,learning,acf_variation_head",
        "same-model,0,same-model-s0-fault-free,none,0,1,m,False,weak,update_norm_rank_sum",
        "same-model,0,same-model-s0-fault-free,none,0,2,m,False,dominant,acf_variation_head",
    ]
    (tmp_path / "clients.csv").write_text("\n".join([columns, *verdicts]) + "\n")
    assert main([str(tmp_path), "--seeds", "0-0", "--test", "misses"]) == 0
    out = capsys.readouterr().out
    # ranks 2, 2, 3, 3, 3 under the verdict's quadratic weights round(64 i^2 / 25) = 3, 10, 23, 41, 64
    w = round_weights(5, "quadratic")
    p = rank_sum_pvalue(float(w @ [2, 2, 3, 3, 3]), 3, 5, w)
    assert (
        f"- same-model-s0-c0-label-noise-0.5: client 0 (m) `dominant` (acf_variation_head); label test p = {p:.3g}, "
        "guard held, highest in 3 of 5 rounds, from round 3 on" in out
    )
    assert "Healthy clients flagged: 2 of 5" in out
    assert "- same-model: 1 `weak` by train_loss_rank_sum" in out and "- same-model: 1 `weak` by update_norm_rank_sum" in out
    assert "more than one run: 1 (same-model seed 0 client 1 x2)" in out
    (tmp_path / "clients.csv").write_text("\n".join([columns, *verdicts[1:]]) + "\n")  # the noisy client detected
    main([str(tmp_path), "--seeds", "0-0", "--test", "misses"])
    assert "Faulty clients not detected:\n\n- none\n" in capsys.readouterr().out
