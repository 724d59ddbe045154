"""Per-study 3D segmentation metrics in mm, where a missed tumour scores Dice 0 and the worst HD95.

:mod:`lungcad.metrics.segmentation` leaves HD95 undefined (NaN) when either mask is empty,
which is right for one slice but wrong for a whole study: averaged with ``np.nanmean``, a
tumour the model missed entirely would drop out of the mean HD95 and flatter it. Here the
conventions for a study ``(z, y, x)`` with voxel spacing in mm are:

* a study **with** tumour (the reference has voxels):

  - Dice is ``2 tp / (2 tp + fp + fn)``; a missed tumour (empty prediction) gives 0;
  - HD95 is MONAI's symmetric 95th-percentile Hausdorff distance in mm; a missed tumour gets
    :func:`worst_hd95_mm`, the diagonal of the volume's physical extent
    (``sqrt(sum((n_i * s_i) ** 2))``). No two voxel centres of the volume are farther apart,
    so this is the largest HD95 any prediction could score: missing the tumour is never
    better than the worst segmentation of it;

* a study **without** tumour: Dice and HD95 are undefined (NaN) and stay out of their means,
  which are taken over the studies with tumour only; what the model predicted there shows in
  the false-positive lesion count (and in the study's specificity).

Lesions are the connected components of a mask (26-connected in 3D): a reference lesion is
detected when a predicted component overlaps it by at least one voxel, and a predicted
component that touches no reference lesion is a false positive
(:func:`lungcad.metrics.segmentation.lesion_detection`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lungcad.errors import InputError
from lungcad.metrics.segmentation import (
    dice_from_counts,
    hd95,
    lesion_detection,
    segmentation_counts,
)

__all__ = ["STUDY_SEGMENTATION_KEYS", "study_segmentation", "worst_hd95_mm"]

#: Keys of :func:`study_segmentation`, in the order ``per_study.csv`` writes them.
STUDY_SEGMENTATION_KEYS = (
    "dice",
    "hd95_mm",
    "tumour_missed",
    "n_ref_lesions",
    "n_detected_lesions",
    "n_pred_lesions",
    "n_fp_lesions",
    "ref_volume_ml",
    "pred_volume_ml",
)


def worst_hd95_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The HD95 given to a missed tumour: the diagonal of the volume's extent, in mm.

    Args:
        shape: the volume's ``(z, y, x)`` voxel counts (or ``(y, x)``).
        spacing: voxel size in mm in the same axis order.

    Returns:
        ``sqrt(sum((shape_i * spacing_i) ** 2))`` in mm.
    """
    if len(shape) != len(spacing):
        raise InputError(f"shape {tuple(shape)} and spacing {tuple(spacing)} differ in length")
    return float(
        math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True)))
    )


def study_segmentation(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """The segmentation metrics of one study, with the conventions of this module.

    Args:
        pred: ``(z, y, x)`` binary predicted tumour mask (0/1 or bool).
        ref: binary reference mask of the same shape.
        spacing: voxel size ``(z, y, x)`` in mm.

    Returns:
        ``dice`` (NaN without reference tumour), ``hd95_mm`` (the worst value,
        :func:`worst_hd95_mm`, for a missed tumour; NaN without reference tumour),
        ``tumour_missed`` (1.0 when the reference has tumour and the prediction none, else
        0.0; NaN without reference tumour), lesion counts ``n_ref_lesions``,
        ``n_detected_lesions``, ``n_pred_lesions``, ``n_fp_lesions`` and the volumes
        ``ref_volume_ml``, ``pred_volume_ml`` (all floats).

    Raises:
        InputError: masks of different shapes, not binary, or a bad spacing.
    """
    tp, fp, fn, _ = segmentation_counts(pred, ref)
    found = lesion_detection(pred, ref, spacing)  # checks the spacing too
    has_tumour, predicted = tp + fn > 0, tp + fp > 0
    nan = float("nan")
    if not has_tumour:
        distance, missed = nan, nan
    elif not predicted:
        distance, missed = worst_hd95_mm(np.shape(ref), spacing), 1.0
    else:
        distance, missed = hd95(pred, ref, spacing), 0.0
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {
        "dice": dice_from_counts(tp, fp, fn),  # 0 for a missed tumour, NaN without tumour
        "hd95_mm": distance,
        "tumour_missed": missed,
        "n_ref_lesions": float(found.n_ref),
        "n_detected_lesions": float(found.n_detected),
        "n_pred_lesions": float(found.n_pred),
        "n_fp_lesions": float(found.n_false_positive),
        "ref_volume_ml": (tp + fn) * voxel_ml,
        "pred_volume_ml": (tp + fp) * voxel_ml,
    }
