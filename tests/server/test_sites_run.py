"""A tiny federation on a multi-site folder (in-process grid, no Ray): three site folders run
three clients named after them, in ``metrics.jsonl``, the server's log and the analysis report."""

from __future__ import annotations

import logging

import pytest

from fedsim.analysis.report import analyze_run
from fedsim.clients.app import app
from fedsim.clients.tasks import resolve_config
from fedsim.config import RunConfig
from fedsim.rundir import RunDir
from fedsim.server.app import run_server
from fedsim.server.inprocess import InProcessGrid
from tests.data.test_sites import SITES, mri_sites

pytestmark = pytest.mark.usefixtures("task_identity")


def test_three_site_folders_run_three_clients_named_after_them(tmp_path, caplog, capsys):
    data = mri_sites(tmp_path / "hospitals")  # berlin 20, lyon 16, oslo 24 images
    cfg = resolve_config(
        RunConfig(
            partition="sites",
            data_dir=str(data),
            profile="tiny",
            rounds=1,
            local_epochs=1,
            models=("small_cnn",) * 3,
            out=str(tmp_path / "run"),
        )
    )
    with caplog.at_level(logging.INFO, logger="fedsim"):
        run_server(InProcessGrid(app, cfg.clients, num_threads=1), cfg)
    log = caplog.text + capsys.readouterr().err  # the ClientApp turns on fedsim's console handler (stderr)
    assert "one client per site: client 0 = berlin, client 1 = lyon, client 2 = oslo" in log
    (row,) = RunDir(cfg.out).read_metrics()
    assert [(c["client"], c["site"]) for c in row["clients"]] == [(0, "berlin"), (1, "lyon"), (2, "oslo")]
    sizes = [c["num_examples"] + c["num_test_examples"] for c in row["clients"]]
    # each client holds its own site less its share of the 9 held-out images (15 % of 60)
    assert all(0 < s <= 4 * n for s, n in zip(sizes, SITES.values(), strict=True)) and sum(sizes) == 60 - 9
    analyze_run(cfg.out)
    report = (tmp_path / "run" / "analysis" / "report.md").read_text()
    assert all(f"| {k} ({site}) | small_cnn |" in report for k, site in enumerate(SITES))
