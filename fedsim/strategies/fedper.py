"""``fedper``: FedPer, personalisation layers stay at each hospital (Arivazhagan et al.,
"Federated Learning with Personalization Layers", 2019, arXiv:1912.00818).

The base layers are averaged; the chosen layers, by default the head's last layer
(``head.out.*``: every fedsim model ends in the standard head), are trained by each client for
itself and never leave it. Option ``local-layers``: fnmatch patterns over the shared parameter
names, separated by ``:`` (e.g. ``head.fc2.*:head.out.*``); they must match at least one shared
name and leave at least one shared. Option ``weighting`` (``examples`` or ``equal``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from fedsim.config import ConfigError
from fedsim.strategies.equal_avg import with_weighting
from fedsim.strategies.personal import KeepLocalFedAvg
from fedsim.strategies.registry import StrategyHooks, check_weighting, register_strategy


@dataclass(frozen=True)
class FedPerOptions:
    """``local-layers``: ``:``-separated fnmatch patterns of the layers kept local; ``weighting``."""

    local_layers: str = "head.out.*"
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if not self.patterns():
            raise ValueError("local-layers needs at least one pattern, e.g. head.out.*")
        check_weighting(self.weighting)

    def patterns(self) -> list[str]:
        return [p.strip() for p in self.local_layers.split(":") if p.strip()]


def personal_keys(options: FedPerOptions, names: Sequence[str]) -> list[str]:
    """The names matching ``local-layers`` (ConfigError if none does, or if all do)."""
    patterns = options.patterns()
    local = [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
    if not local:
        raise ConfigError(
            f"fedper local-layers {':'.join(patterns)} match no shared parameter; the shared ones end with {', '.join(names[-4:])}"
        )
    if len(local) == len(names):
        raise ConfigError(f"fedper local-layers {':'.join(patterns)} match every shared parameter; nothing would be aggregated")
    return local


class FedPer(KeepLocalFedAvg):
    """FedAvg that never sends nor aggregates the personalisation layers."""

    def __init__(self, options: FedPerOptions, **kwargs: object) -> None:
        super().__init__(select_local=lambda names: personal_keys(options, names), kind="fedper", **kwargs)


@register_strategy("fedper", options=FedPerOptions, local_keys=personal_keys)
def build_fedper(options: FedPerOptions, hooks: StrategyHooks) -> FedPer:
    """FedPer: the chosen (default: last) head layers stay at each client (Arivazhagan et al. 2019)."""
    cls: type[FedPer] = with_weighting(FedPer, options.weighting)  # type: ignore[assignment]
    return cls(options, **hooks.fedavg_kwargs())
