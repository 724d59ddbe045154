"""What ``evaluation.json`` records: tasks scored, decision threshold, calibration, data, versions.

Provenance only: nothing here runs the network or scores anything. :func:`scored_tasks`
decides which metrics a run can honestly report; :func:`evaluation_info` assembles the
document :func:`lungcad.evaluation.evaluate.evaluate_loaded` returns and
:func:`lungcad.evaluation.folder.write_evaluation` stores.
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
from lungcad.evaluation.calibration import CALIBRATION_FILE, RunDecision
from lungcad.evaluation.data import EvaluationData
from lungcad.evaluation.scoring import PIXEL_THRESHOLD
from lungcad.io.folders import read_json_or_empty
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import THRESHOLD_FILE, file_sha256, software_versions
from lungcad.training.config import Config, config_hash

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


def threshold_info(
    run_dir: Path, value: float, classify: bool, decision: RunDecision | None
) -> dict[str, Any]:
    """Where the decision threshold came from (never the evaluated data).

    Args:
        run_dir: the run folder (its ``threshold.json`` says how the threshold was chosen).
        value: the checkpoint's (uncalibrated) threshold.
        classify: whether classification is scored (else the value is None).
        decision: the run's calibrated decision, or None.
    """
    stored = read_json_or_empty(run_dir / THRESHOLD_FILE)
    info = {
        "value": value if classify else None,
        "source": THRESHOLD_FILE if stored else "checkpoint",
        "method": stored.get("method"),
        "chosen_on": stored.get("chosen_on", "validation split"),
        "epoch": stored.get("epoch"),
        "rule": stored.get("rule", "cancer if probability >= threshold"),
        "tuned_on_evaluated_data": False,
    }
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
    return info


def calibration_info(decision: RunDecision | None) -> dict[str, Any]:
    """Whether (and which) calibration was applied to the probabilities."""
    if decision is None:
        return {"applied": False, "reason": "no classification scored"}
    cal = decision.calibration
    if cal is None:
        return {"applied": False, "reason": f"the run has no {CALIBRATION_FILE}"}
    return {
        "applied": True,
        "file": CALIBRATION_FILE,
        "method": cal.method,
        "temperature": cal.temperature,
        "fitted_on": cal.info.get("split"),
        "checkpoint_sha256": cal.info.get("checkpoint_sha256"),
        "threshold_source": decision.source,
    }


def data_info(data: EvaluationData, run_info: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluated data: manifest hash, split, counts, and its overlap with training.

    Logs a warning when the rows come from a training manifest and are not its test split.
    """
    sha = file_sha256(data.manifest)
    trained_on = {m.get("sha256") for m in run_info.get("manifests", [])}
    overlaps = sha in trained_on and data.split != "test"
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
        "threshold": threshold_info(
            run_dir, float(checkpoint_info["threshold"]), tasks.classification, decision
        ),
        "calibration": calibration_info(decision),
        "data": data_info(data, run_info),
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
