"""Evaluate a trained run on a prepared dataset: predictions, metrics with patient CIs, plots.

``evaluate_run(run_dir, data, out_dir)`` loads the run with
:func:`lungcad.training.checkpoint.load_checkpoint`, feeds the slices of a prepared dataset through
the
network exactly as training's validation does (:class:`lungcad.data.dataset.SliceDataset`
without augmentation, eval mode, sigmoid of the logits) and writes an evaluation folder::

    OUT/metrics.json         flat metrics (NaN as null), *_ci_low / *_ci_high per metric
    OUT/predictions.csv      one row per slice (PREDICTION_COLUMNS)
    OUT/evaluation.json      provenance: checkpoint, threshold, data, split summary, versions
    OUT/confusion_matrix.png, roc.png, calibration.png   (where labels exist)
    OUT/dice.png             per-slice Dice histogram (where masks exist)
    OUT/examples/*.png       overlays of TP/FP/FN/TN examples, OUT/examples.png montage

Honesty rules built in:

* The decision threshold is the run's own (``threshold.json``, chosen on the validation
  split during training); it is never tuned on the evaluated data. A run calibrated with
  ``lungcad calibrate`` (``calibration.json``) is scored exactly as ``lungcad predict`` scores
  it: calibrated probabilities and the calibrated threshold
  (:func:`lungcad.evaluation.calibration.run_decision`); ``evaluation.json`` records which applied.
* Classification metrics only for slices with a label (0/1) and only for a classification
  ("cls") run, whose head was trained; segmentation metrics only for slices with a mask and
  only for a run whose decoder was trained (a "seg" run, or a "cls" run started from one).
* Confidence intervals resample patients (``group_id``), not slices.
* Segmentation is scored at each slice's own resolution with its own pixel spacing: the
  predicted probability map is resized back from the model's input size before thresholding,
  so Dice and HD95 (mm) refer to the data as stored, not to the network's grid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lungcad import __version__
from lungcad.data.dataset import SliceDataset
from lungcad.data.layouts.common import PrepareSettings
from lungcad.data.layouts.prepare import count_table
from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.calibration import CALIBRATION_FILE, Calibration, RunDecision, run_decision
from lungcad.evaluation.data import (
    EvaluationData,
    open_dataset,
)
from lungcad.evaluation.plots import (
    plot_calibration,
    plot_confusion,
    plot_dice,
    plot_examples,
    plot_overlay,
    plot_roc,
)
from lungcad.evaluation.scoring import (
    PIXEL_THRESHOLD,
    SliceOutput,
    SliceResult,
    predicted_mask,
    predictions_csv,
    score_outputs,
    select_examples,
)
from lungcad.io.atomic import atomic_dir, write_json_atomic, write_text_atomic
from lungcad.io.folders import check_output_dir, read_json_or_empty
from lungcad.io.images import load_slice_array
from lungcad.models.unet import LungCADNet
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import (
    RUN_FILE,
    THRESHOLD_FILE,
    file_sha256,
    load_checkpoint,
    software_versions,
)
from lungcad.training.config import Config, config_hash

log = logging.getLogger(__name__)

__all__ = [
    "EVALUATION_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "EvaluationResult",
    "evaluate_loaded",
    "evaluate_run",
    "predict_slices",
    "read_metrics",
    "resolve_device",
]

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
EVALUATION_FILE = "evaluation.json"
EXAMPLES_DIR = "examples"


# --------------------------------------------------------------------------- prediction


def resolve_device(choice: str = "auto") -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` as a torch device."""
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda; got {choice!r}", "--device")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU; use --device cpu", "--device")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def predict_slices(
    model: LungCADNet,
    records: Sequence[SliceRecord],
    root: str | Path,
    image_size: int,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp: bool = False,
    num_workers: int = 0,
    calibration: Calibration | None = None,
) -> Iterator[SliceOutput]:
    """Run the network over manifest slices, in record order, as training's validation does.

    Args:
        model: the trained network (put in eval mode here).
        records: the slices.
        root: folder the records' paths are relative to (the manifest's folder).
        image_size: the run's ``config.model.image_size``; slices are resized to it exactly
            as :class:`lungcad.data.dataset.SliceDataset` does in training.
        batch_size: slices per forward pass.
        device: where the model runs (the model must already be there).
        amp: float16 autocast on CUDA (as training with ``train.amp``).
        num_workers: DataLoader worker processes.
        calibration: maps the cancer logits to probabilities (as ``lungcad predict`` does for
            a calibrated run); None: the sigmoid.

    Yields:
        One :class:`SliceOutput` per record, in order.
    """
    device = torch.device(device)
    dataset = SliceDataset(records, root, image_size=(image_size, image_size), augment=None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    start = 0
    for batch in loader:
        # Compute inside inference mode, yield outside it: a generator suspended inside the
        # context would leave autograd disabled in the caller's code.
        with torch.inference_mode(), _autocast(device, amp):
            out = model(batch["image"].to(device))
            logits = out["cls_logits"].float()
            cls = (
                calibration.apply(logits.cpu().numpy())
                if calibration is not None
                else torch.sigmoid(logits).cpu().numpy()
            )
            seg = torch.sigmoid(out["seg_logits"].float())[:, 0].cpu().numpy()
        for i in range(len(cls)):
            yield SliceOutput(records[start + i], float(cls[i]), seg[i])
        start += len(cls)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- examples


def _render_examples(
    model: LungCADNet,
    config: Config,
    data: EvaluationData,
    examples: Sequence[tuple[str, SliceResult]],
    out: Path,
    device: torch.device,
    threshold: float | None,
) -> list[dict[str, Any]]:
    """Re-run the model on the chosen slices and draw their overlays into ``out/examples``."""
    by_id = {r.sample_id: r for r in data.records}
    records = [by_id[row.sample_id] for _, row in examples]
    outputs = predict_slices(
        model,
        records,
        data.root,
        config.model.image_size,
        batch_size=max(1, len(records)),
        device=device,
    )
    panels, written = [], []
    for (category, row), output in zip(examples, outputs, strict=True):
        record = output.record
        image = load_slice_array(data.root / record.image_path, record.sample_id, "image").astype(
            np.float32
        )
        ref = (
            load_slice_array(data.root / record.mask_path, record.sample_id, "mask") > 0
            if record.has_mask
            else None
        )
        pred = predicted_mask(output.seg_probability, image.shape)
        title = f"{category}: {row.sample_id}"
        if threshold is not None:
            title += f"\np={row.probability:.3f} (t={threshold:.3f}), label {row.label}"
        if math.isfinite(row.dice):
            title += f", Dice {row.dice:.2f}"
        name = f"{category}_{re.sub(r'[^A-Za-z0-9._-]+', '_', row.sample_id)}.png"
        plot_overlay(image, ref, pred, out / EXAMPLES_DIR / name)
        panels.append((image, ref, pred, title))
        written.append(
            {
                "category": category,
                "sample_id": row.sample_id,
                "file": f"{EXAMPLES_DIR}/{name}",
                "probability": row.probability,
                "label": row.label,
                "dice": row.dice,
            }
        )
    if panels:
        plot_examples(panels, out / "examples.png")
    return written


# --------------------------------------------------------------------------- the run


@dataclass
class EvaluationResult:
    """What :func:`evaluate_run` computed (and wrote, when ``out_dir`` was given).

    Attributes:
        metrics: the flat metrics dict (``metrics.json``).
        rows: per-slice results (``predictions.csv``).
        info: provenance (``evaluation.json``).
        out_dir: the evaluation folder, or None.
    """

    metrics: dict[str, float]
    rows: list[SliceResult]
    info: dict[str, Any]
    out_dir: Path | None = None


def _tasks(
    stage: str, run_info: Mapping[str, Any], data: EvaluationData
) -> tuple[bool, bool, list[str]]:
    """Whether to score classification and segmentation, and notes explaining omissions."""
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
    return classify, segment, notes


def _threshold_info(
    run_dir: Path, value: float, classify: bool, decision: RunDecision | None
) -> dict[str, Any]:
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
    if classify and cal is not None:
        split = cal.info.get("split", "validation")
        info.update(
            {
                "value": decision.threshold,
                "source": decision.source,
                "uncalibrated_value": value,
                "rule": cal.info.get("rule", "cancer if calibrated probability >= threshold"),
            }
        )
        if decision.source == "calibration.json":  # re-chosen on calibrated probabilities
            info.update(
                method=cal.info.get("threshold_method"),
                epoch=None,
                chosen_on=f"{split} split (calibrated probabilities)",
            )
    return info


def _calibration_info(decision: RunDecision | None) -> dict[str, Any]:
    """``evaluation.json``'s record of whether (and which) calibration was applied."""
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


def _data_info(data: EvaluationData, run_info: Mapping[str, Any]) -> dict[str, Any]:
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


def evaluate_loaded(
    model: LungCADNet,
    config: Config,
    checkpoint_info: Mapping[str, Any],
    data: EvaluationData,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
) -> EvaluationResult:
    """Score a loaded run on selected slices (nothing written; see :func:`evaluate_run`).

    Args:
        model: network from :func:`lungcad.training.checkpoint.load_checkpoint`.
        config: its configuration.
        checkpoint_info: its ``info`` dict (``threshold``, ``run_dir``, ``sha256``, ...).
        data: the slices (:func:`open_dataset` / :func:`select_records`).
        n_boot: patient-level bootstrap replicates (0: no CIs).
        seed: bootstrap seed.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.
    """
    if n_boot < 0:
        raise InputError(f"n_boot must be >= 0; got {n_boot}", "--n-boot")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1; got {batch_size}", "--batch-size")
    run_dir = Path(checkpoint_info["run_dir"])
    run_info = read_json_or_empty(run_dir / RUN_FILE)
    classify, segment, notes = _tasks(config.train.stage, run_info, data)
    # The calibration and threshold `lungcad predict` would use (only a trained classifier
    # has a decision to calibrate).
    decision = run_decision(checkpoint_info) if classify else None
    threshold = decision.threshold if decision is not None else None
    torch_device = resolve_device(device)
    model.to(torch_device)
    outputs = predict_slices(
        model,
        data.records,
        data.root,
        config.model.image_size,
        batch_size=batch_size,
        device=torch_device,
        amp=config.train.amp,
        calibration=None if decision is None else decision.calibration,
    )
    rows, metrics = score_outputs(
        outputs, data.root, threshold=threshold, segment=segment, n_boot=n_boot, seed=seed
    )
    spacings = {
        math.isfinite(r.spacing_y) and math.isfinite(r.spacing_x)
        for r in data.records
        if r.has_mask
    }
    info = {
        "kind": "lungcad-evaluation",
        "lungcad_version": __version__,
        "created_at": utc_timestamp(),
        "versions": _versions(),
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
        "threshold": _threshold_info(
            run_dir, float(checkpoint_info["threshold"]), classify, decision
        ),
        "calibration": _calibration_info(decision),
        "data": _data_info(data, run_info),
        "tasks": {"classification": classify, "segmentation": segment},
        "notes": notes,
        "settings": {
            "n_boot": n_boot,
            "seed": seed,
            "batch_size": batch_size,
            "device": str(torch_device),
            "ci_level": 0.95,
            "ci_unit": "patient (group)",
            "pixel_threshold": PIXEL_THRESHOLD,
        },
        "hd95_unit": (
            "mm"
            if spacings == {True}
            else "pixels"
            if spacings == {False}
            else "mixed (mm where the spacing is known)"
        )
        if segment
        else None,
    }
    return EvaluationResult(metrics=metrics, rows=rows, info=info)


def _versions() -> dict[str, str]:
    import matplotlib
    import sklearn

    return {
        **software_versions(),
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
    }


def write_evaluation(
    result: EvaluationResult,
    out: Path,
    model: LungCADNet,
    config: Config,
    data: EvaluationData,
    *,
    n_examples: int = 2,
) -> None:
    """Write the evaluation folder's files into ``out`` (an existing, empty folder)."""
    metrics, rows = result.metrics, result.rows
    threshold = result.info["threshold"]["value"]
    write_json_atomic(out / METRICS_FILE, metrics)
    write_text_atomic(out / PREDICTIONS_FILE, predictions_csv(rows))
    plots: dict[str, str] = {}
    labelled = [r for r in rows if r.label in (0, 1) and math.isfinite(r.probability)]
    if labelled:
        y = np.array([r.label for r in labelled])
        p = np.array([r.probability for r in labelled])
        plot_confusion(
            y, (p >= threshold).astype(int), out / "confusion_matrix.png", threshold=threshold
        )
        plot_roc(y, p, out / "roc.png", threshold=threshold, metrics=metrics)
        plot_calibration(y, p, out / "calibration.png", ece=metrics.get("ece"))
        plots.update(
            confusion_matrix="confusion_matrix.png", roc="roc.png", calibration="calibration.png"
        )
    dice = [r.dice for r in rows if math.isfinite(r.dice)]
    if dice:
        plot_dice(np.array(dice), out / "dice.png", mean=metrics.get("dice"))
        plots["dice"] = "dice.png"
    examples = select_examples(rows, n_examples) if n_examples > 0 else []
    device = next(model.parameters()).device
    written = _render_examples(model, config, data, examples, out, device, threshold)
    if written:
        plots["examples"] = "examples.png"
    result.info["plots"] = plots
    result.info["examples"] = written
    write_json_atomic(out / EVALUATION_FILE, result.info)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str | None = None,
    prepare_settings: PrepareSettings | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    n_examples: int = 2,
) -> EvaluationResult:
    """Evaluate a trained run on a dataset in any supported form and write the folder.

    Args:
        run_dir: a run folder written by ``lungcad train`` (or its ``.pt`` file).
        data: a prepared folder / manifest.csv, or a raw dataset folder (prepared on the fly).
        out_dir: the evaluation folder to write (new, empty, or an earlier evaluation, which
            is replaced atomically); None computes without writing.
        split: "train", "val", "test" or "all"; None: "test" for prepared data, "all" for
            raw data.
        prepare_settings: layout and class mapping for raw data.
        n_boot: patient-level bootstrap replicates for the CIs (0: none).
        seed: bootstrap seed.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.
        n_examples: overlays per TP/FP/FN/TN category.

    Returns:
        The :class:`EvaluationResult`.
    """
    out = (
        check_output_dir(out_dir, EVALUATION_FILE, "an earlier evaluation")
        if out_dir is not None
        else None
    )
    if not Path(data).exists():  # before the (slow) checkpoint load
        raise MissingInputError(
            "evaluation data not found; pass a folder written by `lungcad "
            "prepare` (or its manifest.csv) or a dataset folder",
            data,
        )
    model, config, info = load_checkpoint(run_dir)
    with open_dataset(data, split, prepare_settings) as selected:
        log.info(
            "evaluating %s on %d %r slices of %s",
            info["path"],
            len(selected.records),
            selected.split,
            selected.manifest,
        )
        result = evaluate_loaded(
            model,
            config,
            info,
            selected,
            n_boot=n_boot,
            seed=seed,
            device=device,
            batch_size=batch_size,
        )
        if out is not None:
            with atomic_dir(out) as tmp:
                write_evaluation(result, tmp, model, config, selected, n_examples=n_examples)
            result.out_dir = out
    return result


# --------------------------------------------------------------------------- files


def read_metrics(folder: str | Path) -> dict[str, float]:
    """``metrics.json`` of an evaluation folder, with null read back as NaN."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise MissingInputError(
            f"no {METRICS_FILE}; pass a folder written by `lungcad evaluate`", path
        )
    values = json.loads(path.read_text(encoding="utf-8"))
    return {k: math.nan if v is None else float(v) for k, v in values.items()}
