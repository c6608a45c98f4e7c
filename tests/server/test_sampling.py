"""Client sampling (--fraction-train / --clients-per-round): the count, the seeded draw through
Flower's own ``sample_nodes``, every strategy, the record in metrics.jsonl, CMEs and resume."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from fedsim.clients.tasks import resolve_config
from fedsim.cme import CMEArchive
from fedsim.config import ConfigError, RunConfig
from fedsim.rundir import RunDir
from fedsim.server.app import OrderedGrid, run_server
from fedsim.server.checkpoint import load_checkpoint
from fedsim.server.sampling import sampled_partitions, seeded_sampling
from fedsim.strategies import STRATEGIES, StrategyHooks, build_strategy
from tests.strategies.helpers import FakeGrid


def _draw(seed: int, rnd: int, n: int, k: int) -> list[int]:
    """The draw written out independently: Python's Random seeded with the documented string."""
    return sorted(random.Random(f"fedsim-client-sampling:{seed}:{rnd}").sample(range(n), k))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, 10), ({"fraction_train": 0.1}, 1), ({"fraction_train": 0.25}, 2), ({"fraction_train": 0.01}, 1), ({"clients_per_round": 7}, 7)],
)
def test_sample_size(kwargs, expected):
    assert RunConfig(clients=10, **kwargs).sample_size() == expected
    assert RunConfig(clients=1000, fraction_train=0.1).sample_size() == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction_train": 0.0}, r"fraction_train must be a number in \(0, 1\]"),
        ({"fraction_train": 1.5}, r"fraction_train must be a number in \(0, 1\]"),
        ({"clients_per_round": 11}, "clients_per_round=11 exceeds the 10 clients"),
        ({"clients_per_round": -1}, "clients_per_round must be a whole number >= 0"),
        ({"clients_per_round": 3, "fraction_train": 0.5}, "give either --fraction-train"),
        ({"clients_per_round": 3, "min_clients": 4}, "min_clients=4 exceeds the 3 clients sampled per round"),
    ],
)
def test_bad_sampling_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(clients=10, **kwargs)


def test_one_model_name_applies_to_every_client():
    cfg = RunConfig(clients=5, models=("small_cnn",))
    assert cfg.client_models() == ("small_cnn",) * 5 and cfg.model_for(4) == "small_cnn"
    flower = RunConfig.from_flower({"clients": 5, "models": "small_cnn", "clients-per-round": 2, "fraction-train": 1.0})
    assert flower.client_models() == ("small_cnn",) * 5 and flower.sample_size() == 2
    assert resolve_config(RunConfig(profile="tiny", clients=5, models=("small_cnn",))).server_model == "small_cnn"


def test_ordered_grid_lists_nodes_in_partition_order():
    class Shuffled(FakeGrid):
        def get_node_ids(self) -> list[int]:
            return [907, 15, 311, 42]

    grid = OrderedGrid(Shuffled(4))  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [907, 15, 311, 42]  # before identify: as the engine lists them
    grid.partition_of = {15: 3, 907: 1, 311: 0, 42: 2}
    assert list(grid.get_node_ids()) == [311, 907, 42, 15]


def test_seeded_draw_is_flowers_sample_and_leaves_random_alone():
    random.seed(123)
    before = random.getstate()
    assert sampled_partitions(0, 1, 10, 3) == _draw(0, 1, 10, 3)
    with seeded_sampling(0, 1):
        inside = random.random()
    with seeded_sampling(0, 1):
        assert random.random() == inside
    assert random.getstate() == before
    draws = [sampled_partitions(0, r, 100, 10) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) == 5 and all(len(set(d)) == 10 for d in draws)
    assert sampled_partitions(1, 1, 100, 10) != draws[0]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_samples_k_clients_seeded(name, tmp_path):
    """Flower's configure_train / configure_evaluate of every registered strategy, under the
    seeded draw, address exactly K nodes: those of the independent draw, the same for both."""
    cfg = resolve_config(RunConfig(profile="tiny", clients=10, clients_per_round=7, models=("small_cnn",), strategy=name))
    strategy = build_strategy(cfg, StrategyHooks(cfg.clients))
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(np.zeros(2, dtype=np.float32)) for k in ("head.fc1.weight", "head.out.weight", "bn.running_mean")})
    grid = FakeGrid(10)  # node k + 1 is partition k, in order
    for rnd in (1, 2):
        with seeded_sampling(cfg.seed, rnd):
            train = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
        with seeded_sampling(cfg.seed, rnd):
            evaluate = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
        expected = _draw(cfg.seed, rnd, 10, 7)
        assert sorted(m.metadata.dst_node_id - 1 for m in train) == expected
        assert sorted(m.metadata.dst_node_id - 1 for m in evaluate) == expected


def test_sampling_checks_use_the_clients_per_round():
    with pytest.raises(ConfigError, match=r"bulyan .* needs >= 4f\+3 = 7 clients, got 5 clients per round \(sampled of 20\)"):
        resolve_config(RunConfig(profile="tiny", clients=20, clients_per_round=5, models=("small_cnn",), strategy="bulyan"))


def _sampled_cfg(tmp_path, name: str, **kw):
    base = RunConfig(
        profile="tiny", clients=6, clients_per_round=2, models=("small_cnn",), rounds=3, num_samples=200, out=str(tmp_path / name)
    )
    cfg = resolve_config(dataclasses.replace(base, **kw))
    return dataclasses.replace(cfg, local_epochs=1)


class Killed(BaseException):
    """Stands in for SIGKILL in the middle of round 3."""


def _kill_in_round_3(msg, reply):
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == "train" and config is not None and config.get("server-round") == 3:
        raise Killed


@pytest.mark.usefixtures("task_identity")
def test_sampled_run_records_cmes_and_resumes_bit_identically(tmp_path):
    """In-process (no Ray): 2 of 6 clients per round, recorded, with CMEs; checkpoints every 2
    rounds, so the round-2 checkpoint must also hold the state of clients that trained only in
    round 1; a run cut in round 3 and resumed equals the uninterrupted one."""
    from fedsim.clients.app import app
    from fedsim.server.inprocess import InProcessGrid
    from fedsim.study.federation import quiet_logs

    cfg = _sampled_cfg(tmp_path, "full", cme=True, checkpoint_every=2)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with quiet_logs():
        run_server(InProcessGrid(app, 6, num_threads=1), cfg)
        with pytest.raises(Killed):
            run_server(InProcessGrid(app, 6, num_threads=1, on_reply=_kill_in_round_3), cut)
        ckpt = load_checkpoint(RunDir(cut.out))
        run_server(InProcessGrid(app, 6, num_threads=1), cut, resume=True)
    rows = RunDir(cfg.out).read_metrics()
    for r in rows:
        assert r["sampled"] == _draw(cfg.seed, r["round"], 6, 2)
        assert [c["client"] for c in r["clients"]] == r["sampled"]  # the same clients trained and evaluated
    assert ckpt.round == 2 and sorted(ckpt.clients) == sorted(set(rows[0]["sampled"]) | set(rows[1]["sampled"]))
    arch = CMEArchive(RunDir(cfg.out).path)
    assert sorted(arch.clients) == sorted({c for r in rows for c in r["sampled"]})
    assert all(arch.rounds(c) == [r["round"] for r in rows if c in r["sampled"]] for c in arch.clients)
    assert RunDir(cfg.out).read_results() == RunDir(cut.out).read_results()  # all but the rounds' wall times
    a, b = RunDir(cfg.out).load_params(), RunDir(cut.out).load_params()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.usefixtures("task_identity")
def test_message_window_keeps_few_in_flight_and_changes_no_reply():
    """OrderedGrid(window=2) pushes at most 2 messages before their replies are pulled, and
    returns the same replies, sorted, as pushing all 7 at once."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsim.server.app import StopRequest
    from fedsim.server.inprocess import InProcessGrid
    from tests.server.test_inprocess import toy

    class Counting(InProcessGrid):
        in_flight = most = 0

        def push_messages(self, messages):
            ids = list(super().push_messages(messages))
            self.in_flight += len(ids)
            self.most = max(self.most, self.in_flight)
            return ids

        def pull_messages(self, message_ids):
            got = list(super().pull_messages(message_ids))
            self.in_flight -= len(got)
            return got

    results = {}
    for window in (0, 2):
        inner = Counting(toy, 7)
        grid = OrderedGrid(inner, stop=StopRequest(), window=window)
        grid.partition_of = {nid: k for k, nid in enumerate(inner.get_node_ids())}
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), nid, "train", group_id="1") for nid in inner.get_node_ids()]
        replies = grid.send_and_receive(msgs, timeout=60)
        results[window] = [(m.metadata.src_node_id, int(m.content["metrics"]["partition-id"])) for m in replies]
        assert inner.most == (7 if window == 0 else 2)
    assert results[0] == results[2] and [p for _, p in results[2]] == list(range(7))
