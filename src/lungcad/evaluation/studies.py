"""Scoring whole studies: per-study decisions, 3D Dice and HD95, lesion counts, with patient CIs.

One row per study (:class:`StudyRow`) from the study's decision and predicted mask against its
reference mask; :func:`study_metrics` summarises them:

* the study decision: sensitivity, specificity, AUC, ... of the study probabilities at the
  threshold the predictor used (:func:`lungcad.metrics.classification.classification_metrics`),
  a study being positive when its reference mask has tumour;
* segmentation (:mod:`lungcad.metrics.volumetric`): mean 3D Dice and HD95 (mm) over the studies
  with tumour, a missed tumour counting as Dice 0 and the worst HD95; lesion sensitivity
  (reference lesions detected / reference lesions, pooled over studies) and false-positive
  lesions per study (mean over all studies).

Every estimate gets a percentile bootstrap CI that resamples studies (each case is one
patient), :func:`lungcad.metrics.bootstrap.bootstrap_ci`. Nothing here runs a network.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lungcad.evaluation.study_data import Study
from lungcad.metrics.bootstrap import bootstrap_ci, classification_metrics_with_ci
from lungcad.metrics.classification import classification_metrics
from lungcad.metrics.volumetric import STUDY_SEGMENTATION_KEYS, study_segmentation

__all__ = ["STUDY_COLUMNS", "StudyRow", "per_study_csv", "score_study", "study_metrics"]

#: Columns of ``per_study.csv``.
STUDY_COLUMNS = (
    "case_id",
    "label",
    "probability",
    "threshold",
    "prediction",
    "k",
    "n_slices",
    "n_slices_evaluated",
    *STUDY_SEGMENTATION_KEYS,
    "image_sha256",
)


@dataclass(frozen=True)
class StudyRow:
    """What one study scored.

    Attributes:
        case_id: the study (also its patient group).
        label: 1 when the reference mask has tumour, else 0.
        probability: the study's cancer probability; NaN when it was not assessed.
        threshold: the decision threshold used; NaN when not assessed.
        prediction: 1 cancer suspected, 0 not, -1 not assessed.
        k: slices in the study probability's top-k mean.
        n_slices: the study's axial slices.
        n_slices_evaluated: slices the predictor ran the model on (those with lung).
        segmentation: :func:`lungcad.metrics.volumetric.study_segmentation`'s values, or
            empty when the masks were not scored.
        image_sha256: the study's identity.
    """

    case_id: str
    label: int
    probability: float
    threshold: float
    prediction: int
    k: int
    n_slices: int
    n_slices_evaluated: int
    segmentation: dict[str, float] = field(default_factory=dict)
    image_sha256: str = ""

    def value(self, column: str) -> Any:
        """The row's value of a :data:`STUDY_COLUMNS` column (NaN for an unscored mask)."""
        if column in STUDY_SEGMENTATION_KEYS:
            return self.segmentation.get(column, math.nan)
        return getattr(self, column)


def score_study(
    study: Study,
    reference: np.ndarray,
    spacing: Sequence[float],
    *,
    probability: float | None,
    threshold: float | None,
    k: int,
    n_evaluated: int,
    mask: np.ndarray | None,
) -> StudyRow:
    """Score one study's prediction against its reference.

    Args:
        study: the study.
        reference: bool ``(z, y, x)`` reference tumour mask.
        spacing: voxel size ``(z, y, x)`` in mm.
        probability: the study probability, or None when the predictor made no decision.
        threshold: the threshold of the decision (None when not assessed).
        k: slices in the top-k mean.
        n_evaluated: slices the model ran on.
        mask: ``(z, y, x)`` predicted tumour mask, or None when masks are not scored (a model
            whose decoder is untrained gives none).
    """
    assessed = probability is not None and threshold is not None
    p = float(probability) if probability is not None else math.nan
    t = float(threshold) if threshold is not None else math.nan
    return StudyRow(
        case_id=study.case_id,
        label=int(bool(np.any(reference))),
        probability=p,
        threshold=t,
        prediction=int(p >= t) if assessed else -1,
        k=int(k),
        n_slices=int(reference.shape[0]),
        n_slices_evaluated=int(n_evaluated),
        segmentation={} if mask is None else study_segmentation(mask, reference, spacing),
        image_sha256=study.image_sha256,
    )


def _segmentation_summary(rows: Sequence[StudyRow]) -> dict[str, float]:
    """Dice, HD95, lesion sensitivity and FP per study of some studies (see the module)."""
    nan = math.nan
    tumour = [r.segmentation for r in rows if r.label == 1]
    detected = sum(r.segmentation["n_detected_lesions"] for r in rows)
    n_ref = sum(r.segmentation["n_ref_lesions"] for r in rows)
    return {
        "dice": float(np.mean([s["dice"] for s in tumour])) if tumour else nan,
        "hd95_mm": float(np.mean([s["hd95_mm"] for s in tumour])) if tumour else nan,
        "lesion_sensitivity": detected / n_ref if n_ref else nan,
        "fp_per_study": float(np.mean([r.segmentation["n_fp_lesions"] for r in rows]))
        if rows
        else nan,
    }


def study_metrics(
    rows: Sequence[StudyRow], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """The study-level metrics of scored studies, as one flat dict with bootstrap CIs.

    Args:
        rows: the scored studies (all decided with one threshold).
        n_boot: bootstrap replicates (0: no CIs).
        seed: seed of the resampling.
        alpha: 1 - confidence level.

    Returns:
        Counts ``n_studies, n_with_tumour, n_assessed``; for the assessed studies the keys of
        :func:`lungcad.metrics.bootstrap.classification_metrics_with_ci` (``sensitivity``,
        ``specificity``, ``auc``, ... with ``_ci_low`` / ``_ci_high``); when masks were scored
        ``dice``, ``hd95_mm``, ``lesion_sensitivity``, ``fp_per_study`` (each with a CI),
        ``n_missed_tumours``, ``n_ref_lesions``, ``n_detected_lesions``, ``n_fp_lesions``.
    """
    out: dict[str, float] = {
        "n_studies": float(len(rows)),
        "n_with_tumour": float(sum(r.label for r in rows)),
    }
    assessed = [r for r in rows if r.prediction != -1]
    out["n_assessed"] = float(len(assessed))
    if assessed:
        y = np.array([r.label for r in assessed])
        p = np.array([r.probability for r in assessed])
        threshold = float(assessed[0].threshold)
        groups = [r.case_id for r in assessed]
        if n_boot > 0:
            out.update(
                classification_metrics_with_ci(
                    y, p, groups, threshold=threshold, n_boot=n_boot, alpha=alpha, seed=seed
                )
            )
        else:
            out.update(classification_metrics(y, p, threshold=threshold))
    scored = [r for r in rows if r.segmentation]
    if scored:
        summary = _segmentation_summary(scored)
        out.update(summary)
        if n_boot > 0:
            # Resample study indices by study: each replicate re-summarises whole studies.
            index = np.arange(len(scored), dtype=np.float64)
            cis = bootstrap_ci(
                index,
                index,
                [r.case_id for r in scored],
                metric_fn=lambda i, _: _segmentation_summary([scored[int(j)] for j in i]),
                n_boot=n_boot,
                alpha=alpha,
                seed=seed,
            )
            for key in summary:
                out[f"{key}_ci_low"], out[f"{key}_ci_high"] = cis[key]
        out["n_missed_tumours"] = float(sum(r.segmentation["tumour_missed"] == 1.0 for r in scored))
        for key in ("n_ref_lesions", "n_detected_lesions", "n_fp_lesions"):
            out[key] = float(sum(r.segmentation[key] for r in scored))
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def per_study_csv(rows: Sequence[StudyRow]) -> str:
    """``per_study.csv`` text: :data:`STUDY_COLUMNS`, one row per study, empty cells for
    undefined values (a study without tumour has no Dice; an unscored mask no segmentation)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(STUDY_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.value(c)) for c in STUDY_COLUMNS])
    return text.getvalue()
