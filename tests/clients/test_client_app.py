"""The ClientApp functions called directly on hand-made Messages (no Ray)."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsim.clients import app as client_app
from fedsim.config import ConfigError
from fedsim.models import build_model

pytestmark = pytest.mark.usefixtures("task_identity")

HEAD_KEYS = ["head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"]


def _context(pid: int = 0) -> Context:
    return Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(), run_config={})


def _message(cfg, keys, kind="train", server_round=1, extra=None, seed=0) -> Message:
    torch.manual_seed(seed)
    state = build_model("small_cnn", num_classes=4).state_dict()
    config = ConfigRecord({**cfg.to_flower(), "server-round": server_round, **(extra or {})})
    content = RecordDict({"arrays": ArrayRecord({k: state[k] for k in keys}), "config": config})
    return Message(content=content, dst_node_id=10, message_type=kind)


def test_train_replies_with_exactly_the_shared_keys(tiny_cfg):
    ctx = _context(1)
    reply = client_app.train(_message(tiny_cfg, HEAD_KEYS), ctx)
    assert list(reply.content["arrays"].keys()) == HEAD_KEYS
    m = reply.content["metrics"]
    assert m["partition-id"] == 1 and m["num-examples"] == 27  # 102 pooled / 3 = 34, minus 20 % local test
    assert 0.0 <= m["train-accuracy"] <= 1.0 and m["train-loss"] > 0
    # the private tensors (backbone, head.fc1.weight) are kept in Context.state; shared ones are not
    saved = ctx.state[client_app.STATE_KEY].to_torch_state_dict()
    assert set(saved) == set(build_model("small_cnn").state_dict()) - set(HEAD_KEYS)


def test_private_state_survives_between_rounds(tiny_cfg):
    ctx = _context(0)
    client_app.train(_message(tiny_cfg, HEAD_KEYS), ctx)
    after_round_1 = ctx.state[client_app.STATE_KEY].to_torch_state_dict()["backbone.0.weight"].clone()
    # evaluation on a context with state uses the trained backbone; a fresh context does not
    msg = _message(tiny_cfg, HEAD_KEYS, kind="evaluate")
    with_state = client_app.evaluate(msg, ctx).content["metrics"]
    fresh = client_app.evaluate(msg, _context(0)).content["metrics"]
    assert with_state["test-loss"] != fresh["test-loss"]
    client_app.train(_message(tiny_cfg, HEAD_KEYS, server_round=2), ctx)
    after_round_2 = ctx.state[client_app.STATE_KEY].to_torch_state_dict()["backbone.0.weight"]
    assert not torch.equal(after_round_1, after_round_2)  # trained further from round 1's state


def test_same_inputs_same_outputs(tiny_cfg):
    a = client_app.train(_message(tiny_cfg, HEAD_KEYS), _context(2))
    b = client_app.train(_message(tiny_cfg, HEAD_KEYS), _context(2))
    for k in HEAD_KEYS:
        np.testing.assert_array_equal(a.content["arrays"][k].numpy(), b.content["arrays"][k].numpy())
    assert dict(a.content["metrics"]) == dict(b.content["metrics"])


def test_fedprox_term_keeps_weights_near_the_global_model(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, local_epochs=3, lr=0.01)
    msg0 = _message(cfg, HEAD_KEYS)
    sent = msg0.content["arrays"]["head.fc2.weight"].numpy()

    def drift(mu: float) -> float:
        ctx = _context(0)
        client_app.train(_message(cfg, HEAD_KEYS), ctx)  # round 1 stores the private state
        # round 2 takes the path that restores the private state (received tensors are assigned)
        reply = client_app.train(_message(cfg, HEAD_KEYS, server_round=2, extra={"proximal-mu": mu}), ctx)
        return float(np.linalg.norm(reply.content["arrays"]["head.fc2.weight"].numpy() - sent))

    assert drift(100.0) < 0.5 * drift(0.0)


def test_fedprox_mu_in_run_config_alone_adds_no_proximal_term(tiny_cfg):
    """Only Flower's FedProx puts ``proximal-mu`` into the train config; a ``mu`` strategy option
    in the run config must not switch the term on by itself."""
    cfg = dataclasses.replace(tiny_cfg, strategy_options=(("mu", "100"),))
    a = client_app.train(_message(cfg, HEAD_KEYS), _context(0)).content["arrays"]["head.fc2.weight"].numpy()
    b = client_app.train(_message(tiny_cfg, HEAD_KEYS), _context(0)).content["arrays"]["head.fc2.weight"].numpy()
    np.testing.assert_array_equal(a, b)


def test_missing_partition_id_is_a_clear_error(tiny_cfg):
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="--node-config 'partition-id=0 num-partitions=3'"):
        client_app.train(_message(tiny_cfg, HEAD_KEYS), ctx)
    bad = Context(run_id=1, node_id=5, node_config={"partition-id": 7}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match=r"partition-id 7 is outside 0\.\.2"):
        client_app.train(_message(tiny_cfg, HEAD_KEYS), bad)


def test_wrong_shared_shapes_are_refused(tiny_cfg):
    msg = _message(tiny_cfg, HEAD_KEYS)
    msg.content["arrays"] = ArrayRecord({"head.out.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"cannot take shared arrays \['head.out.weight'\]"):
        client_app.train(msg, _context(0))


def test_float64_arrays_from_server_optimisers_are_cast(tiny_cfg):
    """FedAdam returns float64 arrays; the client trains in its own dtype (float32)."""
    ctx = _context(0)
    client_app.train(_message(tiny_cfg, HEAD_KEYS), ctx)
    msg = _message(tiny_cfg, HEAD_KEYS, server_round=2)
    msg.content["arrays"] = ArrayRecord({k: v.double() for k, v in msg.content["arrays"].to_torch_state_dict().items()})
    reply = client_app.train(msg, ctx)
    assert all(reply.content["arrays"][k].numpy().dtype == np.float32 for k in HEAD_KEYS)


def test_cme_recording_travels_in_the_train_reply(tiny_cfg):
    from fedsim.cme import FIELD, decode
    from fedsim.cme.recorder import recorded_parameters

    cfg = dataclasses.replace(tiny_cfg, cme=True)
    reply = client_app.train(_message(cfg, HEAD_KEYS, server_round=3), _context(1))
    rec = decode(reply.content.config_records["cme"]["payload"])
    assert (rec.client, rec.round, rec.model, rec.epochs) == (1, 3, "small_cnn", cfg.local_epochs)
    assert list(rec.layers) == [n for n, _ in recorded_parameters(build_model("small_cnn"))]
    assert rec.matrices["head.fc2.weight"].shape == (cfg.local_epochs, 128, 128)  # the task's default layer
    assert all(rec.stats[n][:, FIELD["count"]].min() > 0 for n in rec.layers)
    # the reply's model arrays and metrics are exactly those of a run without CMEs
    plain = client_app.train(_message(tiny_cfg, HEAD_KEYS, server_round=3), _context(1))
    assert "cme" not in plain.content.config_records
    for k in HEAD_KEYS:
        np.testing.assert_array_equal(reply.content["arrays"][k].numpy(), plain.content["arrays"][k].numpy())


def _two_rounds(cfg, clear_between: bool) -> tuple[dict, dict]:
    """Train round 1, evaluate, train round 2 on one client; with ``clear_between`` every call
    rebuilds its model from Context.state (as in another actor process)."""
    ctx, out = _context(0), []
    for kind, rnd in (("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)):
        if clear_between:
            client_app.MODELS.clear()
        out.append(getattr(client_app, kind)(_message(cfg, HEAD_KEYS, kind=kind, server_round=rnd), ctx).content)
    return ctx.state[client_app.STATE_KEY].to_torch_state_dict(), {i: c["metrics"] for i, c in enumerate(out)}


def test_kept_model_gives_the_same_results_as_a_rebuilt_one(tiny_cfg):
    client_app.MODELS.clear()
    kept_state, kept_metrics = _two_rounds(tiny_cfg, clear_between=False)
    rebuilt_state, rebuilt_metrics = _two_rounds(tiny_cfg, clear_between=True)
    assert kept_metrics == rebuilt_metrics and all(torch.equal(kept_state[k], rebuilt_state[k]) for k in kept_state)


def test_model_cache_takes_only_a_model_of_the_same_state():
    cache = client_app.ModelCache(max_models=2)
    models = [torch.nn.Linear(2, 2) for _ in range(3)]
    cache.put(("t", "m", 0), "a", models[0])
    assert cache.take(("t", "m", 0), "b") is None and cache.take(("t", "m", 0), "a") is None  # a wrong token drops it
    cache.put(("t", "m", 0), "a", models[0])
    assert cache.take(("t", "m", 0), "a") is models[0] and cache.take(("t", "m", 0), "a") is None  # taken out while in use
    for i, m in enumerate(models):
        cache.put(("t", "m", i), "a", m)
    assert cache.take(("t", "m", 0), "a") is None and cache.take(("t", "m", 2), "a") is models[2]  # least recently used went first
