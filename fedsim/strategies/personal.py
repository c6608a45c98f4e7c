"""Personalised FL from the server side: parameters that are never sent, so they stay at each client.

fedsim's ClientApp loads the arrays it receives over its private state and replies with exactly
the keys it received; every other tensor stays in the client's ``Context.state``. A strategy that
leaves some keys out of its train *and* evaluate messages therefore keeps them local: they are
never sent, never aggregated, and each client's model (used for its local metrics) is its own
version of them plus the shared rest. :class:`KeepLocalFedAvg` is that strategy: Flower's FedAvg
with :meth:`configure_train` and :meth:`configure_evaluate` sending only the shared keys. Its
aggregate (and so the final ``global_params``) holds the shared keys only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim._logging import logger

LocalSelector = Callable[[Sequence[str]], list[str]]


class KeepLocalFedAvg(FedAvg):
    """FedAvg that never sends, and so never aggregates, the parameters ``select_local(names)``
    picks among the arrays it is started with (``names`` in the server's order). ``kind`` names
    the method in the log."""

    def __init__(self, *, select_local: LocalSelector, kind: str = "personalised", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.select_local = select_local
        self.kind = kind
        self.local_keys: tuple[str, ...] | None = None  # a tuple: a checkpoint keeps it (the arrays it is chosen from then lack these keys)

    def shared_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the local keys (chosen once, from the first arrays seen)."""
        if self.local_keys is None:
            local = self.select_local(list(arrays.keys()))
            if local and len(local) == len(arrays):
                raise ValueError(f"{self.kind} would keep every shared parameter local; nothing would be aggregated")
            self.local_keys = tuple(local)
            logger.info(
                "%s: %d of %d shared tensors stay at the clients (%s); per-client test metrics are each client's own model",
                self.kind, len(local), len(arrays), ", ".join(local[:6]) + (", ..." if len(local) > 6 else "") if local else "none",
            )  # fmt: skip
        local_set = set(self.local_keys)
        return ArrayRecord({k: v for k, v in arrays.items() if k not in local_set})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round, self.shared_arrays(arrays), config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self.shared_arrays(arrays), config, grid)
