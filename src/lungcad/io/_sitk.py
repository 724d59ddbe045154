"""Shared reader for the single-file formats SimpleITK handles (NIfTI, MetaImage).

Not part of the public API: use :func:`lungcad.io.read_image`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungcad.errors import InputError, MissingInputError
from lungcad.io._checks import check_voxel_count
from lungcad.volume import Volume, to_canonical

_COMPLEX_TYPES = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def sitk_error_reason(exc: RuntimeError) -> str:
    """The last informative line of a SimpleITK exception (its first lines are C++ file paths)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def nonfinite_error(n_bad: int, n_voxels: int, path: Path) -> InputError:
    """The error for a volume with ``n_bad`` NaN or infinite voxels out of ``n_voxels``."""
    return InputError(
        f"{n_bad} of {n_voxels} voxels are NaN or infinite; a CT volume holds a finite HU "
        "value in every voxel, so the file is corrupt or was written from a failed "
        "computation. Re-export it from the original scan.",
        path,
    )


def read_sitk_volume(path: Path, format_name: str, kind: str) -> Volume:
    """Read a 2D/3D single-channel file as a canonical-LPS HU Volume.

    Args:
        path: the file.
        format_name: value for ``meta["format"]`` ("nifti" or "mhd").
        kind: human name of the format for messages ("NIfTI", "MetaImage").

    Returns:
        Volume, ``array`` (z, y, x) float32 assumed HU (CT), canonical LPS; ``meta`` holds
        source_path, format, warnings and source_orientation.

    Raises:
        MissingInputError: the file does not exist.
        InputError: unreadable, 4D, multi-channel or complex-valued files, or voxels that are
            NaN or infinite (a corrupt file).
    """
    if not path.is_file():
        raise MissingInputError(f"{kind} file not found.", path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only: refuse a huge size before reading
        check_voxel_count([*reader.GetSize(), reader.GetNumberOfComponents()], path)
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"cannot read this {kind} file ({sitk_error_reason(exc)}); it is corrupt, truncated "
            f"or not {kind}. Re-export it.",
            path,
        ) from exc
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]  # a 3D volume stored with a trailing length-1 time axis
    if image.GetDimension() not in (2, 3):
        raise InputError(
            f"{image.GetDimension()}D image of size {size} (x, y, z, t); expected one 3D CT "
            "volume. Split it and pass a single 3D volume (e.g. one time point).",
            path,
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"multi-channel image with {image.GetNumberOfComponentsPerPixel()} components per "
            "voxel; expected one CT value (HU) per voxel. Save a single channel.",
            path,
        )
    if image.GetPixelID() in _COMPLEX_TYPES:
        raise InputError("complex-valued image; expected real CT values in HU.", path)
    if 0 in image.GetSize():
        raise InputError(f"empty image of size {image.GetSize()}.", path)
    volume = Volume.from_sitk(image, intensity="hu", meta={"source_path": str(path)})
    warnings: list[str] = []
    low, high = float(volume.array.min()), float(volume.array.max())
    if not (np.isfinite(low) and np.isfinite(high)):  # min/max propagate NaN and show inf
        raise nonfinite_error(
            int(np.count_nonzero(~np.isfinite(volume.array))), volume.array.size, path
        )
    if low >= 0.0 and high <= 1.0:
        warnings.append(
            f"values lie in [{low:g}, {high:g}]: this looks like a windowed image or a mask, "
            "not CT in HU; lungcad treats it as HU."
        )
    volume.meta.update({"format": format_name, "warnings": warnings})
    return to_canonical(volume)
