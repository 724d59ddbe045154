"""What ``prepare`` found about patient groups, written so a user can check it.

* ``groups.csv``: one row per group: its files' range in scan order, size, label and split;
* ``group_boundaries.png``: a contact sheet with, for every boundary between neighbouring
  groups of a scan-ordered folder, the last image before it and the first image after it, and
  the similarity that decided the cut. A pair that shows one patient on both sides is a wrong
  cut (raise ``min_similarity`` less, or widen ``window``); a group that hides two patients
  is harmless for honesty (it only makes the split coarser).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lungcad.data.manifest import SliceRecord

GROUPS_FILE = "groups.csv"
BOUNDARY_SHEET = "group_boundaries.png"
#: Thumbnail side (pixels) and boundary pairs per row on the contact sheet.
_TILE, _PAIRS_PER_ROW = 96, 6
_LABEL_HEIGHT = 14


def write_group_table(records: Sequence[SliceRecord], dropped: Sequence[SliceRecord], path: Path):
    """Write ``groups.csv``: group, first/last file number, slices kept and left out, label, split.

    Args:
        records: the records kept in the manifest.
        dropped: records left out at split boundaries (:func:`purge_split_boundaries`).
        path: the CSV file to write.
    """
    rows: dict[str, dict] = {}
    for r, kept in [(r, True) for r in records] + [(r, False) for r in dropped]:
        row = rows.setdefault(
            r.group_id,
            {
                "group_id": r.group_id,
                "first": r.slice_index,
                "last": r.slice_index,
                "slices": 0,
                "left_out": 0,
                "label": r.label,
                "split": r.split,
            },
        )
        row["first"], row["last"] = (
            min(row["first"], r.slice_index),
            max(row["last"], r.slice_index),
        )
        row["slices" if kept else "left_out"] += 1
        row["label"] = max(row["label"], r.label)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(next(iter(rows.values())).keys()) if rows else ["group_id"]
    )
    writer.writeheader()
    for group in sorted(rows, key=lambda g: (rows[g]["first"], g)):
        writer.writerow(rows[group])
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _tile(image: np.ndarray) -> Image.Image:
    """An 8-bit square tile of a [0, 1] image, aspect kept (padded with black)."""
    pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    pil.thumbnail((_TILE, _TILE))
    tile = Image.new("L", (_TILE, _TILE))
    tile.paste(pil, ((_TILE - pil.width) // 2, (_TILE - pil.height) // 2))
    return tile


def write_boundary_sheet(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], path: Path
) -> Path | None:
    """Write the contact sheet of group boundaries.

    Args:
        pairs: per boundary, ``(last image before, first image after, caption)``; images are
            ``(H, W)`` in [0, 1].
        path: the PNG file to write.

    Returns:
        ``path``, or None when there is no boundary (nothing is written).
    """
    if not pairs:
        return None
    cell_w, cell_h = 2 * _TILE + 8, _TILE + _LABEL_HEIGHT + 6
    rows = (len(pairs) + _PAIRS_PER_ROW - 1) // _PAIRS_PER_ROW
    sheet = Image.new("L", (_PAIRS_PER_ROW * cell_w, rows * cell_h), color=64)
    draw = ImageDraw.Draw(sheet)
    for k, (before, after, caption) in enumerate(pairs):
        x, y = (k % _PAIRS_PER_ROW) * cell_w, (k // _PAIRS_PER_ROW) * cell_h
        sheet.paste(_tile(before), (x, y))
        sheet.paste(_tile(after), (x + _TILE + 2, y))
        draw.text((x + 2, y + _TILE + 2), caption[:40], fill=255)
    sheet.save(path, format="PNG")
    return path
