"""Percentile bootstrap confidence intervals that resample patients (groups), not images.

Slices of one patient are correlated; resampling them independently gives intervals that are
too narrow. Each replicate therefore draws whole patients with replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lungcad.errors import InputError
from lungcad.metrics.classification import classification_metrics

#: Keys of :func:`lungcad.metrics.classification.classification_metrics` that get a bootstrap CI
#: in :func:`classification_metrics_with_ci` (counts and prevalence are descriptive, not
#: estimates).
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
    """Classification metrics plus patient-level bootstrap CIs, as one flat dict.

    Args:
        y_true: ``(N,)`` labels 0/1.
        y_prob: ``(N,)`` probabilities of class 1.
        groups: ``(N,)`` patient (group) id of each sample.
        threshold: decision threshold of the point estimates and of every replicate.
        n_boot: bootstrap replicates.
        alpha: 1 - confidence level.
        seed: seed of the resampling.

    Returns:
        All keys of :func:`lungcad.metrics.classification.classification_metrics`, plus
        ``<key>_ci_low`` and ``<key>_ci_high`` for each key in :data:`CI_KEYS`, plus
        ``n_groups`` and ``ci_level`` (e.g. 0.95).
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
