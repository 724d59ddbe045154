"""lungcad.reports.figures: detached Agg figures, PNG bytes and files, slice overlays."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungcad.reports.figures import (
    DPI,
    draw_slice,
    figure_bytes,
    new_figure,
    overlay_montage,
    save_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _disc(size: int = 32, radius: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2


def test_new_figure_is_detached_from_pyplot_and_sized_in_inches() -> None:
    fig = new_figure(2.0, 1.0)
    assert fig.dpi == DPI and tuple(fig.get_size_inches()) == (2.0, 1.0)
    image = Image.open(io.BytesIO(figure_bytes(fig)))
    assert image.size == (2 * DPI, DPI)
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # pyplot's global figure list is untouched


def test_save_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    out = save_figure(new_figure(1.0, 1.0, dpi=50), tmp_path / "sub" / "f.png")
    assert out == tmp_path / "sub" / "f.png" and out.read_bytes()[:8] == PNG
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]  # no temporary file left


def test_draw_slice_outlines_masks_and_skips_constant_ones() -> None:
    fig = new_figure(2.0, 2.0)
    ax = fig.subplots()
    image = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant mask would make contour() warn
        draw_slice(
            ax,
            image,
            [
                (_disc(), "lime"),
                (np.zeros((32, 32)), "red"),
                (np.ones((32, 32)), "red"),
                (None, "b"),
            ],
            heatmap=image,
            title="t",
        )
    assert len(ax.images) == 2  # the slice and the heat map
    assert len(ax.collections) == 1  # one contour: the empty, full and None masks are skipped
    assert ax.get_title() == "t" and not ax.axison


def test_overlay_montage_grid_and_empty_input(tmp_path: Path) -> None:
    images = [np.full((32, 32), v) for v in (0.2, 0.5, 0.8)]
    out = overlay_montage(
        images,
        tmp_path / "m.png",
        masks=[_disc(), None, _disc(radius=3)],
        heatmaps=[None, images[1], None],
        titles=["a", "b", "c"],
        columns=2,
        tile_inches=1.0,
    )
    width, height = Image.open(out).size
    assert (width, height) == (200, 200)  # 2 x 2 tiles of 1 inch at 100 dpi
    with pytest.raises(ValueError, match="at least one image"):
        overlay_montage([], tmp_path / "none.png")
