"""``fedbn``: FedBN, BatchNorm layers stay at each hospital (Li et al., "FedBN: Federated Learning
on Non-IID Features via Local Batch Normalization", ICLR 2021, arXiv:2102.07623).

Scanner and protocol differences between hospitals shift the feature statistics; FedBN averages
every parameter except the BatchNorm layers' (``weight``, ``bias``, ``running_mean``,
``running_var``; ``num_batches_tracked`` is never shared in fedsim anyway), which each client
keeps and trains for itself. A BatchNorm layer is recognised by name: a module prefix ``P`` with
``P.running_mean`` among the shared names (BatchNorm without running statistics is not found).
With mixed architectures only the head is shared, which has no BatchNorm: FedBN then equals
FedAvg (logged). Option ``weighting`` (``examples``, the paper's FedAvg weights, or ``equal``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.strategies.equal_avg import with_weighting
from fedsim.strategies.personal import KeepLocalFedAvg
from fedsim.strategies.registry import StrategyHooks, check_weighting, register_strategy

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def batchnorm_keys(names: Sequence[str]) -> list[str]:
    """The BatchNorm entries among ``names`` (in their order)."""
    present = set(names)
    prefixes = {n.removesuffix(".running_mean") for n in names if n.endswith(".running_mean")}
    bn = {f"{p}.{s}" for p in prefixes for s in BN_SUFFIXES} & present
    return [n for n in names if n in bn]


class FedBN(KeepLocalFedAvg):
    """FedAvg that never sends nor aggregates BatchNorm parameters and statistics."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(select_local=batchnorm_keys, kind="fedbn", **kwargs)


@dataclass(frozen=True)
class FedBNOptions:
    """``weighting``: ``examples`` (FedBN's FedAvg weights) or ``equal``."""

    weighting: str = "examples"

    def __post_init__(self) -> None:
        check_weighting(self.weighting)


def _local(options: FedBNOptions, names: Sequence[str]) -> list[str]:
    return batchnorm_keys(names)


@register_strategy("fedbn", options=FedBNOptions, local_keys=_local)
def build_fedbn(options: FedBNOptions, hooks: StrategyHooks) -> FedBN:
    """FedBN: BatchNorm layers stay at each client (Li et al. 2021)."""
    return with_weighting(FedBN, options.weighting)(**hooks.fedavg_kwargs())  # type: ignore[return-value]
