"""Config files for ``fedsim run --config FILE``: a TOML file with the Flower run-config keys, or
a run's own ``config.json`` (to repeat that run).

* ``.toml``: flat ``key = value`` pairs with the keys of ``[tool.flwr.app.config]`` in
  ``pyproject.toml`` (kebab-case, e.g. ``local-epochs = 2``; ``0`` / ``""`` mean "from the
  profile or scenario", as in ``flwr run --run-config``);
* ``.json``: a run's ``config.json`` (snake_case fields, resolved values). Its derived keys
  (``client_models``, ``scenario_description``) and the recorded ``environment`` are not settings
  and are skipped; its ``out`` is the old run's folder and is dropped, so a repeat writes a new one.

Unknown keys are an error naming them and listing the valid ones. Flags given with ``--config``
override the file (:mod:`fedsim.cli`).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError, RunConfig

#: Keys of a run's ``config.json`` that are recorded, not settings.
RECORDED_KEYS = ("client_models", "scenario_description", "environment")


def load_config_file(path: str | Path) -> RunConfig:
    """The :class:`RunConfig` in ``path`` (``.toml`` or a run's ``config.json``); ``ConfigError``
    for a missing or unreadable file, another suffix, or unknown keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(p.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise ConfigError(
                f"--config {path}: expected a .toml file (run-config keys) or a run's config.json, got {p.suffix or 'no suffix'!r}"
            )
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    try:
        return _from_toml(data) if suffix == ".toml" else _from_run_json(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None


def _from_toml(data: dict[str, Any]) -> RunConfig:
    nested = sorted(k for k, v in data.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"tables {nested} are not settings; write the run-config keys at the top level (e.g. rounds = 3)")
    return RunConfig.from_flower(data)


def _from_run_json(data: dict[str, Any]) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(k for k in data if k not in names and k not in RECORDED_KEYS)
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; a run's config.json holds {', '.join(sorted(names))}")
    return RunConfig.from_json_dict({k: v for k, v in data.items() if k != "out"})


__all__ = ["RECORDED_KEYS", "load_config_file"]
