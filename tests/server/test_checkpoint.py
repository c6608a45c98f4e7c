"""Checkpoints and --resume on the in-process grid: a run cut after k rounds and resumed equals an
uninterrupted one bit for bit (private client backbones, FedAdam's server state, CME archive)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping, FedAdam, FedAvgM

from fedsim.clients.app import app
from fedsim.clients.tasks import resolve_config
from fedsim.cme import CMEArchive
from fedsim.config import RunConfig
from fedsim.rundir import RunDir
from fedsim.server.app import run_server
from fedsim.server.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    load_strategy_state,
    prune_cme_index,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from fedsim.server.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")

MIXED = ("small_cnn", "alexnet_skip", "small_cnn")  # alexnet_skip keeps a private backbone


class Killed(BaseException):
    """Stands in for SIGKILL: raised out of the grid in the middle of a round."""


def _kill_in_round(rnd: int):
    def hook(msg, reply):
        config = msg.content.config_records.get("config")
        if msg.metadata.message_type == "train" and config is not None and config.get("server-round") == rnd:
            raise Killed

    return hook


def _grid(cfg, **kw) -> InProcessGrid:
    return InProcessGrid(app, cfg.clients, num_threads=1, **kw)


def _cme_content(path) -> dict:
    arch = CMEArchive(path)
    return {(c, r): {k: v.tobytes() for k, v in arch.read(c, r).stats.items()} for c in arch.clients for r in arch.rounds(c)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-round uninterrupted run, and the same run killed in round 3 then resumed."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    root = tmp_path_factory.mktemp("resume")
    cfg = resolve_config(
        RunConfig(profile="tiny", rounds=3, models=MIXED, server_model="small_cnn", strategy="fedadam", cme=True, out=str(root / "full"))
    )
    run_server(_grid(cfg), cfg)
    cut = dataclasses.replace(cfg, out=str(root / "cut"))
    with pytest.raises(Killed):
        run_server(_grid(cut, on_reply=_kill_in_round(3)), cut)
    before = load_checkpoint(RunDir(cut.out))
    shutil.copytree(cut.out, root / "cut-copy")
    run_server(_grid(cut), cut, resume=True)  # fresh grid: new contexts, private state from the checkpoint
    # control: the same resume without the clients' private state must differ (the test can fail)
    amnesic = dataclasses.replace(cut, out=str(root / "cut-copy"))
    save_checkpoint(RunDir(amnesic.out), dataclasses.replace(before, clients={}))
    run_server(_grid(amnesic), amnesic, resume=True)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return RunDir(cfg.out), RunDir(cut.out), before, RunDir(amnesic.out)


def test_resumed_run_is_bit_identical(runs):
    full, resumed, before, amnesic = runs
    assert before.round == 2 and sorted(before.clients) == [0, 1, 2]
    # every client's private backbone (heads are shared in a mixed federation) is in the checkpoint
    assert all(any(v.dtype == np.float32 and v.size > 1000 for v in state.values()) for state in before.clients.values())
    assert {"strategy/m_t", "strategy/v_t"} <= {k.rsplit("/", 1)[0] for k in before.strategy_arrays}  # FedAdam moments
    assert full.read_results() == resumed.read_results()  # all but the wall times
    a, b = full.load_params(), resumed.load_params()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert _cme_content(full.path) == _cme_content(resumed.path)
    assert [r["round"] for r in resumed.read_metrics()] == [1, 2, 3]  # no duplicates
    assert amnesic.read_metrics()[2] != full.read_metrics()[2]  # private state matters: restoring it is what keeps runs equal


def test_checkpoint_holds_the_last_round_and_a_finished_run_cannot_resume(runs):
    full, *_ = runs
    assert load_checkpoint(full).round == 3
    cfg = resolve_config(RunConfig.from_json_dict(full.read_config()))
    with pytest.raises(CheckpointError, match=r"already finished all 3 rounds; nothing to resume"):
        run_server(_grid(cfg), cfg, resume=True)


def test_resume_without_checkpoint_names_the_cause(tmp_path):
    cfg = resolve_config(RunConfig(profile="tiny", rounds=1, models=("small_cnn",) * 3, checkpoint_every=0, out=str(tmp_path / "r")))
    run_server(_grid(cfg), cfg)
    assert not (tmp_path / "r" / CHECKPOINT_FILE).exists()
    with pytest.raises(CheckpointError, match=r"has no checkpoint .*--checkpoint-every 0, so it cannot be resumed"):
        run_server(_grid(cfg), cfg, resume=True)


def test_checkpoint_file_is_readable_by_the_group(runs):
    full, *_ = runs
    assert (full.path / CHECKPOINT_FILE).stat().st_mode & 0o044 == 0o044  # umask 022: 0644, not mkstemp's 0600


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAdam(eta=0.05),
        lambda: FedAvgM(server_momentum=0.9),
        lambda: DifferentialPrivacyClientSideAdaptiveClipping(FedAdam(), noise_multiplier=0.1, num_sampled_clients=3),
    ],
)
def test_strategy_state_round_trips(make):
    s = make()
    inner = getattr(s, "strategy", s)
    rng = np.random.default_rng(0)
    if isinstance(inner, FedAdam):
        inner.m_t = {"w": rng.normal(size=(2, 3))}
        inner.v_t = {"w": rng.random((2, 3))}
    else:
        inner.current_arrays = ArrayRecord({"w": Array(rng.normal(size=4))})
        inner.momentum_vector = [rng.normal(size=4)]
    if inner is not s:
        s.clipping_norm = 0.37
    arrays, meta = strategy_state(s)
    fresh = make()
    json.dumps(meta)  # the metadata is plain JSON
    load_strategy_state(fresh, arrays, meta)
    again_arrays, again_meta = strategy_state(fresh)
    assert again_meta == meta and again_arrays.keys() == arrays.keys()
    assert all(np.array_equal(again_arrays[k], arrays[k]) for k in arrays)


def test_rng_state_restores_python_numpy_and_torch():
    import random

    import torch

    from fedsim.server.checkpoint import restore_rng

    meta, arrays = rng_state()
    first = (random.random(), np.random.random(), torch.rand(1).item())  # noqa: NPY002
    restore_rng(json.loads(json.dumps(meta)), arrays)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == first  # noqa: NPY002


def test_truncate_metrics_and_prune_cme_index(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    for r in (1, 2, 3):
        rd.append_metrics({"round": r, "clients": []})
    with open(rd.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "cli')  # torn by a kill
    assert rd.truncate_metrics(2) == 2 and [r["round"] for r in rd.read_metrics()] == [1, 2]
    assert rd.truncate_metrics(2) == 0
    (rd.path / "cme").mkdir()
    index = {"format": 1, "fields": ["a"], "entries": [{"client": 0, "round": r} for r in (1, 2, 3)]}
    (rd.path / "cme" / "index.json").write_text(json.dumps(index))
    assert prune_cme_index(rd.path, 1) == 2
    assert json.loads((rd.path / "cme" / "index.json").read_text())["entries"] == [{"client": 0, "round": 1}]
