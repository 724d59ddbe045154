"""Plots of an evaluation: confusion matrix, ROC, calibration, Dice, overlays (PNG).

Figures come from :mod:`lungcad.reports.figures` (``new_figure``/``save_figure``: matplotlib's
object API on an Agg canvas, never ``pyplot``), so this works headless and inside servers.
Files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.io.atomic import atomic_path
from lungcad.reports.figures import draw_slice, new_figure, save_figure

REF_COLOUR = "#00c853"  # reference (ground-truth) contour
PRED_COLOUR = "#ff1744"  # predicted contour


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def plot_confusion(
    y_true: np.ndarray, y_pred: np.ndarray, path: str | Path, threshold: float | None = None
) -> Path:
    """Confusion matrix (counts and row percentages) of labels 0/1.

    Args:
        y_true: ``(N,)`` labels 0/1.
        y_pred: ``(N,)`` predictions 0/1.
        path: PNG to write.
        threshold: shown in the title.
    """
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=[0, 1])
    rows = cm.sum(axis=1, keepdims=True)
    fig = new_figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(cm):
        share = f"\n{100 * n / rows[i, 0]:.0f}%" if rows[i, 0] else ""
        ax.text(
            j,
            i,
            f"{n}{share}",
            ha="center",
            va="center",
            color="white" if n > cm.max() / 2 else "black",
            fontsize=12,
        )
    ax.set_xticks([0, 1], ["not cancer", "cancer"])
    ax.set_yticks([0, 1], ["not cancer", "cancer"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    title = "Confusion matrix (slices)"
    if threshold is not None:
        title += f"\nthreshold {threshold:.3f}"
    ax.set_title(title)
    return save_figure(fig, path)


def plot_roc(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    path: str | Path,
    threshold: float | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """ROC curve with the operating point at ``threshold`` and the AUC (with CI if given)."""
    from sklearn.metrics import roc_curve

    metrics = metrics or {}
    fig = new_figure(4.4, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, y_prob)
        label = f"AUC {_fmt(metrics.get('auc'))}"
        if "auc_ci_low" in metrics:
            label += f" ({_fmt(metrics['auc_ci_low'])}-{_fmt(metrics['auc_ci_high'])})"
        ax.plot(fpr, tpr, lw=2, label=label)
        if threshold is not None:
            pred = y_prob >= threshold
            sens = pred[y_true == 1].mean()
            fp_rate = pred[y_true == 0].mean()
            ax.plot([fp_rate], [sens], "o", color=PRED_COLOUR, label=f"threshold {threshold:.3f}")
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (slices)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_calibration(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    path: str | Path,
    n_bins: int = 10,
    ece: float | None = None,
) -> Path:
    """Reliability diagram (equal-width bins) above a histogram of the probabilities."""
    from sklearn.calibration import calibration_curve

    fig = new_figure(4.4, 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    frac, mean = calibration_curve(y_true, y_prob, n_bins=n_bins, strategy="uniform")
    top.plot(mean, frac, "o-", lw=2, label=f"model (ECE {_fmt(ece)})")
    top.set_ylabel("observed fraction of cancer")
    top.set_ylim(0, 1.01)
    top.set_title("Calibration (slices)")
    top.legend(loc="upper left", fontsize=8)
    bottom.hist(y_prob, bins=np.linspace(0, 1, n_bins + 1), color="grey")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("slices")
    bottom.set_xlim(0, 1)
    return save_figure(fig, path)


def plot_dice(dice: np.ndarray, path: str | Path, mean: float | None = None) -> Path:
    """Histogram of per-slice Dice (slices with a reference tumour)."""
    fig = new_figure(4.4, 3.2)
    ax = fig.add_subplot()
    ax.hist(dice, bins=np.linspace(0, 1, 21), color="#1976d2")
    if mean is not None and math.isfinite(mean):
        ax.axvline(mean, color="black", ls="--", label=f"mean {mean:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("Dice")
    ax.set_ylabel("slices")
    ax.set_title(f"Dice per tumour slice (n={len(dice)})")
    return save_figure(fig, path)


def draw_overlay(
    ax: Any, image: np.ndarray, ref: np.ndarray | None, pred: np.ndarray | None, title: str = ""
) -> None:
    """Draw a slice with the reference (green) and predicted (red) tumour contours on ``ax``.

    Args:
        ax: a matplotlib Axes.
        image: ``(H, W)`` lung-windowed slice in [0, 1].
        ref: ``(H, W)`` reference mask (or None).
        pred: ``(H, W)`` predicted mask (or None).
        title: axes title.
    """
    draw_slice(
        ax,
        image,
        [(ref, REF_COLOUR), (pred, PRED_COLOUR)],
        title=title,
        linewidth=1.2,
        interpolation="nearest",
    )


def overlay_rgb(
    image: np.ndarray, ref: np.ndarray | None, pred: np.ndarray | None, min_size: int = 256
) -> np.ndarray:
    """A slice as RGB with the reference (green) and predicted (red) mask outlines.

    Small slices are enlarged by an integer factor (nearest neighbour, so pixels stay
    pixels) to at least ``min_size`` so one-pixel outlines remain visible.

    Args:
        image: ``(H, W)`` lung-windowed slice in [0, 1].
        ref: ``(H, W)`` reference mask (or None).
        pred: ``(H, W)`` predicted mask (or None).
        min_size: smallest side of the output in pixels.

    Returns:
        ``(H * k, W * k, 3)`` uint8.
    """
    from skimage.segmentation import find_boundaries

    k = max(1, math.ceil(min_size / max(1, min(image.shape))))
    big = np.kron(np.clip(image, 0.0, 1.0), np.ones((k, k)))
    rgb = np.repeat((big * 255).astype(np.uint8)[..., None], 3, axis=2)
    for mask, colour in ((ref, REF_COLOUR), (pred, PRED_COLOUR)):
        if mask is not None and np.any(mask):
            edge = find_boundaries(
                np.kron(np.asarray(mask, bool), np.ones((k, k), bool)), mode="thick"
            )
            rgb[edge] = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return rgb


def plot_overlay(
    image: np.ndarray, ref: np.ndarray | None, pred: np.ndarray | None, path: str | Path
) -> Path:
    """One slice with mask outlines (see :func:`overlay_rgb`) as a PNG, written atomically.

    Drawn with Pillow rather than matplotlib: exact pixels, and ~50x faster per image.
    """
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay_rgb(image, ref, pred)).save(tmp, format="PNG")
    return path


def plot_examples(
    panels: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """A montage of overlays ``(image, ref, pred, title)``, ``columns`` per row."""
    n = len(panels)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = new_figure(3.0 * cols, 3.3 * rows)
    for i, (image, ref, pred, title) in enumerate(panels):
        draw_overlay(fig.add_subplot(rows, cols, i + 1), image, ref, pred, title)
    fig.suptitle("Examples (green: reference, red: prediction)", fontsize=10)
    return save_figure(fig, path)
