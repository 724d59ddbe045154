"""Read MetaImage CT volumes: ``.mhd`` header + ``.raw`` data (LUNA16) or single-file ``.mha``.

The values are taken as HU (MetaImage has no modality field, so CT is assumed).
"""

from __future__ import annotations

from pathlib import Path

from lungcad.errors import MissingInputError
from lungcad.io._sitk import read_sitk_volume
from lungcad.volume import Volume

METAIMAGE_SUFFIXES = (".mhd", ".mha")


def _data_file(header: Path) -> Path | None:
    """The data file a ``.mhd`` header names, or None when the data is inline or a list."""
    for line in header.read_text(encoding="latin-1", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            value = value.strip()
            if value in ("LOCAL", "LIST") or "%" in value:  # inline data or a file pattern
                return None
            return header.parent / value
    return None


def read_metaimage(path: str | Path) -> Volume:
    """Read a 3D MetaImage CT volume (``.mhd`` + data file, or ``.mha``) as HU, canonical LPS.

    Args:
        path: a ``.mhd`` or ``.mha`` file.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU, spacing (z, y, x) mm; ``meta`` holds
        source_path, format ("mhd"), warnings and source_orientation.

    Raises:
        MissingInputError: the header or the data file it names does not exist.
        InputError: corrupt, 4D or multi-channel files.
    """
    path = Path(path)
    if path.suffix.lower() == ".mhd" and path.is_file():
        data = _data_file(path)
        if data is not None and not data.is_file():
            raise MissingInputError(
                f"the header names the data file {data.name}, which is not there; keep the "
                f".raw/.zraw file next to the .mhd (expected {data}).",
                path,
            )
    return read_sitk_volume(path, "mhd", "MetaImage")
