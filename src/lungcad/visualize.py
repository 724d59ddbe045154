"""PNG figures of slices with overlays (lung masks, tumour masks, heat maps).

One place for the overlay drawing every command uses, so previews look the same in the demo,
``predict`` and reports. Matplotlib runs headless (Agg) and is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungcad.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    n = len(images)
    if n == 0:
        raise ValueError("overlay_montage needs at least one image")
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * tile_inches, rows * tile_inches),
                             squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(np.asarray(images[i]), cmap="gray", vmin=0.0, vmax=1.0)
        if heatmaps is not None and heatmaps[i] is not None:
            ax.imshow(np.asarray(heatmaps[i]), cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0)
        if masks is not None and masks[i] is not None and np.any(masks[i]):
            ax.contour(np.asarray(masks[i]).astype(float), levels=[0.5], colors=mask_colour,
                       linewidths=1.0)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
