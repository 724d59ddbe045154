"""Binary classification metrics (scikit-learn based), ECE and the decision threshold.

Classification metrics are scikit-learn's, never rewritten; this module only chooses the
conventions for the undefined cases (NaN, explicitly) and returns them as one flat dict.
Segmentation metrics are in :mod:`lungcad.metrics.segmentation`, patient-level confidence
intervals in :mod:`lungcad.metrics.bootstrap`.
"""

from __future__ import annotations

import numpy as np
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

#: Rules :func:`choose_threshold` knows (maximise MCC, or Youden's J).
THRESHOLD_METHODS = ("mcc", "youden")
#: Equal-width probability bins of :func:`expected_calibration_error`.
ECE_BINS = 10


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
    if method not in THRESHOLD_METHODS:
        raise InputError(f"threshold method must be one of {THRESHOLD_METHODS}; got {method!r}")
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
