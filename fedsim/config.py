"""Typed, validated run configuration.

One frozen :class:`RunConfig` describes a run. It is validated once when it is built; CLI flags
(``fedsim run``), Flower's ``[tool.flwr.app.config]`` / ``--run-config`` (``flwr run``) and the
``ConfigRecord`` the server sends to its clients all map onto it with :meth:`RunConfig.from_flower`
and :meth:`RunConfig.to_flower`.

Scenarios are the CME paper's Table 1; profiles give the size of the experiment (``tiny`` for
tests, ``quick`` for a few minutes on 2 CPU cores, ``paper`` for the paper's schedule on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedsim.registry import UnknownNameError


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


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a fedsim run. ``None`` means "take it from the profile/scenario".

    Call :meth:`resolve` to get a config with every field filled in.
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
    fedprox_mu: float = 0.01
    server_lr: float = 0.01
    global_test_fraction: float = 0.15
    local_test_fraction: float = 0.2
    client_cpus: float = 2.0
    client_gpus: float | None = None
    node_timeout: float = 120.0
    round_timeout: float = 3600.0
    task_options: tuple[tuple[str, Any], ...] = ()
    cme: bool = False
    cme_layers: tuple[str, ...] = ()
    cme_threshold: float = 1e-3
    cme_max_size: int = 256
    cme_biases: bool = False
    extra: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # Cheap checks that need no registry; registry names are checked in validate_names().
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {self.scenario!r}; valid choices: {', '.join(map(str, SCENARIOS))}")
        _positive_int("clients", self.clients)
        for name in ("rounds", "local_epochs", "image_size", "num_samples", "batch_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("lr", "fedprox_mu", "server_lr", "alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0 or (name == "fedprox_mu" and value == 0)):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("global_test_fraction", "local_test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.client_cpus <= 0:
            raise ConfigError(f"client_cpus must be > 0, got {self.client_cpus}")
        if self.client_gpus is not None and self.client_gpus < 0:
            raise ConfigError(f"client_gpus must be >= 0, got {self.client_gpus}")
        if self.node_timeout <= 0 or self.round_timeout <= 0:
            raise ConfigError("node_timeout and round_timeout must be > 0 seconds")
        if self.models and len(self.models) != self.clients:
            raise ConfigError(f"models lists {len(self.models)} models for {self.clients} clients; give one per client")
        if self.fractions and len(self.fractions) != self.clients:
            raise ConfigError(f"fractions lists {len(self.fractions)} values for {self.clients} clients; give one per client")
        if not (math.isfinite(self.cme_threshold) and self.cme_threshold >= 0):
            raise ConfigError(f"cme_threshold must be a number >= 0, got {self.cme_threshold}")
        _positive_int("cme_max_size", self.cme_max_size)
        if self.cme_max_size < 2:
            raise ConfigError(f"cme_max_size must be >= 2 (a covariance needs two rows), got {self.cme_max_size}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16 pixels, got {self.image_size}")

    # ------------------------------------------------------------------ resolution
    @property
    def scenario_spec(self) -> Scenario:
        return SCENARIOS[self.scenario]

    def client_models(self) -> tuple[str, ...]:
        return self.models or self.scenario_spec.models_for(self.clients)

    def model_for(self, partition_id: int) -> str:
        return self.client_models()[partition_id % self.clients]

    def resolve(self) -> RunConfig:
        """Fill unset fields from the task's profile and the scenario, and check every name."""
        from fedsim.clients.tasks import get_task

        task = get_task(self.task)
        if self.profile not in task.profiles:
            raise ConfigError(f"unknown profile {self.profile!r}; valid choices: {', '.join(task.profiles)}")
        prof = task.profiles[self.profile]
        filled = {n: getattr(prof, n) for n in PROFILE_FIELDS if getattr(self, n) is None}
        if self.partition is None:
            filled["partition"] = self.scenario_spec.partition
        models = self.models
        if not models and task.default_model is not None:  # a task with one architecture (3D tasks)
            models = filled["models"] = (task.default_model,) * self.clients
        if task.default_model is not None and len(set(models)) > 1:
            raise ConfigError(
                f"task {self.task!r} aggregates the whole model, so every client needs the same one; got "
                f"{', '.join(models)} (give one name per client, e.g. --models {models[0]},{models[0]},{models[0]})"
            )
        if not self.server_model:
            same = models and len(set(models)) == 1
            filled["server_model"] = models[0] if same else self.scenario_spec.server_model
        if self.client_gpus is None:
            filled["client_gpus"] = 1.0 if _cuda_available() else 0.0
        cfg = dataclasses.replace(self, **filled)
        cfg.validate_names()
        return cfg

    def validate_names(self) -> None:
        from fedsim.clients.tasks import get_task
        from fedsim.data.partition import PARTITIONERS
        from fedsim.strategies import STRATEGIES

        task = get_task(self.task)
        task.options(self)  # unknown keys / bad values -> ConfigError
        STRATEGIES.get(self.strategy)
        if self.partition is not None:
            PARTITIONERS.get(self.partition)
            if self.partition == "sizes" and not self.fractions:
                raise ConfigError("partition 'sizes' needs fractions, one per client (e.g. --fractions 0.5,0.3,0.2)")
        choices = task.model_choices()
        for m in (*self.client_models(), *([self.server_model] if self.server_model else [])):
            if m not in choices:
                raise UnknownNameError(f"unknown model {m!r} for task {self.task!r}; valid choices: {', '.join(choices)}")

    # ------------------------------------------------------------------ Flower mapping
    def to_flower(self) -> dict[str, bool | int | float | str | list[float] | list[str]]:
        """Flat kebab-case mapping for Flower ``run_config`` / ``ConfigRecord`` (``None`` omitted)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None or value == ():
                continue
            if f.name == "task_options":
                value = ",".join(f"{k}={v}" for k, v in value)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_flower(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Build from a Flower run config / ConfigRecord; unknown keys are kept in ``extra``.

        In TOML there is no ``None``: ``0``, ``0.0`` and ``""`` stand for "unset" on the
        optional fields; list-valued fields also accept comma-separated strings.
        """
        kwargs: dict[str, Any] = {}
        extra: list[tuple[str, Any]] = []
        by_key = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "extra"}
        for key, value in mapping.items():
            f = by_key.get(key)
            if f is None:
                extra.append((key, value))
                continue
            kwargs[f.name] = _coerce(f, value)
        return cls(**kwargs, extra=tuple(sorted(extra)))

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_json_dict` (a run's ``config.json``); derived keys are ignored."""
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        for k in ("fractions", "models", "cme_layers"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if "task_options" in kwargs:
            kwargs["task_options"] = tuple((str(k), v) for k, v in kwargs["task_options"])
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["client_models"] = list(self.client_models())
        d["scenario_description"] = self.scenario_spec.description
        return d


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    if f.name == "client_gpus":  # 0 GPUs is meaningful; a negative value means "auto"
        return None if float(value) < 0 else float(value)
    if "None" in str(f.type) and value in (0, 0.0, ""):
        return None
    if f.name == "task_options":
        return parse_key_values(value)
    if f.name in ("fractions", "models", "cme_layers"):
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
                raise ConfigError(f"task options must look like key=value, got {item!r}")
            pairs.append((key.strip(), val.strip()))
        else:
            key, val = item
            pairs.append((str(key), val))
    return tuple(pairs)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["SCENARIOS", "ConfigError", "Profile", "RunConfig", "Scenario", "UnknownNameError", "parse_key_values"]
