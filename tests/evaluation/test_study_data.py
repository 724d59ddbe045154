"""Tests of lungcad.evaluation.study_data: MSD-layout study folders and their hashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.synthetic.cohort import write_cohort
from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.study_data import open_studies, read_study
from lungcad.io.writers import write_mask
from lungcad.training.checkpoint import file_sha256
from lungcad.volume import Volume


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("studies") / "cohort"
    write_cohort(out, 2, seed=3, tumour_fraction=0.5, formats=("msd",), matrix=32)
    return out


def test_open_studies_reads_the_msd_folder_or_the_cohort_above_it(cohort: Path) -> None:
    from_root = open_studies(cohort)
    from_msd = open_studies(cohort / "msd")
    assert from_root.folder == from_msd.folder == cohort / "msd"
    assert [s.case_id for s in from_root.studies] == ["lung_001", "lung_002"]
    first = from_root.studies[0]
    assert first.image_sha256 == file_sha256(first.image)
    assert from_root.hashes == from_msd.hashes
    volume, reference = read_study(first)
    assert reference.shape == volume.shape and reference.dtype == bool


def test_a_copy_of_the_studies_has_the_same_hashes(cohort: Path, tmp_path: Path) -> None:
    shutil.copytree(cohort / "msd", tmp_path / "copy")
    assert open_studies(tmp_path / "copy").hashes == open_studies(cohort).hashes


def test_bad_study_folders_are_refused(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingInputError):
        open_studies(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputError, match="MSD Task06 layout"):
        open_studies(tmp_path / "flat")
    broken = tmp_path / "broken"
    shutil.copytree(cohort / "msd", broken)
    (broken / "labelsTr" / "lung_002.nii.gz").unlink()
    with pytest.raises(MissingInputError, match="lung_002"):
        open_studies(broken)


def test_a_label_on_another_grid_is_refused(cohort: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(cohort / "msd", moved)
    study = open_studies(moved).studies[0]
    _, reference = read_study(study)
    small = Volume(array=reference[:, :-1].astype(np.uint8), spacing=(2.5, 5.0, 5.0))
    write_mask(small, study.label)
    with pytest.raises(InputError, match="label geometry") as err:
        read_study(study)
    assert str(study.label) in str(err.value)
