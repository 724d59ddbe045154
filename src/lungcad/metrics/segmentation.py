"""Segmentation metrics from tp/fp/fn counts: Dice, IoU, HD95 and lesion detection.

The counts follow nnU-Net's ``evaluate_predictions``, with one deliberate difference: an empty
reference gives NaN (not 0 or 1) whatever the prediction (nnU-Net says 0 when only the
prediction has voxels). Averages over cases are therefore taken with ``np.nanmean``, images
without tumour neither inflate nor deflate Dice, and their false positives show in ``fp`` and
in the lesion counts instead. Masks are 2D ``(y, x)`` or 3D ``(z, y, x)``; spacings are in mm
in the same axis order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from lungcad.errors import InputError


class SegmentationCounts(NamedTuple):
    """Voxel counts of a binary prediction against a binary reference."""

    tp: int
    fp: int
    fn: int
    tn: int


def _check_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(
            f"pred and ref masks must have the same shape; got {pred.shape} and {ref.shape}"
        )
    if pred.ndim not in (2, 3):
        raise InputError(f"masks must be 2D (y, x) or 3D (z, y, x); got shape {pred.shape}")
    for name, arr in (("pred", pred), ("ref", ref)):
        if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
            raise InputError(
                f"{name} mask must be binary (0/1 or bool); got values such as "
                f"{np.unique(arr)[:5].tolist()}. Threshold probabilities first."
            )
    return pred.astype(bool), ref.astype(bool)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(
            f"spacing must be {ndim} positive finite values in mm, in the mask's axis order "
            f"({'z, y, x' if ndim == 3 else 'y, x'}); got {spacing}"
        )
    return spacing


def segmentation_counts(pred: np.ndarray, ref: np.ndarray) -> SegmentationCounts:
    """tp, fp, fn, tn voxel counts of a binary ``pred`` against ``ref`` (same shape, 2D/3D)."""
    pred, ref = _check_masks(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return SegmentationCounts(tp, fp, fn, int(pred.size) - tp - fp - fn)


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """``2 tp / (2 tp + fp + fn)``; NaN when the reference is empty (``tp + fn == 0``).

    An empty reference gives NaN even when the prediction is empty too (where some tools say
    1) or not (where they say 0): the score is undefined, and averaging with ``np.nanmean``
    keeps tumour-free images from inflating or deflating the mean. False positives on such
    images are counted by ``fp`` and by the lesion-level metrics instead.
    Summing counts over cases first gives the "global" Dice.
    """
    if tp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def iou_from_counts(tp: float, fp: float, fn: float) -> float:
    """``tp / (tp + fp + fn)`` (Jaccard); NaN when the reference is empty (as Dice)."""
    if tp + fn == 0:
        return float("nan")
    return float(tp / (tp + fp + fn))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of binary masks; NaN for an empty reference (see :func:`dice_from_counts`)."""
    tp, fp, fn, _ = segmentation_counts(pred, ref)
    return dice_from_counts(tp, fp, fn)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union of binary masks; NaN for an empty reference."""
    tp, fp, fn, _ = segmentation_counts(pred, ref)
    return iou_from_counts(tp, fp, fn)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in mm.

    MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed
    95th percentiles of boundary-to-boundary Euclidean distances, with anisotropic spacing.

    Args:
        pred: ``(y, x)`` or ``(z, y, x)`` binary prediction.
        ref: binary reference of the same shape.
        spacing: pixel/voxel size in mm in the array's axis order.

    Returns:
        HD95 in mm; NaN when either mask is empty (no surface to measure from).
    """
    pred, ref = _check_masks(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        return float("nan")
    from monai.metrics import compute_hausdorff_distance  # torch import is slow; only here

    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument internally; nothing for us to fix.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        value = compute_hausdorff_distance(
            pred[None, None].astype(np.float32),
            ref[None, None].astype(np.float32),
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(np.asarray(value).reshape(-1)[0])


class LesionDetection(NamedTuple):
    """Lesion-level detection counts (connected components)."""

    n_ref: int  # reference lesions (after the size filter)
    n_detected: int  # reference lesions hit by the prediction
    n_pred: int  # predicted components
    n_false_positive: int  # predicted components touching no reference lesion

    @property
    def sensitivity(self) -> float:
        """Fraction of reference lesions detected; NaN when there is no reference lesion."""
        return float("nan") if self.n_ref == 0 else self.n_detected / self.n_ref


def lesion_detection(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    min_overlap: float = 0.0,
    min_lesion_size: float = 0.0,
) -> LesionDetection:
    """Count reference lesions found by the prediction (connected components, full connectivity).

    A reference lesion (a connected component of ``ref``, 8-connected in 2D, 26-connected in
    3D) is detected when the prediction covers more than ``min_overlap`` of its area/volume
    (with the default 0, one overlapping voxel is enough).

    Args:
        pred: ``(y, x)`` or ``(z, y, x)`` binary prediction.
        ref: binary reference of the same shape.
        spacing: voxel size in mm in the array's axis order.
        min_overlap: fraction in [0, 1) of a lesion that must be covered to count as found.
        min_lesion_size: reference lesions smaller than this (mm^2 in 2D, mm^3 in 3D) are
            ignored (annotation specks).

    Returns:
        :class:`LesionDetection` counts.
    """
    pred, ref = _check_masks(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    if not 0 <= min_overlap < 1:
        raise InputError(f"min_overlap must be a fraction in [0, 1); got {min_overlap}")
    structure = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    ref_labels, n_ref_all = ndimage.label(ref, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    voxel = float(np.prod(spacing))
    idx = np.arange(1, n_ref_all + 1)
    sizes = ndimage.sum_labels(np.ones_like(ref, dtype=np.float64), ref_labels, idx)
    covered = ndimage.sum_labels(pred.astype(np.float64), ref_labels, idx)
    keep = sizes * voxel >= min_lesion_size
    hit = covered / np.maximum(sizes, 1) > min_overlap
    touching = np.unique(pred_labels[ref & pred])
    n_fp = n_pred - int(np.count_nonzero(touching))
    return LesionDetection(int(keep.sum()), int((keep & hit).sum()), int(n_pred), n_fp)


def lesion_sensitivity(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    min_overlap: float = 0.0,
    min_lesion_size: float = 0.0,
) -> float:
    """Fraction of reference lesions detected (see :func:`lesion_detection`); NaN if none."""
    return lesion_detection(pred, ref, spacing, min_overlap, min_lesion_size).sensitivity


def segmentation_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], min_overlap: float = 0.0
) -> dict[str, float]:
    """All segmentation metrics of one case as a flat dict.

    Args:
        pred: ``(y, x)`` or ``(z, y, x)`` binary prediction.
        ref: binary reference of the same shape.
        spacing: voxel size in mm in the array's axis order.
        min_overlap: see :func:`lesion_detection`.

    Returns:
        ``dice, iou, hd95`` (mm), ``lesion_sensitivity``, voxel counts ``tp, fp, fn, tn``,
        ``ref_voxels, pred_voxels``, ``ref_size_mm`` (mm^2 or mm^3) and lesion counts
        ``n_ref_lesions, n_detected_lesions, n_pred_lesions, n_fp_lesions``.
    """
    pred, ref = _check_masks(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    tp, fp, fn, tn = segmentation_counts(pred, ref)
    found = lesion_detection(pred, ref, spacing, min_overlap=min_overlap)
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "hd95": hd95(pred, ref, spacing),
        "lesion_sensitivity": found.sensitivity,
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "tn": float(tn),
        "ref_voxels": float(tp + fn),
        "pred_voxels": float(tp + fp),
        "ref_size_mm": float((tp + fn) * np.prod(spacing)),
        "n_ref_lesions": float(found.n_ref),
        "n_detected_lesions": float(found.n_detected),
        "n_pred_lesions": float(found.n_pred),
        "n_fp_lesions": float(found.n_false_positive),
    }
