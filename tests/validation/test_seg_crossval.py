"""Grouped k-fold CV of the segmentation stage (lungcad.validation.seg_crossval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lungcad.errors import InputError
from lungcad.validation.seg_crossval import cross_validate_segmentation
from tests.inference_helpers import make_manifest


def test_every_tumour_slice_is_segmented_once_out_of_fold(tmp_path: Path, tiny_config) -> None:
    data = make_manifest(tmp_path / "data", {"train": 4, "val": 2})
    config = tiny_config(None, None, "train.stage=seg")
    result = cross_validate_segmentation(data, tmp_path / "cv", config, k=3, n_boot=20)
    out = result.out_dir
    for name in ("folds.json", "oof_segmentation.csv", "seg_cv_metrics.json", "results.md"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "oof_segmentation.csv").open()))
    # Six patients, one tumour slice and one empty slice each: every slice once.
    assert sorted(r["sample_id"] for r in rows) == sorted(f"s{i}" for i in range(12))
    folds = json.loads((out / "folds.json").read_text())["fold_of"]
    for row in rows:  # each slice was scored by the fold that held its patient out
        assert row["fold"] == f"fold{folds[row['group_id']]}"
    assert 0.0 <= result.metrics["dice"] <= 1.0
    assert result.metrics["dice_ci_low"] <= result.metrics["dice_ci_high"]
    assert len(result.per_fold) == 3
    ensemble = json.loads((out / "ensemble.json").read_text())
    assert [m["run"] for m in ensemble["members"]] == ["fold0/run", "fold1/run", "fold2/run"]


def test_a_cls_config_is_refused(tmp_path: Path, tiny_config) -> None:
    data = make_manifest(tmp_path / "data", {"train": 3})
    with pytest.raises(InputError, match="seg config"):
        cross_validate_segmentation(
            data, tmp_path / "cv", tiny_config(None, None, "train.stage=cls"), k=2
        )
    assert not (tmp_path / "cv").exists()


def test_more_folds_than_patients_is_refused(tmp_path: Path, tiny_config) -> None:
    data = make_manifest(tmp_path / "data", {"train": 2})
    config = tiny_config(None, None, "train.stage=seg")
    with pytest.raises(InputError, match="at least 3 groups"):
        cross_validate_segmentation(data, tmp_path / "cv", config, k=3)
