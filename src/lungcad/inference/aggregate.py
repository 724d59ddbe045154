"""The study decision: from per-slice cancer probabilities to one probability per study."""

from __future__ import annotations

import numpy as np

#: The default extent (mm along z) that the top-k slices of a study probability span.
AGGREGATION_EXTENT_MM = 5.0


def aggregate_study(
    slice_probabilities: np.ndarray,
    spacing_z_mm: float,
    extent_mm: float = AGGREGATION_EXTENT_MM,
) -> tuple[float, int]:
    """Study probability: the mean of the top-k slice probabilities, k spanning ``extent_mm``.

    Why not the maximum: over hundreds of slices one noisy slice would decide the study, and
    the false-positive rate grows with the slice count. Why not noisy-OR: neighbouring slices
    see the same anatomy, so treating them as independent evidence inflates the probability
    further. Requiring the evidence to span about ``extent_mm`` along z (k = extent / slice
    spacing, at least 1) matches how a nodule looks (a 5 mm nodule crosses 2 slices at
    2.5 mm, 5 at 1 mm) and keeps the result on the scale of the slice probabilities; with one
    slice (a 2D image) it is that slice's probability. The scale is not the distribution: a
    study's top-k mean runs higher than a typical slice's probability, so a 3D study is
    decided with a threshold chosen on validation studies (``study_threshold.json``,
    :mod:`lungcad.evaluation.study_threshold`) when the run has one.

    Args:
        slice_probabilities: ``(z,)`` probabilities; NaN for slices not evaluated.
        spacing_z_mm: slice spacing in mm.
        extent_mm: extent along z that the evidence should cover.

    Returns:
        ``(probability, k)``; ``(0.0, 0)`` when no slice was evaluated.
    """
    p = np.asarray(slice_probabilities, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return 0.0, 0
    k = max(1, min(p.size, int(round(extent_mm / max(float(spacing_z_mm), 1e-6)))))
    top = np.sort(p)[::-1][:k]
    return float(top.mean()), k
