"""Scoring of model outputs: per-slice results and dataset metrics with patient CIs.

Pure NumPy on top of :mod:`lungcad.metrics` (no torch), so it can score outputs from any
source. A :class:`SliceOutput` is what the network said about one manifest slice; a
:class:`SliceResult` is one row of ``predictions.csv``. Segmentation is scored at each
slice's own resolution and pixel spacing: the model-size probability map is resized back
before thresholding, so Dice and HD95 (mm) refer to the data as stored.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.manifest import SliceRecord
from lungcad.data.preprocessing import Letterbox
from lungcad.io.images import load_slice_array
from lungcad.metrics.bootstrap import bootstrap_ci, classification_metrics_with_ci
from lungcad.metrics.classification import classification_metrics
from lungcad.metrics.segmentation import dice_from_counts, iou_from_counts, segmentation_metrics

#: Probability above which a pixel counts as tumour (the logit > 0 rule of training).
PIXEL_THRESHOLD = 0.5
#: Segmentation metrics that get a patient-level bootstrap CI.
SEG_CI_KEYS = ("dice", "iou", "hd95", "lesion_sensitivity")
PREDICTION_COLUMNS = (
    "sample_id",
    "group_id",
    "split",
    "source",
    "label",
    "probability",
    "prediction",
    "has_mask",
    "dice",
    "iou",
    "hd95",
    "ref_pixels",
    "pred_pixels",
)
CATEGORIES = ("TP", "FP", "FN", "TN")


@dataclass
class SliceOutput:
    """The network's output for one slice.

    Attributes:
        record: the manifest row.
        probability: cancer probability of the slice, in [0, 1].
        seg_probability: ``(S, S)`` float32 tumour probability at the model's input size.
    """

    record: SliceRecord
    probability: float
    seg_probability: np.ndarray


def predicted_mask(seg_probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary tumour mask at ``shape`` from a model-size probability map.

    The probability map (not the binary mask) is taken out of the model input's letterbox,
    resized bilinearly back to the slice's own ``(H, W)`` and then thresholded at
    :data:`PIXEL_THRESHOLD`, which keeps smooth borders.
    """
    return Letterbox.fit(shape, seg_probability.shape).invert(seg_probability) > PIXEL_THRESHOLD


# --------------------------------------------------------------------------- scoring


@dataclass
class SliceResult:
    """Per-slice outcome, one row of ``predictions.csv``.

    ``probability``/``prediction`` are NaN/-1 when the run is not a classification run;
    segmentation fields are NaN when the slice has no mask (``dice``/``iou`` also when its
    reference is empty; ``hd95`` in mm, or in pixels when the spacing is unknown).
    """

    sample_id: str
    group_id: str
    split: str
    source: str
    label: int
    probability: float
    prediction: int
    has_mask: bool
    dice: float = math.nan
    iou: float = math.nan
    hd95: float = math.nan
    ref_pixels: float = math.nan
    pred_pixels: float = math.nan
    seg_counts: dict[str, float] = field(default_factory=dict, repr=False)


def _score_slice(
    output: SliceOutput, root: Path, threshold: float | None, segment: bool
) -> SliceResult:
    record = output.record
    prob = output.probability if threshold is not None else math.nan
    result = SliceResult(
        sample_id=record.sample_id,
        group_id=record.group_id,
        split=record.split,
        source=record.source,
        label=record.label,
        probability=prob,
        prediction=int(prob >= threshold) if threshold is not None else -1,
        has_mask=record.has_mask,
    )
    if segment and record.has_mask:
        ref = load_slice_array(root / record.mask_path, record.sample_id, "mask") > 0
        pred = predicted_mask(output.seg_probability, ref.shape)
        spacing = [
            s if math.isfinite(s) and s > 0 else 1.0 for s in (record.spacing_y, record.spacing_x)
        ]
        seg = segmentation_metrics(pred, ref, spacing)
        result.dice, result.iou, result.hd95 = seg["dice"], seg["iou"], seg["hd95"]
        result.ref_pixels, result.pred_pixels = seg["ref_voxels"], seg["pred_voxels"]
        result.seg_counts = {
            k: seg[k]
            for k in ("tp", "fp", "fn", "n_ref_lesions", "n_detected_lesions", "n_fp_lesions")
        }
    return result


def _segmentation_aggregate(rows: Sequence[SliceResult]) -> dict[str, float]:
    """Dataset-level segmentation metrics of masked slices.

    ``dice``/``iou``/``hd95`` are means over slices where they are defined (reference
    tumour present; HD95 also needs a prediction), ``dice_global`` pools the pixel counts of
    all slices, ``lesion_sensitivity`` pools lesion counts (found / present).
    """

    def nanmean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    counts = {k: float(sum(r.seg_counts[k] for r in rows)) for k in rows[0].seg_counts}
    n_ref = counts["n_ref_lesions"]
    return {
        "dice": nanmean([r.dice for r in rows]),
        "iou": nanmean([r.iou for r in rows]),
        "hd95": nanmean([r.hd95 for r in rows]),
        "lesion_sensitivity": counts["n_detected_lesions"] / n_ref if n_ref else math.nan,
        "dice_global": dice_from_counts(counts["tp"], counts["fp"], counts["fn"]),
        "iou_global": iou_from_counts(counts["tp"], counts["fp"], counts["fn"]),
        "n_mask_slices": float(len(rows)),
        "n_tumour_slices": float(sum(r.ref_pixels > 0 for r in rows)),
        "n_ref_lesions": n_ref,
        "n_detected_lesions": counts["n_detected_lesions"],
        "n_fp_lesions": counts["n_fp_lesions"],
    }


def segmentation_summary(
    rows: Sequence[SliceResult], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Segmentation metrics of masked slices plus patient-level bootstrap CIs.

    Args:
        rows: scored slices that have a mask.
        n_boot: bootstrap replicates (0: no CIs).
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        See ``_segmentation_aggregate``; plus ``<key>_ci_low``/``<key>_ci_high`` for
        :data:`SEG_CI_KEYS` when ``n_boot > 0``.
    """
    out = _segmentation_aggregate(rows)
    if n_boot > 0:
        # metrics.bootstrap_ci resamples whole groups of (y_true, y_prob) pairs; passing slice
        # indices as both lets the metric look the resampled slices up.
        index = np.arange(len(rows))
        cis = bootstrap_ci(
            index,
            index.astype(np.float64),
            [r.group_id for r in rows],
            metric_fn=lambda idx, _: {
                k: v
                for k, v in _segmentation_aggregate([rows[i] for i in idx]).items()
                if k in SEG_CI_KEYS
            },
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
        )
        for key in SEG_CI_KEYS:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = cis[key]
    return out


def score_outputs(
    outputs: Iterable[SliceOutput],
    root: str | Path,
    *,
    threshold: float | None,
    segment: bool,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[SliceResult], dict[str, float]]:
    """Per-slice results and the flat metrics dict of a set of model outputs.

    Args:
        outputs: :func:`lungcad.evaluation.evaluate.predict_slices` output.
        root: the manifest's folder (masks are read from it).
        threshold: decision threshold on the cancer probability (the run's, chosen on
            validation); None skips classification.
        segment: score segmentation on slices with a mask.
        n_boot: patient-level bootstrap replicates for CIs (0: none).
        seed: bootstrap seed.

    Returns:
        ``(rows, metrics)``: metrics hold the keys of
        :func:`lungcad.metrics.bootstrap.classification_metrics_with_ci` (labelled slices
        only) and of :func:`segmentation_summary` (masked slices only), plus ``n_slices``
        and ``n_groups``.
    """
    root = Path(root)
    rows = [_score_slice(o, root, threshold, segment) for o in outputs]
    metrics: dict[str, float] = {
        "n_slices": float(len(rows)),
        "n_groups": float(len({r.group_id for r in rows})),
    }
    labelled = [r for r in rows if r.label in (0, 1)]
    if threshold is not None and labelled:
        y = np.array([r.label for r in labelled])
        p = np.array([r.probability for r in labelled])
        groups = [r.group_id for r in labelled]
        cls = (
            classification_metrics_with_ci(y, p, groups, threshold, n_boot=n_boot, seed=seed)
            if n_boot > 0
            else classification_metrics(y, p, threshold)
        )
        cls.pop("n_groups", None)  # the labelled subset's; n_groups above counts all slices
        metrics.update(cls)
        metrics["n_labelled"] = float(len(labelled))
    masked = [r for r in rows if r.has_mask and r.seg_counts]
    if segment and masked:
        metrics.update(segmentation_summary(masked, n_boot=n_boot, seed=seed))
    return rows, metrics


# --------------------------------------------------------------------------- examples


def example_category(row: SliceResult) -> str | None:
    """TP/FP/FN/TN of a slice: by label and prediction for a classification run, else by
    whether the reference mask and the predicted mask are empty; None when undefined."""
    if row.prediction in (0, 1) and row.label in (0, 1):
        truth, pred = row.label, row.prediction
    elif row.has_mask and math.isfinite(row.ref_pixels):
        truth, pred = int(row.ref_pixels > 0), int(row.pred_pixels > 0)
    else:
        return None
    return {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN", (0, 0): "TN"}[(truth, pred)]


def select_examples(
    rows: Sequence[SliceResult], per_category: int = 2
) -> list[tuple[str, SliceResult]]:
    """The most telling slices of each category, ``per_category`` at most.

    TP and FP: highest cancer probability first (most confident detections and errors); FN
    and TN: lowest first. Without classification, by tumour size (TP, FN: largest reference;
    FP: largest prediction; TN: in order). Ties keep the manifest order.
    """

    def key(category: str, r: SliceResult) -> float:
        if math.isfinite(r.probability):
            return -r.probability if category in ("TP", "FP") else r.probability
        if category in ("TP", "FN"):
            return -r.ref_pixels
        return -r.pred_pixels if category == "FP" else 0.0

    chosen = []
    for category in CATEGORIES:
        members = [r for r in rows if example_category(r) == category]
        members.sort(key=functools.partial(key, category))
        chosen += [(category, r) for r in members[:per_category]]
    return chosen


# --------------------------------------------------------------------------- files


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


def predictions_csv(rows: Sequence[SliceResult]) -> str:
    """``predictions.csv`` text: :data:`PREDICTION_COLUMNS`, empty cells for undefined values
    (probabilities are written with full precision so metrics can be recomputed exactly)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for r in rows:
        values = [getattr(r, c) for c in PREDICTION_COLUMNS]
        if r.prediction == -1:
            values[PREDICTION_COLUMNS.index("prediction")] = ""
        writer.writerow([_cell(v) for v in values])
    return text.getvalue()
