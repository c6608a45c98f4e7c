"""Where a client ran (the ``fedsim.placement`` reply record, ``placement.jsonl``), its device
choice under Ray, and its check of the data folder on the node that runs it."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
from flwr.app import Message

from fedsim.clients import app as client_app
from fedsim.config import ConfigError
from fedsim.server.recorder import PlacementLog, read_placement

from .test_client_app import HEAD_KEYS, _context, _message

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize(
    ("gpu_ids", "cuda", "expected"),
    [
        (None, True, "cuda"),  # not under Ray (deployment, in-process): CUDA if there is one
        (None, False, "cpu"),
        ([], True, "cpu"),  # Ray gave no GPU: never take one
        (["0"], True, "cuda"),
        (["0"], False, "cpu"),  # a logical GPU on a machine without CUDA
    ],
)
def test_cuda_only_when_ray_gave_a_gpu(gpu_ids, cuda, expected):
    assert client_app.select_device(gpu_ids, cuda) == torch.device(expected)


def test_replies_say_where_they_ran_and_the_server_logs_it(tiny_cfg, tmp_path):
    train = client_app.train(_message(tiny_cfg, HEAD_KEYS, server_round=2), _context(1))
    evaluate = client_app.evaluate(_message(tiny_cfg, HEAD_KEYS, kind="evaluate", server_round=2), _context(0))
    for reply, pid in ((train, 1), (evaluate, 0)):
        rec = reply.content.config_records[client_app.PLACEMENT_KEY]
        assert rec["partition-id"] == pid and rec["server-round"] == 2 and rec["host"] == socket.gethostname()
        assert rec["node-id"] == "" and rec["gpu-ids"] == [] and rec["device"] == str(client_app.device())  # no Ray here
    log = PlacementLog(tmp_path)
    log.incoming([evaluate.__class__(train.content, reply_to=_message(tiny_cfg, HEAD_KEYS)), evaluate])
    rows = read_placement(tmp_path)
    assert [(r["phase"], r["client"], r["round"]) for r in rows] == [("evaluate", 0, 2), ("train", 1, 2)]
    assert log.outgoing([]) == []


def test_a_data_folder_missing_on_the_node_is_named_with_the_host(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=rf"client 2 on host {socket.gethostname()}: data folder .*nowhere does not exist there"):
        client_app.query(_message(cfg, HEAD_KEYS, kind="query"), _context(2))
    client_app.check_data_dir(str(tmp_path), 0)  # an existing folder passes


def test_placement_record_keeps_the_reply_aggregatable(tiny_cfg):
    reply = client_app.train(_message(tiny_cfg, HEAD_KEYS), _context(0))
    assert isinstance(reply, Message)
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
