"""Config resolution: a user's :class:`RunConfig` -> a checked :class:`ResolvedConfig`.

This is where the registries meet the config: the task's profile fills the unset sizes, the
scenario (CME paper Table 1) the partition and models, the machine the GPU default and the
client layout (``client_cpus``); then every
name (task, profile, model, strategy, partitioner) and the task's and strategy's typed options are
checked, so invalid input is refused before any work starts.
"""

from __future__ import annotations

import dataclasses

from fedsim.clients.tasks.registry import get_task
from fedsim.config import PROFILE_FIELDS, ConfigError, ResolvedConfig, RunConfig, UnknownNameError
from fedsim.data.partition import PARTITIONERS
from fedsim.strategies import strategy_options
from fedsim.tracking import TRACKERS


def resolve_config(cfg: RunConfig) -> ResolvedConfig:
    """Fill unset fields from the task's profile and the scenario, and check every name."""
    if isinstance(cfg, ResolvedConfig):
        return cfg
    task = get_task(cfg.task)
    if cfg.profile not in task.profiles:
        raise ConfigError(f"unknown profile {cfg.profile!r}; valid choices: {', '.join(task.profiles)}")
    prof = task.profiles[cfg.profile]
    filled = {n: getattr(prof, n) for n in PROFILE_FIELDS if getattr(cfg, n) is None}
    if cfg.partition is None:
        filled["partition"] = cfg.scenario_spec.partition
    models = cfg.models
    if not models and task.default_model is not None:  # a task with one architecture (3D tasks)
        models = filled["models"] = (task.default_model,) * cfg.clients
    if task.default_model is not None and len(set(models)) > 1:
        raise ConfigError(
            f"task {cfg.task!r} aggregates the whole model, so every client needs the same one; got "
            f"{', '.join(models)} (give one name per client, e.g. --models {models[0]},{models[0]},{models[0]})"
        )
    if not cfg.server_model:
        same = models and len(set(models)) == 1
        filled["server_model"] = models[0] if same else cfg.scenario_spec.server_model
    if cfg.client_gpus is None:
        filled["client_gpus"] = 1.0 if cuda_available() else 0.0
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} | filled
    resolved = ResolvedConfig(**values)
    check_names(resolved)
    if cfg.client_cpus is None:  # the client layout for this machine and these models
        from fedsim.clients.layout import pick_client_cpus

        resolved = dataclasses.replace(resolved, client_cpus=pick_client_cpus(resolved))
    return resolved


def check_names(cfg: ResolvedConfig) -> None:
    """Check the registry names and typed options of a resolved config (ConfigError otherwise)."""
    task = get_task(cfg.task)
    task.options(cfg)  # unknown keys / bad values -> ConfigError
    strategy_options(cfg)
    PARTITIONERS.get(cfg.partition)
    TRACKERS.get(cfg.tracker).check()  # an unknown name lists the trackers; a missing optional package says how to install it
    if cfg.partition == "sizes" and not cfg.fractions:
        raise ConfigError("partition 'sizes' needs fractions, one per client (e.g. --fractions 0.5,0.3,0.2)")
    choices = task.model_choices()
    for m in (*cfg.client_models(), cfg.server_model):
        if m not in choices:
            raise UnknownNameError(f"unknown model {m!r} for task {cfg.task!r}; valid choices: {', '.join(choices)}")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU here (imports torch only when asked)."""
    import torch

    return torch.cuda.is_available()
