"""Read MetaImage CT volumes: ``.mhd`` header + ``.raw`` data (LUNA16) or single-file ``.mha``.

The values are taken as HU (MetaImage has no modality field, so CT is assumed). An
uncompressed ``.raw`` file shorter than its header declares is refused with a clear message
(SimpleITK itself reports it only as "No such file or directory").
"""

from __future__ import annotations

from pathlib import Path

from lungcad.errors import InputError, MissingInputError
from lungcad.io._sitk import read_sitk_volume
from lungcad.volume import Volume

METAIMAGE_SUFFIXES = (".mhd", ".mha")

# Bytes per value of each MetaIO ElementType (metaTypes.h, MET_ValueTypeSize).
_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _header_fields(header: Path) -> dict[str, str]:
    """The ``key = value`` lines of a ``.mhd`` header."""
    fields: dict[str, str] = {}
    for line in header.read_text(encoding="latin-1", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _data_file(header: Path, fields: dict[str, str]) -> Path | None:
    """The data file a ``.mhd`` header names, or None when the data is inline or a list."""
    value = fields.get("ElementDataFile")
    if value is None or value in ("LOCAL", "LIST") or "%" in value:  # inline data or a pattern
        return None
    return header.parent / value


def _declared_bytes(fields: dict[str, str]) -> int | None:
    """Header bytes to skip plus voxel bytes an uncompressed data file must hold, or None.

    None when the data is compressed (SimpleITK's zlib reader refuses a short stream itself)
    or the header is too unusual to tell; SimpleITK then has the last word.
    """
    if fields.get("CompressedData", "False").lower() == "true":
        return None
    try:
        n_bytes = _ELEMENT_BYTES[fields["ElementType"]]
        n_bytes *= int(fields.get("ElementNumberOfChannels", "1"))
        for size in fields["DimSize"].split():
            n_bytes *= int(size)
        skip = max(int(fields.get("HeaderSize", "0")), 0)  # -1: the data ends the file
    except (KeyError, ValueError):
        return None
    return skip + n_bytes


def read_metaimage(path: str | Path) -> Volume:
    """Read a 3D MetaImage CT volume (``.mhd`` + data file, or ``.mha``) as HU, canonical LPS.

    Args:
        path: a ``.mhd`` or ``.mha`` file.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU, spacing (z, y, x) mm; ``meta`` holds
        source_path, format ("mhd"), warnings and source_orientation.

    Raises:
        MissingInputError: the header or the data file it names does not exist.
        InputError: corrupt, truncated, NaN-containing, 4D or multi-channel files.
    """
    path = Path(path)
    if path.suffix.lower() == ".mhd" and path.is_file():
        fields = _header_fields(path)
        data = _data_file(path, fields)
        if data is not None and not data.is_file():
            raise MissingInputError(
                f"the header names the data file {data.name}, which is not there; keep the "
                f".raw/.zraw file next to the .mhd (expected {data}).",
                path,
            )
        expected = _declared_bytes(fields)
        if data is not None and expected is not None and data.stat().st_size < expected:
            raise InputError(
                f"truncated or corrupt MetaImage data: the header declares {expected} bytes "
                f"(DimSize {fields['DimSize']}, {fields['ElementType']}) but {data.name} holds "
                f"{data.stat().st_size}; it was cut short, e.g. by an interrupted download or "
                "copy. Download or export it again.",
                path,
            )
    return read_sitk_volume(path, "mhd", "MetaImage")
