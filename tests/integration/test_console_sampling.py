"""A sampled tiny run through the CLI on Ray, as a user sees it: the console output (to a pipe,
not a terminal) fits on one screen, has one line per round and no escape codes or Flower/Ray
chatter; metrics.jsonl records the seeded sample and exactly K clients train per round."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from fedsim.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: A terminal's height: a tiny run's whole console output must fit.
SCREEN_LINES = 24


def test_sampled_tiny_run_console_and_record(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--profile", "tiny", "--rounds", "2", "--clients", "6", "--clients-per-round", "2", "--models", "small_cnn",
            "--num-samples", "200", "--seed", "3", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    console = proc.stderr + proc.stdout
    assert proc.returncode == 0, console[-6000:]
    assert "\x1b" not in console  # no ANSI codes reach a file or pipe
    lines = console.splitlines()
    assert len(lines) <= SCREEN_LINES, console
    for rnd in (1, 2):
        assert (
            sum(bool(re.search(rf"fedsim INFO: round {rnd}/2 [\d.ms]+.*: 2 clients, test accuracy mean [\d.]+ range", ln)) for ln in lines)
            == 1
        )
    for chatter in ("DEPRECATED", "Weighted by", "FutureWarning", "Started a local Ray instance", "MetricRecord", "epoch 1/"):
        assert chatter not in console
    assert "2 of 6 clients per round, sampled with seed 3" in console and "2 rounds finished" in proc.stdout
    rows = RunDir(out).read_metrics()
    for r in rows:
        expected = sorted(random.Random(f"fedsim-client-sampling:3:{r['round']}").sample(range(6), 2))
        assert r["sampled"] == expected and [c["client"] for c in r["clients"]] == expected
