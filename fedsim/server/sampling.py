"""Client sampling: which clients train in a round, drawn by Flower, seeded and recorded by fedsim.

Flower's strategies sample their nodes themselves: ``FedAvg.configure_train`` asks
``sample_nodes`` for ``max(int(nodes x fraction_train), min_train_nodes)`` of the grid's node ids,
drawn with ``random.sample`` from Python's global generator (``configure_evaluate`` likewise with
the evaluate pair). fedsim keeps that machinery (every strategy in ``fedsim list`` builds on
FedAvg's, :class:`~fedsim.strategies.StrategyHooks` sets the counts) and makes the draw
reproducible:

* the grid lists the node ids in partition order (:class:`~fedsim.server.app.OrderedGrid`), so
  the population does not depend on the random node ids of Flower's engine;
* :func:`seeded_sampling` seeds Python's generator from the run's seed and the round number just
  for the strategy's ``configure_train`` / ``configure_evaluate`` call and puts its previous state
  back afterwards. The sample of round ``r`` is thus a function of ``(seed, r)`` only: a resumed
  run draws the same clients as an uninterrupted one without keeping any sampler state, and the
  evaluate call (same count, same seed, same population) picks exactly the clients that trained;
* :class:`SampleLog` notes the partition ids of each round's train messages, which the
  :class:`~fedsim.server.recorder.RoundRecorder` writes into ``metrics.jsonl`` as ``sampled``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from flwr.app import Message
from flwr.common import MessageType

#: Mixed into the seed of every round's draw, so it differs from other uses of the run's seed.
SAMPLING_SALT = "fedsim-client-sampling"


@contextmanager
def seeded_sampling(seed: int, server_round: int) -> Iterator[None]:
    """Within the block, Python's global ``random`` is seeded from ``(seed, server_round)``;
    afterwards its previous state is back (nothing else sees the draw)."""
    saved = random.getstate()
    random.seed(f"{SAMPLING_SALT}:{seed}:{server_round}")
    try:
        yield
    finally:
        random.setstate(saved)


def sampled_partitions(seed: int, server_round: int, num_clients: int, per_round: int) -> list[int]:
    """The partition ids Flower's ``sample_nodes`` draws in round ``server_round`` when the grid
    lists ``num_clients`` nodes in partition order: ``random.sample`` under :func:`seeded_sampling`
    (for tests and tools that need a run's sample without running it)."""
    with seeded_sampling(seed, server_round):
        return sorted(random.sample(range(num_clients), per_round))


class SampleLog:
    """Grid hook (:class:`~fedsim.server.app.GridHook`) passing the partition ids that a round's
    train messages go to, sorted, to ``on_sampled``."""

    def __init__(self, partition_of: Mapping[int, int], on_sampled: Callable[[list[int]], None]) -> None:
        self._partition_of = partition_of
        self._on_sampled = on_sampled

    def outgoing(self, messages: list[Message]) -> list[Message]:
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if train:
            self._on_sampled(sorted(self._partition_of.get(m.metadata.dst_node_id, -1) for m in train))
        return messages

    def incoming(self, replies: Iterable[Message]) -> None:
        return None
