from dataclasses import dataclass

import pytest

from fedsim.clients.tasks import resolve_config
from fedsim.config import ConfigError, RunConfig, parse_key_values, parse_options


@dataclass(frozen=True)
class _Opts:
    finetune_rounds: int = 0
    variant: str = "a"
    weight: float = 0.5
    flag: bool = False


def test_strings_are_converted_to_the_field_types():
    pairs = parse_key_values("finetune-rounds=2,variant=b,weight=0.25,flag=true")
    assert parse_options(_Opts, pairs, "task", "fake") == _Opts(2, "b", 0.25, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds=2", "unknown task option 'rounds' for task 'fake'; valid options: finetune-rounds, variant, weight, flag"),
        ("finetune-rounds=two", "task option 'finetune-rounds' expects a int, got 'two'"),
        ("flag=maybe", "expects a bool"),
    ],
)
def test_bad_task_options_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(_Opts, parse_key_values(text), "task", "fake")


def test_task_without_options_refuses_them():
    with pytest.raises(ConfigError, match="task 'fake' takes no --task-option; got x"):
        parse_options(None, (("x", "1"),), "task", "fake")
    with pytest.raises(ConfigError, match="unknown task option 'x' for task 'brain_mri'; valid options: lr-decay, shift-round"):
        resolve_config(RunConfig(profile="tiny", task_options=(("x", "1"),)))


def test_task_options_round_trip_through_flower():
    cfg = RunConfig(task_options=(("finetune-rounds", "2"), ("variant", "b")))
    assert RunConfig.from_flower(cfg.to_flower()).task_options == cfg.task_options
    with pytest.raises(ConfigError, match="key=value"):
        parse_key_values("novalue")
