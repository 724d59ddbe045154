"""The study evaluation folder: its files, their provenance and the writer.

::

    OUT/study_metrics.json     flat study-level metrics (NaN as null), *_ci_low / *_ci_high
    OUT/per_study.csv          one row per study (lungcad.evaluation.studies.STUDY_COLUMNS)
    OUT/study_evaluation.json  provenance: model, decision threshold and where it was chosen,
                               the studies, the metric conventions, notes
    OUT/roc.png                study-level ROC with the operating point (both classes present)

``study_evaluation.json`` is written last and marks the folder as a study evaluation, which a
later ``lungcad evaluate --studies`` may replace. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcad import __version__
from lungcad.evaluation.info import CI_LEVEL, evaluation_versions
from lungcad.evaluation.plots import plot_roc
from lungcad.evaluation.studies import StudyRow, per_study_csv
from lungcad.evaluation.study_data import StudySet
from lungcad.evaluation.study_threshold import STUDY_RULE, STUDY_THRESHOLD_FILE, StudyThreshold
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.provenance import utc_timestamp

__all__ = [
    "CONVENTIONS",
    "PER_STUDY_FILE",
    "STUDY_EVALUATION_FILE",
    "STUDY_METRICS_FILE",
    "StudyEvaluation",
    "study_decision_info",
    "write_study_evaluation",
]

STUDY_METRICS_FILE = "study_metrics.json"
PER_STUDY_FILE = "per_study.csv"
STUDY_EVALUATION_FILE = "study_evaluation.json"

#: How the study metrics are defined (recorded in ``study_evaluation.json``).
CONVENTIONS = {
    "study_label": "1 when the reference mask has any tumour voxel, else 0",
    "study_probability": "mean of the top-k slice cancer probabilities, k spanning extent_mm",
    "dice": "3D Dice per study with tumour, averaged over those studies; a missed tumour "
    "(empty prediction) counts as 0; studies without tumour have none",
    "hd95_mm": "symmetric 95th-percentile Hausdorff distance in mm (MONAI) per study with "
    "tumour, averaged over those studies; a missed tumour counts as the diagonal of the "
    "volume's physical extent, the largest value any prediction could score",
    "lesion": "a connected component (26-connected) of the reference mask; detected when a "
    "predicted component overlaps it by at least one voxel",
    "lesion_sensitivity": "detected reference lesions / reference lesions, pooled over studies",
    "fp_per_study": "predicted components touching no reference lesion, mean over all studies",
    "ci": f"{CI_LEVEL:.0%} percentile bootstrap resampling studies (one per patient)",
}


@dataclass
class StudyEvaluation:
    """What a study evaluation computed (and wrote).

    Attributes:
        metrics: flat metrics (``study_metrics.json``).
        rows: one per study (``per_study.csv``).
        info: provenance (``study_evaluation.json``).
        out_dir: the folder written, or None.
    """

    metrics: dict[str, float]
    rows: list[StudyRow]
    info: dict[str, Any]
    out_dir: Path | None = None


def study_decision_info(
    study_threshold: StudyThreshold | None,
    slice_threshold: float,
    slice_source: str,
    studies: StudySet,
) -> dict[str, Any]:
    """Which threshold decided the studies, where it was chosen, and whether on these studies.

    Args:
        study_threshold: the run's study threshold, or None (the slice threshold decides).
        slice_threshold: the run's slice threshold (``threshold.json`` / calibration).
        slice_source: where the slice threshold comes from.
        studies: the evaluated studies.
    """
    if study_threshold is None:
        return {
            "value": slice_threshold,
            "source": slice_source,
            "level": "slice",
            "chosen_on": "the run's validation slices (a slice threshold, not chosen for studies)",
            "rule": "cancer suspected if study probability >= threshold",
            "tuned_on_evaluated_data": False,
            "n_evaluated_studies_tuned_on": 0,
        }
    overlap = study_threshold.study_hashes & set(studies.hashes)
    return {
        "value": study_threshold.threshold,
        "source": STUDY_THRESHOLD_FILE,
        "level": "study",
        "method": study_threshold.method,
        "chosen_on": study_threshold.chosen_on.get("input"),
        "chosen_on_n_studies": study_threshold.chosen_on.get("n_studies"),
        "rule": STUDY_RULE,
        "tuned_on_evaluated_data": bool(overlap),
        "n_evaluated_studies_tuned_on": len(overlap),
        "slice_threshold": slice_threshold,
    }


def study_evaluation_info(
    *,
    predictor_info: Mapping[str, Any],
    checkpoint_info: Mapping[str, Any],
    studies: StudySet,
    rows: Sequence[StudyRow],
    decision: Mapping[str, Any],
    segmented: bool,
    notes: Sequence[str],
    settings: Mapping[str, Any],
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``study_evaluation.json`` document.

    Args:
        predictor_info: :attr:`lungcad.inference.predictor.Predictor.info`.
        checkpoint_info: the loaded model's info (``path``, ``sha256``, ``ensemble``).
        studies: the evaluated studies.
        rows: their scores.
        decision: :func:`study_decision_info`.
        segmented: whether masks were scored.
        notes: sentences for the reader (omissions, caveats).
        settings: ``n_boot``, ``seed``, ``device``, ``batch_size``, ``extent_mm``.
        selection: which studies of the folder were scored (``split``, ``training_manifest``,
            ``overlaps_training_data``; :func:`lungcad.evaluation.study_splits.select_studies`).
    """
    return {
        "kind": "lungcad-study-evaluation",
        "lungcad_version": __version__,
        "created_at": utc_timestamp(),
        "versions": evaluation_versions(),
        "checkpoint": {
            "path": checkpoint_info.get("path"),
            "run_dir": checkpoint_info.get("run_dir"),
            "sha256": checkpoint_info.get("sha256"),
            "ensemble": checkpoint_info.get("ensemble"),
            "model": predictor_info.get("model_name"),
            "stage": predictor_info.get("stage"),
            "image_size": predictor_info.get("image_size"),
        },
        "threshold": dict(decision),
        "predictor": dict(predictor_info),
        "data": {
            "input": str(studies.input),
            "folder": str(studies.folder),
            "layout": studies.layout,
            **(selection or {}),
            "n_studies": len(rows),
            "n_with_tumour": sum(r.label for r in rows),
            "cases": [r.case_id for r in rows],
            "study_sha256": [r.image_sha256 for r in rows],
        },
        "tasks": {
            "classification": any(r.prediction != -1 for r in rows),
            "segmentation": segmented,
        },
        "conventions": CONVENTIONS,
        "notes": list(notes),
        "settings": {**settings, "ci_level": CI_LEVEL, "ci_unit": "study (patient)"},
    }


def write_study_evaluation(result: StudyEvaluation, out: Path) -> None:
    """Write the folder's files into ``out`` (an existing, empty folder; see the module)."""
    write_json_atomic(out / STUDY_METRICS_FILE, result.metrics)
    write_text_atomic(out / PER_STUDY_FILE, per_study_csv(result.rows))
    plots: dict[str, str] = {}
    assessed = [r for r in result.rows if r.prediction != -1]
    if len({r.label for r in assessed}) == 2:
        plot_roc(
            np.array([r.label for r in assessed]),
            np.array([r.probability for r in assessed]),
            out / "roc.png",
            threshold=float(result.info["threshold"]["value"]),
            metrics=result.metrics,
        )
        plots["roc"] = "roc.png"
    result.info["plots"] = plots
    write_json_atomic(out / STUDY_EVALUATION_FILE, result.info)
