"""The API's job vocabulary: statuses as stored strings, public keys, job ids, result document."""

from __future__ import annotations

import json
import math

import numpy as np

from lungcad.service.jobs.schema import (
    API_PREFIX,
    FINISHED,
    PUBLIC_KEYS,
    JobStatus,
    is_job_id,
    public_view,
    result_document,
)
from tests.service_helpers import FakePredictor, hu_volume


def test_statuses_are_the_strings_on_disk_and_in_the_api() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "done", "failed"]
    assert JobStatus("done") is JobStatus.DONE and JobStatus.DONE == "done"
    assert json.dumps({"status": JobStatus.RUNNING}) == '{"status": "running"}'
    assert f"job is {JobStatus.QUEUED}" == "job is queued" and str(JobStatus.FAILED) == "failed"
    assert FINISHED == {"done", "failed"} and "queued" not in FINISHED


def test_job_ids_and_public_view() -> None:
    assert is_job_id("0123456789abcdef" * 2)
    for bad in ("0" * 31, "0" * 33, "G" * 32, "../" + "0" * 29, "0" * 32 + "\n"):
        assert not is_job_id(bad), bad
    state = {"job_id": "a" * 32, "status": JobStatus.QUEUED, "user": "tok-1", "attempts": 0}
    view = public_view(state)
    assert tuple(view) == PUBLIC_KEYS and view["status"] == "queued"
    assert view["error"] is None and "user" not in view and "attempts" not in view


def test_result_document_links_only_written_outputs_and_has_no_nan(tmp_path) -> None:
    volume = hu_volume((5, 16, 16))
    result = FakePredictor(probability=0.7).predict_volume(volume)
    result.slice_probabilities[0] = np.nan  # a slice without lung
    files = {name: tmp_path / name for name in ("mask.nii.gz", "findings.json", "report.html")}
    doc = result_document("b" * 32, volume, result, files, "0.1.0+abc")
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON
    assert doc["slice_probabilities"][0] is None
    assert math.isclose(doc["slice_probabilities"][2], 0.7)
    assert doc["study_probability"] == 0.7 and doc["is_cancer"] is True
    assert doc["decision"] == "cancer suspected" and doc["threshold"] == 0.5
    assert doc["n_slices"] == 5 and doc["shape_zyx"] == [5, 16, 16]
    assert doc["spacing_zyx"] == [2.0, 1.5, 1.5] and doc["cam_slices"] == [2]
    assert doc["files"]["mask"] == f"{API_PREFIX}/jobs/{'b' * 32}/files/mask.nii.gz"
    assert doc["files"]["seg"] is None and doc["files"]["sr"] is None
    assert doc["outputs"] == sorted(files) and doc["model_version"] == "0.1.0+abc"
    assert isinstance(doc["lesions"], list) and doc["lesions"]


def test_result_document_of_a_study_without_decision(tmp_path) -> None:
    """ "cannot assess" and "no classifier": no probability, threshold or decision, and why."""
    import dataclasses

    from lungcad.finding import StudyFinding

    volume = hu_volume((5, 16, 16))
    for status, reason in (("cannot assess", "no lung in the image"), ("no classifier", "seg")):
        result = dataclasses.replace(
            FakePredictor().predict_volume(volume),
            finding=StudyFinding.not_assessed(status, reason),
            slice_probabilities=np.full(5, np.nan),
        )
        doc = result_document("c" * 32, volume, result, {}, "0.1.0+abc")
        assert json.loads(json.dumps(doc, allow_nan=False)) == doc
        assert doc["decision"] == status and doc["finding"]["reason"] == reason
        assert doc["study_probability"] is None and doc["is_cancer"] is None
        assert doc["threshold"] is None and doc["slice_probabilities"] == [None] * 5
        assert doc["input_check"] is None  # the fake predictor runs no checks
