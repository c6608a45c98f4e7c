"""Typed, validated run configuration.

One frozen :class:`RunConfig` describes a run as the user gave it (``None`` = "from the profile or
scenario"). Its numbers are validated when it is built; CLI flags (``fedsim run``), Flower's
``[tool.flwr.app.config]`` / ``--run-config`` (``flwr run``) and the ``ConfigRecord`` the server
sends to its clients all map onto it with :meth:`RunConfig.from_flower` and
:meth:`RunConfig.to_flower`. :func:`fedsim.clients.tasks.resolve_config` fills it from the task's
profile and checks every registry name, giving a :class:`ResolvedConfig` (no field is ``None``), the
only type code below the CLI works with.

This module sits at the bottom of fedsim's layers: it knows no registry (names are checked by
``resolve_config``), so typed option dataclasses (:func:`parse_options`) are parsed here for tasks
and strategies alike.

Scenarios are the CME paper's Table 1; profiles give the size of the experiment (``tiny`` for
tests, ``quick`` for a few minutes on 2 CPU cores, ``paper`` for the paper's schedule on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Self, TypeVar

from fedsim.faults import Fault, FaultSpecError, parse_faults
from fedsim.registry import UnknownNameError

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Scenario:
    """One row of the CME paper's Table 1."""

    number: int
    description: str
    partition: str
    client_models: tuple[str, ...]
    server_model: str = "resnet50"

    def models_for(self, num_clients: int) -> tuple[str, ...]:
        """Client ``k`` uses ``client_models[k % len(client_models)]``."""
        return tuple(self.client_models[k % len(self.client_models)] for k in range(num_clients))


_MIXED = ("resnet50", "densenet121", "alexnet_skip")
SCENARIOS: dict[int, Scenario] = {
    1: Scenario(1, "different data, different models", "iid", _MIXED),
    2: Scenario(2, "different data, same model", "iid", ("resnet50",)),
    3: Scenario(3, "same data, different models", "identical", _MIXED),
    4: Scenario(4, "same data, same model", "identical", ("resnet50",)),
}


@dataclass(frozen=True)
class Profile:
    """Experiment size: data, schedule and optimiser defaults."""

    image_size: int
    num_samples: int
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float


#: Fields a profile fills in when the user leaves them unset.
PROFILE_FIELDS = tuple(f.name for f in fields(Profile))
#: ``key=value`` option fields, parsed into typed dataclasses by :func:`parse_options`.
OPTION_FIELDS = ("task_options", "strategy_options")

T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a fedsim run. ``None`` means "take it from the profile/scenario".

    :func:`fedsim.clients.tasks.resolve_config` turns it into a :class:`ResolvedConfig`.
    """

    task: str = "brain_mri"
    scenario: int = 1
    profile: str = "quick"
    rounds: int | None = None
    local_epochs: int | None = None
    clients: int = 3
    strategy: str = "equal_avg"
    partition: str | None = None
    alpha: float = 0.5
    fractions: tuple[float, ...] = ()
    data_dir: str = ""
    seed: int = 0
    out: str = ""
    image_size: int | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    models: tuple[str, ...] = ()
    server_model: str = ""
    site_styles: bool = False
    strategy_options: tuple[tuple[str, Any], ...] = ()
    global_test_fraction: float = 0.15
    local_test_fraction: float = 0.2
    #: CPUs (torch threads) per client actor; None = picked for this machine and these models
    #: (:func:`fedsim.clients.layout.pick_client_cpus`), the pick recorded in the resolved config.
    client_cpus: float | None = None
    client_gpus: float | None = None
    node_timeout: float = 120.0
    round_timeout: float = 3600.0
    task_options: tuple[tuple[str, Any], ...] = ()
    cme: bool = False
    cme_layers: tuple[str, ...] = ()
    cme_threshold: float = 1e-3
    cme_max_size: int = 256
    cme_biases: bool = False
    faults: tuple[str, ...] = ()
    #: Clients that must answer (without error, with finite parameters) for a round to count;
    #: 0 = all of them, and a client error stops the run (docs/reliability.md).
    min_clients: int = 0
    #: Write a checkpoint (``checkpoint.safetensors``) every this many rounds and after the last; 0 = never.
    checkpoint_every: int = 1
    #: Join this existing Ray cluster (``host:port`` of its head's GCS, or ``auto``) instead of
    #: starting a Ray instance on this machine; ``""`` = start one (``fedsim run`` only).
    ray_address: str = ""
    #: Experiment tracker the server logs every round to (:mod:`fedsim.tracking`): tensorboard, mlflow or none.
    tracker: str = "tensorboard"
    #: MLflow tracking URI; "" = a local store in the run directory (RUN_DIR/mlflow.db).
    tracking_uri: str = ""
    #: Client sampling: the share of the clients that trains (and evaluates) in a round, drawn anew
    #: every round from the seed and the round number; ``max(1, floor(fraction_train x clients))``.
    fraction_train: float = 1.0
    #: Client sampling by count: this many clients per round (0 = from ``fraction_train``).
    clients_per_round: int = 0

    def __post_init__(self) -> None:
        # Cheap checks that need no registry; registry names are checked in validate_names().
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {self.scenario!r}; valid choices: {', '.join(map(str, SCENARIOS))}")
        _positive_int("clients", self.clients)
        for name in ("rounds", "local_epochs", "image_size", "num_samples", "batch_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("global_test_fraction", "local_test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.client_cpus is not None and not (math.isfinite(self.client_cpus) and self.client_cpus > 0):
            raise ConfigError(f"client_cpus must be a number > 0, got {self.client_cpus}")
        if self.client_gpus is not None and not (math.isfinite(self.client_gpus) and self.client_gpus >= 0):
            raise ConfigError(f"client_gpus must be a number >= 0, got {self.client_gpus}")
        if self.client_gpus is not None and self.client_gpus > 1 and not float(self.client_gpus).is_integer():
            raise ConfigError(
                f"client_gpus must be a fraction 0 < F <= 1 (floor(1/F) clients share a GPU) or a whole number of GPUs, got {self.client_gpus:g}"
            )
        _check_ray_address(self.ray_address)
        for name in ("node_timeout", "round_timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")
        if self.models and len(self.models) not in (1, self.clients):
            raise ConfigError(
                f"models lists {len(self.models)} models for {self.clients} clients; give one per client, or one name for all of them"
            )
        if self.fractions and len(self.fractions) != self.clients:
            raise ConfigError(f"fractions lists {len(self.fractions)} values for {self.clients} clients; give one per client")
        if self.fractions and not all(math.isfinite(f) and f > 0 for f in self.fractions):
            raise ConfigError(f"fractions must all be numbers > 0, got {','.join(f'{f:g}' for f in self.fractions)}")
        if self.fractions and abs(sum(self.fractions) - 1) > 1e-3:
            raise ConfigError(
                f"fractions must sum to 1 (each is a client's share of the data), got {','.join(f'{f:g}' for f in self.fractions)} "
                f"summing to {sum(self.fractions):g}"
            )
        if not (math.isfinite(self.cme_threshold) and 0 < self.cme_threshold < 1):
            raise ConfigError(
                f"--cme-threshold (run-config key cme-threshold) must be in the range 0 < threshold < 1 "
                f"(default 1e-3), got {self.cme_threshold}: eq. 2 divides by the weight, so weights at or near 0 must be masked"
            )
        try:
            parse_faults(self.faults, self.clients)
        except FaultSpecError as exc:
            raise ConfigError(f"--fault: {exc}") from None
        for name in ("min_clients", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.min_clients > self.clients:
            raise ConfigError(f"min_clients={self.min_clients} exceeds the {self.clients} clients; use at most {self.clients} (0 = all)")
        self._check_sampling()
        _positive_int("cme_max_size", self.cme_max_size)
        if self.cme_max_size < 2:
            raise ConfigError(f"cme_max_size must be >= 2 (a covariance needs two rows), got {self.cme_max_size}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16 pixels, got {self.image_size}")

    def _check_sampling(self) -> None:
        if not (isinstance(self.fraction_train, int | float) and math.isfinite(self.fraction_train) and 0 < self.fraction_train <= 1):
            raise ConfigError(f"fraction_train must be a number in (0, 1] (the share of clients per round), got {self.fraction_train!r}")
        k = self.clients_per_round
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"clients_per_round must be a whole number >= 0 (0 = from fraction_train), got {k!r}")
        if k and self.fraction_train != 1:
            raise ConfigError(
                f"give either --fraction-train ({self.fraction_train:g}) or --clients-per-round ({k}), not both "
                "(run-config keys fraction-train / clients-per-round)"
            )
        if k > self.clients:
            raise ConfigError(f"clients_per_round={k} exceeds the {self.clients} clients; use at most {self.clients}")
        if self.min_clients > self.sample_size():
            raise ConfigError(
                f"min_clients={self.min_clients} exceeds the {self.sample_size()} clients sampled per round; "
                f"use --min-clients {self.sample_size()} or fewer (0 = all sampled)"
            )

    def sample_size(self) -> int:
        """Clients that train and evaluate in each round: ``clients_per_round``, else
        ``max(1, floor(fraction_train x clients))`` (all clients with the defaults)."""
        if self.clients_per_round:
            return self.clients_per_round
        return max(1, min(self.clients, math.floor(self.fraction_train * self.clients + 1e-9)))

    # ------------------------------------------------------------------ resolution
    @property
    def scenario_spec(self) -> Scenario:
        return SCENARIOS[self.scenario]

    def fault_specs(self) -> tuple[Fault, ...]:
        """The injected faults (:mod:`fedsim.faults`), parsed from ``faults``."""
        return parse_faults(self.faults, self.clients)

    def client_models(self) -> tuple[str, ...]:
        """One model name per client: ``models`` (one name stands for every client), else the scenario's."""
        if len(self.models) == 1:
            return self.models * self.clients
        return self.models or self.scenario_spec.models_for(self.clients)

    def model_for(self, partition_id: int) -> str:
        return self.client_models()[partition_id % self.clients]

    # ------------------------------------------------------------------ Flower mapping
    def to_flower(self) -> dict[str, ConfigRecordValues]:
        """Flat kebab-case mapping for Flower ``run_config`` / ``ConfigRecord`` (``None`` omitted)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            if f.name in OPTION_FIELDS:
                value = ",".join(f"{k}={v}" for k, v in value)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_flower(cls, mapping: Mapping[str, Any], ignore: Sequence[str] = ()) -> Self:
        """Build from a Flower run config / ConfigRecord.

        In TOML there is no ``None``: ``0``, ``0.0`` and ``""`` stand for "unset" on the
        optional fields; list-valued fields also accept comma-separated strings. Keys that are no
        field are an error naming the valid keys, except those in ``ignore`` (e.g. the
        ``server-round`` Flower's strategies add to a train message's config).
        """
        kwargs: dict[str, Any] = {}
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(k for k in mapping if k not in by_key and k not in ignore)
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; valid keys: {', '.join(sorted(by_key))}")
        for key, value in mapping.items():
            if key in by_key:
                kwargs[by_key[key].name] = _coerce(by_key[key], value)
        return cls(**kwargs)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_json_dict` (a run's ``config.json``); derived keys are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for k in ("fractions", "models", "cme_layers", "faults"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        for k in OPTION_FIELDS:
            if k in kwargs:
                kwargs[k] = tuple((str(key), v) for key, v in kwargs[k])
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["client_models"] = list(self.client_models())
        d["scenario_description"] = self.scenario_spec.description
        return d


def _check_ray_address(address: str) -> None:
    """``""`` (start Ray here), ``auto`` or ``host:port`` with a port in 1..65535."""
    if address in ("", "auto"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise ConfigError(
            f"ray_address must be host:port of a Ray head node (e.g. 10.0.0.5:6379, as 'ray start --head' prints) or 'auto', got {address!r}"
        )


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    if f.name == "client_gpus":  # 0 GPUs is meaningful; a negative value means "auto"
        return None if float(value) < 0 else float(value)
    if "None" in str(f.type) and value in (0, 0.0, ""):
        return None
    if f.name in OPTION_FIELDS:
        return parse_key_values(value)
    if f.name in ("fractions", "models", "cme_layers", "faults"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        conv = float if f.name == "fractions" else str
        try:
            return tuple(conv(v) for v in value)
        except ValueError:
            raise ConfigError(f"{f.name} must be a comma-separated list, got {value!r}") from None
    if f.name == "scenario":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"unknown scenario {value!r}; valid choices: {', '.join(map(str, SCENARIOS))}") from None
    return value


def parse_key_values(value: Any) -> tuple[tuple[str, Any], ...]:
    """``"a=1,b=x"`` (or an iterable of ``"k=v"`` strings / pairs) -> ``(("a", "1"), ("b", "x"))``."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    pairs = []
    for item in value:
        if isinstance(item, str):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"options must look like key=value, got {item!r}")
            pairs.append((key.strip(), val.strip()))
        else:
            key, val = item
            pairs.append((str(key), val))
    return tuple(pairs)


def parse_options(options_type: type[T] | None, pairs: Sequence[tuple[str, Any]], kind: str, owner: str) -> T | None:
    """Build the typed options ``options_type`` (a frozen dataclass) of a task or strategy.

    ``pairs`` are ``(key, value)``; values may be strings (CLI, TOML) and are converted to the
    field's type; keys may use ``-`` or ``_``. ``kind`` is ``"task"`` or ``"strategy"`` and
    ``owner`` its registered name, for the messages. Unknown keys and bad values raise
    :class:`ConfigError` naming the valid options; with no ``options_type`` any pair is an error.
    """
    if options_type is None:
        if pairs:
            raise ConfigError(f"{kind} {owner!r} takes no --{kind}-option; got {', '.join(k for k, _ in pairs)}")
        return None
    if not dataclasses.is_dataclass(options_type):
        raise TypeError(f"options_type of {kind} {owner!r} must be a dataclass, got {options_type!r}")
    known = [f.name for f in fields(options_type)]
    hints = typing.get_type_hints(options_type)
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        name = key.replace("-", "_")
        if name not in known:
            valid = ", ".join(n.replace("_", "-") for n in known)
            raise ConfigError(f"unknown {kind} option {key!r} for {kind} {owner!r}; valid options: {valid}")
        kwargs[name] = _convert(hints[name], value, f"{kind} option {key!r}")
    try:
        return options_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {kind} options for {owner!r}: {exc}") from exc


def _convert(tp: Any, value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float):
            return tp(value)
    except ValueError:
        raise ConfigError(f"{what} expects a {tp.__name__}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class ResolvedConfig(RunConfig):
    """A :class:`RunConfig` with every field filled in (profile, scenario and device defaults) and
    every name checked against the registries; made by :func:`fedsim.clients.tasks.resolve_config`
    (or read back from a run's ``config.json`` / the server's ``ConfigRecord``)."""

    rounds: int = 0
    local_epochs: int = 0
    partition: str = ""
    image_size: int = 0
    num_samples: int = 0
    batch_size: int = 0
    lr: float = 0.0
    client_cpus: float = 2.0
    client_gpus: float = 0.0


__all__ = [
    "OPTION_FIELDS",
    "SCENARIOS",
    "ConfigError",
    "Profile",
    "ResolvedConfig",
    "RunConfig",
    "Scenario",
    "UnknownNameError",
    "parse_key_values",
    "parse_options",
]
