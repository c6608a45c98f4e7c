"""Figures draw exactly the computed arrays; ``fedsim analyze`` writes figures, summary and report."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.analysis.cme import client_acf, round_maps, summarise_client
from fedsim.analysis.figures import ACFDisplay, ClientCMEFigure, CovarianceMapDisplay, pick_rounds
from fedsim.analysis.report import AnalysisSettings, analyze_run
from fedsim.cli import main
from fedsim.callbacks import TrainInfo
from fedsim.cme import CMEArchive, CMEArchiveWriter, CMERecorder, CMESettings, encode
from fedsim.config import RunConfig
from fedsim.clients.tasks import resolve_config
from fedsim.rundir import RunDir


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc2 = nn.Linear(10, 10)


def make_run(path, rng, cme=True, rounds=4, clients=2, epochs=2):
    """A run directory like 'fedsim run' writes, with CMEs recorded from random weight walks."""
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
                            p.add_(torch.tensor(rng.normal(scale=0.05, size=p.shape), dtype=p.dtype))
                    rec.on_epoch_end(model, info, e, {})
                rec.on_train_end(model, info)
                writer.write(encode(rec.result, c, r, "small_cnn"))
        rd.append_metrics({"round": r, "clients": rows, "global": None})
    return rd.path


def test_pick_rounds():
    assert pick_rounds([1, 2, 3, 4, 5, 6], saturation=None) == [1, 4, 6]
    assert pick_rounds([1, 2, 3, 4, 5, 6], saturation=2) == [1, 2, 4]
    assert pick_rounds([1, 2], saturation=None) == [1, 2]


def test_figures_show_the_computed_arrays(tmp_path, rng):
    arch = CMEArchive(make_run(tmp_path / "run", rng))
    rounds, maps = round_maps(arch, 1, "fc2.weight")
    fig = CovarianceMapDisplay(maps[:3], rounds[:3]).plot()
    map_axes = [ax for ax in fig.axes if ax.images]  # colorbar axes hold no image
    assert len(map_axes) == 3
    for ax, m in zip(map_axes, maps[:3]):
        np.testing.assert_array_equal(ax.images[0].get_array(), m)
    acf = client_acf(arch, 1)
    assert acf.raw.shape == (4, 2) and acf.layers == ("conv.weight", "fc2.weight")
    ax = ACFDisplay(acf).plot().axes[0]
    for line, row in zip(ax.lines, acf.normalised):
        np.testing.assert_array_equal(line.get_ydata(), row)
    s = summarise_client(arch, 1, "fc2.weight")
    shown = pick_rounds(list(rounds), s.saturation_round)
    fig = ClientCMEFigure(s, [maps[list(rounds).index(r)] for r in shown], shown, acf).plot()
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 3
    for img, r in zip(images, shown):
        np.testing.assert_array_equal(img, maps[list(rounds).index(r)])


def test_analyze_writes_figures_summary_and_report(tmp_path, rng, capsys):
    run = make_run(tmp_path / "run", rng)
    assert main(["analyze", str(run), "--similarity", "0.5"]) == 0
    out = run / "analysis"
    assert {"curves.png", "client0_cme.png", "client1_cme.png", "summary.json", "report.md"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cme"] is True and summary["settings"]["layer"] == "fc2.weight"
    arch = CMEArchive(run)
    for entry in summary["clients"]:
        expect = summarise_client(arch, entry["client"], "fc2.weight", similarity_threshold=0.5)
        assert entry["saturation_round"] == expect.saturation_round
        assert entry["acf_variation"] == pytest.approx(expect.acf_variation)
        assert entry["label"] == expect.label
        assert entry["final_test_accuracy"] == pytest.approx(0.4 + 0.01 * entry["client"])
    report = (out / "report.md").read_text()
    assert "![client1_cme](client1_cme.png)" in report and "| 1 | small_cnn |" in report
    assert "saturation round" in capsys.readouterr().out


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
    (run / "cme/client1/round0002.safetensors").write_bytes(b"truncated")
    assert main(["analyze", str(run)]) == 1
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="patience must be >= 1"):
        AnalysisSettings(patience=0)
