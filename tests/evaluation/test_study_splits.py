"""Tests of lungcad.evaluation.study_splits: a study folder's cases in a run's training splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lungcad.data.layouts.prepare import prepare_dataset
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.synthetic.cohort import write_cohort
from lungcad.errors import InputError
from lungcad.evaluation.study_data import open_studies
from lungcad.evaluation.study_splits import StudySplits, select_studies, training_splits
from lungcad.training.checkpoint import file_sha256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    write_cohort(root / "cohort", 6, seed=5, tumour_fraction=0.5, formats=("msd",), matrix=32)
    settings = PrepareSettings(layout="msd", val_fraction=0.34, test_fraction=0.34, seed=0)
    prepare_dataset(root / "cohort" / "msd", root / "prep", settings)
    return {"studies": root / "cohort" / "msd", "manifest": root / "prep" / "manifest.csv"}


def _manifests(prepared: dict[str, Path]) -> list[dict[str, str]]:
    path = prepared["manifest"]
    return [{"path": str(path), "sha256": file_sha256(path)}]


def _groups(prepared: dict[str, Path]) -> dict[str, list[str]]:
    summary = json.loads((prepared["manifest"].parent / "summary.json").read_text("utf-8"))
    return summary["group_ids"]


def test_the_folder_a_manifest_was_prepared_from_is_recognised(prepared) -> None:
    studies = open_studies(prepared["studies"])
    found = training_splits(studies, [{"path": "/nonexistent/manifest.csv"}, *_manifests(prepared)])
    assert found is not None and found.manifest == str(prepared["manifest"])
    groups = _groups(prepared)
    assert {case for case, split in found.splits.items() if split == "test"} == set(groups["test"])
    assert training_splits(studies, []) is None


def test_other_patients_are_not_recognised(prepared, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_cohort(other, 6, seed=6, tumour_fraction=0.5, formats=("msd",), matrix=32)
    assert training_splits(open_studies(other), _manifests(prepared)) is None
    studies, selection = select_studies(open_studies(other), None, None, "evaluate")
    assert len(studies.studies) == 6 and selection["split"] == "all"
    assert selection["overlaps_training_data"] is False
    with pytest.raises(InputError, match="no manifest of this model"):
        select_studies(open_studies(other), None, "val", "threshold")


def test_thresholds_come_from_val_and_evaluations_from_test(prepared) -> None:
    studies = open_studies(prepared["studies"])
    found = training_splits(studies, _manifests(prepared))
    groups = _groups(prepared)
    val, chosen = select_studies(studies, found, None, "threshold")
    assert [s.case_id for s in val.studies] == sorted(groups["val"])
    assert chosen["split"] == "val" and chosen["overlaps_training_data"] is False
    test, scored = select_studies(studies, found, None, "evaluate")
    assert [s.case_id for s in test.studies] == sorted(groups["test"])
    assert scored["training_manifest"] == str(prepared["manifest"])
    for refused in ("test", "all"):
        with pytest.raises(InputError, match="never chosen"):
            select_studies(studies, found, refused, "threshold")
    _, trained = select_studies(studies, found, "train", "evaluate")
    assert trained["overlaps_training_data"] is True


def test_a_fold_ensemble_trained_on_every_split(prepared) -> None:
    studies = open_studies(prepared["studies"])
    found = training_splits(studies, _manifests(prepared), every_split_trained=True)
    assert isinstance(found, StudySplits) and found.every_split_trained
    with pytest.raises(InputError, match="fold ensemble"):
        select_studies(studies, found, None, "threshold")
    _, scored = select_studies(studies, found, None, "evaluate")
    assert scored["overlaps_training_data"] is True


def test_a_changed_folder_is_not_the_prepared_one(prepared, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(prepared["studies"], changed)
    (changed / "labelsTr" / "lung_001.nii.gz").write_bytes(b"0" * 10)
    assert training_splits(open_studies(changed), _manifests(prepared)) is None
