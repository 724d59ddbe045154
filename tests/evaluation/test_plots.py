"""lungcad.evaluation.plots: every figure is written as a PNG, including the degenerate cases
(one class, no masks), and overlays keep exact pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lungcad.evaluation.plots import (
    PRED_COLOUR,
    REF_COLOUR,
    overlay_rgb,
    plot_calibration,
    plot_confusion,
    plot_dice,
    plot_examples,
    plot_overlay,
    plot_roc,
)

PNG = b"\x89PNG\r\n\x1a\n"
Y = np.array([0, 0, 1, 1, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_classification_plots(tmp_path: Path) -> None:
    assert _png(plot_confusion(Y, (P >= 0.5).astype(int), tmp_path / "cm.png", threshold=0.5))
    metrics = {"auc": 0.9, "auc_ci_low": 0.7, "auc_ci_high": 1.0}
    assert _png(plot_roc(Y, P, tmp_path / "roc.png", threshold=0.5, metrics=metrics))
    assert _png(plot_calibration(Y, P, tmp_path / "cal.png", ece=0.1))
    # One class only: the ROC is undefined but the figure still says so.
    assert _png(plot_roc(np.zeros(3, int), P[:3], tmp_path / "roc1.png"))
    assert _png(plot_dice(np.array([0.2, 0.8, 0.9]), tmp_path / "dice.png", mean=0.63))


def test_overlay_rgb_marks_reference_and_prediction() -> None:
    image = np.full((8, 8), 0.5)
    ref = np.zeros((8, 8), bool)
    ref[2:5, 2:5] = True
    rgb = overlay_rgb(image, ref, None, min_size=32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8  # enlarged 4x, pixels kept
    green = [int(REF_COLOUR[i : i + 2], 16) for i in (1, 3, 5)]
    assert (rgb == green).all(axis=2).any() and (rgb[0, 0] == [127, 127, 127]).all()
    red = [int(PRED_COLOUR[i : i + 2], 16) for i in (1, 3, 5)]
    assert not (overlay_rgb(image, ref, np.zeros((8, 8)), min_size=8) == red).all(axis=2).any()


def test_overlay_file_and_montage(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((20, 30))
    mask = image > 0.7
    out = plot_overlay(image, mask, mask, tmp_path / "sub" / "o.png")
    assert Image.open(out).size == (390, 260)  # smallest side enlarged to >= 256
    panels = [(image, mask, None, "a"), (image, None, mask, "b"), (image, None, None, "c")]
    assert _png(plot_examples(panels, tmp_path / "m.png", columns=2))
