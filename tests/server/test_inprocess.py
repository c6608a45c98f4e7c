"""InProcessGrid: Flower's Simulation Engine contract without Ray, and the same run as on Ray."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsim.clients.tasks import resolve_config
from fedsim.cme import CMEArchive
from fedsim.config import RunConfig
from fedsim.rundir import RunDir
from fedsim.server.inprocess import InProcessGrid, ray_client_threads

pytestmark = pytest.mark.usefixtures("task_identity")  # restores Flower's process task identity

toy = ClientApp()


@toy.train()
def _toy_train(msg: Message, context) -> Message:
    calls = int(context.state["toy"]["calls"]) + 1 if "toy" in context.state else 1
    context.state["toy"] = ConfigRecord({"calls": calls})  # kept only if the call succeeds
    if msg.content["config"].get("fail", False):
        raise RuntimeError("boom")
    msg.content["config"]["touched"] = True  # the ClientApp works on its own copy
    pid = int(context.node_config["partition-id"])
    metrics = {"partition-id": pid, "num-partitions": int(context.node_config["num-partitions"]), "calls": calls}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _send(grid: InProcessGrid, fail: bool = False) -> tuple[list[Message], list[Message]]:
    content = RecordDict({"config": ConfigRecord({"fail": fail})})
    msgs = [Message(content, nid, "train", group_id="1") for nid in grid.get_node_ids()]
    return msgs, list(grid.send_and_receive(msgs))


def test_contexts_replies_and_state_like_the_simulation_engine():
    grid = InProcessGrid(toy, 3)
    ids = list(grid.get_node_ids())
    assert len(set(ids)) == 3
    for _ in range(2):
        msgs, replies = _send(grid)
    assert [r.content["metrics"]["partition-id"] for r in replies] == [0, 1, 2]
    assert all(r.content["metrics"]["num-partitions"] == 3 for r in replies)
    assert all(r.content["metrics"]["calls"] == 2 for r in replies)  # Context.state persisted
    for m, r in zip(msgs, replies, strict=True):
        assert m.metadata.message_id and r.metadata.message_id and r.metadata.message_id != m.metadata.message_id
        assert r.metadata.reply_to_message_id == m.metadata.message_id
        assert (r.metadata.src_node_id, r.metadata.dst_node_id) == (m.metadata.dst_node_id, m.metadata.src_node_id)
        assert r.metadata.group_id == "1" and r.metadata.message_type == "train"
    assert "touched" not in msgs[0].content["config"]  # the server's message is not mutated
    assert grid.contexts[ids[1]].node_config == {"partition-id": 1, "num-partitions": 3}
    assert list(grid.pull_messages([m.metadata.message_id for m in msgs])) == []  # each reply is returned once


def test_client_exception_becomes_an_error_reply_and_keeps_the_old_context():
    grid = InProcessGrid(toy, 2)
    _send(grid)
    _, replies = _send(grid, fail=True)
    assert all(r.has_error() and r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in replies)
    assert "boom" in replies[0].error.reason
    _, replies = _send(grid)
    assert [r.content["metrics"]["calls"] for r in replies] == [2, 2]  # the failed call left no trace


def test_absent_nodes_never_reply_and_on_reply_sees_every_exchange():
    seen: list[tuple[int, int]] = []
    grid = InProcessGrid(toy, 3, absent={1}, on_reply=lambda m, r: seen.append((m.metadata.dst_node_id, r.metadata.src_node_id)))
    assert len(list(grid.get_node_ids())) == 3  # listed as connected
    _, replies = _send(grid)
    assert [r.content["metrics"]["partition-id"] for r in replies] == [0, 2]
    assert len(seen) == 2 and all(a == b for a, b in seen)
    with pytest.raises(ValueError, match="absent"):
        InProcessGrid(toy, 3, absent={3})


def test_ray_client_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [ray_client_threads(c) for c in (0.5, 1, 2, 2.5)] == [1, 1, 2, 2]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ray_client_threads(1) == 3


def _tiny(tmp_path, name: str, **kw) -> object:
    return resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, rounds=2, out=str(tmp_path / name), **kw))


def _run_in_process(cfg, num_threads: int | None = 1, **grid_kw) -> RunDir:
    from fedsim.clients.app import app
    from fedsim.server.app import run_server

    run_server(InProcessGrid(app, cfg.clients, num_threads=num_threads, **grid_kw), cfg)
    return RunDir(cfg.out)


def test_run_server_writes_a_normal_run_directory(tmp_path):
    cfg = _tiny(tmp_path, "a", cme=True)
    rd = _run_in_process(cfg)
    rows = rd.read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert [c["client"] for c in rows[-1]["clients"]] == [0, 1, 2] and rows[-1]["global"] is not None
    assert "backbone.0.weight" in rd.load_params()  # whole small_cnn aggregated
    arch = CMEArchive(rd.path)
    assert arch.clients == [0, 1, 2] and arch.rounds(2) == [1, 2]
    # same config, same process: bit-identical outputs
    again = _run_in_process(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert rd.read_results() == again.read_results()  # all but the wall times


def test_leave_one_out_keeps_the_other_clients_partition(tmp_path):
    cfg = _tiny(tmp_path, "full")
    full = _run_in_process(cfg).read_metrics()
    loo = _run_in_process(dataclasses.replace(cfg, out=str(tmp_path / "loo")), absent={1}).read_metrics()
    assert [c["client"] for c in loo[-1]["clients"]] == [0, 2]
    # same local data as in the full federation (train and test sizes unchanged)
    for key in ("num_examples", "num_test_examples"):
        assert [c[key] for c in loo[0]["clients"]] == [c[key] for c in full[0]["clients"] if c["client"] != 1]
    assert loo[-1]["global"] != full[-1]["global"]


def _cme_content(path) -> dict:
    arch = CMEArchive(path)
    out = {}
    for c in arch.clients:
        for r in arch.rounds(c):
            rec = arch.read(c, r)
            out[(c, r)] = ({k: v.tobytes() for k, v in rec.stats.items()}, {k: v.tobytes() for k, v in rec.matrices.items()})
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_bit_identical_to_the_simulation_engine(tmp_path, monkeypatch):
    """The same config through Ray (Flower's Simulation Engine) and through InProcessGrid with the
    torch thread count a Ray actor gets: identical metrics.jsonl, parameters and CME archive. The
    layout is the one fedsim picks (no --client-cpus), recorded in config.json; the client actors
    run at niceness 0 with that many torch threads."""
    from safetensors import safe_open

    from fedsim.clients.timing import TIMINGS_ENV
    from fedsim.simulation import run_simulation

    monkeypatch.setenv(TIMINGS_ENV, str(tmp_path / "timings.jsonl"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = RunConfig(profile="tiny", models=("small_cnn",) * 3, rounds=2, out=str(tmp_path / "ray"), cme=True)
    run_simulation(given)
    calls = [json.loads(line) for line in (tmp_path / "timings.jsonl").read_text().splitlines()]
    monkeypatch.delenv(TIMINGS_ENV)
    cfg = resolve_config(given)
    ours = _run_in_process(dataclasses.replace(cfg, out=str(tmp_path / "inproc")), num_threads=ray_client_threads(cfg.client_cpus))
    ray_dir = RunDir(cfg.out)
    layout = ray_dir.read_config()["ray"]
    assert layout["client_cpus_picked"] and layout["client_cpus"] == ray_dir.read_config()["client_cpus"] == cfg.client_cpus
    assert len(calls) == 12 and {c["phase"] for c in calls} == {"train", "evaluate"}  # 3 clients x 2 rounds x 2 phases
    assert all(c["nice"] == 0 and c["torch_threads"] == ray_client_threads(cfg.client_cpus) for c in calls)
    assert len({c["pid"] for c in calls}) <= layout["concurrent_clients"]
    assert ray_dir.read_results() == ours.read_results()  # all but the wall times
    a, b = ray_dir.load_params(), ours.load_params()
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # safetensors writes its metadata map in no fixed order, so the files' bytes may differ
    metas = []
    for d in (ray_dir, ours):
        with safe_open(str(d.path / "global_params.safetensors"), "np") as f:
            metas.append(f.metadata())
    assert metas[0] == metas[1]
    assert _cme_content(ray_dir.path) == _cme_content(ours.path)
