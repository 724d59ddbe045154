"""Checks every reader shares: a bounded image size before allocating, a valid Volume after.

Not part of the public API: :func:`lungcad.io.read_image` applies :func:`check_volume` to what
every format reader returns, and the readers call :func:`check_voxel_count` on the size a
header declares before any pixel buffer is allocated, so a damaged header cannot make a
reader ask for terabytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungcad.errors import InputError
from lungcad.volume import Volume

#: Largest image a reader accepts (voxels): 2^30, a 4 GiB float32 array, e.g. 4000 slices of
#: 512x512. Whole-body CT of 0.5 mm slices is under a third of it.
MAX_VOXELS = 1 << 30


def check_voxel_count(shape: Sequence[int], path: str | Path) -> None:
    """Refuse a declared image size with a non-positive axis or more than :data:`MAX_VOXELS`.

    Args:
        shape: the axis lengths the header declares (any order).
        path: the file, named in the error.
    """
    if any(int(n) < 1 for n in shape):
        raise InputError(f"the header declares an empty image of size {tuple(shape)}.", path)
    count = math.prod(int(n) for n in shape)
    if count > MAX_VOXELS:
        raise InputError(
            f"the header declares {count:,} voxels (size {tuple(int(n) for n in shape)}), more "
            f"than the {MAX_VOXELS:,} lungcad reads; the header is damaged, or the image is "
            "not one CT series. Re-export it.",
            path,
        )


def check_volume(volume: Volume, path: str | Path) -> Volume:
    """Refuse a Volume whose geometry or values are not finite; return it unchanged.

    Args:
        volume: what a format reader returned.
        path: the file or folder it came from, named in the error.

    Raises:
        InputError: spacing not finite and positive, origin or direction not finite, an empty
            axis, or NaN/infinite voxel values.
    """
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise InputError(
            f"voxel spacing (z, y, x) {tuple(float(s) for s in spacing)} mm is not finite and "
            "positive; the header's geometry is damaged. Re-export the image.",
            path,
        )
    if not (np.all(np.isfinite(volume.origin)) and np.all(np.isfinite(volume.direction))):
        raise InputError(
            "the image origin or orientation is not finite; the header's geometry is damaged. "
            "Re-export the image.",
            path,
        )
    if min(volume.array.shape) < 1:
        raise InputError(f"empty image of shape {volume.array.shape} (z, y, x).", path)
    # min/max propagate NaN and show inf, without a boolean copy of the volume.
    if not (np.isfinite(volume.array.min()) and np.isfinite(volume.array.max())):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        raise InputError(
            f"{bad} of {volume.array.size} voxels are NaN or infinite; the file is corrupt. "
            "Re-export it from the original scan.",
            path,
        )
    return volume
