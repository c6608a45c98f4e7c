"""The CME validation study: its plan, its tables, and a tiny study end to end (in-process)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time

import numpy as np
import pytest

from fedsim.rundir import RunDir
from fedsim.study import cme_validation as cv
from fedsim.study.federation import RECORD_FILE, with_update_norms


def test_plan_of_the_tiny_size(monkeypatch):
    size = cv.SIZES["tiny"]
    monkeypatch.setattr(cv, "with_fault", lambda cfg, spec: cfg)  # only the plan is checked here
    plan = cv.plan_study(size)
    names = [c.name for c in plan.conditions]
    assert names == [
        "same-model-s0-fault-free", "same-model-s0-c0-few-data-0.1", "same-model-s1-fault-free", "same-model-s1-c1-few-data-0.1",
        "mixed-s0-fault-free", "mixed-s0-c0-few-data-0.1", "mixed-s1-fault-free", "mixed-s1-c1-few-data-0.1",
    ]  # fmt: skip
    # leave-one-out runs: every client of each fault-free run, shared with the faulty client of the faulty run
    # (tiny: 3 same-model clients, 4 mixed clients)
    loo_jobs = [j for j in plan.jobs.values() if j.absent]
    assert len(loo_jobs) == 2 * 3 + 2 * 4 and len(plan.jobs) == 8 + 14
    assert plan.loo[("mixed-s1-c1-few-data-0.1", 1)] == "mixed-s1-fault-free-without1"
    assert ("mixed-s1-c1-few-data-0.1", 0) not in plan.loo  # healthy clients of faulty runs: loo="full" only
    assert all(not j.cme and not j.probe for j in loo_jobs)
    full = cv.plan_study(dataclasses.replace(size, loo="full"))
    assert len(full.jobs) == 8 + 14 + 2 * 2 + 2 * 3 and full.loo[("mixed-s1-c1-few-data-0.1", 0)] == "mixed-s1-c1-few-data-0.1-without0"
    cfg = next(c for c in plan.conditions if c.style == "mixed").config(size)
    assert cfg.models == ("small_cnn", "alexnet_skip", "small_cnn", "alexnet_skip") and cfg.server_model == "small_cnn" and cfg.rounds == 3
    # every client of both styles holds the same share of the images
    same = next(c for c in plan.conditions if c.style == "same-model").config(size)
    assert (same.clients, same.num_samples, cfg.clients, cfg.num_samples) == (3, 120, 4, 160)
    default = cv.SIZES["default"]
    assert (default.clients_for("mixed"), default.samples_for("mixed"), default.samples_for("same-model")) == (6, 2400, 1200)


def test_size_overrides():
    size = cv.size_for("tiny", seeds=3, loo="full")
    assert size.seeds == (0, 1, 2) and size.loo == "full" and size.faults == cv.SIZES["tiny"].faults
    assert cv.size_for("default") is cv.SIZES["default"]


def test_default_size_is_the_issue_grid():
    size = cv.SIZES["default"]
    assert len(size.seeds) >= 10 and set(size.styles) == {"same-model", "mixed"}
    assert {k for k, _ in size.faults} == {"few-data", "label-noise", "lazy", "free-rider", "diverge"}
    assert len(size.faults) == 10 and ("few-data", 0.1) in size.faults and ("label-noise", 0.5) in size.faults


def _row(style, kind, level, faulty, score, seed=0, client=0):
    return {"style": style, "fault_kind": kind, "fault_level": level, "is_faulty": faulty, "seed": seed, "client": client, "s": score}


def test_auroc_table_groups_by_style_kind_and_level():
    rows = [
        _row("a", "lazy", 0.1, True, 5.0), _row("a", "lazy", 0.1, False, 1.0), _row("a", "lazy", 0.1, False, 2.0),
        _row("a", "lazy", 0.01, True, 0.0), _row("a", "lazy", 0.01, False, 1.0),
        _row("a", "none", None, False, 1.5), _row("a", "none", None, False, math.nan),
    ]  # fmt: skip
    table = {(t["fault_level"]): t for t in cv.auroc_table(rows, ["s"])}
    assert set(table) == {0.1, 0.01, "all"}
    assert table[0.1]["auroc"] == 1.0 and table[0.01]["auroc"] == 0.0
    assert table["all"]["auroc"] == 0.5  # faulty 5 > healthy 1, 2, 1 (3 pairs); faulty 0 < all of them: 3 / 6
    assert table[0.01]["direction"] == "lower" and table[0.01]["auroc_best"] == 1.0
    # vs the fault-free clients: NaN (undefined) is left out and counted
    assert table[0.1]["auroc_vs_fault_free"] == 1.0 and table["all"]["n_fault_free"] == 2
    assert table["all"]["missing_faulty"] == 0 and table["all"]["infinite_faulty"] == 0
    md = cv.auroc_markdown(cv.auroc_table(rows, ["s"])).splitlines()
    assert md[0] == "| statistic | a lazy |" and md[2] == "| s | 0.50 |"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    out = tmp_path_factory.mktemp("study")
    t0 = time.perf_counter()
    res = cv.run_study(out, "tiny", workers=1, threads=1)
    yield res, time.perf_counter() - t0
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_tiny_study_end_to_end(tiny_study):
    res, _ = tiny_study
    plan = cv.plan_study(cv.SIZES["tiny"])
    assert not res.summary["failed"] and res.summary["federations"] == len(plan.jobs)
    assert len(res.rows) == sum(len(plan.jobs[c.name].config.models) for c in plan.conditions) == 4 * 3 + 4 * 4
    with open(res.out / "clients.csv", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(res.rows)
    for col in ("loo_global", "loo_others", "update_norm_mean", "update_cos_mean", "train_loss_last", "test_metric_last",
                "cme_acf_variation_head", "cme_saturation_round"):  # fmt: skip
        assert col in csv_rows[0], col
    assert sum(c.startswith("cme_") for c in csv_rows[0]) >= 5  # the CME candidates fedsim.analysis offers
    for r in res.rows:
        assert math.isfinite(r["update_norm_mean"]) and r["update_norm_mean"] > 0 and -1 <= r["update_cos_mean"] <= 1
        has_loo = r["fault_kind"] == "none" or r["is_faulty"]  # loo="faulty": not the healthy clients of faulty runs
        assert math.isfinite(r["loo_others"]) == has_loo
        assert math.isfinite(r["loo_global"]) == (has_loo and r["style"] == "same-model")  # no global model in mixed runs
    assert {r["model"] for r in res.rows if r["style"] == "mixed"} == {"small_cnn", "alexnet_skip"}
    summary = json.loads((res.out / "study.json").read_text())
    assert summary["threads"] == 1 and summary["size"]["name"] == "tiny"
    faulty = [r for r in res.rows if r["is_faulty"]]
    assert len(faulty) == len([c for c in plan.conditions if c.faulty is not None])
    assert {t["fault_kind"] for t in res.auroc} == {"few-data"}
    for r in faulty:  # the fault really applied: 10 % of the client's training data
        peer = next(p for p in res.rows if p["condition"] == r["condition"] and not p["is_faulty"])
        assert r["num_examples"] < peer["num_examples"] / 3, f"few-data did not apply in {r['condition']}"


def test_leave_one_out_is_read_from_the_run_without_the_client(tiny_study):
    res, _ = tiny_study
    row = next(r for r in res.rows if r["condition"] == "same-model-s1-fault-free" and r["client"] == 2)
    full = json.loads((res.out / "runs" / "same-model-s1-fault-free" / RECORD_FILE).read_text())
    loo = json.loads((res.out / "runs" / "same-model-s1-fault-free-without2" / RECORD_FILE).read_text())
    assert [c["client"] for c in loo["metrics"][-1]["clients"]] == [0, 1] and loo["absent"] == [2]
    assert row["loo_global"] == pytest.approx(full["metrics"][-1]["global"]["accuracy"] - loo["metrics"][-1]["global"]["accuracy"])
    others = lambda rec: sum(c["test_accuracy"] for c in rec["metrics"][-1]["clients"] if c["client"] != 2) / 2  # noqa: E731
    assert row["loo_others"] == pytest.approx(others(full) - others(loo))


def test_the_server_records_each_clients_update_norm_as_the_probe_measures_it(tiny_study):
    """metrics.jsonl's update_norm (fedsim.server.updates, per array) equals the study's probe's
    norm of the concatenated float64 update, for every client and round of every run."""
    res, _ = tiny_study
    checked = 0
    for run in sorted((res.out / "runs").iterdir()):
        rec = json.loads((run / RECORD_FILE).read_text())
        rows = {r["round"]: {c["client"]: c for c in r["clients"]} for r in RunDir(run).read_metrics()}
        for pid, u in rec["updates"].items():
            for rnd, norm in zip(u["rounds"], u["norm"], strict=True):
                assert rows[rnd][int(pid)]["update_norm"] == pytest.approx(norm, rel=1e-9, abs=1e-12)
                checked += 1
    assert checked >= 20
    # older records without it get the probe's norms, and the rows are copied, not changed
    rows = [{"round": 1, "clients": [{"client": 0}, {"client": 1, "update_norm": 5.0}]}]
    filled = with_update_norms(rows, {"0": {"rounds": [1], "norm": [2.0]}, "1": {"rounds": [1], "norm": [3.0]}})
    assert [c.get("update_norm") for c in filled[0]["clients"]] == [2.0, 5.0] and "update_norm" not in rows[0]["clients"][0]


def test_a_finished_study_is_resumed_not_rerun(tiny_study):
    res, _ = tiny_study
    records = sorted(res.out.glob("runs/*/config.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    again = cv.run_study(res.out, "tiny", workers=1, threads=1)
    np.testing.assert_array_equal([r["loo_others"] for r in again.rows], [r["loo_others"] for r in res.rows])
    # the CME statistics can be recomputed from the archives without training again
    fresh = cv.run_study(res.out, "tiny", workers=1, threads=1, refresh_cme=True)
    assert records and [p.stat().st_mtime_ns for p in records] == stamps  # no federation ran again
    key = "cme_acf_variation_head"
    np.testing.assert_array_equal([r.get(key) for r in fresh.rows], [r.get(key) for r in res.rows])


def test_verdict_tables_overall_and_split_into_development_and_held_out_seeds():
    def row(seed, faulty, verdict, kind="few-data", client=0):
        return {"style": "mixed", "fault_kind": kind, "fault_level": 0.1 if kind != "none" else None, "seed": seed,
                "client": client, "is_faulty": faulty, "cme_verdict": verdict}  # fmt: skip

    rows = [
        row(0, True, "weak"), row(0, False, "learning", client=1), row(1, True, "learning"), row(1, False, "weak", client=1),
        row(10, True, "weak"), row(10, False, "dominant", client=1), row(11, True, "weak"), row(11, False, "dominant", client=1),
        row(12, True, "diverged"), row(12, False, "dominant", client=1),
    ]  # fmt: skip
    every = next(t for t in cv.verdict_table(rows) if t["fault_level"] == "all")
    # a few-data client called "diverged" is flagged but not detected
    assert every["detected"] == 3 / 5 and every["flagged"] == 4 / 5 and every["false_alarm"] == 1 / 5 and every["faulty_weak"] == 3
    split = {t["seeds"]: t for t in cv.verdict_table_split(rows, 10) if t["fault_level"] == "all"}
    assert set(split) == {"development 0-1", "held-out 10-12"}
    assert split["development 0-1"]["detected"] == 0.5 and split["development 0-1"]["false_alarm"] == 0.5
    assert split["held-out 10-12"]["detected"] == 2 / 3 and split["held-out 10-12"]["false_alarm"] == 0.0
