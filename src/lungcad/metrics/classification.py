"""Evaluation metrics: classification (scikit-learn), segmentation (counts), bootstrap CIs.

Classification metrics are scikit-learn's, never rewritten; this module only chooses the
conventions for the undefined cases and returns them as one flat dict. Segmentation metrics
come from tp/fp/fn counts as in nnU-Net's ``evaluate_predictions``; an empty reference gives
NaN (not 0 or 1) whatever the prediction (nnU-Net says 0 when only the prediction has
voxels), so averages over cases are taken with ``np.nanmean``, images without tumour do not
inflate or deflate Dice, and their false positives show in ``fp`` and the lesion counts
instead. Confidence intervals resample
**patients** (groups), not images: slices of one patient are correlated, and resampling them
independently gives intervals that are too narrow.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from lungcad.errors import InputError

#: Keys of :func:`classification_metrics` that get a bootstrap CI in
#: :func:`classification_metrics_with_ci` (counts and prevalence are descriptive, not estimates).
CI_KEYS = (
    "accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "f1",
    "mcc",
    "kappa",
    "auc",
    "pr_auc",
    "brier",
    "ece",
)
ECE_BINS = 10


# --------------------------------------------------------------------------- classification


def _check_binary_inputs(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 1 or y_prob.ndim != 1 or y_true.shape != y_prob.shape:
        raise InputError(
            f"y_true and y_prob must be 1D arrays of the same length; got shapes "
            f"{y_true.shape} and {y_prob.shape}"
        )
    if y_true.size == 0:
        raise InputError("no samples to score (y_true is empty); check the labels and split")
    labels = set(np.unique(y_true).tolist())
    if not labels <= {0, 1}:
        raise InputError(
            f"y_true must hold binary labels 0/1; got values {sorted(labels)}. Drop unknown "
            "labels (-1) before scoring."
        )
    if not np.all(np.isfinite(y_prob)) or y_prob.min() < 0 or y_prob.max() > 1:
        raise InputError(
            "y_prob must be finite probabilities in [0, 1]; got values in "
            f"[{np.nanmin(y_prob):.4g}, {np.nanmax(y_prob):.4g}]"
            + (" with NaN/inf" if not np.all(np.isfinite(y_prob)) else "")
            + ". Apply a sigmoid to logits first."
        )
    return y_true.astype(np.int64), y_prob


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error with equal-width probability bins.

    ``ECE = sum_b (n_b / N) * |mean(y_true in b) - mean(y_prob in b)|`` over ``n_bins`` bins
    ``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]`` (the last bin is closed, so 1.0 falls in it);
    empty bins contribute nothing. Written here because scikit-learn has no ECE; the binning is
    the same as ``sklearn.calibration.calibration_curve(strategy="uniform")``.

    Args:
        y_true: ``(N,)`` labels 0/1.
        y_prob: ``(N,)`` predicted probabilities of class 1.
        n_bins: number of equal-width bins.

    Returns:
        ECE in [0, 1].
    """
    y_true, y_prob = _check_binary_inputs(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], y_prob, side="right")
    counts = np.bincount(bin_ids, minlength=n_bins)
    sum_true = np.bincount(bin_ids, weights=y_true, minlength=n_bins)
    sum_prob = np.bincount(bin_ids, weights=y_prob, minlength=n_bins)
    filled = counts > 0
    gaps = np.abs(sum_true[filled] - sum_prob[filled]) / counts[filled]
    return float(np.sum(counts[filled] / y_true.size * gaps))


def classification_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Binary classification metrics at one decision threshold, as a flat dict.

    Predictions are ``y_prob >= threshold``. Undefined values are NaN, explicitly:

    * ``precision`` when nothing is predicted positive; ``sensitivity`` when there are no
      positives; ``specificity`` when there are no negatives; ``f1`` when there are neither
      positives nor positive predictions;
    * ``auc`` and ``pr_auc`` when ``y_true`` has a single class (no ranking to score);
    * ``mcc`` and ``kappa`` when ``y_true`` has a single class. When both classes are present
      but every prediction is the same class, ``mcc`` is 0 (scikit-learn's convention: an
      uninformative classifier) and ``kappa`` is 0 from its formula.

    Args:
        y_true: ``(N,)`` labels, 1 = cancerous, 0 = not.
        y_prob: ``(N,)`` predicted probability of class 1, in [0, 1].
        threshold: decision threshold; choose it on validation data (:func:`choose_threshold`).

    Returns:
        ``accuracy, precision, sensitivity, specificity, f1, mcc, kappa, auc, pr_auc, brier,
        ece, tp, fp, tn, fn, n, prevalence, threshold`` (all floats).

    Raises:
        InputError: shapes differ, labels are not 0/1, probabilities are outside [0, 1].
    """
    y_true, y_prob = _check_binary_inputs(y_true, y_prob)
    y_pred = (y_prob >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = 0 < int(y_true.sum()) < y_true.size
    nan = float("nan")
    out = {
        "accuracy": accuracy_score(y_true, y_pred),
        "precision": precision_score(y_true, y_pred, labels=[0, 1], zero_division=np.nan),
        "sensitivity": recall_score(y_true, y_pred, labels=[0, 1], zero_division=np.nan),
        "specificity": recall_score(
            y_true, y_pred, labels=[0, 1], pos_label=0, zero_division=np.nan
        ),
        "f1": f1_score(y_true, y_pred, labels=[0, 1], zero_division=np.nan),
        "mcc": matthews_corrcoef(y_true, y_pred) if both_classes else nan,
        "kappa": (
            cohen_kappa_score(y_true, y_pred, labels=[0, 1], replace_undefined_by=np.nan)
            if both_classes
            else nan
        ),
        "auc": roc_auc_score(y_true, y_prob) if both_classes else nan,
        "pr_auc": average_precision_score(y_true, y_prob) if both_classes else nan,
        "brier": brier_score_loss(y_true, y_prob, pos_label=1),
        "ece": expected_calibration_error(y_true, y_prob),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": y_true.size,
        "prevalence": y_true.mean(),
        "threshold": threshold,
    }
    return {key: float(value) for key, value in out.items()}


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, method: str = "mcc") -> float:
    """The decision threshold that maximises MCC or Youden's J on (validation) data.

    Use it on validation or cross-validated training predictions only, never on the data the
    threshold will be reported on. Candidates are the midpoints between consecutive distinct
    probabilities (so the rule ``y_prob >= t`` gives exactly the predictions that scored best,
    with a margin on both sides); ties go to the candidate closest to 0.5.

    Args:
        y_true: ``(N,)`` labels 0/1 with both classes present.
        y_prob: ``(N,)`` probabilities of class 1.
        method: ``"mcc"`` (scikit-learn's ``matthews_corrcoef`` at each candidate) or
            ``"youden"`` (``sensitivity + specificity - 1`` from ``roc_curve``).

    Returns:
        The threshold in [0, 1].

    Raises:
        InputError: unknown method, or a single class in ``y_true``.
    """
    y_true, y_prob = _check_binary_inputs(y_true, y_prob)
    if method not in ("mcc", "youden"):
        raise InputError(f"threshold method must be 'mcc' or 'youden'; got {method!r}")
    if not 0 < int(y_true.sum()) < y_true.size:
        raise InputError(
            "cannot choose a threshold: the labels hold a single class; the validation data "
            "needs both cancerous and non-cancerous samples"
        )
    values = np.unique(y_prob)  # ascending
    # Midpoints between neighbours, plus one candidate below the lowest value (all positive)
    # and one above the highest (all negative).
    candidates = np.concatenate(
        [[values[0] / 2.0], (values[:-1] + values[1:]) / 2.0, [(values[-1] + 1.0) / 2.0]]
    )
    if method == "mcc":
        scores = np.array(
            [matthews_corrcoef(y_true, (y_prob >= t).astype(np.int64)) for t in candidates]
        )
    else:
        fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
        # roc_curve's thresholds are the distinct scores (descending, first = +inf): the point
        # at score v predicts positive for y_prob >= v, i.e. the candidate just below v.
        j_at_value = dict(zip(thresholds[1:].tolist(), (tpr - fpr)[1:].tolist(), strict=True))
        scores = np.array([j_at_value.get(v, np.nan) for v in values] + [0.0])
    best = np.flatnonzero(scores >= np.nanmax(scores) - 1e-12)
    chosen = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return float(np.clip(candidates[chosen], 0.0, 1.0))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Sequence | np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = classification_metrics,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals that resample groups (patients).

    Each replicate draws ``G`` group ids with replacement from the ``G`` unique ids and takes
    **all** samples of every drawn group (a group drawn twice appears twice). Slices of one
    patient are correlated, so resampling slices independently would understate the variance.
    Replicates where a metric is undefined (NaN, e.g. AUC on a single-class resample) are left
    out of that metric's interval.

    Args:
        y_true: ``(N,)`` labels 0/1.
        y_prob: ``(N,)`` probabilities of class 1.
        groups: ``(N,)`` patient (group) id of each sample.
        metric_fn: ``metric_fn(y_true, y_prob) -> dict[str, float]``; use
            ``functools.partial(classification_metrics, threshold=t)`` for another threshold.
        n_boot: number of bootstrap replicates.
        alpha: 1 - confidence level (0.05 gives 95% intervals).
        seed: seed of the resampling, for reproducible intervals.

    Returns:
        ``{key: (low, high)}`` for every key ``metric_fn`` returns; ``(nan, nan)`` when the
        metric was undefined in every replicate.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    groups = np.asarray(groups)
    if groups.shape != y_true.shape or y_prob.shape != y_true.shape:
        raise InputError(
            f"y_true, y_prob and groups must have the same length; got {y_true.shape}, "
            f"{y_prob.shape} and {groups.shape}"
        )
    if n_boot < 1 or not 0 < alpha < 1:
        raise InputError(f"need n_boot >= 1 and 0 < alpha < 1; got {n_boot} and {alpha}")
    _, inverse = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    replicates: dict[str, list[float]] = {}
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[g] for g in drawn])
        for key, value in metric_fn(y_true[idx], y_prob[idx]).items():
            replicates.setdefault(key, []).append(float(value))
    out = {}
    for key, values in replicates.items():
        arr = np.asarray(values)
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            out[key] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(arr, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[key] = (float(low), float(high))
    return out


def classification_metrics_with_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Sequence | np.ndarray,
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`classification_metrics` plus patient-level bootstrap CIs, as one flat dict.

    Returns:
        All keys of :func:`classification_metrics`, plus ``<key>_ci_low`` and ``<key>_ci_high``
        for each key in :data:`CI_KEYS`, plus ``n_groups`` and ``ci_level`` (e.g. 0.95).
    """
    out = classification_metrics(y_true, y_prob, threshold=threshold)
    cis = bootstrap_ci(
        y_true,
        y_prob,
        groups,
        metric_fn=lambda t, p: classification_metrics(t, p, threshold=threshold),
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
    )
    for key in CI_KEYS:
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = cis[key]
    out["n_groups"] = float(len(np.unique(np.asarray(groups))))
    out["ci_level"] = 1.0 - alpha
    return out


# --------------------------------------------------------------------------- segmentation


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
    found = lesion_detection(pred, ref, spacing, min_overlap, min_lesion_size)
    return float("nan") if found.n_ref == 0 else found.n_detected / found.n_ref


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
        "lesion_sensitivity": (
            float("nan") if found.n_ref == 0 else found.n_detected / found.n_ref
        ),
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
