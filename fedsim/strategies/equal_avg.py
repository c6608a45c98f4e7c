"""``equal_avg``: the CME paper's equal-weighted averaging (section 3.2, ref. [15]).

Every participating client counts the same, whatever its number of examples:
``w = (1/K) * sum_k w_k`` over exactly the arrays the clients return (the server's allow-list of
shared parameters). Subclasses Flower's FedAvg and overrides only :meth:`aggregate_train`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.strategies.registry import register_strategy


class EqualWeightFedAvg(FedAvg):
    """FedAvg with equal client weights for the parameters (metrics stay example-weighted)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        records = [next(iter(c.array_records.values())) for c in contents]
        arrays = ArrayRecord(
            {k: Array(np.mean([r[k].numpy() for r in records], axis=0).astype(records[0][k].numpy().dtype)) for k in records[0]}
        )
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


@register_strategy("equal_avg")
def build_equal_avg(cfg, options):  # type: ignore[no-untyped-def]
    return EqualWeightFedAvg(**options.fedavg_kwargs())
