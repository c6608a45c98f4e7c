"""Each client's update norm per round, measured by the server: ``update_norm`` in ``metrics.jsonl``.

The update of client ``k`` in round ``r`` is ``w_k - w``: the shared arrays it returns minus the
ones the server sent it (the arrays both carry; client state such as FedBN's local layers never
leaves the client and is not part of it). Its L2 norm is the CME validation study's best single
score for a client that contributes little (docs/cme-validation.md: a client with a tenth of the
data or one that returns what it received has the smallest update of its same-model peers in
every seed), and it costs one pass over the arrays per reply, so every run records it and
``fedsim analyze``'s ``weak`` verdict can use it (:func:`fedsim.analysis.agreement.update_tests`).

Not recorded under differential privacy (``dp_fixed`` / ``dp_adaptive``): a client's exact update
norm is not covered by the run's privacy accounting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType

#: The record name of the shared arrays in train messages and replies (Flower's strategies).
ARRAYS_KEY = "arrays"


def update_norm(sent: ArrayRecord, got: ArrayRecord) -> float:
    """``||got - sent||_2`` over the arrays both records hold (float64 accumulation); ``inf`` when
    the difference is not finite (a diverged client); ``nan`` when they share no array."""
    return _norm_against(_float64(sent), got)


def _float64(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().astype(np.float64, copy=False) for k, a in record.items()}


def _norm_against(sent: Mapping[str, np.ndarray], got: ArrayRecord) -> float:
    keys = [k for k in got if k in sent]
    if not keys:
        return float("nan")
    total = 0.0
    for k in keys:
        d = got[k].numpy().astype(np.float64, copy=False) - sent[k]
        total += float(np.sum(d * d))
    return float(np.sqrt(total)) if np.isfinite(total) else float("inf")


class UpdateNormLog:
    """Grid hook (:class:`~fedsim.server.app.GridHook`): remembers the arrays each train message
    carries and passes ``{partition id: update norm}`` of the round's train replies to ``on_norms``
    (replies with an error, or without arrays, are left out)."""

    def __init__(self, partition_of: Mapping[int, int], on_norms: Callable[[dict[int, float]], None]) -> None:
        self._partition_of = partition_of
        self._on_norms = on_norms
        self._sent: dict[int, ArrayRecord] = {}

    def outgoing(self, messages: list[Message]) -> list[Message]:
        train = {
            m.metadata.dst_node_id: m.content.array_records.get(ARRAYS_KEY)
            for m in messages
            if m.metadata.message_type == MessageType.TRAIN
        }
        self._sent = {node: arrays for node, arrays in train.items() if arrays is not None}
        return messages

    def incoming(self, replies: Iterable[Message]) -> None:
        if not self._sent:
            return
        norms: dict[int, float] = {}
        # Flower's strategies send one ArrayRecord to every node of a round: convert it once, not per reply
        converted: dict[int, dict[str, np.ndarray]] = {}
        for m in replies:
            sent = self._sent.get(m.metadata.src_node_id)
            if sent is None or m.has_error() or m.metadata.message_type != MessageType.TRAIN:
                continue
            got = m.content.array_records.get(ARRAYS_KEY)
            pid = self._partition_of.get(m.metadata.src_node_id)
            if got is not None and pid is not None:
                if id(sent) not in converted:
                    converted[id(sent)] = _float64(sent)
                norms[pid] = _norm_against(converted[id(sent)], got)
        self._sent = {}
        if norms:
            self._on_norms(norms)


__all__ = ["ARRAYS_KEY", "UpdateNormLog", "update_norm"]
