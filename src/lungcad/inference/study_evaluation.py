"""Whole-study evaluation: the predictor over 3D studies, to score a model or set its threshold.

Both use :class:`lungcad.inference.predictor.Predictor` exactly as ``lungcad predict`` runs
it (lung mask, slice selection, calibration, top-k aggregation, mask threshold), one study at
a time, so what is scored or tuned is what a user gets:

* :func:`evaluate_studies` (``lungcad evaluate --studies DIR``) decides each study with the
  threshold ``predict`` would use (the run's ``study_threshold.json``, else its slice
  threshold) and scores decisions and masks (:mod:`lungcad.evaluation.studies`) into a study
  evaluation folder (:mod:`lungcad.evaluation.study_folder`);
* :func:`choose_run_study_threshold` (``lungcad calibrate --studies VAL``) chooses the study
  threshold on validation studies and writes ``study_threshold.json`` into the model folder
  (:mod:`lungcad.evaluation.study_threshold`), recording the studies it was chosen on, so an
  evaluation on them says that it was tuned on the evaluated data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lungcad import __version__
from lungcad.errors import InputError
from lungcad.evaluation.evaluate import resolve_device
from lungcad.evaluation.studies import StudyRow, score_study, study_metrics
from lungcad.evaluation.study_data import StudySet, open_studies, read_study
from lungcad.evaluation.study_folder import (
    STUDY_EVALUATION_FILE,
    StudyEvaluation,
    study_decision_info,
    study_evaluation_info,
    write_study_evaluation,
)
from lungcad.evaluation.study_splits import StudySplits, select_studies, training_splits
from lungcad.evaluation.study_threshold import (
    StudyThreshold,
    calibration_identity,
    choose_study_threshold,
    model_folder,
    model_identity,
    save_study_threshold,
)
from lungcad.inference.predictor import Predictor
from lungcad.io.atomic import atomic_dir
from lungcad.io.folders import check_output_dir, read_json_or_empty
from lungcad.metrics.classification import classification_metrics
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import RUN_FILE

log = logging.getLogger(__name__)

__all__ = [
    "ChosenStudyThreshold",
    "choose_run_study_threshold",
    "evaluate_studies",
    "predict_studies",
]


def predict_studies(predictor: Predictor, studies: StudySet) -> Iterator[StudyRow]:
    """Predict every study of a set and score it against its reference, one at a time.

    Masks are scored only when the predictor's decoder was trained (an untrained decoder gives
    none, which must not count as missed tumours).

    Yields:
        One :class:`lungcad.evaluation.studies.StudyRow` per study, in the set's order.
    """
    for i, study in enumerate(studies.studies):
        log.info("study %d/%d: %s", i + 1, len(studies.studies), study.case_id)
        volume, reference = read_study(study)
        result = predictor.predict_volume(volume, cam=False)
        finding = result.finding
        yield score_study(
            study,
            reference,
            volume.spacing,
            probability=finding.probability,
            threshold=finding.threshold,
            k=int(result.aggregation.get("k", 0)),
            n_evaluated=len(result.lung_slices),
            mask=np.asarray(result.mask.array) if predictor.decoder_trained else None,
        )


def _load(checkpoint: str | Path, device: str, batch_size: int, **options: Any) -> Predictor:
    return Predictor.from_checkpoint(
        checkpoint, device=str(resolve_device(device)), batch_size=batch_size, **options
    )


def model_training_splits(predictor: Predictor, studies: StudySet) -> StudySplits | None:
    """The splits of ``studies`` in the predictor's training manifests, when it was trained
    on them (a run's ``run.json`` manifests; a fold ensemble's cross-validated manifest)."""
    info = predictor.checkpoint_info
    ensemble = info.get("ensemble")
    if ensemble:
        manifests = (ensemble.get("trained_on") or {}).get("manifests") or []
        return training_splits(studies, manifests, every_split_trained=True)
    run_info = read_json_or_empty(Path(info["run_dir"]) / RUN_FILE)
    return training_splits(studies, run_info.get("manifests") or [])


def evaluate_studies(
    checkpoint: str | Path,
    studies: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 8,
) -> StudyEvaluation:
    """Evaluate a model on 3D studies: decisions, 3D Dice/HD95, lesions; write the folder.

    Args:
        checkpoint: a run folder (or its ``.pt``) or a fold-ensemble folder.
        studies: an MSD-layout study folder (:func:`lungcad.evaluation.study_data.open_studies`).
        out_dir: the folder to write (new, empty, or an earlier study evaluation, replaced
            atomically); None computes without writing.
        split: for the dataset the model was prepared and trained from, the split of its
            cases to score (default "test"); other folders are scored whole
            (:func:`lungcad.evaluation.study_splits.select_studies`).
        n_boot: bootstrap replicates of the CIs (0: none).
        seed: bootstrap seed.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.

    Returns:
        The :class:`lungcad.evaluation.study_folder.StudyEvaluation`.
    """
    if n_boot < 0:
        raise InputError(f"n_boot must be >= 0; got {n_boot}", "--n-boot")
    out = (
        check_output_dir(out_dir, STUDY_EVALUATION_FILE, "an earlier study evaluation")
        if out_dir is not None
        else None
    )
    study_set = open_studies(studies)  # before the (slow) model load
    predictor = _load(checkpoint, device, batch_size)
    study_set, selection = select_studies(
        study_set, model_training_splits(predictor, study_set), split, "evaluate"
    )
    rows = list(predict_studies(predictor, study_set))
    metrics = study_metrics(rows, n_boot=n_boot, seed=seed)
    decision = study_decision_info(
        predictor.study_threshold, predictor.threshold, predictor.threshold_source, study_set
    )
    notes = _notes(predictor, rows, decision, selection)
    info = study_evaluation_info(
        predictor_info=predictor.info,
        checkpoint_info=predictor.checkpoint_info,
        studies=study_set,
        rows=rows,
        decision=decision,
        segmented=predictor.decoder_trained,
        notes=notes,
        selection=selection,
        settings={
            "n_boot": n_boot,
            "seed": seed,
            "device": str(predictor.device),
            "batch_size": batch_size,
            "extent_mm": predictor.aggregation_extent_mm,
        },
    )
    result = StudyEvaluation(metrics=metrics, rows=rows, info=info)
    if out is not None:
        with atomic_dir(out) as tmp:
            write_study_evaluation(result, tmp)
        result.out_dir = out
    return result


def _notes(
    predictor: Predictor,
    rows: list[StudyRow],
    decision: dict[str, Any],
    selection: dict[str, Any],
) -> list[str]:
    notes = []
    if selection["overlaps_training_data"]:
        notes.append(
            f"these studies ({selection['split']!r} split of {selection['training_manifest']}) "
            "trained the model: these are not held-out results"
        )
    elif selection["split"] == "val" and predictor.study_threshold is None:
        notes.append(
            "these are the run's validation studies, whose slices chose the slice threshold "
            "that decided them: the thresholded figures are tuned on the evaluated data"
        )
    if predictor.study_threshold is None:
        notes.append(
            "the run has no study_threshold.json, so the studies were decided with its slice "
            f"threshold ({predictor.threshold_source}), which was chosen for single slices; "
            "choose one on validation studies with `lungcad calibrate --checkpoint RUN "
            "--studies VAL`"
        )
    if decision["tuned_on_evaluated_data"]:
        notes.append(
            f"the study threshold was chosen on {decision['n_evaluated_studies_tuned_on']} of "
            f"these {len(rows)} studies: sensitivity, specificity and every other thresholded "
            "figure are tuned on the evaluated data, not held-out results (AUC does not "
            "depend on the threshold)"
        )
    if not predictor.decoder_trained:
        notes.append(
            "the run's decoder is untrained (a cls run not started from a segmentation run): "
            "no masks, so Dice, HD95 and lesion metrics are omitted"
        )
    if rows and all(r.label == 1 for r in rows):
        notes.append("every study has tumour: specificity and AUC are undefined")
    if rows and all(r.label == 0 for r in rows):
        notes.append("no study has tumour: sensitivity, AUC, Dice and HD95 are undefined")
    not_assessed = sum(r.prediction == -1 for r in rows)
    if predictor.config.train.stage != "cls":
        notes.append(
            "a segmentation-only run has no cancer classifier: no study decisions, so the "
            "decision metrics are omitted"
        )
    elif not_assessed:
        notes.append(
            f"{not_assessed} studies were not assessed (no decision): they are left out of "
            "the decision metrics"
        )
    return notes


class ChosenStudyThreshold(NamedTuple):
    """What :func:`choose_run_study_threshold` chose and wrote.

    Attributes:
        threshold: the stored study threshold.
        path: the ``study_threshold.json`` written.
        rows: the validation studies' scores (at the new threshold: in-sample).
    """

    threshold: StudyThreshold
    path: Path
    rows: list[StudyRow]


def choose_run_study_threshold(
    checkpoint: str | Path,
    studies: str | Path,
    *,
    split: str | None = None,
    method: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
) -> ChosenStudyThreshold:
    """Choose a model's study threshold on validation studies and store it in its folder.

    Args:
        checkpoint: a run folder (or its ``.pt``) or a fold-ensemble folder; the file is
            written into it (an earlier ``study_threshold.json`` is replaced).
        studies: the validation studies (MSD layout). Never the studies you report on: the
            file records their hashes and ``lungcad evaluate --studies`` flags an overlap.
        split: for the dataset the model was prepared and trained from, the split of its
            cases to choose on (default and only sensible choice "val"; "test" is refused);
            other folders are used whole.
        method: ``"mcc"`` or ``"youden"``; None uses the run's ``train.threshold_method``.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.

    Raises:
        InputError: the studies lack either class (with and without tumour), or the model
            folder's other files are invalid.
    """
    study_set = open_studies(studies)
    # The old study threshold plays no part in study probabilities; it is being replaced.
    predictor = _load(checkpoint, device, batch_size, study_threshold=None)
    if predictor.config.train.stage != "cls":
        raise InputError(
            "this is a segmentation-only run: it has no cancer classifier, so there is no "
            "study threshold to choose; use the cls run trained from it",
            checkpoint,
        )
    study_set, selection = select_studies(
        study_set, model_training_splits(predictor, study_set), split, "threshold"
    )
    rows = [r for r in predict_studies(predictor, study_set) if r.prediction != -1]
    rule = method or predictor.config.train.threshold_method
    y = np.array([r.label for r in rows], dtype=np.int64)
    p = np.array([r.probability for r in rows])
    value = choose_study_threshold(y, p, rule)
    in_sample = classification_metrics(y, p, threshold=value)
    chosen = StudyThreshold(
        threshold=value,
        method=rule,
        model_sha256=model_identity(predictor.checkpoint_info),
        calibration_sha256=calibration_identity(predictor.calibration),
        extent_mm=predictor.aggregation_extent_mm,
        chosen_on={
            "input": str(study_set.input),
            "folder": str(study_set.folder),
            "layout": study_set.layout,
            **selection,
            "n_studies": len(rows),
            "n_positive": int(y.sum()),
            "n_not_assessed": len(study_set.studies) - len(rows),
            "case_ids": [r.case_id for r in rows],
            "study_sha256": study_set.hashes,
            "study_probabilities": [float(v) for v in p],
        },
        info={
            "created_at": utc_timestamp(),
            "lungcad_version": __version__,
            "checkpoint_path": predictor.checkpoint_info.get("path"),
            "slice_threshold": predictor.threshold,
            "slice_threshold_source": predictor.threshold_source,
            "in_sample": {
                key: in_sample[key]
                for key in ("sensitivity", "specificity", "mcc", "auc", "accuracy")
            },
            "evaluated_on": "the studies it was chosen on (in-sample figures)",
        },
    )
    path = save_study_threshold(model_folder(checkpoint), chosen)
    log.info("study threshold %.4f (%s) on %d studies -> %s", value, rule, len(rows), path)
    return ChosenStudyThreshold(chosen, path, rows)
