"""The evaluation folder that ``evaluate_run`` writes: its files, the writer and a reader.

::

    OUT/metrics.json         flat metrics (NaN as null), *_ci_low / *_ci_high per metric
    OUT/predictions.csv      one row per slice (PREDICTION_COLUMNS)
    OUT/evaluation.json      provenance (lungcad.evaluation.info), plots and examples
    OUT/confusion_matrix.png, roc.png, calibration.png   (where labels exist)
    OUT/dice.png             per-slice Dice histogram (where masks exist)
    OUT/examples/*.png       overlays of TP/FP/FN/TN examples, OUT/examples.png montage

Writing needs no network: the example overlays are drawn from model outputs computed by the
caller. Nothing here imports torch, so reports can read these folders cheaply.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.errors import MissingInputError
from lungcad.evaluation.plots import (
    plot_calibration,
    plot_confusion,
    plot_dice,
    plot_examples,
    plot_overlay,
    plot_roc,
)
from lungcad.evaluation.scoring import SliceOutput, SliceResult, predicted_mask, predictions_csv
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.io.images import load_slice_array

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
EVALUATION_FILE = "evaluation.json"
EXAMPLES_DIR = "examples"


@dataclass
class EvaluationResult:
    """What :func:`lungcad.evaluation.evaluate.evaluate_run` computed (and wrote).

    Attributes:
        metrics: the flat metrics dict (``metrics.json``).
        rows: per-slice results (``predictions.csv``).
        info: provenance (``evaluation.json``).
        out_dir: the evaluation folder, or None when nothing was written.
    """

    metrics: dict[str, float]
    rows: list[SliceResult]
    info: dict[str, Any]
    out_dir: Path | None = None


#: One example overlay to draw: its category (TP/FP/FN/TN), its row and the model's output.
Example = tuple[str, SliceResult, SliceOutput]


def _draw_examples(
    examples: Sequence[Example], root: Path, out: Path, threshold: float | None
) -> list[dict[str, Any]]:
    """Overlay each example's reference and predicted masks into ``out/examples``.

    Returns:
        One ``evaluation.json`` entry per drawn example (category, sample, file, ...).
    """
    panels, written = [], []
    for category, row, output in examples:
        record = output.record
        image = load_slice_array(root / record.image_path, record.sample_id, "image").astype(
            np.float32
        )
        ref = (
            load_slice_array(root / record.mask_path, record.sample_id, "mask") > 0
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


def write_evaluation(
    result: EvaluationResult, out: Path, root: Path, examples: Sequence[Example] = ()
) -> None:
    """Write the evaluation folder's files into ``out`` (an existing, empty folder).

    Args:
        result: the scored evaluation; its ``info`` gains ``plots`` and ``examples``.
        out: the folder to write into.
        root: the folder the evaluated records' paths are relative to.
        examples: overlays to draw (``lungcad.evaluation.scoring.select_examples`` rows with
            their model outputs).
    """
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
    written = _draw_examples(examples, root, out, threshold)
    if written:
        plots["examples"] = "examples.png"
    result.info["plots"] = plots
    result.info["examples"] = written
    write_json_atomic(out / EVALUATION_FILE, result.info)


def read_metrics(folder: str | Path) -> dict[str, float]:
    """``metrics.json`` of an evaluation folder, with null read back as NaN."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise MissingInputError(
            f"no {METRICS_FILE}; pass a folder written by `lungcad evaluate`", path
        )
    values = json.loads(path.read_text(encoding="utf-8"))
    return {k: math.nan if v is None else float(v) for k, v in values.items()}
