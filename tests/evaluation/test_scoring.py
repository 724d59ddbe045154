"""lungcad.evaluation.scoring on hand-made model outputs: per-slice rows, dataset metrics with
and without CIs, example selection and predictions.csv (no network involved)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.manifest import SliceRecord, read_manifest
from lungcad.evaluation.scoring import (
    PREDICTION_COLUMNS,
    SEG_CI_KEYS,
    SliceOutput,
    SliceResult,
    example_category,
    predicted_mask,
    predictions_csv,
    score_outputs,
    select_examples,
)
from lungcad.metrics.bootstrap import CI_KEYS


@pytest.fixture(scope="module")
def prepared(tiny_manifest: Callable[..., Path]) -> tuple[Path, list[SliceRecord]]:
    folder = tiny_manifest({"test": 6})
    return folder, read_manifest(folder)


def _perfect(root: Path, records: list[SliceRecord]) -> list[SliceOutput]:
    """Outputs that reproduce every reference mask and rank every label correctly."""
    return [
        SliceOutput(r, 0.1 + 0.8 * r.label, np.load(root / r.mask_path).astype(np.float32))
        for r in records
    ]


def test_predicted_mask_goes_back_to_the_slice_shape() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[16:48, 16:48] = 0.9
    mask = predicted_mask(prob, (32, 32))  # a 32x32 slice fills the whole 64x64 input
    assert mask.shape == (32, 32) and mask.dtype == bool
    assert mask[8:24, 8:24].all() and not mask[:6].any()
    # A 32x64 slice sits in the middle rows of the input: the padding is cut away.
    assert predicted_mask(prob, (32, 64)).shape == (32, 64)


def test_perfect_outputs_score_perfectly(prepared) -> None:
    root, records = prepared
    rows, metrics = score_outputs(
        _perfect(root, records), root, threshold=0.5, segment=True, n_boot=20, seed=0
    )
    assert [r.sample_id for r in rows] == [r.sample_id for r in records]
    assert metrics["n_slices"] == 12 and metrics["n_groups"] == 6 and metrics["n_labelled"] == 12
    for key in ("accuracy", "sensitivity", "specificity", "mcc", "auc", "dice", "dice_global"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["hd95"] == 0.0 and metrics["lesion_sensitivity"] == 1.0
    assert metrics["n_tumour_slices"] == 6 and metrics["n_mask_slices"] == 12
    for key in (*CI_KEYS, *SEG_CI_KEYS):
        assert f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics, key
    tumour_free = [r for r in rows if r.label == 0]
    assert all(math.isnan(r.dice) and r.ref_pixels == 0 for r in tumour_free)


def test_without_threshold_or_segmentation(prepared) -> None:
    root, records = prepared
    outputs = _perfect(root, records)
    rows, metrics = score_outputs(outputs, root, threshold=None, segment=True, n_boot=0)
    assert "accuracy" not in metrics and "n_labelled" not in metrics
    assert "dice_ci_low" not in metrics  # n_boot=0: no intervals
    assert all(math.isnan(r.probability) and r.prediction == -1 for r in rows)
    rows, metrics = score_outputs(outputs, root, threshold=0.5, segment=False, n_boot=0)
    assert "dice" not in metrics and all(math.isnan(r.dice) for r in rows)
    assert metrics["accuracy"] == 1.0


def _row(sample_id: str, label: int, probability: float, prediction: int) -> SliceResult:
    return SliceResult(sample_id, "g", "test", "s", label, probability, prediction, False)


def test_example_categories_and_their_order() -> None:
    rows = [
        _row("tp_low", 1, 0.6, 1),
        _row("tp_high", 1, 0.9, 1),
        _row("fp", 0, 0.7, 1),
        _row("fn", 1, 0.2, 0),
        _row("tn_high", 0, 0.3, 0),
        _row("tn_low", 0, 0.1, 0),
        _row("unknown", -1, 0.5, 1),
    ]
    assert [example_category(r) for r in rows] == ["TP", "TP", "FP", "FN", "TN", "TN", None]
    chosen = select_examples(rows, per_category=1)
    assert chosen == [("TP", rows[1]), ("FP", rows[2]), ("FN", rows[3]), ("TN", rows[5])]
    # Without classification: by whether the reference and predicted masks are empty.
    seg = SliceResult("m", "g", "test", "s", -1, math.nan, -1, True, ref_pixels=0, pred_pixels=3)
    assert example_category(seg) == "FP"


def test_predictions_csv_cells() -> None:
    rows = [
        _row("a", 1, 0.123456789, 1),
        SliceResult("b", "g", "val", "s", 0, math.nan, -1, True, dice=0.5),
    ]
    table = list(csv.DictReader(io.StringIO(predictions_csv(rows))))
    assert list(table[0]) == list(PREDICTION_COLUMNS)
    assert table[0]["probability"] == "0.123456789"  # full precision
    assert table[0]["has_mask"] == "0" and table[1]["has_mask"] == "1"
    assert table[1]["probability"] == "" and table[1]["prediction"] == ""  # undefined: empty
    assert table[1]["dice"] == "0.5" and table[0]["dice"] == ""
