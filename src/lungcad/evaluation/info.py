"""What ``evaluation.json`` records: tasks scored, decision threshold, calibration, data, versions.

Provenance only: nothing here runs the network or scores anything. :func:`scored_tasks`
decides which metrics a run can honestly report; :func:`evaluation_info` assembles the
document :func:`lungcad.evaluation.evaluate.evaluate_loaded` returns and
:func:`lungcad.evaluation.folder.write_evaluation` stores.

The honesty flags are computed, never written as constants: the rows a threshold was chosen
on (``threshold.json``, a calibration's threshold, a fold ensemble's out-of-fold threshold)
and the rows a calibration was fitted on are each a manifest's SHA-256 plus a split
(:func:`data_source`); :func:`rows_overlap` compares them with the evaluated manifest and
split, giving ``tuned_on_evaluated_data`` and ``fitted_on_evaluated_data`` (None when a file
of an older lungcad does not say).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lungcad import __version__
from lungcad.data.layouts.prepare import count_table
from lungcad.data.manifest import SliceRecord
from lungcad.evaluation.calibration import CALIBRATION_FILE, Calibration, RunDecision
from lungcad.evaluation.data import EvaluationData
from lungcad.evaluation.scoring import PIXEL_THRESHOLD
from lungcad.io.folders import read_json_or_empty
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import THRESHOLD_FILE, file_sha256, software_versions
from lungcad.training.config import Config, config_hash
from lungcad.training.ensemble import ENSEMBLE_FILE

log = logging.getLogger(__name__)

#: Confidence level of the bootstrap intervals (``classification_metrics_with_ci``'s default).
CI_LEVEL = 0.95


class ScoredTasks(NamedTuple):
    """Which metric families an evaluation reports, and why others are left out.

    Attributes:
        classification: score the cancer classifier (a trained head and labelled slices).
        segmentation: score the tumour masks (a trained decoder and slices with masks).
        notes: one sentence per omission, for ``evaluation.json`` and the report.
    """

    classification: bool
    segmentation: bool
    notes: list[str]


def scored_tasks(stage: str, run_info: Mapping[str, Any], data: EvaluationData) -> ScoredTasks:
    """The tasks a run of ``stage`` can be scored on with ``data``.

    Only a "cls" run has a trained classifier head; only a "seg" run, or a "cls" run started
    from one (``init_from`` in ``run.json``), has a trained decoder.
    """
    notes = []
    has_labels = any(r.label in (0, 1) for r in data.records)
    has_masks = any(r.has_mask for r in data.records)
    classify = stage == "cls" and has_labels
    if stage != "cls" and has_labels:
        notes.append(
            "segmentation-stage run: its classifier head is untrained, so no "
            "classification metrics are reported (evaluate the 'cls' run instead)"
        )
    if stage == "cls" and not has_labels:
        notes.append("no slice has a label (0/1): classification metrics omitted")
    seg_trained = stage == "seg" or bool(run_info.get("init_from"))
    segment = seg_trained and has_masks
    if has_masks and not seg_trained:
        notes.append(
            "this classification run was not started from a segmentation run "
            "(no init_from), so its decoder is untrained: segmentation metrics omitted"
        )
    if seg_trained and not has_masks:
        notes.append("no slice has a tumour mask: segmentation metrics omitted")
    return ScoredTasks(classify, segment, notes)


def data_source(manifests: Sequence[Any] | None, split: str | None) -> dict[str, Any] | None:
    """Which rows something was fitted or chosen on: manifests (path + SHA-256) and a split.

    Args:
        manifests: ``{"path", "sha256"}`` dicts (as ``run.json`` records them); a bare path
            (a ``calibration.json`` of an older lungcad) keeps its path but no hash.
        split: "train", "val", "test" or "all" (every row of the manifests).

    Returns:
        ``{"manifests": [{"path", "sha256"}], "split"}``, or None when nothing is known.
    """
    entries = [
        {"path": m.get("path"), "sha256": m.get("sha256")}
        if isinstance(m, Mapping)
        else {"path": str(m), "sha256": None}
        for m in manifests or []
    ]
    if not entries:
        return None
    return {"manifests": entries, "split": split}


def rows_overlap(
    source: Mapping[str, Any] | None, evaluated: Mapping[str, Any] | None
) -> bool | None:
    """Whether the rows of ``source`` include evaluated rows (both as :func:`data_source`).

    Two sources share rows when they name a manifest with the same content (SHA-256) and
    their splits meet: the same split, or "all" (or an unrecorded split) on either side.

    Returns:
        True or False; None when either side records no manifest hash (unknown).
    """
    if not source or not evaluated:
        return None
    hashes = {m.get("sha256") for m in source.get("manifests", [])} - {None}
    evaluated_hashes = {m.get("sha256") for m in evaluated.get("manifests", [])} - {None}
    if not hashes or not evaluated_hashes:
        return None
    if not hashes & evaluated_hashes:
        return False
    splits = {source.get("split"), evaluated.get("split")}
    return len(splits) == 1 or bool(splits & {"all", None})


def threshold_source(
    stored: Mapping[str, Any], run_info: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The rows a run's own threshold was chosen on.

    ``threshold.json`` records them (``manifests``, ``split``); one written before it did was
    still chosen by training on the validation split of the run's manifests (``run.json``).
    """
    if stored.get("manifests"):
        return data_source(stored["manifests"], stored.get("split", "val"))
    return data_source(run_info.get("manifests"), "val")


def calibration_source(calibration: Calibration) -> dict[str, Any] | None:
    """The rows a calibration was fitted on (``calibration.json``'s manifests and split)."""
    return data_source(calibration.info.get("manifests"), calibration.info.get("split"))


def threshold_info(
    run_dir: Path,
    value: float,
    classify: bool,
    decision: RunDecision | None,
    *,
    evaluated: Mapping[str, Any] | None = None,
    run_info: Mapping[str, Any] | None = None,
    ensemble: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where the decision threshold came from, and whether that was the evaluated data.

    Args:
        run_dir: the run folder (its ``threshold.json`` says how the threshold was chosen).
        value: the checkpoint's (uncalibrated) threshold.
        classify: whether classification is scored (else the value is None).
        decision: the run's calibrated decision, or None.
        evaluated: the evaluated rows (:func:`data_source`); None: unknown.
        run_info: the run's ``run.json`` (its manifests, for a ``threshold.json`` that does
            not record its own).
        ensemble: a fold ensemble's ``info["ensemble"]``: its threshold is the ensemble's own,
            chosen on the pooled out-of-fold predictions.

    Returns:
        The ``threshold`` entry of ``evaluation.json``: ``chosen_on_data`` holds the rows it
        was chosen on and ``tuned_on_evaluated_data`` whether they include evaluated rows
        (None when unknown).
    """
    stored = read_json_or_empty(run_dir / THRESHOLD_FILE)
    info = {
        "value": value if classify else None,
        "source": THRESHOLD_FILE if stored else "checkpoint",
        "method": stored.get("method"),
        "chosen_on": stored.get("chosen_on", "validation split"),
        "epoch": stored.get("epoch"),
        "rule": stored.get("rule", "cancer if probability >= threshold"),
    }
    chosen = threshold_source(stored, run_info or {})
    if ensemble is not None:
        info.update(
            source=ENSEMBLE_FILE,
            method=ensemble.get("threshold_method"),
            chosen_on="pooled out-of-fold predictions of the cross-validated patients",
            epoch=None,
        )
        chosen = ensemble.get("threshold_chosen_on")
    cal = None if decision is None else decision.calibration
    if classify and decision is not None and cal is not None:
        split = cal.info.get("split", "validation")
        info.update(
            {
                "value": decision.threshold,
                "source": decision.source,
                "uncalibrated_value": value,
                "rule": cal.info.get("rule", "cancer if calibrated probability >= threshold"),
            }
        )
        if decision.source == CALIBRATION_FILE:  # re-chosen on calibrated probabilities
            info.update(
                method=cal.info.get("threshold_method"),
                epoch=None,
                chosen_on=f"{split} split (calibrated probabilities)",
            )
            chosen = calibration_source(cal)
    info["chosen_on_data"] = chosen
    info["tuned_on_evaluated_data"] = rows_overlap(chosen, evaluated) if classify else None
    return info


def calibration_info(
    decision: RunDecision | None, *, evaluated: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Whether (and which) calibration was applied, and whether it was fitted on the
    evaluated rows (``evaluated`` as :func:`data_source`; None: unknown)."""
    if decision is None:
        return {"applied": False, "reason": "no classification scored"}
    cal = decision.calibration
    if cal is None:
        return {"applied": False, "reason": f"the run has no {CALIBRATION_FILE}"}
    source = calibration_source(cal)
    return {
        "applied": True,
        "file": CALIBRATION_FILE,
        "method": cal.method,
        "temperature": cal.temperature,
        "fitted_on": cal.info.get("split"),
        "fitted_on_data": source,
        "fitted_on_evaluated_data": rows_overlap(source, evaluated),
        "checkpoint_sha256": cal.info.get("checkpoint_sha256"),
        "threshold_source": decision.source,
    }


def evaluated_source(data: EvaluationData) -> dict[str, Any]:
    """The evaluated rows as :func:`data_source` describes them (manifest hash and split)."""
    source = data_source(
        [{"path": str(data.manifest), "sha256": file_sha256(data.manifest)}], data.split
    )
    assert source is not None  # one manifest given
    return source


def data_info(
    data: EvaluationData,
    run_info: Mapping[str, Any],
    ensemble: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluated data: manifest hash, split, counts, and its overlap with training.

    A run trained on a manifest's train split (and stopped early on its val split) has seen
    every split of it but the test split; a fold ensemble (``ensemble``: its
    ``info["ensemble"]``) was trained on every labelled row of its cross-validated manifest.
    Logs a warning when the evaluated rows overlap training.
    """
    sha = file_sha256(data.manifest)
    trained_on = {m.get("sha256") for m in run_info.get("manifests", [])}
    overlaps = sha in trained_on and data.split != "test"
    cross_validated = (ensemble or {}).get("trained_on")
    if rows_overlap(cross_validated, evaluated_source(data)):
        trained_on.add(sha)
        overlaps = True
    if overlaps:
        log.warning(
            "the evaluated %r rows come from a manifest this run was trained on; "
            "these are not held-out results",
            data.split,
        )
    records = data.records
    return {
        "input": str(data.input),
        # A manifest prepared for this evaluation lived in a temporary folder; its hash and
        # the input file-list hash identify the data.
        "manifest": None if data.prepared else str(data.manifest),
        "manifest_sha256": sha,
        "prepared_for_evaluation": data.prepared,
        "layout": data.prepare_summary.get("layout"),
        "input_files_sha256": data.prepare_summary.get("input_files_sha256"),
        "split": data.split,
        "same_manifest_as_training": sha in trained_on,
        "overlaps_training_data": overlaps,
        "n_slices": len(records),
        "n_groups": len({r.group_id for r in records}),
        "n_labelled": sum(r.label in (0, 1) for r in records),
        "n_positive": sum(r.label == 1 for r in records),
        "n_with_mask": sum(r.has_mask for r in records),
        "sources": sorted({r.source for r in records}),
        "split_summary": count_table(data.all_records),
    }


def hd95_unit(records: Sequence[SliceRecord]) -> str:
    """ "mm" when every slice with a mask has a pixel spacing, "pixels" when none has."""
    spacings = {
        math.isfinite(r.spacing_y) and math.isfinite(r.spacing_x) for r in records if r.has_mask
    }
    if spacings == {True}:
        return "mm"
    if spacings == {False}:
        return "pixels"
    return "mixed (mm where the spacing is known)"


def evaluation_versions() -> dict[str, str]:
    """Library versions of the evaluation: training's set plus scikit-learn and matplotlib."""
    import matplotlib
    import sklearn

    return {
        **software_versions(),
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
    }


def evaluation_info(
    config: Config,
    checkpoint_info: Mapping[str, Any],
    run_info: Mapping[str, Any],
    data: EvaluationData,
    tasks: ScoredTasks,
    decision: RunDecision | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``evaluation.json`` document (before the plots and examples are added).

    Args:
        config: the run's configuration.
        checkpoint_info: the checkpoint's ``info`` (``run_dir``, ``path``, ``sha256``, ...).
        run_info: the run's ``run.json`` (empty if absent).
        data: the evaluated slices.
        tasks: what was scored (:func:`scored_tasks`).
        decision: the calibration and threshold applied, or None without classification.
        settings: ``n_boot``, ``seed``, ``batch_size``, ``device`` of the evaluation.
    """
    run_dir = Path(checkpoint_info["run_dir"])
    ensemble = checkpoint_info.get("ensemble")
    evaluated = evaluated_source(data)
    threshold = threshold_info(
        run_dir,
        float(checkpoint_info["threshold"]),
        tasks.classification,
        decision,
        evaluated=evaluated,
        run_info=run_info,
        ensemble=ensemble,
    )
    calibration = calibration_info(decision, evaluated=evaluated)
    if threshold["tuned_on_evaluated_data"]:
        log.warning(
            "the decision threshold was chosen on the evaluated %r rows (%s): "
            "these results are not held-out",
            data.split,
            threshold["chosen_on"],
        )
    if calibration.get("fitted_on_evaluated_data"):
        log.warning(
            "the calibration was fitted on the evaluated %r rows: these results are not held-out",
            data.split,
        )
    return {
        "kind": "lungcad-evaluation",
        "lungcad_version": __version__,
        "created_at": utc_timestamp(),
        "versions": evaluation_versions(),
        "checkpoint": {
            "run_dir": str(run_dir),
            "path": checkpoint_info.get("path"),
            "sha256": checkpoint_info.get("sha256"),
            "epoch": checkpoint_info.get("epoch"),
            "stage": config.train.stage,
            "model": config.model.name,
            "image_size": config.model.image_size,
            "config_hash": config_hash(config),
            "trained_with": checkpoint_info.get("versions", {}),
            "training_manifests": run_info.get("manifests", []),
            "init_from": run_info.get("init_from"),
        },
        "threshold": threshold,
        "calibration": calibration,
        "data": data_info(data, run_info, ensemble),
        "tasks": {"classification": tasks.classification, "segmentation": tasks.segmentation},
        "notes": tasks.notes,
        "settings": {
            **settings,
            "ci_level": CI_LEVEL,
            "ci_unit": "patient (group)",
            "pixel_threshold": PIXEL_THRESHOLD,
        },
        "hd95_unit": hd95_unit(data.records) if tasks.segmentation else None,
    }
