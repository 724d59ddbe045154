"""PNG figures of slices with overlays (lung masks, tumour masks, heat maps).

One place for the figure plumbing and the overlay drawing every command uses, so previews
look the same in the demo, evaluations, gap plots and reports. Figures are built with
matplotlib's object API (``matplotlib.figure.Figure`` on an Agg canvas), never ``pyplot``: no
global backend or figure state is touched, so this works headless, in threads and inside
servers. Matplotlib is imported on first use; files are written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lungcad.io.atomic import atomic_path

#: Default resolution of figures (dots per inch).
DPI = 110
#: Matplotlib layout engines :func:`new_figure` accepts.
Layout = Literal["constrained", "compressed", "tight"]


def new_figure(
    width: float, height: float, *, dpi: float = DPI, layout: Layout = "constrained"
) -> Any:
    """A matplotlib Figure on an Agg canvas, detached from pyplot.

    Args:
        width, height: size in inches.
        dpi: resolution (pixels = inches * dpi).
        layout: matplotlib layout engine (``"constrained"`` or ``"tight"``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write the figure as PNG, atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(figure_bytes(fig))
    return path


def draw_slice(
    ax: Any,
    image: np.ndarray,
    contours: Sequence[tuple[np.ndarray | None, str]] = (),
    *,
    heatmap: np.ndarray | None = None,
    title: str | None = None,
    linewidth: float = 1.0,
    interpolation: str | None = None,
) -> None:
    """Draw a greyscale slice with optional heat map and mask contours on ``ax``.

    Args:
        ax: a matplotlib Axes.
        image: ``(H, W)`` lung-windowed slice in [0, 1].
        contours: ``(mask, colour)`` pairs; each non-empty, non-full binary ``(H, W)`` mask
            is outlined at 0.5 in its colour (None masks are skipped).
        heatmap: ``(H, W)`` map in [0, 1] drawn semi-transparent ("jet"), or None.
        title: axes title (small font), or None.
        linewidth: contour line width.
        interpolation: ``imshow`` interpolation of the slice (None: matplotlib's default).
    """
    ax.imshow(np.asarray(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation=interpolation)
    if heatmap is not None:
        ax.imshow(np.asarray(heatmap), cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0)
    for mask, colour in contours:
        # A constant mask has no 0.5 level: nothing to outline (and matplotlib would warn).
        if mask is not None and np.any(mask) and not np.all(mask):
            ax.contour(
                np.asarray(mask, dtype=float), levels=[0.5], colors=[colour], linewidths=linewidth
            )
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def overlay_montage(
    images: Sequence[np.ndarray],
    path: str | Path,
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    heatmaps: Sequence[np.ndarray | None] | None = None,
    titles: Sequence[str] | None = None,
    mask_colour: str = "red",
    columns: int = 4,
    tile_inches: float = 3.0,
) -> Path:
    """Save a grid of greyscale slices with optional mask contours and heat maps as PNG.

    Args:
        images: 2D arrays ``(H, W)`` in [0, 1] (windowed intensity).
        path: output PNG (written atomically).
        masks: per image a binary ``(H, W)`` mask drawn as a contour, or None.
        heatmaps: per image an ``(H, W)`` map in [0, 1] drawn semi-transparent, or None.
        titles: per image a caption.
        mask_colour: matplotlib colour of the contours.
        columns: tiles per row.
        tile_inches: size of one tile.

    Returns:
        The PNG path.
    """
    n = len(images)
    if n == 0:
        raise ValueError("overlay_montage needs at least one image")
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig = new_figure(cols * tile_inches, rows * tile_inches, dpi=100, layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        draw_slice(
            ax,
            images[i],
            [(None if masks is None else masks[i], mask_colour)],
            heatmap=None if heatmaps is None else heatmaps[i],
            title=None if titles is None else titles[i],
        )
    return save_figure(fig, path)
