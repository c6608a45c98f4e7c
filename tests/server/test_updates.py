"""The server's per-client update norm (fedsim.server.updates), by hand."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from fedsim.server.updates import UpdateNormLog, update_norm

pytestmark = pytest.mark.usefixtures("task_identity")


def _arrays(**named):
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in named.items()})


def test_update_norm_by_hand():
    sent = _arrays(a=[1.0, 2.0], b=[[0.5, 0.5]])
    # only the arrays both hold count ("c" is not in what was sent): ||(3, 4, 0, 0)|| = 5
    assert update_norm(sent, _arrays(a=[4.0, 6.0], b=[[0.5, 0.5]], c=[9.0])) == pytest.approx(5.0)
    assert update_norm(sent, _arrays(a=[1.0, 2.0], b=[[0.5, 0.5]])) == 0.0  # a client that returns what it got
    assert update_norm(sent, _arrays(a=[np.nan, 2.0], b=[[0.5, 0.5]])) == math.inf
    assert update_norm(sent, _arrays(a=[np.inf, 2.0], b=[[0.5, 0.5]])) == math.inf
    assert math.isnan(update_norm(sent, _arrays(z=[1.0])))


def test_update_norm_log_pairs_each_train_reply_with_what_its_node_was_sent():
    got: list[dict[int, float]] = []
    log = UpdateNormLog({11: 0, 12: 1, 13: 2}, got.append)
    out = [
        Message(RecordDict({"arrays": _arrays(w=[0.0, 0.0])}), dst_node_id=11, message_type="train"),
        Message(RecordDict({"arrays": _arrays(w=[1.0, 1.0])}), dst_node_id=12, message_type="train"),
        Message(RecordDict({"arrays": _arrays(w=[2.0, 2.0])}), dst_node_id=13, message_type="train"),
    ]
    assert log.outgoing(out) == out  # messages go out unchanged
    replies = [
        Message(RecordDict({"arrays": _arrays(w=[1.0, 2.0])}), reply_to=out[1]),  # node 12: (0, 1) -> 1
        Message(RecordDict({"arrays": _arrays(w=[3.0, 4.0])}), reply_to=out[0]),  # node 11: (3, 4) -> 5
        Message(Error(code=1, reason="crashed"), reply_to=out[2]),  # an error carries no update
    ]
    log.incoming(replies)
    assert got == [{1: pytest.approx(1.0), 0: pytest.approx(5.0)}]
    # evaluate rounds send no train messages: nothing is reported
    ev = Message(RecordDict({"arrays": _arrays(w=[0.0, 0.0])}), dst_node_id=11, message_type="evaluate")
    log.outgoing([ev])
    log.incoming([Message(RecordDict({"arrays": _arrays(w=[9.0, 9.0])}), reply_to=ev)])
    assert len(got) == 1
