"""Figures draw exactly the computed arrays; ``fedsim analyze`` writes figures, summary and report
with one verdict per client."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.analysis.cme import VERDICTS, client_statistics, decide_verdicts, round_maps
from fedsim.analysis.figures import (
    CAPTION_WIDTH,
    ACFDisplay,
    ClientCMEFigure,
    CovarianceMapDisplay,
    RoundStatisticDisplay,
    off_diagonal,
    pick_rounds,
    robust_scale,
)
from fedsim.analysis.report import AnalysisSettings, analyze_run
from fedsim.callbacks import TrainInfo
from fedsim.cli import main
from fedsim.clients.tasks import resolve_config
from fedsim.cme import CMEArchive, CMEArchiveWriter, CMERecorder, CMESettings, encode
from fedsim.config import RunConfig
from fedsim.rundir import RunDir


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc2 = nn.Linear(10, 10)


def make_run(path, rng, cme=True, rounds=4, clients=2, epochs=2, nan_client=None, scales=None):
    """A run directory like 'fedsim run' writes, with CMEs recorded from random weight walks.
    ``nan_client`` gets a NaN weight from round 2 on; ``scales[c]`` sets client c's step size."""
    cfg = resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * clients, clients=clients, rounds=rounds, cme=cme))
    rd = RunDir(path).create()
    rd.write_config(cfg.to_json_dict())
    writer = CMEArchiveWriter(rd.path)
    for r in range(1, rounds + 1):
        rows = []
        for c in range(clients):
            rows.append({"client": c, "model": "small_cnn", "num_examples": 10, "train_loss": 1.0 / r,
                         "train_accuracy": 0.1 * r, "test_loss": 1.2 / r, "test_accuracy": 0.1 * r + 0.01 * c})  # fmt: skip
            if cme:
                model = Net()
                rec = CMERecorder(CMESettings(layers=("fc2.weight",), threshold=1e-3))
                info = TrainInfo(r, c, epochs, "small_cnn")
                rec.on_train_start(model, info)
                for e in range(1, epochs + 1):
                    with torch.no_grad():
                        for p in model.parameters():
                            step = 0.05 if scales is None else scales[c]
                            p.add_(torch.tensor(rng.normal(scale=step, size=p.shape), dtype=p.dtype))
                        if c == nan_client and r >= 2:
                            model.fc2.weight[0, 0] = float("nan")
                    rec.on_epoch_end(model, info, e, {})
                rec.on_train_end(model, info)
                writer.write(encode(rec.result, c, r, "small_cnn"))
        rd.append_metrics({"round": r, "clients": rows, "global": None})
    return rd.path


def test_pick_rounds():
    assert pick_rounds([1, 2, 3, 4, 5, 6], saturation=None) == [1, 4, 6]
    assert pick_rounds([1, 2, 3, 4, 5, 6], saturation=2) == [1, 2, 4]
    assert pick_rounds([1, 2], saturation=None) == [1, 2]


def test_colour_scale_is_shared_and_robust():
    maps = [np.array([[9.0, 1.0], [1.0, 9.0]]), np.array([[100.0, -2.0], [-2.0, 100.0]])]
    # the diagonal never sets the scale: 99th percentile of |off-diagonal| = [1, 1, 2, 2]
    assert robust_scale(maps) == pytest.approx(np.percentile([1, 1, 2, 2], 99))
    assert robust_scale([np.full((2, 2), np.nan)]) == 1.0


def test_figures_show_the_computed_arrays(tmp_path, rng):
    arch = CMEArchive(make_run(tmp_path / "run", rng))
    rounds, maps = round_maps(arch, 1, "fc2.weight")
    disp = CovarianceMapDisplay(maps[:3], rounds[:3], neurons=np.arange(10) * 3, layer="fc2.weight")
    fig = disp.plot()
    map_axes = [ax for ax in fig.axes if ax.images]  # the colour bar is drawn as a mesh, not an image
    assert len(map_axes) == 3
    for ax, m in zip(map_axes, maps[:3], strict=True):
        drawn = np.ma.filled(ax.images[0].get_array(), np.nan)
        np.testing.assert_array_equal(drawn, off_diagonal(m))
        assert np.isnan(np.diag(drawn)).all()
        assert ax.images[0].get_clim() == (-robust_scale(maps[:3]), robust_scale(maps[:3]))  # one scale
        assert ax.get_xlabel().startswith("neuron") and [t.get_text() for t in ax.get_xticklabels()][-1] == "27"
    bars = [a for ax in map_axes for a in ax.child_axes]
    assert len(bars) == 1 and "covariance" in bars[0].get_ylabel()  # one labelled colour bar, on the last map

    stats = client_statistics(arch, 1, "fc2.weight", samples=50)
    acf = stats.acf
    assert acf is not None and acf.raw.shape == (4, 2) and acf.layers == ("conv.weight", "fc2.weight")
    ax = ACFDisplay(acf, head=["fc2.weight"]).plot().axes[0]
    for line, row in zip(ax.lines, acf.normalised, strict=True):
        np.testing.assert_array_equal(line.get_ydata(), row)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv.weight", "fc2.weight"]  # layer names

    ax = RoundStatisticDisplay(stats.rounds, {"s": (stats.similarity, stats.similarity_band)}, "sim", threshold=0.9).plot().axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), stats.similarity)
    assert len(ax.collections) == 1  # the null band

    verdict = decide_verdicts([stats])[1]
    shown = pick_rounds(list(rounds), stats.saturation_round)
    fig = ClientCMEFigure(stats, verdict, shown, similarity_threshold=0.9).plot()
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == len(shown)
    for img, r in zip(images, shown, strict=True):
        np.testing.assert_array_equal(np.ma.filled(img, np.nan), off_diagonal(maps[list(rounds).index(r)]))
    title = fig._suptitle.get_text()
    assert f"verdict {verdict.verdict.upper()}" in title and verdict.reason in " ".join(title.split())
    assert len(title.splitlines()) > 2 and all(len(line) <= CAPTION_WIDTH for line in title.splitlines())  # the long reason is wrapped


def test_analyze_writes_figures_summary_and_report(tmp_path, rng, capsys):
    run = make_run(tmp_path / "run", rng, clients=3)
    assert main(["analyze", str(run), "--similarity", "0.5", "--null-samples", "50"]) == 0
    out = run / "analysis"
    assert {"curves.png", "client0_cme.png", "client1_cme.png", "summary.json", "report.md"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cme"] is True and summary["settings"]["layer"] == "fc2.weight"
    arch = CMEArchive(run)
    all_stats = [client_statistics(arch, c, "fc2.weight", similarity_threshold=0.5, samples=50) for c in arch.clients]
    verdicts = decide_verdicts(all_stats, metrics_rows=RunDir(run).read_metrics())
    for entry, s in zip(summary["clients"], all_stats, strict=True):
        v = verdicts[entry["client"]]
        assert entry["verdict"] in VERDICTS and entry["verdict"] == v.verdict and entry["reason"] == v.reason
        assert entry["statistic"] == v.statistic and entry["value"] == pytest.approx(v.value)
        assert entry["null_band"] == pytest.approx(list(v.band))
        assert entry["saturation_round"] == s.saturation_round
        assert entry["acf_variation_head"] == pytest.approx(s.acf_variation_head)
        st = entry["statistics"]
        assert st["rounds"] == [1, 2, 3, 4] and len(st["similarity_band"]) == 4 and st["similarity_band"][0] == [None, None]
        assert st["magnitude"] == pytest.approx(list(s.magnitude)) and st["dead_fraction"] == pytest.approx(list(s.dead_fraction))
        assert entry["final_test_accuracy"] == pytest.approx(0.4 + 0.01 * entry["client"])
    report = (out / "report.md").read_text()
    assert "![client1_cme](client1_cme.png)" in report and "| 1 | small_cnn | **" in report
    assert all(f"**{c['verdict']}**" in report and c["reason"] in report for c in summary["clients"])
    printed = capsys.readouterr().out
    assert all(f"{c['verdict'].upper()}" in printed and c["reason"] in printed for c in summary["clients"])


def test_a_client_with_nan_weights_is_diverged(tmp_path, rng):
    run = make_run(tmp_path / "run", rng, clients=3, nan_client=1)
    clients = {c["client"]: c for c in analyze_run(run, settings=AnalysisSettings(null_samples=50)).summary["clients"]}
    assert clients[1]["verdict"] == "diverged" and "non-finite" in clients[1]["reason"] and "round 2" in clients[1]["reason"]
    assert clients[1]["max_nonfinite_fraction"] == pytest.approx(1 / 100)
    assert clients[1]["mean_masked_fraction"] < 0.05  # NaN is not counted as masked
    assert clients[0]["verdict"] != "diverged"


def test_a_client_that_changes_far_less_than_the_others_is_weak(tmp_path, rng):
    run = make_run(tmp_path / "run", rng, clients=3, scales=[0.05, 0.0005, 0.05])
    clients = {c["client"]: c for c in analyze_run(run, settings=AnalysisSettings(null_samples=50)).summary["clients"]}
    assert clients[1]["verdict"] == "weak" and clients[1]["statistic"] == "magnitude_rank_sum"
    assert clients[1]["value"] > clients[1]["null_band"][1]  # rank sum above the exchangeable-clients band
    assert clients[0]["verdict"] != "weak" and clients[2]["verdict"] != "weak"


def test_a_run_too_short_for_a_verdict_is_undetermined(tmp_path, rng, capsys):
    run = make_run(tmp_path / "run", rng, rounds=2)
    assert main(["analyze", str(run), "--null-samples", "50"]) == 0
    summary = json.loads((run / "analysis/summary.json").read_text())
    for c in summary["clients"]:
        assert c["verdict"] == "undetermined" and c["reason"].startswith("needs >= 3 rounds with >= 2 local epochs; has 2 rounds")
    assert "UNDETERMINED" in capsys.readouterr().out


def test_analyze_says_when_a_run_has_no_cme(tmp_path, rng, capsys):
    run = make_run(tmp_path / "run", rng, cme=False)
    res = analyze_run(run)
    assert not res.has_cme and [p.name for p in res.figures] == ["curves.png"]
    assert json.loads((run / "analysis/summary.json").read_text())["cme"] is False
    assert "This run has no CME records" in (run / "analysis/report.md").read_text()
    assert main(["analyze", str(run), "--out", str(tmp_path / "a2")]) == 0
    assert "no CME records" in capsys.readouterr().out


def test_analyze_bad_input(tmp_path, rng, capsys):
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "not a fedsim run directory" in capsys.readouterr().err
    run = make_run(tmp_path / "run", rng, rounds=2)
    assert main(["analyze", str(run), "--layer", "head.fc1.weight"]) == 2
    assert "no full CME matrices of layer 'head.fc1.weight' for client 0; archived: fc2.weight" in capsys.readouterr().err
    assert main(["analyze", str(run), "--coverage", "1.5"]) == 2
    assert "coverage must be in (0, 1)" in capsys.readouterr().err
    (run / "cme/client1/round0002.safetensors").write_bytes(b"truncated")
    assert main(["analyze", str(run)]) == 1
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="patience must be >= 1"):
        AnalysisSettings(patience=0)
