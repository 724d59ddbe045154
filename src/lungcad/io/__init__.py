"""Reading and writing CT images; everything comes back as a canonical-LPS Volume.

``read_image(path)`` dispatches on what ``path`` is: a folder (or a ``.dcm`` file) is a DICOM
series, ``.nii``/``.nii.gz`` NIfTI, ``.mhd``/``.mha`` MetaImage, and ``.png``/``.jpg``/
``.jpeg``/``.bmp``/``.tif``/``.tiff`` a 2D windowed slice. Format modules are imported on first
use so that ``import lungcad.io`` (e.g. for :mod:`lungcad.io.atomic`) stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lungcad.errors import InputError, MissingInputError

if TYPE_CHECKING:
    from lungcad.volume import Volume

__all__ = [
    "SUPPORTED_SUFFIXES",
    "read_image",
]

_DICOM = (".dcm", ".dicom", ".ima")
_NIFTI = (".nii", ".nii.gz")
_METAIMAGE = (".mhd", ".mha")
_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUPPORTED_SUFFIXES = _DICOM + _NIFTI + _METAIMAGE + _IMAGES


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume or a 2D slice image as a canonical-LPS Volume.

    Args:
        path: a DICOM series folder (searched recursively) or one of its files, or a
            .nii/.nii.gz, .mhd/.mha, .png/.jpg/.jpeg/.bmp/.tif/.tiff file.
        series_uid: for DICOM only, the SeriesInstanceUID to read when a folder holds several.

    Returns:
        Volume with ``array`` (z, y, x) float32: HU for DICOM/NIfTI/MetaImage, windowed [0, 1]
        with shape (1, H, W) for 2D images. Spacing (z, y, x) mm; ``meta`` as described in the
        format readers (always source_path, format, warnings, source_orientation).

    Raises:
        MissingInputError: the path does not exist, or a folder holds no DICOM image.
        InputError: unknown suffix, or an unreadable or unusable file (the message names it).
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            "not found; expected a DICOM series folder or a file ending in "
            f"{', '.join(SUPPORTED_SUFFIXES)}.",
            path,
        )
    suffix = _suffix(path)
    if path.is_dir() or suffix in _DICOM:
        from lungcad.io.dicom import read_dicom_series

        volume = read_dicom_series(path, series_uid=series_uid)
    elif series_uid is not None:
        raise InputError("series_uid applies only to DICOM input (a series folder).", path)
    elif suffix in _NIFTI:
        from lungcad.io.nifti import read_nifti

        volume = read_nifti(path)
    elif suffix in _METAIMAGE:
        from lungcad.io.mhd import read_metaimage

        volume = read_metaimage(path)
    elif suffix in _IMAGES:
        from lungcad.io.images import read_slice_volume

        volume = read_slice_volume(path)
    else:
        raise _unknown_type(path, suffix)
    from lungcad.io._checks import check_volume

    # Whatever a format reader let through, no damaged geometry or value goes further.
    return check_volume(volume, path)


def _unknown_type(path: Path, suffix: str) -> InputError:
    return InputError(
        f"unknown file type {suffix or '(no suffix)'!r}; lungcad reads a DICOM series folder or "
        f"files ending in {', '.join(SUPPORTED_SUFFIXES)}. Convert the image to NIfTI, or pass "
        "the folder of its DICOM series.",
        path,
    )
