"""The fixed value sets (lungcad.training.choices): the config's types and the CLI's choices."""

from __future__ import annotations

import typing

import pytest

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.training.choices import DEVICES, SCHEDULES, STAGES, THRESHOLD_METHODS
from lungcad.training.config import OptimConfig, TrainConfig, load_config


def test_fixed_value_sets_are_the_literal_types() -> None:
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["stage"]) == STAGES == ("seg", "cls")
    assert typing.get_args(hints["device"]) == DEVICES
    assert typing.get_args(hints["threshold_method"]) == THRESHOLD_METHODS
    assert typing.get_args(typing.get_type_hints(OptimConfig)["schedule"]) == SCHEDULES
    with pytest.raises(InputError, match=r"train\.stage: expected one of 'seg', 'cls'"):
        load_config(None, ["train.stage=both"])


def test_cli_offers_the_library_stages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["train", "both"])
    assert "{" + ",".join(STAGES) + "}" in capsys.readouterr().err
