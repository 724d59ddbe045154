"""lungcad.evaluation.info: which tasks a run is scored on, and the provenance of the threshold,
the calibration and the data in evaluation.json (no network involved)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from lungcad.evaluation.calibration import Calibration, RunDecision
from lungcad.evaluation.data import EvaluationData, select_records
from lungcad.evaluation.info import (
    CI_LEVEL,
    ScoredTasks,
    calibration_info,
    data_info,
    data_source,
    evaluation_info,
    hd95_unit,
    rows_overlap,
    scored_tasks,
    threshold_info,
)
from lungcad.io.atomic import write_json_atomic
from lungcad.training.checkpoint import THRESHOLD_FILE, file_sha256
from lungcad.training.config import load_config


@pytest.fixture(scope="module")
def data(tiny_manifest: Callable[..., Path]) -> EvaluationData:
    return select_records(tiny_manifest({"train": 2, "test": 2}), "test")


def _without(data: EvaluationData, **changes: object) -> EvaluationData:
    return dataclasses.replace(
        data, records=[dataclasses.replace(r, **changes) for r in data.records]
    )


def test_scored_tasks(data: EvaluationData) -> None:
    assert scored_tasks("cls", {"init_from": "seg/best.pt"}, data) == ScoredTasks(True, True, [])
    seg = scored_tasks("seg", {}, data)
    assert (seg.classification, seg.segmentation) == (False, True)
    assert "classifier head is untrained" in seg.notes[0]
    cls = scored_tasks("cls", {}, data)  # not started from a seg run: untrained decoder
    assert (cls.classification, cls.segmentation) == (True, False)
    assert "no init_from" in cls.notes[0]
    unlabelled = scored_tasks("cls", {"init_from": "x"}, _without(data, label=-1))
    assert not unlabelled.classification and "no slice has a label" in unlabelled.notes[0]
    no_masks = scored_tasks("seg", {}, _without(data, mask_path="", label=-1))
    assert not no_masks.segmentation and "no slice has a tumour mask" in no_masks.notes[0]


def test_threshold_info(tmp_path: Path) -> None:
    plain = threshold_info(tmp_path, 0.4, True, None)
    assert plain["value"] == 0.4 and plain["source"] == "checkpoint"
    assert plain["tuned_on_evaluated_data"] is None  # nothing known about either side
    assert threshold_info(tmp_path, 0.4, False, None)["value"] is None
    write_json_atomic(tmp_path / THRESHOLD_FILE, {"threshold": 0.4, "method": "youden", "epoch": 3})
    stored = threshold_info(tmp_path, 0.4, True, None)
    assert stored["source"] == THRESHOLD_FILE and stored["method"] == "youden"
    assert stored["epoch"] == 3 and stored["chosen_on"] == "validation split"
    cal = Calibration(
        "temperature",
        temperature=2.0,
        threshold=0.3,
        info={"split": "val", "threshold_method": "mcc"},
    )
    calibrated = threshold_info(tmp_path, 0.4, True, RunDecision(cal, 0.3, "calibration.json"))
    assert calibrated["value"] == 0.3 and calibrated["uncalibrated_value"] == 0.4
    assert calibrated["method"] == "mcc" and calibrated["epoch"] is None
    assert calibrated["chosen_on"] == "val split (calibrated probabilities)"
    mapped = threshold_info(tmp_path, 0.4, True, RunDecision(cal, 0.35, "checkpoint, calibrated"))
    assert mapped["method"] == "youden" and mapped["epoch"] == 3  # still the run's own choice


def _rows(sha: str, split: str) -> dict:
    return {"manifests": [{"path": "m.csv", "sha256": sha}], "split": split}


def test_rows_overlap_compares_manifest_hashes_and_splits() -> None:
    assert rows_overlap(_rows("a", "val"), _rows("a", "val")) is True
    assert rows_overlap(_rows("a", "val"), _rows("a", "test")) is False
    assert rows_overlap(_rows("a", "val"), _rows("a", "all")) is True
    assert rows_overlap(_rows("a", "all"), _rows("a", "test")) is True
    assert rows_overlap(_rows("a", "val"), _rows("b", "val")) is False
    # An older calibration.json named its manifests without a hash: unknown, not False.
    assert rows_overlap(data_source(["m.csv"], "val"), _rows("a", "val")) is None
    assert rows_overlap(None, _rows("a", "val")) is None
    assert data_source([], "val") is None


def test_threshold_tuned_on_the_evaluated_rows_is_reported(tmp_path: Path) -> None:
    """The flag is computed from the manifests and splits involved, never written as False."""
    run_info = {"manifests": [{"path": "train.csv", "sha256": "a"}]}
    write_json_atomic(
        tmp_path / THRESHOLD_FILE, {"threshold": 0.4, "chosen_on": "validation split"}
    )
    # threshold.json without manifests (older runs): training chose it on run.json's val split.
    on_val = threshold_info(
        tmp_path, 0.4, True, None, evaluated=_rows("a", "val"), run_info=run_info
    )
    assert on_val["tuned_on_evaluated_data"] is True
    assert on_val["chosen_on_data"] == {**_rows("a", "val"), "manifests": run_info["manifests"]}
    on_test = threshold_info(
        tmp_path, 0.4, True, None, evaluated=_rows("a", "test"), run_info=run_info
    )
    assert on_test["tuned_on_evaluated_data"] is False
    elsewhere = threshold_info(
        tmp_path, 0.4, True, None, evaluated=_rows("b", "all"), run_info=run_info
    )
    assert elsewhere["tuned_on_evaluated_data"] is False
    # threshold.json's own record wins over run.json's.
    write_json_atomic(
        tmp_path / THRESHOLD_FILE,
        {"threshold": 0.4, "split": "val", "manifests": [{"path": "x.csv", "sha256": "b"}]},
    )
    own = threshold_info(tmp_path, 0.4, True, None, evaluated=_rows("b", "val"), run_info=run_info)
    assert own["tuned_on_evaluated_data"] is True
    # A calibration's own threshold was chosen where the calibration was fitted.
    cal = Calibration(
        "temperature", temperature=2.0, threshold=0.3, info={"split": "val", **_rows("c", "val")}
    )
    calibrated = threshold_info(
        tmp_path,
        0.4,
        True,
        RunDecision(cal, 0.3, "calibration.json"),
        evaluated=_rows("c", "val"),
        run_info=run_info,
    )
    assert calibrated["tuned_on_evaluated_data"] is True
    # A fold ensemble's threshold: pooled out-of-fold predictions of every cross-validated row.
    ensemble = {"threshold_chosen_on": _rows("d", "all"), "threshold_method": "mcc"}
    pooled = threshold_info(
        tmp_path,
        0.4,
        True,
        None,
        evaluated=_rows("d", "test"),
        run_info=run_info,
        ensemble=ensemble,
    )
    assert pooled["source"] == "ensemble.json" and pooled["tuned_on_evaluated_data"] is True
    assert "out-of-fold" in pooled["chosen_on"] and pooled["method"] == "mcc"
    assert (
        threshold_info(tmp_path, 0.4, True, None, evaluated=_rows("a", "test"), ensemble=ensemble)[
            "tuned_on_evaluated_data"
        ]
        is False
    )


def test_calibration_info() -> None:
    assert calibration_info(None) == {"applied": False, "reason": "no classification scored"}
    assert "has no calibration.json" in calibration_info(RunDecision(None, 0.5, "x"))["reason"]
    cal = Calibration(
        "temperature", temperature=1.5, info={"split": "val", "checkpoint_sha256": "ab"}
    )
    info = calibration_info(RunDecision(cal, 0.5, "calibration.json"))
    assert info["applied"] and info["temperature"] == 1.5 and info["fitted_on"] == "val"
    assert info["checkpoint_sha256"] == "ab" and info["threshold_source"] == "calibration.json"
    assert info["fitted_on_evaluated_data"] is None  # no manifest recorded, no data given
    fitted = Calibration("temperature", temperature=1.5, info={"split": "val", **_rows("a", "val")})
    decision = RunDecision(fitted, 0.5, "calibration.json")
    assert calibration_info(decision, evaluated=_rows("a", "val"))["fitted_on_evaluated_data"]
    assert calibration_info(decision, evaluated=_rows("a", "all"))["fitted_on_evaluated_data"]
    assert (
        calibration_info(decision, evaluated=_rows("a", "test"))["fitted_on_evaluated_data"]
        is False
    )
    assert (
        calibration_info(decision, evaluated=_rows("b", "val"))["fitted_on_evaluated_data"] is False
    )


def test_hd95_unit(data: EvaluationData) -> None:
    assert hd95_unit(data.records) == "mm"
    no_spacing = _without(data, spacing_x=math.nan).records
    assert hd95_unit(no_spacing) == "pixels"
    assert hd95_unit([*data.records, *no_spacing]).startswith("mixed")


def test_data_info_flags_training_data(data: EvaluationData, caplog) -> None:
    sha = file_sha256(data.manifest)
    held_out = data_info(data, {"manifests": [{"sha256": sha}]})
    assert held_out["same_manifest_as_training"] and not held_out["overlaps_training_data"]
    assert held_out["n_slices"] == 4 and held_out["n_groups"] == 2 and held_out["n_positive"] == 2
    assert held_out["split_summary"] and held_out["sources"] == ["test"]
    with caplog.at_level(logging.WARNING, logger="lungcad"):
        train = data_info(
            dataclasses.replace(data, split="train"), {"manifests": [{"sha256": sha}]}
        )
    assert train["overlaps_training_data"] and "not held-out" in caplog.text
    assert not data_info(data, {})["same_manifest_as_training"]
    # A fold ensemble was trained on every labelled row of its cross-validated manifest, the
    # test split too.
    ensemble = {"trained_on": _rows(sha, "all")}
    assert data_info(data, {}, ensemble)["overlaps_training_data"]
    assert not data_info(data, {}, {"trained_on": _rows("other", "all")})["overlaps_training_data"]


def test_evaluation_info_document(data: EvaluationData, tmp_path: Path) -> None:
    config = load_config(None, ["model.name=resnet18", "train.stage=cls"])
    checkpoint = {"run_dir": str(tmp_path), "path": "best.pt", "threshold": 0.5, "epoch": 2}
    tasks = ScoredTasks(True, False, ["a note"])
    info = evaluation_info(config, checkpoint, {}, data, tasks, None, {"n_boot": 0})
    assert info["kind"] == "lungcad-evaluation" and info["checkpoint"]["model"] == "resnet18"
    assert info["tasks"] == {"classification": True, "segmentation": False}
    assert info["notes"] == ["a note"] and info["hd95_unit"] is None
    assert info["settings"] == {
        "n_boot": 0,
        "ci_level": CI_LEVEL,
        "ci_unit": "patient (group)",
        "pixel_threshold": 0.5,
    }
    assert {"torch", "scikit-learn", "matplotlib"} <= set(info["versions"])
