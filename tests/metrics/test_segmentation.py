"""Tests of lungcad.metrics.segmentation: Dice/IoU from counts, NaN for empty references, HD95
and lesion detection on shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungcad.errors import InputError
from lungcad.metrics.segmentation import (
    dice,
    hd95,
    iou,
    lesion_detection,
    lesion_sensitivity,
    segmentation_counts,
    segmentation_metrics,
)


def _square(shape, y0, x0, size=10):
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return mask


def test_dice_iou_from_counts():
    ref = _square((40, 40), 10, 10)
    pred = _square((40, 40), 10, 14)  # 60 px overlap of 100 each
    assert tuple(segmentation_counts(pred, ref)) == (60, 40, 40, 1600 - 140)
    assert dice(pred, ref) == pytest.approx(120 / 200)
    assert iou(pred, ref) == pytest.approx(60 / 140)


def test_empty_reference_gives_nan():
    empty = np.zeros((20, 20), dtype=np.uint8)
    some = _square((20, 20), 2, 2, 5)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert math.isnan(dice(some, empty)) and math.isnan(iou(some, empty))
    assert dice(empty, some) == 0.0
    assert math.isnan(hd95(empty, some, (1.0, 1.0)))
    m = segmentation_metrics(some, empty, (1.0, 1.0))
    assert math.isnan(m["dice"]) and math.isnan(m["lesion_sensitivity"])
    assert m["fp"] == 25 and m["n_fp_lesions"] == 1


def test_non_binary_mask_raises():
    with pytest.raises(InputError, match="binary"):
        dice(np.full((4, 4), 0.7), np.ones((4, 4)))
    with pytest.raises(InputError, match="shape"):
        dice(np.ones((4, 4)), np.ones((4, 5)))


def test_hd95_of_offset_squares_in_mm():
    ref = _square((40, 40), 10, 10)
    # Shifted 4 columns: every point of the far edge is 4 px from the reference -> 4 * 1.5 mm.
    assert hd95(_square((40, 40), 10, 14), ref, (0.7, 1.5)) == pytest.approx(6.0, abs=1e-4)
    # Shifted 6 rows at 0.7 mm per row.
    assert hd95(_square((40, 40), 16, 10), ref, (0.7, 1.5)) == pytest.approx(4.2, abs=1e-4)
    assert hd95(ref, ref, (0.7, 1.5)) == 0.0


def test_hd95_3d_anisotropic():
    ref = np.zeros((12, 20, 20), dtype=bool)
    ref[2:8, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=0)  # two slices further at 2.5 mm
    assert hd95(pred, ref, (2.5, 0.8, 0.8)) == pytest.approx(5.0, abs=1e-4)
    with pytest.raises(InputError, match="spacing"):
        hd95(pred, ref, (0.8, 0.8))


def test_lesion_sensitivity_two_lesions_one_missed():
    ref = _square((60, 60), 5, 5) | _square((60, 60), 40, 40)
    pred = _square((60, 60), 8, 8, 4) | _square((60, 60), 40, 5, 5)  # hits 1st, plus a FP
    found = lesion_detection(pred, ref, (1.0, 1.0))
    assert found == (2, 1, 2, 1)
    assert lesion_sensitivity(pred, ref, (1.0, 1.0)) == 0.5
    # The hit covers 16% of the lesion: not enough when 50% is required.
    assert lesion_sensitivity(pred, ref, (1.0, 1.0), min_overlap=0.5) == 0.0
    # Lesions smaller than 50 mm^2 (at 0.5 mm pixels each lesion is 25 mm^2) are ignored.
    assert math.isnan(lesion_sensitivity(pred, ref, (0.5, 0.5), min_lesion_size=50.0))
    m = segmentation_metrics(pred, ref, (1.0, 1.0))
    assert m["lesion_sensitivity"] == 0.5 and m["n_ref_lesions"] == 2
