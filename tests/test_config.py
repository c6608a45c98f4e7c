import pytest

from fedsim.clients.tasks import resolve_config
from fedsim.config import SCENARIOS, ConfigError, ResolvedConfig, RunConfig
from fedsim.registry import UnknownNameError


def test_resolve_fills_profile_and_scenario():
    cfg = resolve_config(RunConfig(scenario=3, profile="tiny"))
    assert (cfg.image_size, cfg.num_samples, cfg.rounds, cfg.local_epochs) == (32, 120, 2, 2)
    assert cfg.partition == "identical"
    assert cfg.client_models() == ("resnet50", "densenet121", "alexnet_skip")
    assert cfg.server_model == "resnet50"
    assert resolve_config(RunConfig(scenario=2, profile="tiny")).client_models() == ("resnet50",) * 3


def test_explicit_values_win_over_profile():
    cfg = resolve_config(RunConfig(profile="quick", rounds=7, lr=0.5, partition="dirichlet"))
    assert cfg.rounds == 7 and cfg.lr == 0.5 and cfg.partition == "dirichlet" and cfg.local_epochs == 2


def test_scenarios_match_table_1():
    assert {n: (s.partition, s.client_models) for n, s in SCENARIOS.items()} == {
        1: ("iid", ("resnet50", "densenet121", "alexnet_skip")),
        2: ("iid", ("resnet50",)),
        3: ("identical", ("resnet50", "densenet121", "alexnet_skip")),
        4: ("identical", ("resnet50",)),
    }
    assert SCENARIOS[1].models_for(5) == ("resnet50", "densenet121", "alexnet_skip", "resnet50", "densenet121")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds": 0}, "rounds must be a whole number >= 1, got 0"),
        ({"clients": -2}, "clients must be a whole number >= 1"),
        ({"scenario": 5}, "unknown scenario 5; valid choices: 1, 2, 3, 4"),
        ({"alpha": 0.0}, "alpha must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"local_test_fraction": 1.0}, r"local_test_fraction must be in \(0, 1\)"),
        ({"models": ("small_cnn", "small_cnn")}, "models lists 2 models for 3 clients; give one per client, or one name"),
        ({"image_size": 8}, "image_size must be >= 16"),
    ],
)
def test_invalid_numbers_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "huge"}, "unknown profile 'huge'; valid choices: tiny, quick, paper"),
        ({"strategy": "fedfoo"}, r"unknown strategy 'fedfoo'; valid choices: (\w+, )*equal_avg, (\w+, )*fedprox"),
        ({"partition": "random"}, "unknown partitioner 'random'; valid choices: dirichlet, identical, iid, sites, sizes"),
        ({"task": "nope"}, r"unknown task 'nope'; valid choices: (\w+, )*brain_mri"),
        (
            {"models": ("vgg", "small_cnn", "small_cnn")},
            "unknown model 'vgg' for task 'brain_mri'; valid choices: alexnet_skip, densenet121",
        ),
        ({"partition": "sizes"}, "partition 'sizes' needs fractions"),
    ],
)
def test_unknown_names_list_choices(kwargs, message):
    with pytest.raises((ConfigError, UnknownNameError), match=message):
        resolve_config(RunConfig(**kwargs))


def test_flower_round_trip_and_toml_sentinels():
    cfg = resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, partition="sizes", fractions=(0.2, 0.3, 0.5)))
    flat = cfg.to_flower()
    assert flat["local-epochs"] == 2 and flat["fractions"] == [0.2, 0.3, 0.5]
    assert ResolvedConfig.from_flower(flat) == cfg
    # pyproject-style values: 0 / "" mean "unset", lists may be comma strings
    toml = {"rounds": 0, "partition": "", "models": "small_cnn, small_cnn,small_cnn", "client-gpus": -1.0, "server-round": 3}
    parsed = RunConfig.from_flower(toml, ignore=("server-round",))
    assert parsed.rounds is None and parsed.partition is None and parsed.client_gpus is None
    assert parsed.models == ("small_cnn",) * 3
    with pytest.raises(ConfigError, match=r"unknown run-config keys \['server-round'\]; valid keys: .*alpha"):
        RunConfig.from_flower(toml)
    assert RunConfig.from_flower({"client-gpus": 0.0}).client_gpus == 0.0


def test_pyproject_app_config_is_a_valid_run_config():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    cfg = resolve_config(RunConfig.from_flower(data["tool"]["flwr"]["app"]["config"]))
    assert cfg.profile == "tiny" and cfg.scenario == 1 and cfg.rounds == 2
    # Flower refuses --run-config keys missing from this table: every RunConfig field needs one
    import dataclasses

    keys = set(data["tool"]["flwr"]["app"]["config"])
    assert {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)} <= keys
    assert data["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedsim.server.app:app",
        "clientapp": "fedsim.clients.app:app",
    }


def test_single_architecture_tasks_refuse_mixed_models():
    with pytest.raises(ConfigError, match="every client needs the same one; got h3denet, unet3d, unet3d"):
        resolve_config(RunConfig(task="h3denet", profile="tiny", models=("h3denet", "unet3d", "unet3d")))
    with pytest.raises(ConfigError, match="every client needs the same one"):
        resolve_config(RunConfig(task="aicnet3d", profile="tiny", models=("aicnet3d_plain", "aicnet3d_epa", "aicnet3d_plain")))


@pytest.mark.parametrize("task", ["h3denet", "aicnet3d"])
def test_cli_reports_bad_3d_data_folders_without_a_traceback(task, tmp_path, capsys):
    from fedsim.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["run", "--task", task, "--profile", "tiny", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedsim: error: no ") and "expected" in err
    assert not (tmp_path / "o").exists()


def test_faults_are_parsed_checked_and_round_trip():
    from fedsim.faults import Fault

    cfg = RunConfig(profile="tiny", faults=("1:few-data:0.1", "2:free-rider"))
    assert cfg.fault_specs() == (Fault(1, "few-data", 0.1), Fault(2, "free-rider", 1e-3))
    assert RunConfig.from_flower(cfg.to_flower()).faults == cfg.faults
    assert RunConfig.from_flower({"faults": "0:lazy:0.5, 1:diverge"}).faults == ("0:lazy:0.5", "1:diverge")
    assert RunConfig.from_json_dict(cfg.to_json_dict()).faults == cfg.faults
    with pytest.raises(ConfigError, match=r"--fault: fault 5:lazy:0\.1 names client 5, but the run has clients 0\.\.2"):
        RunConfig(faults=("5:lazy",))
    with pytest.raises(ConfigError, match="unknown fault kind 'slow'"):
        RunConfig(faults=("0:slow",))


def test_cli_refuses_a_bad_fault_with_exit_code_2(tmp_path, capsys):
    from fedsim.cli import main

    code = main(["run", "--profile", "tiny", "--fault", "1:few-data:2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "few-data LEVEL is a share in (0, 1]" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
        (["--client-cpus", "nan"], "client_cpus must be a number > 0, got nan"),
        (["--client-gpus", "nan"], "client_gpus must be a number >= 0, got nan"),
        (["--round-timeout", "0"], "round_timeout must be a number of seconds > 0, got 0.0"),
        (["--node-timeout", "inf"], "node_timeout must be a number of seconds > 0, got inf"),
    ],
)
def test_bad_numbers_are_one_line_errors_with_exit_code_2(args, message, tmp_path, capsys):
    from fedsim.cli import main

    code = main(["run", "--profile", "tiny", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"fedsim: error: {message}\n" and not (tmp_path / "o").exists()


def test_gpus_requested_without_cuda_are_refused_before_ray(tmp_path, capsys, monkeypatch):
    import fedsim.simulation as sim
    from fedsim.cli import main

    monkeypatch.setattr(sim, "cuda_available", lambda: False)
    monkeypatch.setattr(sim, "backend_config", lambda cfg: pytest.fail("Ray must not be configured"))
    code = main(
        ["run", "--profile", "tiny", "--models", "small_cnn,small_cnn,small_cnn", "--client-gpus", "1", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "client_gpus=1 but this machine has no CUDA GPU" in err and "--client-gpus 0" in err


def test_round_timeout_flag_reaches_the_config():
    from fedsim.cli import _config_from_args, build_parser

    cfg = _config_from_args(build_parser().parse_args(["run", "--round-timeout", "90"]))
    assert cfg.round_timeout == 90.0
