"""Client-failure policy (--min-clients) with the crash / hang / nan faults, on the in-process grid,
and the one-line failure reasons."""

from __future__ import annotations

import pytest

from fedsim.clients.app import app
from fedsim.clients.tasks import resolve_config
from fedsim.config import ConfigError, RunConfig
from fedsim.rundir import RunDir
from fedsim.server.app import ClientFailedError, NonFiniteUpdateError, one_line_reason, run_server
from fedsim.server.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(tmp_path, name: str, **kw) -> RunDir:
    cfg = resolve_config(RunConfig(**{"profile": "tiny", "models": ("small_cnn",) * 3, "rounds": 2, "out": str(tmp_path / name), **kw}))
    run_server(InProcessGrid(app, cfg.clients, num_threads=1), cfg)
    return RunDir(cfg.out)


def test_crash_with_min_clients_goes_on_and_records_who_failed(tmp_path):
    rows = _run(tmp_path, "a", faults=("1:crash:2",), min_clients=2).read_metrics()
    assert [c["client"] for c in rows[0]["clients"]] == [0, 1, 2] and "failed" not in rows[0]
    # client 1 did not train in round 2 (no train metrics), but evaluated the new global model
    assert [("train_loss" in c, "test_loss" in c) for c in rows[1]["clients"]] == [(True, True), (False, True), (True, True)]
    (failed,) = rows[1]["failed"]
    assert failed["client"] == 1 and failed["phase"] == "train"
    assert failed["reason"] == "InjectedCrash: client 1 crashed in round 2 (injected fault 1:crash:2)"


def test_crash_without_min_clients_stops_with_one_line(tmp_path):
    with pytest.raises(ClientFailedError) as err:
        _run(tmp_path, "b", faults=("1:crash:2",))
    assert (
        str(err.value) == "round 2: 1 of 3 clients failed: client 1: InjectedCrash: client 1 crashed in round 2 (injected fault 1:crash:2)"
    )
    assert [r["round"] for r in RunDir(tmp_path / "b").read_metrics()] == [1]  # round 1 kept


def test_below_min_clients_the_run_stops_naming_every_failed_client(tmp_path):
    with pytest.raises(ClientFailedError, match=r"^round 1: 2 of 3 clients failed; 2 needed \(--min-clients\): client 1: .*; client 2: "):
        _run(tmp_path, "c", faults=("1:crash:1", "2:crash:1"), min_clients=2)


def test_nan_client_is_refused_by_the_guard_or_tolerated_by_the_policy(tmp_path):
    with pytest.raises(NonFiniteUpdateError, match=r"^round 1: non-finite parameters from client 0 \(.+\); stopped before aggregating"):
        _run(tmp_path, "d", faults=("0:nan",))
    rows = _run(tmp_path, "e", faults=("0:nan:2",), min_clients=2).read_metrics()
    assert rows[1]["failed"][0]["client"] == 0 and rows[1]["failed"][0]["reason"].startswith("non-finite parameters (")
    assert all(v is not None for c in rows[1]["clients"] for k, v in c.items() if k.startswith("train_"))


def test_hanging_client_is_dropped_at_the_round_timeout(tmp_path):
    rows = _run(tmp_path, "f", faults=("2:hang:1",), min_clients=2, round_timeout=1.0, rounds=1).read_metrics()
    assert [("train_loss" in c) for c in rows[0]["clients"]] == [True, True, False]
    assert rows[0]["failed"] == [{"client": 2, "phase": "train", "reason": "no reply within the round timeout (1 s)"}]


def test_lr_1e30_stops_with_the_round_and_clients(tmp_path):
    with pytest.raises(NonFiniteUpdateError, match=r"^round 1: non-finite parameters from client 0 \(.+\), client 1 \(.+\), client 2"):
        _run(tmp_path, "g", lr=1e30, rounds=1)


def test_round_fault_levels_are_rounds_and_min_clients_is_bounded():
    with pytest.raises(ConfigError, match=r"crash LEVEL is the round it happens in, a whole number >= 1, got 0.5"):
        RunConfig(faults=("1:crash:0.5",))
    with pytest.raises(ConfigError, match=r"min_clients=4 exceeds the 3 clients"):
        RunConfig(min_clients=4)


RAY_REASON = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\x1b[31mTraceback (most recent call last):\n"
    '  File "/x/ray_transport/ray_actor.py", line 50, in run\n    raise ClientAppException(str(ex)) from ex\n'
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: cannot read image /data/b.jpg\n"
    'Traceback (most recent call last):\n  File "/x/app.py", line 3, in train\n'
    "    raise ValueError('cannot read image /data/b.jpg')\n"
    "ValueError: cannot read image /data/b.jpg\x1b[0m'>"
)


def test_one_line_reason_keeps_the_innermost_error_without_colours():
    assert one_line_reason(RAY_REASON) == "ValueError: cannot read image /data/b.jpg"
    assert one_line_reason("plain words") == "plain words"
    assert len(one_line_reason("x" * 1000)) == 300


class _Grid:
    def __init__(self, replies):
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


def _exchange(node: int, pid: int, cme_round: int | None = None, payload: bytes = b"x"):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    ask = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), node, "train")
    content = RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-examples": 1})})
    if cme_round is not None:
        content["cme"] = ConfigRecord({"payload": payload, "partition-id": pid, "server-round": cme_round})
    return ask, Message(content, reply_to=ask)


def test_replies_are_checked_against_the_node_they_came_from(monkeypatch):
    import fedsim.server.app as server_app
    from fedsim.server.app import OrderedGrid

    monkeypatch.setattr(server_app, "MAX_CME_PAYLOAD", 10)
    pairs = [_exchange(11, 0), _exchange(12, 0), _exchange(13, 2, cme_round=2), _exchange(14, 3, cme_round=3, payload=b"y" * 11)]
    seen: list = []
    grid = OrderedGrid(_Grid([r for _, r in pairs]), min_replies=1, on_failures=seen.extend)
    grid.partition_of = {11: 0, 12: 1, 13: 2, 14: 3}
    good = grid.send_and_receive([a for a, _ in pairs])
    assert [m.metadata.src_node_id for m in good] == [11]
    assert [str(f) for f in seen] == [
        "client 1: replied as partition 0, but node 12 is client 1",
        "client 2: its CME record is of round 2, not 3",
        "client 3: its CME record has 11 bytes, more than the 10 fedsim accepts",
    ]
