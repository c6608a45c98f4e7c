"""Joining a Ray cluster (``--ray-address``) without Ray: the layout arithmetic, Flower's init
arguments, the reachability check and the config checks. The real cluster is in
``tests/integration/test_ray_cluster.py``."""

from __future__ import annotations

import socket
from unittest.mock import patch

import pytest

from fedsim.clients.tasks import resolve_config
from fedsim.config import ConfigError, RunConfig
from fedsim.simulation import (
    THREAD_PROFILES,
    RayClusterUnreachable,
    RayLayout,
    RayNode,
    ThreadProfile,
    _makespan,
    backend_config,
    check_reachable,
    pick_client_cpus,
)

from .integration.flower_procs import free_port

HEAD = RayNode("a" * 56, "10.0.0.1", cpus=8, gpus=2)
WORKER = RayNode("b" * 56, "10.0.0.2", cpus=4, gpus=0)


@pytest.mark.parametrize(
    ("cpus", "gpus", "head", "worker", "per_gpu"),
    [
        (2, 0, 4, 2, 0),  # CPUs only: 8/2 and 4/2
        (1, 0.25, 8, 0, 4),  # min(8/1, 2/0.25 = 8); no GPU on the worker: none there
        (2, 0.25, 4, 0, 4),  # CPU-bound: 8/2 = 4 < 8 GPU slots
        (1, 0.3, 6, 0, 3),  # floor(2/0.3) = 6; floor(1/0.3) = 3 per GPU
        (1, 0.5, 4, 0, 2),
        (1, 1, 2, 0, 1),
        (1, 2, 1, 0, 0),  # two GPUs per client
    ],
)
def test_layout_counts_clients_per_node_and_per_gpu(cpus, gpus, head, worker, per_gpu):
    layout = RayLayout("10.0.0.1:6379", (HEAD, WORKER), cpus, gpus)
    assert [n.clients(cpus, gpus) for n in layout.nodes] == [head, worker]
    assert layout.concurrent_clients == head + worker and layout.clients_per_gpu == per_gpu
    assert layout.cluster_cpus == 12 and layout.cluster_gpus == 2
    js = layout.to_json()
    assert [n["clients"] for n in js["nodes"]] == [head, worker] and js["address"] == "10.0.0.1:6379"
    assert f"{head + worker} clients at a time" in layout.describe()


def test_layout_that_fits_no_client_is_refused_with_the_largest_node():
    with pytest.raises(ConfigError, match=r"no node of the Ray cluster at h:1 .*client_cpus=16.*use --client-cpus 8 or fewer"):
        RayLayout("h:1", (HEAD, WORKER), 16, 0).check()
    with pytest.raises(ConfigError, match=r"--client-gpus 0 or fewer \(0: the cluster has no GPU\)"):
        RayLayout("h:1", (WORKER,), 1, 0.5).check()
    RayLayout("h:1", (HEAD, WORKER), 8, 2).check()  # exactly one client fits


def test_init_args_join_the_cluster_or_start_ray_here():
    joined = backend_config(resolve_config(RunConfig(profile="tiny", client_gpus=0, ray_address="10.0.0.1:6379")))
    assert joined["init_args"]["address"] == "10.0.0.1:6379" and "num_cpus" not in joined["init_args"]
    own = backend_config(resolve_config(RunConfig(profile="tiny", client_gpus=0, client_cpus=2)))
    assert "address" not in own["init_args"] and own["init_args"]["num_cpus"] >= 1
    # joining a cluster without --client-cpus keeps the former default, 2 CPUs per client
    assert joined["client_resources"] == own["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def _cfg(**kw):
    return resolve_config(RunConfig(profile="tiny", client_gpus=0, client_cpus=1, **kw))


def test_picked_layout_follows_the_round_estimate():
    slow, fast = "resnet50", "small_cnn"  # stand-ins with made-up profiles; alexnet_skip has none here
    profiles = {slow: ThreadProfile(10.0, 1.9, 1.0), fast: ThreadProfile(1.0, 1.1, 1.0)}
    with patch.dict(THREAD_PROFILES, profiles, clear=True):
        # 3 clients that gain almost 2x from 2 threads: 3 x 10/1.9 = 15.8 s one after another beats 20 s in two waves
        assert pick_client_cpus(_cfg(models=(slow,)), cpus=2) == 2.0
        # a 4th client fills the second wave: 4 x 10/1.9 = 21.1 s > 20 s
        assert pick_client_cpus(_cfg(models=(slow,), clients=4), cpus=2) == 1.0
        assert pick_client_cpus(_cfg(models=(fast,)), cpus=2) == 1.0  # 2 s in parallel vs 3 x 1/1.1
        assert pick_client_cpus(_cfg(models=(slow,), clients=4, clients_per_round=3), cpus=2) == 2.0  # the round's clients count
        assert pick_client_cpus(_cfg(models=(fast,)), cpus=1) == 1.0
        assert pick_client_cpus(_cfg(models=(fast, slow, "alexnet_skip")), cpus=2) == 2.0  # no profile: all CPUs for one client
        assert pick_client_cpus(_cfg(models=(fast,), ray_address="10.0.0.1:6379"), cpus=2) == 2.0  # a cluster: as before
    assert _makespan([10, 9, 2], 2) == 11 and _makespan([1, 1, 1], 1) == 3


def test_layout_is_picked_only_when_not_given():
    picked = resolve_config(RunConfig(profile="tiny", models=("small_cnn",), client_gpus=0))
    assert picked.client_cpus == pick_client_cpus(picked)
    assert resolve_config(RunConfig(profile="tiny", models=("small_cnn",), client_gpus=0, client_cpus=2)).client_cpus == 2.0
    assert RunConfig.from_json_dict(picked.to_json_dict()).client_cpus == picked.client_cpus  # --config / --resume keep the pick


def test_reachability_check_names_the_address():
    port = free_port()
    with pytest.raises(RayClusterUnreachable, match=rf"cannot reach a Ray cluster at 127\.0\.0\.1:{port} \(connection refused\)"):
        check_reachable(f"127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")  # something listens: left to Ray


def test_unreachable_address_is_one_line_exit_2_before_anything_starts(tmp_path, capsys):
    from fedsim.cli import main

    address = f"127.0.0.1:{free_port()}"
    code = main(["run", "--profile", "tiny", "--client-gpus", "0", "--ray-address", address, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fedsim: error: cannot reach a Ray cluster at {address}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("address", ["6379", "host:", ":6379", "host:0", "host:70000", "ray://host:10001", "host:port"])
def test_bad_ray_addresses_are_refused(address):
    with pytest.raises(ConfigError, match="ray_address must be host:port"):
        RunConfig(ray_address=address)


def test_ray_address_from_run_config_and_gpu_fractions():
    assert RunConfig.from_flower({"ray-address": "auto"}).ray_address == "auto"
    assert RunConfig(ray_address="[::1]:6379").ray_address == "[::1]:6379"
    assert RunConfig(client_gpus=2).client_gpus == 2 and RunConfig(client_gpus=0.25).client_gpus == 0.25
    with pytest.raises(ConfigError, match=r"fraction 0 < F <= 1 .* or a whole number of GPUs, got 1\.5"):
        RunConfig(client_gpus=1.5)


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
