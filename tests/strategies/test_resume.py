"""Server-side strategy state survives a checkpoint: a run killed in round 3 and resumed equals
an uninterrupted one (personal keys of FedBN/FedPer, DP noise generator, accountant, clip norm)."""

import dataclasses

import pytest

from fedsim.rundir import RunDir
from fedsim.server.app import run_server
from fedsim.server.checkpoint import load_checkpoint
from tests.strategies.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("task_identity")


class Killed(BaseException):
    """Stands in for SIGKILL in the middle of round 3."""


def _kill_in_round_3(msg, reply):
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == "train" and config is not None and config.get("server-round") == 3:
        raise Killed


@pytest.mark.parametrize(
    ("name", "options"), [("fedbn", ()), ("fedper", ()), ("dp_fixed", (("noise", "0.5"),)), ("dp_adaptive", (("noise", "0.5"),))]
)
def test_resumed_run_equals_the_uninterrupted_one(name, options, tmp_path):
    from fedsim.clients.app import app
    from fedsim.server.inprocess import InProcessGrid
    from fedsim.study.federation import quiet_logs

    cfg = tiny_config(tmp_path, name, clients=3, rounds=3, options=options)
    cfg = dataclasses.replace(cfg, local_epochs=1, out=str(tmp_path / "full"))
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with quiet_logs():
        full = run_server(InProcessGrid(app, 3, num_threads=1), cfg)
        with pytest.raises(Killed):
            run_server(InProcessGrid(app, 3, num_threads=1, on_reply=_kill_in_round_3), cut)
        assert load_checkpoint(RunDir(cut.out)).round == 2
        resumed = run_server(InProcessGrid(app, 3, num_threads=1), cut, resume=True)
    assert RunDir(tmp_path / "full").read_results() == RunDir(tmp_path / "cut").read_results()  # all but the wall times
    a, b = RunDir(cfg.out).load_params(), RunDir(cut.out).load_params()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    if name.startswith("dp_"):  # the accountant counted the rounds before the cut too
        assert resumed.train_metrics_clientapp[3]["dp-epsilon"] == full.train_metrics_clientapp[3]["dp-epsilon"]
