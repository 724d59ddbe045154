"""Read MetaImage CT volumes: ``.mhd`` header + ``.raw`` data (LUNA16) or single-file ``.mha``.

The values are taken as HU (MetaImage has no modality field, so CT is assumed). The header is
checked before SimpleITK reads it (:func:`check_metaimage_header`): SimpleITK's parser uses
defaults after a malformed field, crashes on some, and follows ``ElementDataFile`` anywhere,
so the data file must lie beside its header. Data shorter than the header declares is
refused with a clear message (SimpleITK itself reports it only as "No such file or
directory"), and so is compressed data too small to hold the declared image.
"""

from __future__ import annotations

import math
from pathlib import Path

from lungcad.errors import InputError, MissingInputError
from lungcad.io._checks import check_voxel_count
from lungcad.io._sitk import read_sitk_volume
from lungcad.volume import Volume

METAIMAGE_SUFFIXES = (".mhd", ".mha")
#: zlib's largest expansion (deflate's limit is about 1032:1), with a margin.
_MAX_ZLIB_RATIO = 1100
#: A MetaImage header is a few hundred bytes; the fields are looked for in the first 64 KiB.
_MAX_HEADER_BYTES = 1 << 16

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
    """The ``key = value`` lines of a MetaImage header, up to ``ElementDataFile`` (the last
    field; in a ``.mha`` the binary data follows it)."""
    with header.open("rb") as fh:
        head = fh.read(_MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return fields


def _numbers(
    fields: dict[str, str], key: str, count: int, path: Path, kind: type = float
) -> list[float] | None:
    """The ``count`` numbers of a header field (None when absent), or InputError."""
    if key not in fields:
        return None
    try:
        values = [kind(v) for v in fields[key].split()]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputError(
            f"the header's {key} is {fields[key]!r}; it must hold {count} finite numbers "
            f"(one per axis of NDims = {fields.get('NDims')}). The header is damaged; re-export "
            "the image.",
            path,
        )
    return values


def check_metaimage_header(path: Path, fields: dict[str, str]) -> None:
    """Refuse a MetaImage header that SimpleITK would misread, crash on or follow elsewhere.

    SimpleITK's MetaIO parser stops at the first malformed field and silently uses defaults for
    the rest (a broken ``Offset`` line gives 1 mm spacing), crashes on a negative ``NDims``, and
    follows an ``ElementDataFile`` anywhere on the disk. So the header is checked first: NDims 2
    to 4; DimSize positive and within :data:`~lungcad.io._checks.MAX_VOXELS`; spacing finite and
    positive; origin and direction finite; a known ElementType; and a data file that lies
    beside the header (``LOCAL`` for inline data).

    Raises:
        InputError: naming the field and the problem.
    """
    value = fields.get("ElementDataFile", "")
    if value.startswith("LIST") or "%" in value:
        raise InputError(
            f"ElementDataFile = {value}: data split over several files is not supported; save "
            "the image as one .mhd + .raw pair, one .mha, or NIfTI.",
            path,
        )
    name = Path(value)
    if value != "LOCAL" and (
        not value or name.is_absolute() or len(name.parts) != 1 or value in (".", "..")
    ):
        raise InputError(
            f"ElementDataFile = {value!r}: the data file must lie beside its header, named "
            "without a folder (e.g. ct.raw); lungcad does not follow a header elsewhere.",
            path,
        )
    ndims = fields.get("NDims", "")
    if not ndims.isdigit() or not 2 <= int(ndims) <= 4:
        raise InputError(
            f"the header's NDims is {ndims!r}; lungcad reads 2D or 3D images (NDims 2 or 3). "
            "The header is damaged or not a MetaImage header.",
            path,
        )
    n = int(ndims)
    sizes = _numbers(fields, "DimSize", n, path, int)
    if sizes is None:
        raise InputError("the header has no DimSize; it is damaged. Re-export the image.", path)
    check_voxel_count([int(s) for s in sizes], path)
    for key in ("ElementSpacing", "ElementSize"):
        spacing = _numbers(fields, key, n, path)
        if spacing is not None and min(spacing) <= 0:
            raise InputError(
                f"the header's {key} {fields[key]!r} mm is not positive; the voxel size is "
                "damaged. Re-export the image.",
                path,
            )
    for key in ("Offset", "Position", "Origin", "CenterOfRotation"):
        _numbers(fields, key, n, path)
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        _numbers(fields, key, n * n, path)
    _numbers(fields, "ElementNumberOfChannels", 1, path, int)
    _numbers(fields, "HeaderSize", 1, path, int)
    if fields.get("ElementType") not in _ELEMENT_BYTES:
        raise InputError(
            f"the header's ElementType is {fields.get('ElementType')!r}; expected one of "
            f"{', '.join(_ELEMENT_BYTES)}.",
            path,
        )
    if fields.get("CompressedData", "False") not in ("True", "False"):
        raise InputError(
            f"the header's CompressedData is {fields['CompressedData']!r}; expected True or False.",
            path,
        )


def _data_file(header: Path, fields: dict[str, str]) -> Path | None:
    """The data file a ``.mhd`` header names (beside it), or None when the data is inline."""
    value = fields.get("ElementDataFile")
    if value is None or value == "LOCAL":
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


def _inline_offset(path: Path) -> int:
    """Where a ``.mha``'s inline data starts: after the ``ElementDataFile = LOCAL`` line."""
    with path.open("rb") as fh:
        head = fh.read(_MAX_HEADER_BYTES)
    line = head.find(b"ElementDataFile")
    end = head.find(b"\n", line)
    return len(head) if line < 0 or end < 0 else end + 1


def _check_data_size(path: Path, fields: dict[str, str], data: Path | None) -> None:
    """Refuse data shorter than the header declares, or compressed data that could not hold
    it (zlib expands at most about 1032-fold), before SimpleITK allocates the image."""
    stored = data.stat().st_size if data is not None else path.stat().st_size - _inline_offset(path)
    name = data.name if data is not None else "the inline data"
    if fields.get("CompressedData") == "True":
        voxels = _declared_bytes({**fields, "CompressedData": "False", "HeaderSize": "0"})
        if voxels is not None and voxels > _MAX_ZLIB_RATIO * max(stored, 1):
            raise InputError(
                f"the header declares {voxels} bytes of image data (DimSize {fields['DimSize']}, "
                f"{fields['ElementType']}), more than the {stored} compressed bytes of {name} "
                "can hold; the header or the data is damaged. Re-export the image.",
                path,
            )
        return
    expected = _declared_bytes(fields)
    if data is None and expected is not None:
        expected -= max(int(fields.get("HeaderSize", "0")), 0)  # inline: no separate header
    if expected is not None and stored < expected:
        raise InputError(
            f"truncated or corrupt MetaImage data: the header declares {expected} bytes "
            f"(DimSize {fields['DimSize']}, {fields['ElementType']}) but {name} holds "
            f"{stored}; it was cut short, e.g. by an interrupted download or copy. Download "
            "or export it again.",
            path,
        )


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
    if path.is_file():
        fields = _header_fields(path)
        check_metaimage_header(path, fields)
        data = _data_file(path, fields) if path.suffix.lower() == ".mhd" else None
        if data is not None and not data.is_file():
            raise MissingInputError(
                f"the header names the data file {data.name}, which is not there; keep the "
                f".raw/.zraw file next to the .mhd (expected {data}).",
                path,
            )
        _check_data_size(path, fields, data)
    return read_sitk_volume(path, "mhd", "MetaImage")
