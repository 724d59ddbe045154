"""lungcad.evaluation.choices: the value sets the evaluation checks and the CLI offers."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.evaluation.calibration import Calibration, fit_calibration
from lungcad.evaluation.choices import CALIBRATION_METHODS, SPLIT_CHOICES


def test_value_sets() -> None:
    assert SPLIT_CHOICES == ("train", "val", "test", "all")
    assert CALIBRATION_METHODS == ("temperature", "isotonic")


def test_the_library_refuses_other_values() -> None:
    with pytest.raises(InputError, match="calibration method must be one of"):
        Calibration("platt")
    with pytest.raises(InputError, match="calibration method must be one of"):
        fit_calibration(np.array([0.0, 1.0]), np.array([0, 1]), "platt")


def test_the_cli_offers_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["calibrate", "--checkpoint", "r", "--manifest", "m", "--method", "platt"])
    assert "{" + ",".join(CALIBRATION_METHODS) + "}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--checkpoint", "r", "--data", "d", "--out", "o", "--split", "x"])
    assert "{" + ",".join(SPLIT_CHOICES) + "}" in capsys.readouterr().err


def test_importing_them_imports_nothing_heavy(modules_imported_by) -> None:
    # The CLI builds every parser on each call; this module must not slow that down.
    assert not modules_imported_by("lungcad.evaluation.choices") & {
        "numpy",
        "lungcad.evaluation.data",
    }
