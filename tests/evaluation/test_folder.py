"""lungcad.evaluation.folder: the evaluation folder written from scored results and model
outputs made by hand (no network), and metrics.json read back with NaN for null."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.manifest import read_manifest
from lungcad.errors import MissingInputError
from lungcad.evaluation.folder import (
    EVALUATION_FILE,
    EXAMPLES_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    EvaluationResult,
    read_metrics,
    write_evaluation,
)
from lungcad.evaluation.scoring import SliceOutput, score_outputs, select_examples

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scored(tiny_manifest: Callable[..., Path]) -> tuple[Path, EvaluationResult, list]:
    root = tiny_manifest({"test": 3})
    outputs = [
        # Every mask found; the probabilities put one tumour-free slice above the threshold.
        SliceOutput(r, [0.2, 0.9, 0.7, 0.8, 0.1, 0.6][i], np.load(root / r.mask_path) * 0.9)
        for i, r in enumerate(read_manifest(root))
    ]
    rows, metrics = score_outputs(outputs, root, threshold=0.5, segment=True, n_boot=0)
    info = {"threshold": {"value": 0.5}}
    by_id = {o.record.sample_id: o for o in outputs}
    examples = [(c, row, by_id[row.sample_id]) for c, row in select_examples(rows, 1)]
    return root, EvaluationResult(metrics, rows, info), examples


def test_write_evaluation_files(scored, tmp_path: Path) -> None:
    root, result, examples = scored
    write_evaluation(result, tmp_path, root, examples)
    for name in (METRICS_FILE, PREDICTIONS_FILE, EVALUATION_FILE):
        assert (tmp_path / name).is_file(), name
    for name in ("confusion_matrix.png", "roc.png", "calibration.png", "dice.png", "examples.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    info = json.loads((tmp_path / EVALUATION_FILE).read_text())
    assert info["plots"]["examples"] == "examples.png" and set(info["plots"]) >= {"roc", "dice"}
    assert {e["category"] for e in info["examples"]} == {"TP", "FP", "TN"}  # no FN here
    for example in info["examples"]:
        assert example["file"].startswith(f"{EXAMPLES_DIR}/")
        assert (tmp_path / example["file"]).read_bytes()[:8] == PNG
    assert len((tmp_path / PREDICTIONS_FILE).read_text().splitlines()) == 1 + 6


def test_write_evaluation_without_examples_or_labels(scored, tmp_path: Path) -> None:
    root, result, _ = scored
    unlabelled = [dataclasses.replace(r, label=-1) for r in result.rows if r.label == 0]
    segmentation_only = EvaluationResult({"dice": 0.5}, unlabelled, {"threshold": {"value": None}})
    write_evaluation(segmentation_only, tmp_path, root)
    assert segmentation_only.info["plots"] == {} and segmentation_only.info["examples"] == []
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / EXAMPLES_DIR).exists()


def test_read_metrics(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text(json.dumps({"auc": None, "n_slices": 3}))
    metrics = read_metrics(tmp_path)
    assert math.isnan(metrics["auc"]) and metrics["n_slices"] == 3.0
    with pytest.raises(MissingInputError, match="lungcad evaluate"):
        read_metrics(tmp_path / "missing")
