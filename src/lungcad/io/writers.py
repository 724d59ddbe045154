"""Write volumes and masks as NIfTI or MetaImage, in the geometry of the input they came from.

Volumes are written in ``meta["source_orientation"]`` (the orientation their file had before
:func:`~lungcad.volume.to_canonical`), so a result opens in a viewer exactly on top of its
input. Writes are atomic: a failure leaves the old file or none, never half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungcad.errors import InputError
from lungcad.io.atomic import atomic_path
from lungcad.volume import Volume, to_source_orientation

WRITE_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    suffix = next((s for s in WRITE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InputError(
            f"cannot write {path.suffix or 'a file without suffix'!r}; choose one of "
            f"{', '.join(WRITE_SUFFIXES)}.",
            path,
        )
    return suffix


def _write(image: sitk.Image, path: Path) -> Path:
    suffix = _suffix(path)
    if suffix != ".mhd":
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp))
        return path
    # A .mhd header names its data file, so both are written under their final names in a
    # temporary folder beside the destination, then moved in: data first, header last, so the
    # header never points at a missing or partial data file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        header = Path(tmp) / path.name
        sitk.WriteImage(image, str(header))
        os.replace(header.with_suffix(".raw"), path.with_suffix(".raw"))
        os.replace(header, path)
    return path


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write a volume (float32 values, HU or windowed) in its source orientation.

    Args:
        volume: any Volume; ``meta["source_orientation"]``, when present, sets the file's axes.
        path: destination ending in .nii, .nii.gz, .mhd (+ .raw beside it) or .mha.

    Returns:
        ``path`` as a Path. Reading it back with :func:`lungcad.io.read_image` gives the same
        array and geometry.

    Raises:
        InputError: unsupported suffix.
    """
    path = Path(path)
    _suffix(path)
    source = to_source_orientation(volume)
    return _write(source.with_array(source.array.astype(np.float32, copy=False)).to_sitk(), path)


def write_mask(mask_volume: Volume, path: str | Path) -> Path:
    """Write a label mask as uint8 in its source orientation.

    Args:
        mask_volume: Volume whose ``array`` (z, y, x) holds integer labels 0..255 (e.g. 0/1).
        path: destination ending in .nii, .nii.gz, .mhd or .mha.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: unsupported suffix, or values that are not integers in 0..255
            (probabilities must be thresholded first).
    """
    path = Path(path)
    _suffix(path)
    values = mask_volume.array
    if values.size and (
        values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values))
    ):
        raise InputError(
            f"a mask must hold integer labels 0..255; got values {values.min():g}..{values.max():g}"
            ". Threshold probabilities first (e.g. probability >= 0.5).",
            path,
        )
    source = to_source_orientation(mask_volume)
    return _write(source.with_array(source.array.astype(np.uint8)).to_sitk(), path)
