"""Server pieces without Ray: node waiting, reply ordering, per-client recording."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedsim.rundir import RunDir
from fedsim.server.app import ClientFailedError, NodeTimeoutError, OrderedGrid, wait_for_nodes
from fedsim.server.recorder import RoundRecorder

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    def __init__(self, nodes, replies=()):
        self.nodes, self.replies, self.pushed = nodes, list(replies), []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return ["id"]


def _reply(pid, **metrics):
    content = RecordDict({"metrics": MetricRecord({"partition-id": pid, **metrics})})
    return Message(content=content, dst_node_id=pid + 1, message_type="train")


def test_wait_for_nodes_gives_up_with_count():
    with pytest.raises(NodeTimeoutError, match="waited 0s for 3 client nodes but saw only 2"):
        wait_for_nodes(FakeGrid([1, 2]), 3, timeout=0.2, poll=0.05)
    assert wait_for_nodes(FakeGrid([1, 2, 3]), 3, timeout=0.2) == [1, 2, 3]


def test_ordered_grid_sorts_by_partition_and_delegates():
    grid = OrderedGrid(
        FakeGrid([1], [_reply(2, **{"num-examples": 1}), _reply(0, **{"num-examples": 1}), _reply(1, **{"num-examples": 1})])
    )
    assert [int(m.content["metrics"]["partition-id"]) for m in grid.send_and_receive([])] == [0, 1, 2]
    assert grid.get_node_ids() == [1] and grid.push_messages(["m"]) == ["id"] and grid._grid.pushed == ["m"]


def test_ordered_grid_stops_on_client_error():
    failed = Message(Error(code=0, reason="cannot read image /data/x.jpg"), reply_to=_reply(1))
    grid = OrderedGrid(FakeGrid([1], [_reply(0, **{"num-examples": 1}), failed]))
    with pytest.raises(ClientFailedError, match=r"1 of 2 clients failed: node .*cannot read image /data/x\.jpg"):
        grid.send_and_receive([])


def test_recorder_writes_one_line_per_round_with_per_client_metrics(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rec = RoundRecorder(rd, ["resnet50", "densenet121"], global_eval=lambda arrays: {"global-accuracy": 0.5})
    train = [
        _reply(1, **{"num-examples": 30, "train-loss": 2.0, "train-accuracy": 0.25}).content,
        _reply(0, **{"num-examples": 10, "train-loss": 1.0, "train-accuracy": 0.75}).content,
    ]
    rec.note_update_norms({0: 0.5, 1: float("inf")})  # the UpdateNormLog hook runs before aggregation
    agg = rec.train_metrics(train, "num-examples")
    assert agg["train-loss"] == pytest.approx(1.75) and "partition-id" not in agg  # (10*1 + 30*2) / 40
    rec.evaluate_metrics(
        [
            _reply(0, **{"num-examples": 5, "test-loss": 0.1, "test-accuracy": 0.8}).content,
            _reply(1, **{"num-examples": 7, "test-loss": 0.2, "test-accuracy": 0.6}).content,
        ],
        "num-examples",
    )
    out = rec.on_round_end(1, ArrayRecord({"x": Array(np.zeros(1))}))
    assert out["global-accuracy"] == 0.5
    (line,) = rd.read_metrics()
    assert line["round"] == 1 and line["global"] == {"accuracy": 0.5}
    assert line["clients"] == [
        {
            "client": 0,
            "model": "resnet50",
            "num_examples": 10,
            "num_test_examples": 5,
            "train_loss": 1.0,
            "train_accuracy": 0.75,
            "test_loss": 0.1,
            "test_accuracy": 0.8,
            "update_norm": 0.5,
        },
        {
            "client": 1,
            "model": "densenet121",
            "num_examples": 30,
            "num_test_examples": 7,
            "train_loss": 2.0,
            "train_accuracy": 0.25,
            "test_loss": 0.2,
            "test_accuracy": 0.6,
            "update_norm": None,  # not finite: written as null
        },
    ]
    # round 0 (Flower's initial evaluation) writes no line
    rec.on_round_end(0, ArrayRecord())
    assert len(rd.read_metrics()) == 1
    # the norms are per round: the next round's line has none unless the hook reports them
    rec.train_metrics(train, "num-examples")
    rec.on_round_end(2, ArrayRecord({"x": Array(np.zeros(1))}))
    assert all("update_norm" not in c for c in rd.read_metrics()[-1]["clients"])


def test_ordered_grid_hands_cme_records_to_the_archive_and_leaves_replies_alone(tmp_path, rng):
    from flwr.app import ConfigRecord

    from fedsim.cme import CMEArchive, CMEArchiveWriter, encode
    from tests.cme.test_archive import fake_cme

    replies = []
    for pid in (1, 0):
        msg = _reply(pid, **{"num-examples": 1})
        msg.content["cme"] = ConfigRecord({"payload": encode(fake_cme(rng), pid, 4, "m"), "partition-id": pid})
        replies.append(msg)
    grid = OrderedGrid(FakeGrid([1], replies), on_reply=CMEArchiveWriter(tmp_path).collect)
    out = grid.send_and_receive([])
    assert all("cme" in m.content.config_records for m in out)  # read, not removed (no reply mutation)
    arch = CMEArchive(tmp_path)
    assert arch.clients == [0, 1] and arch.rounds(1) == [4]


def test_non_finite_parameters_are_refused_before_aggregation():
    from fedsim.server.app import NonFiniteUpdateError

    def reply(pid, value):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"head.w": Array(np.array([1.0, value], dtype=np.float32))}),
                "metrics": MetricRecord({"partition-id": pid, "num-examples": 1}),
            }
        )
        return Message(content=content, dst_node_id=pid + 1, message_type="train")

    ok = OrderedGrid(FakeGrid([1], [reply(0, 2.0), reply(1, 3.0)]))
    assert len(ok.send_and_receive([])) == 2
    bad = OrderedGrid(FakeGrid([1], [reply(0, 2.0), reply(2, np.inf), reply(1, np.nan)]))
    with pytest.raises(NonFiniteUpdateError, match=r"non-finite parameters from client 1 \(head\.w\), client 2 \(head\.w\); stopped"):
        bad.send_and_receive([])


def test_an_exploding_learning_rate_stops_the_run_with_a_clear_error(tmp_path):
    """`--lr 1e30` used to exit 0 with NaN parameters; now the server stops at the first NaN update."""
    from fedsim.clients.app import app
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig
    from fedsim.server.app import NonFiniteUpdateError, run_server
    from fedsim.server.inprocess import InProcessGrid

    cfg = resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, lr=1e30, out=str(tmp_path / "run")))
    with pytest.raises(NonFiniteUpdateError, match="non-finite parameters from client"):
        run_server(InProcessGrid(app, 3, num_threads=1), cfg)
    assert not (tmp_path / "run" / "global_params.safetensors").exists()
