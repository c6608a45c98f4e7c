"""``fedsim run --ray-address`` on a real Ray cluster on loopback (issue 15).

One cluster serves every test of this module: a head node and a worker node, each declaring 2
CPUs and 1 *logical* GPU (this machine has none), both ``ray start`` processes this module starts
and stops (:class:`~tests.integration.ray_procs.LocalRayCluster`). An actor holds its GPU share for
its whole life, so the distinct client actors that reported the same (node, GPU) ran side by side.
An unreachable ``--ray-address`` needs no cluster: ``tests/test_ray_layout.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from fedsim.rundir import RunDir
from fedsim.server.recorder import read_placement

from .ray_procs import LocalRayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The smallest run that still trains and evaluates every client once.
TINY = ["--profile", "tiny", "--models", "small_cnn,small_cnn,small_cnn", "--rounds", "1", "--local-epochs", "1"]


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster()
    try:
        c.start_head(num_cpus=2, num_gpus=1, ready=None)  # both nodes start side by side
        c.add_worker(num_cpus=2, num_gpus=1, ready=None)
        c.wait_ready()
        yield c
    finally:
        c.stop()
    assert not c.leftover_pids(), "Ray processes of the test cluster survived its teardown"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", "run", *TINY, *args]


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout)


def actors_per_gpu(rows: list[dict]) -> dict[tuple[str, str], int]:
    """(node id, GPU id) -> how many distinct client actors held it."""
    actors: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        for gpu in r["gpu_ids"]:
            actors[(r["node_id"], gpu)].add(r["actor_id"])
    return {k: len(v) for k, v in actors.items()}


def test_two_nodes_one_client_per_gpu_and_the_results_of_fedsims_own_ray(cluster, tmp_path):
    """``--client-gpus 1``: one client per logical GPU, one per node, clients on both nodes; the
    metrics and parameters equal a run on fedsim's own Ray instance with the same seed and CPUs
    per client (2: the same torch threads; without CUDA both train on the CPU). The own-Ray run
    goes on meanwhile: it shares nothing with the cluster."""
    own = subprocess.Popen(command("--client-cpus", "2", "--client-gpus", "0", "--out", "own"), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        joined = run("--client-cpus", "2", "--client-gpus", "1", "--ray-address", cluster.address, "--out", "joined", cwd=tmp_path)
        out, err = own.communicate(timeout=300)
    finally:
        own.kill()
    ok(joined)
    ok(subprocess.CompletedProcess(own.args, own.returncode, out, err))
    run_joined, run_own = RunDir(tmp_path / "joined"), RunDir(tmp_path / "own")

    layout = run_joined.read_config()["ray"]
    assert layout["address"] == cluster.address and [(n["cpus"], n["gpus"], n["clients"]) for n in layout["nodes"]] == [(2.0, 1.0, 1)] * 2
    assert layout["cluster_gpus"] == 2.0 and layout["clients_per_gpu"] == 1 and layout["concurrent_clients"] == 2
    assert "1 clients per GPU; 2 clients at a time" in joined.stderr  # the layout is logged
    assert run_own.read_config()["ray"]["address"] == "local" and len(run_own.read_config()["ray"]["nodes"]) == 1

    rows = read_placement(run_joined.path)
    assert sorted((r["phase"], r["client"]) for r in rows) == sorted((p, c) for p in ("train", "evaluate") for c in range(3))
    assert {r["node_id"] for r in rows} == {n["node_id"] for n in layout["nodes"]}, rows  # both nodes ran clients
    assert all(r["gpu_ids"] == ["0"] and r["device"] == "cpu" for r in rows), rows
    assert set(actors_per_gpu(rows).values()) == {1}, rows
    assert all(r["gpu_ids"] == [] and r["node_id"] for r in read_placement(run_own.path))

    assert run_joined.read_results() == run_own.read_results()  # all but the rounds' wall times
    a, b = run_joined.load_params(), run_own.load_params()
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_half_a_gpu_runs_two_clients_per_logical_gpu(cluster, tmp_path):
    """``--client-gpus 0.5``: floor(1/0.5) = 2 clients share each node's logical GPU (4 actors on
    2 GPUs; the 3 clients of a round run at once, so some GPU holds 2 of them, none more)."""
    proc = ok(run("--client-cpus", "1", "--client-gpus", "0.5", "--ray-address", cluster.address, "--out", "half", cwd=tmp_path))
    layout = RunDir(tmp_path / "half").read_config()["ray"]
    assert layout["clients_per_gpu"] == 2 and layout["concurrent_clients"] == 4 and layout["client_gpus"] == 0.5
    assert "2 clients per GPU; 4 clients at a time" in proc.stderr
    rows = read_placement(tmp_path / "half")
    assert len(rows) == 6 and all(len(r["gpu_ids"]) == 1 and r["device"] == "cpu" for r in rows), rows
    assert max(actors_per_gpu(rows).values()) == 2, rows
