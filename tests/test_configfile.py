"""fedsim run --config: TOML with the Flower run-config keys, a run's config.json, flags on top,
unknown keys refused by name; config.json's environment is recorded but not part of the config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedsim.cli import _config_with_file
from fedsim.config import ConfigError, RunConfig
from fedsim.configfile import load_config_file
from fedsim.provenance import environment, git_commit, package_versions


def test_toml_with_run_config_keys(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        'profile = "tiny"\nrounds = 3\nlocal-epochs = 0\nmodels = "small_cnn,small_cnn,small_cnn"\nstrategy-options = "mu=0.1"\n'
    )
    cfg = load_config_file(path)
    assert cfg == RunConfig(profile="tiny", rounds=3, models=("small_cnn",) * 3, strategy_options=(("mu", "0.1"),))
    assert cfg.local_epochs is None  # 0 = from the profile, as in flwr run --run-config


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('profile = "tiny"\nrounds = 3\nseed = 4\nstrategy = "fedprox"\n')
    cfg = _config_with_file(str(path), ["run", "--config", str(path), "--rounds", "5", "--tracker", "none"])
    assert (cfg.profile, cfg.rounds, cfg.seed, cfg.strategy, cfg.tracker) == ("tiny", 5, 4, "fedprox", "none")
    assert cfg.clients == RunConfig().clients  # neither in the file nor given: the default


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('profile = "tiny"\nlocal_epochs = 2\nround = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown run-config keys \['local_epochs', 'round'\]; valid keys: .*local-epochs"):
        load_config_file(path)
    bad_json = tmp_path / "config.json"
    bad_json.write_text(json.dumps(RunConfig().to_json_dict() | {"learning_rate": 0.1}))
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate'\]; a run's config.json holds"):
        load_config_file(bad_json)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match=r"expected a \.toml file .* or a run's config\.json, got '\.yaml'"):
        load_config_file(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")
    (tmp_path / "t.toml").write_text("[tool]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"tables \['tool'\] are not settings"):
        load_config_file(tmp_path / "t.toml")


def test_a_runs_config_json_gives_back_its_config_without_out_or_environment(tmp_path, tiny_cfg):
    stored = tiny_cfg.to_json_dict() | {"out": "/old/run", "environment": environment("cpu")}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    cfg = load_config_file(tmp_path / "config.json")
    assert cfg.out == ""  # a repeat writes a new run folder
    assert RunConfig.from_json_dict(stored) == dataclasses.replace(cfg, out="/old/run")
    assert cfg.rounds == tiny_cfg.rounds and cfg.models == tiny_cfg.models and cfg.lr == tiny_cfg.lr


def test_environment_records_versions_git_and_machine():
    import importlib.metadata
    import os
    import platform

    env = environment("cpu")
    assert env["versions"] == package_versions()
    assert env["versions"]["torch"] == importlib.metadata.version("torch") and env["versions"]["python"] == platform.python_version()
    assert env["machine"]["cpu_count"] == os.cpu_count() and env["device"] == "cpu"
    git = git_commit()
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))


def test_git_commit_outside_a_repository_is_none(tmp_path):
    assert git_commit(tmp_path) is None
