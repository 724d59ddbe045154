"""Tests of lungcad.metrics.volumetric: per-study 3D metrics with the missed-tumour convention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungcad.errors import InputError
from lungcad.metrics.segmentation import hd95
from lungcad.metrics.volumetric import STUDY_SEGMENTATION_KEYS, study_segmentation, worst_hd95_mm

SHAPE = (10, 20, 30)
SPACING = (2.5, 0.8, 0.7)


def _box(z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[z, y, x] = 1
    return mask


def test_worst_hd95_is_the_diagonal_of_the_physical_extent() -> None:
    assert worst_hd95_mm(SHAPE, SPACING) == pytest.approx(math.sqrt(25.0**2 + 16.0**2 + 21.0**2))
    with pytest.raises(InputError):
        worst_hd95_mm(SHAPE, SPACING[:2])


def test_missed_tumour_scores_dice_zero_and_the_worst_hd95() -> None:
    ref = _box(slice(3, 5), slice(5, 9), slice(5, 9))
    empty = np.zeros(SHAPE, dtype=np.uint8)
    missed = study_segmentation(empty, ref, SPACING)
    assert missed["dice"] == 0.0
    assert missed["hd95_mm"] == pytest.approx(worst_hd95_mm(SHAPE, SPACING))
    assert missed["tumour_missed"] == 1.0
    assert missed["n_ref_lesions"] == 1 and missed["n_detected_lesions"] == 0
    # Missing the tumour is never better than the worst real segmentation of it.
    far = _box(slice(9, 10), slice(19, 20), slice(29, 30))
    assert missed["hd95_mm"] >= study_segmentation(far, ref, SPACING)["hd95_mm"]
    assert set(missed) == set(STUDY_SEGMENTATION_KEYS)


def test_found_tumour_uses_monai_hd95_and_dice() -> None:
    ref = _box(slice(3, 6), slice(5, 10), slice(5, 10))
    pred = _box(slice(3, 6), slice(5, 10), slice(6, 11))
    out = study_segmentation(pred, ref, SPACING)
    assert out["dice"] == pytest.approx(2 * 60 / (75 + 75))
    assert out["hd95_mm"] == pytest.approx(hd95(pred, ref, SPACING))
    assert 0 < out["hd95_mm"] < worst_hd95_mm(SHAPE, SPACING)
    assert out["tumour_missed"] == 0.0
    perfect = study_segmentation(ref, ref, SPACING)
    assert perfect["dice"] == 1.0 and perfect["hd95_mm"] == 0.0
    voxel_ml = 2.5 * 0.8 * 0.7 / 1000
    assert out["ref_volume_ml"] == pytest.approx(75 * voxel_ml)


def test_tumour_free_study_has_no_dice_and_counts_false_positives() -> None:
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = _box(slice(0, 2), slice(0, 2), slice(0, 2))
    out = study_segmentation(pred, ref, SPACING)
    assert math.isnan(out["dice"]) and math.isnan(out["hd95_mm"])
    assert math.isnan(out["tumour_missed"])
    assert out["n_ref_lesions"] == 0 and out["n_fp_lesions"] == 1


def test_lesion_sensitivity_and_false_positives_on_hand_made_masks() -> None:
    # Three reference lesions; the prediction overlaps two of them (one by a single voxel)
    # and adds two components that touch none.
    ref = (
        _box(slice(1, 3), slice(1, 4), slice(1, 4))
        | _box(slice(5, 7), slice(10, 13), slice(10, 13))
        | _box(slice(8, 10), slice(15, 18), slice(25, 28))
    )
    pred = (
        _box(slice(1, 3), slice(1, 4), slice(1, 4))
        | _box(slice(6, 7), slice(12, 14), slice(12, 14))  # one voxel inside lesion 2
        | _box(slice(0, 1), slice(18, 20), slice(0, 2))
        | _box(slice(8, 9), slice(0, 2), slice(20, 22))
    )
    out = study_segmentation(pred, ref, SPACING)
    assert out["n_ref_lesions"] == 3
    assert out["n_detected_lesions"] == 2
    assert out["n_pred_lesions"] == 4
    assert out["n_fp_lesions"] == 2
