"""``benchmarks/cme_cme_rules.py`` scores the rules on the CME statistics on a study folder: checked
on hand-made runs whose ``ClientStatistics`` are put in the script's cache (no CME archive, no
training): the head-magnitude ``weak`` test under its two guards, and the relative ``diverged``
rule without and with its 10x update requirement."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from benchmarks import cme_cme_rules as rules
from benchmarks.cme_cme_rules import CACHE, main, score_exploding, score_magnitude, update_ratio
from benchmarks.cme_label_rules import load
from fedsim.analysis import cme
from fedsim.analysis.cme import ClientStatistics, update_norms_by_client


def _stats(client, model, magnitude, jump=0.1, nonfinite=0.0, rounds=5):
    n = rounds
    full, bands = np.full(n, np.nan), np.full((n, 2), np.nan)
    return ClientStatistics(
        client=client, model=model, layer="head.out.weight", head=("head.out.weight",), rounds=np.arange(1, n + 1),
        epochs=np.full(n, 2), nonfinite_fraction=np.broadcast_to(np.asarray(nonfinite, dtype=float), (n,)).copy(),
        nonfinite_layer=("",) * n, jump_fraction=np.broadcast_to(np.asarray(jump, dtype=float), (n,)).copy(),
        magnitude=np.broadcast_to(np.asarray(magnitude, dtype=float), (n,)).copy(), norm=full, masked_fraction=full,
        dead_fraction=full, dead_unit_fraction=full, similarity=full, similarity_band=bands, ceiling_band=bands,
        similarity_with_diagonal=full, acf_change_head=full, acf_change_head_band=bands, acf_change_all=full,
        acf_change_all_band=bands, acf_variation_head=np.nan, acf_variation_head_band=(np.nan, np.nan),
        acf_variation_all=np.nan, acf_variation_all_band=(np.nan, np.nan), saturation_round=None,
    )  # fmt: skip


def _study(root, runs, norms=None):
    """Study folder with ``runs`` (``{name: [ClientStatistics]}``) in its statistics cache; ``norms``:
    ``{name: {client: [update norm per round]}}`` for the metrics rows."""
    for name, stats in runs.items():
        d = root / "runs" / name
        d.mkdir(parents=True)
        per_client = (norms or {}).get(name, {})
        rows = [
            {
                "round": int(r),
                "clients": [
                    {"client": s.client, "model": s.model, "train_loss": 1.0}
                    | ({"update_norm": per_client[s.client][j]} if s.client in per_client else {})
                    for s in stats
                ],
            }
            for j, r in enumerate(stats[0].rounds)
        ]
        (d / "study_record.json").write_text(json.dumps({"metrics": rows}))
    (root / CACHE).write_bytes(pickle.dumps(runs))


def test_scores_the_magnitude_guards(tmp_path, capsys):
    a, b = "small_cnn", "alexnet_skip"
    runs = {
        # client 0 has half its peers' magnitude in rounds 1-4 and 0.95 of the smaller one in round 5:
        # lowest in every round (p = 3^-5 = 0.004); in the last round log(1/0.95) = 0.051 below the
        # nearer peer, less than the peers' log range log(1.1) = 0.095 (clear_outlier: no); on average
        # (4 log 2 + 0.051) / 5 = 0.56 below, more than 0.095 (outlier_on_average: yes)
        "same-model-s0-c0-few-data-0.1": [_stats(0, a, [0.5, 0.5, 0.5, 0.5, 0.95]), _stats(1, a, 1.0), _stats(2, a, 1.1)],
        "same-model-s0-c1-free-rider-0.01": [_stats(0, a, 1.0), _stats(1, a, 1e-4), _stats(2, a, 1.1)],
        # a healthy client half its peers' in every round: a false alarm under both guards
        "same-model-s0-fault-free": [_stats(0, a, 0.5), _stats(1, a, 1.0), _stats(2, a, 1.1)],
        # the label-noise client is the lowest, but only few-data and free-rider clients are scored
        "same-model-s0-c2-label-noise-0.5": [_stats(0, a, 1.0), _stats(1, a, 1.1), _stats(2, a, 0.1)],
        # client 0 is log 2 = 0.69 below its nearer peer in every round; its peers' log range is
        # log 1.2 = 0.18, the other model's log 4 = 1.39: pooled (0.18 + 1.39) / 2 = 0.78 > 0.69, so
        # neither guard lets it through (on its own peers' range alone both would)
        "mixed-s0-c0-few-data-0.1": [_stats(k, a if k % 2 == 0 else b, v) for k, v in enumerate([0.5, 1.0, 1.0, 4.0, 1.2, 2.0])],
        "mixed-s0-c0-lazy-0.1": [_stats(k, a if k % 2 == 0 else b, 1.0) for k in range(6)],  # not a bar condition: left out
    }
    _study(tmp_path, runs)
    loaded = load(tmp_path, range(1))
    assert sorted(loaded) == sorted(set(runs) - {"mixed-s0-c0-lazy-0.1"})
    clear = score_magnitude(loaded, runs, "clear_outlier")
    avg = score_magnitude(loaded, runs, "outlier_on_average")
    assert clear[("same-model", "few-data")] == [0, 1] and avg[("same-model", "few-data")] == [1, 1]
    assert clear[("same-model", "free-rider")] == avg[("same-model", "free-rider")] == [1, 1]
    # 2 peers of each faulty client (label-noise too) + 3 fault-free clients; client 0 of the fault-free run flagged
    assert clear[("same-model", "healthy")] == avg[("same-model", "healthy")] == [1, 9]
    assert clear[("mixed", "few-data")] == avg[("mixed", "few-data")] == [0, 1]
    assert avg[("mixed", "healthy")] == [0, 5]
    with pytest.raises(ValueError, match="unknown guard"):
        score_magnitude(loaded, runs, "outlier_overall")
    assert main([str(tmp_path), "--seeds", "0-0"]) == 0
    out = capsys.readouterr().out
    assert "| clear_outlier | 0/1 | 1/1 | 1/9 | 0/1 | - | 0/5 |" in out
    assert "| outlier_on_average | 1/1 | 1/1 | 1/9 | 0/1 | - | 0/5 |" in out


def test_scores_the_exploding_rule_with_and_without_the_update_ratio(tmp_path, capsys):
    m = "small_cnn"
    peers = [_stats(1, m, 1.0, rounds=3), _stats(2, m, 1.1, rounds=3)]  # jump fractions equal: no gap, no excess
    norms = {1: [1.0] * 3, 2: [1.2] * 3}
    runs = {
        "same-model-s1-c0-diverge-10000": [_stats(0, m, 1.0, nonfinite=[0, 0.2, 0.3], rounds=3), *peers],
        "same-model-s2-c0-diverge-10000": [_stats(0, m, 1.0, jump=[0.1, 0.8, 0.1], rounds=3), *peers],
        # round 1: magnitude 3 / 1.1, jump fraction 3x, update 1e5 / 1.2, all beyond the peers' gaps
        # (log 1.1, 0, log 1.2): exploding in round 1, whichever the update ratio
        "same-model-s3-c0-diverge-10000": [_stats(0, m, 3.0, jump=0.3, rounds=3), *peers],
        # round 2: magnitude 1.5 / 1.1, jump 1.5x, update 2 / 1.2: beyond the gaps, but < 10x
        "same-model-s4-c0-label-noise-0.5": [_stats(0, m, [1.0, 1.5, 1.0], jump=[0.1, 0.15, 0.1], rounds=3), *peers],
        # a healthy client in round 3: magnitude 2 / 1.1, jump 2x, update 30 / 1.2 = 25x: diverged under both
        "same-model-s5-fault-free": [_stats(0, m, [1.0, 1.0, 2.0], jump=[0.1, 0.1, 0.2], rounds=3), *peers],
    }
    run_norms = {name: {0: [1.0] * 3, **norms} for name in runs}
    run_norms["same-model-s1-c0-diverge-10000"][0] = [1.0, None, None]  # a non-finite update is recorded as None
    run_norms["same-model-s3-c0-diverge-10000"][0] = [1e5, 1e5, 1e5]
    run_norms["same-model-s4-c0-label-noise-0.5"][0] = [1.0, 2.0, 1.0]
    run_norms["same-model-s5-fault-free"][0] = [1.0, 1.0, 30.0]
    _study(tmp_path, runs, run_norms)
    loaded = load(tmp_path, range(6))
    assert update_norms_by_client(loaded["same-model-s1-c0-diverge-10000"][4])[0] == {1: 1.0, 2: np.inf, 3: np.inf}

    old, new = score_exploding(loaded, runs, ratio=1.0), score_exploding(loaded, runs)
    assert cme.EXPLODING_UPDATE_RATIO == 10.0  # restored
    for res in (old, new):
        c = res[("same-model", "diverge")]
        assert (c.clients, c.nonfinite, c.jump) == (3, 1, 1)
        assert [h[:3] for h in c.hits] == [("same-model-s3-c0-diverge-10000", 0, 1)]
        assert c.hits[0][3:] == pytest.approx((3.0 / 1.1, 1e5 / 1.2))
        assert res[("same-model", "healthy")].clients == 11  # 2 peers in each of 4 faulty runs + 3 fault-free clients
        assert [h[:3] for h in res[("same-model", "healthy")].hits] == [("same-model-s5-fault-free", 0, 3)]
        assert res[("same-model", "healthy")].hits[0][3:] == pytest.approx((2.0 / 1.1, 25.0))
    assert [h[:3] for h in old[("same-model", "label-noise")].hits] == [("same-model-s4-c0-label-noise-0.5", 0, 2)]
    assert old[("same-model", "label-noise")].hits[0][3:] == pytest.approx((1.5 / 1.1, 2.0 / 1.2))
    assert new[("same-model", "label-noise")].hits == []
    with update_ratio(1.0):  # the context manager alone
        assert cme.EXPLODING_UPDATE_RATIO == 1.0
    assert cme.EXPLODING_UPDATE_RATIO == 10.0

    assert main([str(tmp_path), "--seeds", "0-9", "--report", "exploding"]) == 0
    out = capsys.readouterr().out
    assert "| none (before 0151f04) | same-model | label-noise | 1 | 0 | 0 | 1 | 1 | 1.36 | 1.67 |" in out
    assert "| >= 10x (now) | same-model | label-noise | 1 | 0 | 0 | 0 | 0 | - | - |" in out
    assert "| >= 10x (now) | same-model | diverge | 3 | 1 | 1 | 1 | 3 | 2.73 | 8.33e+04 |" in out
    assert "| same-model-s4-c0-label-noise-0.5 | 0 | 2 | 1.36 | 1.67 |" in out


def _fake_statistics(run_dir):
    return [_stats(0, run_dir.name, 1.0)]


def test_computes_only_the_runs_missing_from_the_cache(tmp_path, monkeypatch):
    for name in ("same-model-s0-fault-free", "same-model-s1-fault-free"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / CACHE).write_bytes(pickle.dumps({"same-model-s0-fault-free": []}))
    monkeypatch.setattr(rules, "run_statistics", _fake_statistics)  # the worker is forked: it sees the patch
    logged = []
    got = rules.cached_statistics(tmp_path, ["same-model-s0-fault-free", "same-model-s1-fault-free"], workers=1, progress=logged.append)
    assert got["same-model-s0-fault-free"] == [] and [s.model for s in got["same-model-s1-fault-free"]] == ["same-model-s1-fault-free"]
    assert sorted(pickle.loads((tmp_path / CACHE).read_bytes())) == ["same-model-s0-fault-free", "same-model-s1-fault-free"]
    assert logged[0] == "computing the client statistics of 1 runs (1 cached) with 1 workers" and logged[-1].startswith("1/1 runs")
