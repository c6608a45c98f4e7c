"""``equal_avg``: the CME paper's equal-weighted averaging (section 3.2, ref. [15]).

Every participating client counts the same, whatever its number of examples:
``w = (1/K) * sum_k w_k`` over exactly the arrays the clients return (the server's allow-list of
shared parameters). Subclasses Flower's FedAvg and overrides only :meth:`aggregate_train`, using
Flower's public reply check (:func:`validate_message_reply_consistency`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedsim.strategies.registry import StrategyHooks, register_strategy


class EqualWeightFedAvg(FedAvg):
    """FedAvg with equal client weights for the parameters (metrics stay example-weighted)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return None, None
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
        records = [c.array_records[self.arrayrecord_key] for c in contents]
        arrays = ArrayRecord(
            {k: Array(np.mean([r[k].numpy() for r in records], axis=0).astype(records[0][k].numpy().dtype)) for k in records[0]}
        )
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


@register_strategy("equal_avg")
def build_equal_avg(options: None, hooks: StrategyHooks) -> EqualWeightFedAvg:
    """Equal-weighted FedAvg: every hospital counts the same (the CME paper's default)."""
    return EqualWeightFedAvg(**hooks.fedavg_kwargs())


_EQUAL_CLASSES: dict[type[FedAvg], type[FedAvg]] = {}


def with_weighting(cls: type[FedAvg], weighting: str) -> type[FedAvg]:
    """``cls`` itself for ``weighting="examples"``; for ``"equal"`` the subclass of ``cls`` and
    :class:`EqualWeightFedAvg` (``cls``'s own ``aggregate_train``, e.g. FedAdam's server
    optimiser, then gets the equal-weighted mean from ``super().aggregate_train``)."""
    if weighting == "examples":
        return cls
    if weighting != "equal":
        raise ValueError(f"weighting must be 'examples' or 'equal', got {weighting!r}")
    if cls is FedAvg or issubclass(cls, EqualWeightFedAvg):
        return EqualWeightFedAvg if cls is FedAvg else cls
    if cls not in _EQUAL_CLASSES:
        _EQUAL_CLASSES[cls] = type(
            f"EqualWeight{cls.__name__}", (cls, EqualWeightFedAvg), {"__doc__": f"{cls.__name__} with equal client weights."}
        )
    return _EQUAL_CLASSES[cls]
