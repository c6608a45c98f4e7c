"""The round loop: Flower's ``Strategy.start``, able to begin at any round, with round-end hooks.

:func:`run_rounds` makes the same strategy and grid calls in the same order as
``flwr.serverapp.strategy.Strategy.start`` (configure/aggregate train, configure/aggregate
evaluate, ``evaluate_fn``), so a fresh run's results are unchanged; in addition it

* starts at ``first_round`` (a resumed run skips the rounds its checkpoint holds, and the initial
  evaluation ``evaluate_fn(0, ...)``);
* refuses an aggregated global model that is not finite (:class:`NonFiniteUpdateError`, naming the
  round and the clients aggregated), e.g. a server optimiser that overflowed;
* calls ``on_round_start(round)`` hooks before a round's first message (the round's wall time) and
  ``on_round_end(round, arrays)`` hooks after ``evaluate_fn`` (checkpoints);
* runs ``configure_train`` / ``configure_evaluate`` inside ``sampling(round)`` when given (client
  sampling, :func:`fedsim.server.sampling.seeded_sampling`);
* does not log Flower's ``strategy.summary()``: it names FedAvg's ``num-examples`` weighting even
  for strategies that weigh clients equally or not at all (the server logs its own description).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsim._logging import logger

RoundEndHook = Callable[[int, ArrayRecord], None]


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    *,
    first_round: int = 1,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    on_round_end: Sequence[RoundEndHook] = (),
    on_round_start: Sequence[Callable[[int], None]] = (),
    sampling: Callable[[int], AbstractContextManager[None]] | None = None,
) -> Result:
    """Run rounds ``first_round..num_rounds``; return Flower's :class:`Result` (of those rounds)."""
    from fedsim.server.app import NonFiniteUpdateError, _partition_of

    result = Result()
    arrays = initial_arrays
    result.arrays = arrays
    if evaluate_fn is not None and first_round == 1:
        res = evaluate_fn(0, arrays)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
    for rnd in range(first_round, num_rounds + 1):
        logger.debug("round %d/%d", rnd, num_rounds)
        for start_hook in on_round_start:
            start_hook(rnd)
        with sampling(rnd) if sampling is not None else contextlib.nullcontext():
            messages = strategy.configure_train(rnd, arrays, train_config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        agg_arrays, agg_train = strategy.aggregate_train(rnd, replies)
        if agg_arrays is not None:
            bad = next((k for k, a in agg_arrays.items() if not np.isfinite(a.numpy()).all()), None)
            if bad is not None:
                clients = ", ".join(str(_partition_of(m)[1]) for m in replies)
                raise NonFiniteUpdateError(
                    f"round {rnd}: the aggregated global model is not finite ({bad}) after averaging clients {clients}; "
                    "stopped (the rounds so far are kept; a lower learning rate usually helps)"
                )
            result.arrays = arrays = agg_arrays
        if agg_train is not None:
            result.train_metrics_clientapp[rnd] = agg_train
        with sampling(rnd) if sampling is not None else contextlib.nullcontext():
            messages = strategy.configure_evaluate(rnd, arrays, evaluate_config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        agg_eval = strategy.aggregate_evaluate(rnd, replies)
        if agg_eval is not None:
            result.evaluate_metrics_clientapp[rnd] = agg_eval
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        for hook in on_round_end:
            hook(rnd, arrays)
    return result
