"""Read NIfTI CT volumes (``.nii``, ``.nii.gz``), e.g. MSD Task06 ``imagesTr``.

SimpleITK converts NIfTI's RAS header to ITK's LPS geometry and applies ``scl_slope`` /
``scl_inter``; the values are taken as HU (NIfTI has no modality field, so CT is assumed).
"""

from __future__ import annotations

from pathlib import Path

from lungcad.io._sitk import read_sitk_volume
from lungcad.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI CT volume as HU in canonical LPS.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU, spacing (z, y, x) mm; ``meta`` holds
        source_path, format ("nifti"), warnings and source_orientation.

    Raises:
        MissingInputError: the file does not exist.
        InputError: corrupt, 4D or multi-channel files.
    """
    return read_sitk_volume(Path(path), "nifti", "NIfTI")
