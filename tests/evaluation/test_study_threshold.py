"""Tests of lungcad.evaluation.study_threshold: the study_threshold.json record and its checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungcad.errors import InputError
from lungcad.evaluation.calibration import Calibration
from lungcad.evaluation.study_threshold import (
    STUDY_THRESHOLD_FILE,
    StudyThreshold,
    calibration_identity,
    choose_study_threshold,
    load_study_threshold,
    model_folder,
    model_identity,
    read_study_threshold,
    save_study_threshold,
)

INFO = {"sha256": "a" * 64, "run_dir": "run"}
CAL = Calibration("temperature", temperature=1.7)


def _threshold(**changes) -> StudyThreshold:
    values = {
        "threshold": 0.42,
        "method": "mcc",
        "model_sha256": model_identity(INFO),
        "calibration_sha256": None,
        "extent_mm": 5.0,
        "chosen_on": {"input": "val", "n_studies": 4, "study_sha256": ["h1", "h2"]},
        "info": {"slice_threshold": 0.5},
    }
    return StudyThreshold(**{**values, **changes})


def test_round_trip_and_the_studies_it_was_chosen_on(tmp_path: Path) -> None:
    assert read_study_threshold(tmp_path) is None
    stored = _threshold()
    path = save_study_threshold(tmp_path, stored)
    assert path == tmp_path / STUDY_THRESHOLD_FILE
    again = read_study_threshold(tmp_path)
    assert again == stored
    assert again.study_hashes == {"h1", "h2"}
    assert load_study_threshold(tmp_path, INFO, None, 5.0) == stored
    assert "0.420" in stored.describe() and "4 validation studies" in stored.describe()


@pytest.mark.parametrize(
    ("info", "calibration", "extent", "match"),
    [
        ({"sha256": "b" * 64}, None, 5.0, "another model"),
        (INFO, CAL, 5.0, "calibration"),
        (INFO, None, 7.5, "7.5 mm"),
    ],
)
def test_a_stale_study_threshold_is_refused(tmp_path: Path, info, calibration, extent, match):
    save_study_threshold(tmp_path, _threshold())
    with pytest.raises(InputError, match=match) as err:
        load_study_threshold(tmp_path, info, calibration, extent)
    assert STUDY_THRESHOLD_FILE in str(err.value)


def test_the_calibration_and_the_ensemble_identify_the_probabilities(tmp_path: Path) -> None:
    save_study_threshold(tmp_path, _threshold(calibration_sha256=calibration_identity(CAL)))
    assert load_study_threshold(tmp_path, INFO, CAL, 5.0) is not None
    other = Calibration("temperature", temperature=2.0)
    with pytest.raises(InputError, match="calibration"):
        load_study_threshold(tmp_path, INFO, other, 5.0)
    assert calibration_identity(None) is None
    ensemble = {"sha256": "a" * 64, "ensemble": {"member_sha256": ["x", "y"]}}
    assert model_identity(ensemble).startswith("ensemble:")
    assert model_identity(ensemble) != model_identity(
        {"sha256": "a" * 64, "ensemble": {"member_sha256": ["x", "z"]}}
    )


def test_model_folder_of_a_checkpoint_file(tmp_path: Path) -> None:
    (tmp_path / "best.pt").write_bytes(b"")
    assert model_folder(tmp_path / "best.pt") == tmp_path
    assert model_folder(tmp_path) == tmp_path


def test_invalid_files_and_values_are_refused(tmp_path: Path) -> None:
    (tmp_path / STUDY_THRESHOLD_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="invalid study threshold"):
        read_study_threshold(tmp_path)
    (tmp_path / STUDY_THRESHOLD_FILE).write_text('{"threshold": 0.3}', encoding="utf-8")
    with pytest.raises(InputError, match="invalid study threshold"):
        read_study_threshold(tmp_path)
    with pytest.raises(InputError):
        _threshold(threshold=1.5)
    with pytest.raises(InputError):
        _threshold(method="f1")


def test_choose_study_threshold_needs_both_kinds_of_study() -> None:
    t = choose_study_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8], "mcc")
    assert 0.3 < t < 0.6
    assert 0.3 < choose_study_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8], "youden") < 0.6
    with pytest.raises(InputError, match="with and without tumour"):
        choose_study_threshold([1, 1, 1], [0.2, 0.5, 0.9], "mcc")
