"""``fedsim run --ray-address`` on a real Ray cluster on loopback (issue 15).

One cluster serves every test of this module: a head node declaring 2 CPUs and 1 *logical* GPU
(this machine has none) and a worker node with 2 CPUs and no GPU, both ``ray start`` processes
this module starts and stops (:class:`~tests.integration.ray_procs.LocalRayCluster`).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from fedsim.rundir import RunDir
from fedsim.server.recorder import read_placement

from .flower_procs import free_port
from .ray_procs import LocalRayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The smallest run that still trains and evaluates every client once.
TINY = ["--profile", "tiny", "--models", "small_cnn,small_cnn,small_cnn", "--rounds", "1", "--local-epochs", "1"]


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster()
    try:
        c.start_head(num_cpus=2, num_gpus=1)
        c.add_worker(num_cpus=2)
        yield c
    finally:
        c.stop()
    assert not c.leftover_pids(), "Ray processes of the test cluster survived its teardown"


def fedsim_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


def test_two_node_cluster_gives_the_results_of_fedsims_own_ray(cluster, tmp_path):
    """Clients run on both nodes, and metrics and parameters equal a run on fedsim's own Ray
    instance with the same seed and client resources (2 CPUs each: the same torch threads)."""
    ok(fedsim_run(*TINY, "--client-cpus", "2", "--client-gpus", "0", "--ray-address", cluster.address, "--out", "joined", cwd=tmp_path))
    ok(fedsim_run(*TINY, "--client-cpus", "2", "--client-gpus", "0", "--out", "own", cwd=tmp_path))
    joined, own = RunDir(tmp_path / "joined"), RunDir(tmp_path / "own")

    layout = joined.read_config()["ray"]
    assert layout["address"] == cluster.address and len(layout["nodes"]) == 2
    assert sorted((n["cpus"], n["gpus"], n["clients"]) for n in layout["nodes"]) == [(2.0, 0.0, 1), (2.0, 1.0, 1)]
    assert layout["concurrent_clients"] == 2 and layout["cluster_gpus"] == 1.0 and layout["clients_per_gpu"] == 0
    assert own.read_config()["ray"]["address"] == "local" and len(own.read_config()["ray"]["nodes"]) == 1

    rows = read_placement(joined.path)
    assert sorted((r["phase"], r["client"]) for r in rows) == sorted((p, c) for p in ("train", "evaluate") for c in range(3))
    assert {r["node_id"] for r in rows} == {n["node_id"] for n in layout["nodes"]}, rows  # both nodes ran clients
    assert all(r["gpu_ids"] == [] and r["device"] == "cpu" for r in rows)

    assert (joined.path / "metrics.jsonl").read_bytes() == (own.path / "metrics.jsonl").read_bytes()
    a, b = joined.load_params(), own.load_params()
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_gpu_fraction_schedules_floor_one_over_f_clients_per_logical_gpu(cluster, tmp_path, fraction):
    """``--client-gpus F``: Ray places floor(1/F) clients on the head's one logical GPU at once (an
    actor holds its GPU share for its whole life, so distinct actors on a GPU ran side by side);
    the worker node has no GPU and runs none; without CUDA the clients train on the CPU."""
    proc = fedsim_run(
        *TINY, "--client-cpus", "1", "--client-gpus", str(fraction), "--ray-address", cluster.address, "--out", "gpu", cwd=tmp_path
    )
    ok(proc)
    run = RunDir(tmp_path / "gpu")
    layout = run.read_config()["ray"]
    per_gpu = math.floor(1 / fraction)
    assert layout["clients_per_gpu"] == per_gpu and layout["concurrent_clients"] == per_gpu and layout["cluster_gpus"] == 1.0
    assert f"{per_gpu} clients per GPU" in proc.stderr  # the layout is logged
    head = next(n["node_id"] for n in layout["nodes"] if n["gpus"] == 1.0)

    rows = read_placement(run.path)
    assert len(rows) == 6 and all(r["node_id"] == head and r["gpu_ids"] == ["0"] and r["device"] == "cpu" for r in rows), rows
    actors_per_gpu: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        actors_per_gpu[r["gpu_ids"][0]].add(r["actor_id"])
    assert {gpu: len(actors) for gpu, actors in actors_per_gpu.items()} == {"0": per_gpu}


def test_unreachable_address_fails_at_once_naming_it(tmp_path):
    """Nothing listens on the port: one line naming the address, exit code 2 (the subprocess
    timeout bounds the wait: Ray's own connect would retry for minutes)."""
    address = f"127.0.0.1:{free_port()}"
    proc = fedsim_run(*TINY, "--client-gpus", "0", "--ray-address", address, "--out", "never", cwd=tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedsim: error:")]
    assert len(errors) == 1 and f"cannot reach a Ray cluster at {address} (connection refused)" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "never").exists()
