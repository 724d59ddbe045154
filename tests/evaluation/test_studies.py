"""Tests of lungcad.evaluation.studies: per-study rows and the study-level metrics."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from lungcad.evaluation.studies import STUDY_COLUMNS, per_study_csv, score_study, study_metrics
from lungcad.evaluation.study_data import Study
from lungcad.metrics.volumetric import worst_hd95_mm

SHAPE = (8, 16, 16)
SPACING = (2.0, 1.0, 1.0)


def _study(name: str) -> Study:
    return Study(name, Path(f"{name}.nii.gz"), Path(f"{name}_label.nii.gz"), "0" * 64)


def _box(*boxes: tuple[slice, slice, slice]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


LESION_A = (slice(1, 3), slice(2, 5), slice(2, 5))
LESION_B = (slice(5, 7), slice(10, 13), slice(10, 13))
FAR = (slice(0, 1), slice(14, 16), slice(0, 2))


def _rows():
    ref = _box(LESION_A, LESION_B)
    empty = _box()
    return [
        # found (lesion A exactly), lesion B missed, one false-positive component
        score_study(
            _study("found"),
            ref,
            SPACING,
            probability=0.9,
            threshold=0.5,
            k=2,
            n_evaluated=8,
            mask=_box(LESION_A, FAR),
        ),
        # the tumour missed altogether
        score_study(
            _study("missed"),
            ref,
            SPACING,
            probability=0.4,
            threshold=0.5,
            k=2,
            n_evaluated=8,
            mask=empty,
        ),
        # no tumour, nothing predicted
        score_study(
            _study("clean"),
            empty,
            SPACING,
            probability=0.2,
            threshold=0.5,
            k=2,
            n_evaluated=8,
            mask=empty,
        ),
        # no tumour, one false positive, decided cancer
        score_study(
            _study("fp"),
            empty,
            SPACING,
            probability=0.6,
            threshold=0.5,
            k=2,
            n_evaluated=8,
            mask=_box(FAR),
        ),
    ]


def test_score_study_labels_and_decisions() -> None:
    found, missed, clean, fp = _rows()
    assert (found.label, missed.label, clean.label, fp.label) == (1, 1, 0, 0)
    assert (found.prediction, missed.prediction, clean.prediction, fp.prediction) == (1, 0, 0, 1)
    assert missed.segmentation["dice"] == 0.0
    assert missed.segmentation["hd95_mm"] == pytest.approx(worst_hd95_mm(SHAPE, SPACING))
    unassessed = score_study(
        _study("x"),
        _box(),
        SPACING,
        probability=None,
        threshold=None,
        k=0,
        n_evaluated=0,
        mask=None,
    )
    assert unassessed.prediction == -1 and math.isnan(unassessed.probability)
    assert unassessed.segmentation == {}


def test_study_metrics_count_a_missed_tumour_in_every_mean() -> None:
    rows = _rows()
    m = study_metrics(rows, n_boot=50, seed=0)
    found_dice = rows[0].segmentation["dice"]
    # The missed tumour's 0 is in the mean Dice; its worst HD95 is in the mean HD95.
    assert m["dice"] == pytest.approx(found_dice / 2)
    worst = worst_hd95_mm(SHAPE, SPACING)
    assert m["hd95_mm"] == pytest.approx((rows[0].segmentation["hd95_mm"] + worst) / 2)
    assert math.isfinite(m["hd95_mm"]) and m["n_missed_tumours"] == 1
    # 4 reference lesions (2 per tumour study), 1 detected; FP components: 1 + 0 + 0 + 1.
    assert m["lesion_sensitivity"] == pytest.approx(1 / 4)
    assert m["fp_per_study"] == pytest.approx(2 / 4)
    assert (m["n_ref_lesions"], m["n_detected_lesions"], m["n_fp_lesions"]) == (4, 1, 2)
    # Study decisions: sensitivity 1/2, specificity 1/2, AUC from the ranking (0.9, 0.4 vs
    # 0.2, 0.6): 3 of 4 pairs ordered.
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["auc"] == pytest.approx(0.75)
    assert m["n_studies"] == 4 and m["n_with_tumour"] == 2 and m["n_assessed"] == 4
    for key in ("auc", "dice", "hd95_mm", "lesion_sensitivity", "fp_per_study"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
    no_ci = study_metrics(rows, n_boot=0)
    assert "dice_ci_low" not in no_ci and no_ci["dice"] == m["dice"]


def test_per_study_csv_has_one_row_per_study_and_empty_undefined_cells() -> None:
    rows = _rows()
    table = list(csv.DictReader(io.StringIO(per_study_csv(rows))))
    assert [r["case_id"] for r in table] == ["found", "missed", "clean", "fp"]
    assert list(table[0]) == list(STUDY_COLUMNS)
    assert table[1]["dice"] == "0" and table[1]["tumour_missed"] == "1"
    assert table[2]["dice"] == "" and table[2]["hd95_mm"] == ""
    assert float(table[1]["hd95_mm"]) == pytest.approx(worst_hd95_mm(SHAPE, SPACING))
