"""Read NIfTI CT volumes (``.nii``, ``.nii.gz``), e.g. MSD Task06 ``imagesTr``.

SimpleITK converts NIfTI's RAS header to ITK's LPS geometry and applies ``scl_slope`` /
``scl_inter``; the values are taken as HU (NIfTI has no modality field, so CT is assumed).

SimpleITK also replaces a zero or NaN voxel size by 1 mm and ignores an infinite value
scale, so the header's geometry and scaling are checked first (:func:`check_nifti_header`).

SimpleITK's NIfTI reader hides two kinds of damage: it zero-fills the voxels missing from a
truncated file and reads NaN voxels as 0. So the data is checked first against the header
(read cheaply with nibabel): the file size for ``.nii``; the whole gzip stream for ``.nii.gz``
(a stream cut short ends without its end-of-stream marker); and float data for NaN/inf,
streamed in chunks so the check never holds a second copy of the volume.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lungcad.errors import InputError
from lungcad.io._checks import check_voxel_count
from lungcad.io._sitk import nonfinite_error, read_sitk_volume
from lungcad.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK = 1 << 24  # bytes read at a time when streaming the data


@dataclass(frozen=True)
class _Layout:
    """Where the voxels of a NIfTI file lie: byte offset, on-disk dtype and voxel count."""

    offset: int
    dtype: np.dtype
    n_voxels: int

    @property
    def end(self) -> int:
        return self.offset + self.n_voxels * self.dtype.itemsize


def _layout(path: Path) -> _Layout | None:
    """The data layout the header declares, or None if nibabel cannot read the header."""
    import nibabel as nib

    try:
        # A lazy proxy: only the header is read (also for .nii.gz). Its offset is the one in
        # the file (the image's .header is a copy whose vox_offset is reset to 0).
        proxy = nib.load(path).dataobj  # type: ignore[attr-defined]
        return _Layout(int(proxy.offset), np.dtype(proxy.dtype), int(np.prod(proxy.shape)))
    except Exception:  # nibabel raises many types; SimpleITK then reports the damaged file
        return None


class _ByteStream(Protocol):
    """A binary stream: a plain file or a gzip file."""

    def read(self, size: int = -1, /) -> bytes: ...


def _count_nonfinite(stream: _ByteStream, layout: _Layout) -> tuple[int, int]:
    """Read ``stream`` to its end; return (bytes read, NaN/inf voxels among the data)."""
    total, n_bad, pending = 0, 0, b""
    size = layout.dtype.itemsize
    while chunk := stream.read(_CHUNK):
        start, total = total, total + len(chunk)
        # The part of this chunk that lies inside the voxel data, whole voxels only.
        data = pending + chunk[max(layout.offset - start, 0) : max(layout.end - start, 0)]
        whole = len(data) - len(data) % size
        n_bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:whole], layout.dtype))))
        pending = data[whole:]
    return total, n_bad


def _scan(path: Path, layout: _Layout | None) -> tuple[int, int]:
    """Bytes of NIfTI data in ``path`` (decompressed for .gz) and its NaN/inf voxel count.

    Raises:
        InputError: the gzip stream ends early or is damaged.
    """
    gz = path.name.lower().endswith(".gz")
    float_layout = layout if layout is not None and layout.dtype.kind == "f" else None
    if not gz and float_layout is None:
        return path.stat().st_size, 0
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as stream:
            if float_layout is not None:
                return _count_nonfinite(stream, float_layout)
            total = 0
            while chunk := stream.read(_CHUNK):  # to the end: also verifies the gzip CRC
                total += len(chunk)
            return total, 0
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise InputError(
            f"truncated or corrupt NIfTI: the gzip stream is damaged ({exc}); the file was cut "
            "short, e.g. by an interrupted download or copy. Download or export it again.",
            path,
        ) from exc


def check_nifti_data(path: str | Path) -> None:
    """Refuse a NIfTI file whose data is shorter than its header declares or holds NaN/inf.

    Reads the whole (decompressed) file once for ``.nii.gz`` or float data; an integer
    ``.nii`` costs only its header.

    Args:
        path: an existing ``.nii`` or ``.nii.gz`` file.

    Raises:
        InputError: the file is truncated, its gzip stream is corrupt, or voxels are NaN/inf.
    """
    path = Path(path)
    layout = _layout(path)
    stored, n_bad = _scan(path, layout)
    if layout is not None and stored < layout.end:
        unpacked = " (decompressed)" if path.name.lower().endswith(".gz") else ""
        raise InputError(
            f"truncated or corrupt NIfTI: the header declares {layout.end} bytes (header + "
            f"voxels) but the file holds {stored}{unpacked}; it was cut short, e.g. by an "
            "interrupted download or copy. Download or export it again.",
            path,
        )
    if n_bad and layout is not None:  # NaN/inf are only counted when the layout is known
        raise nonfinite_error(n_bad, layout.n_voxels, path)


def check_nifti_header(path: str | Path) -> None:
    """Refuse a NIfTI header whose geometry or scaling SimpleITK would silently replace.

    SimpleITK sets a zero or NaN ``pixdim`` to 1 mm (only printing a note on stderr) and
    ignores an infinite ``scl_slope``, so such a file would be read with a made-up voxel size
    or unscaled values. Checked: ``dim`` (1 to 7 axes, each >= 1, at most
    :data:`~lungcad.io._checks.MAX_VOXELS` voxels), the spatial ``pixdim`` (finite, non-zero),
    ``scl_slope``/``scl_inter`` (a slope of 0 or NaN means "no scaling", as the standard and
    nibabel have it; otherwise both finite), and the qform/sform parameters when their code
    says they are used.

    Args:
        path: an existing ``.nii`` or ``.nii.gz`` file.

    Raises:
        InputError: naming the header field and the problem.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    path = Path(path)
    try:
        # The header as stored (nib.load rebuilds it from the affine, or refuses some damage).
        with ImageOpener(str(path)) as stream:
            size = stream.read(4)
            stream.seek(0)
            nifti2 = 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big"))
            header_class = nib.Nifti2Header if nifti2 else nib.Nifti1Header
            header = header_class.from_fileobj(stream, check=False)
        dim = [int(d) for d in header["dim"]]
        pixdim = [float(p) for p in header["pixdim"]]
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
        quatern = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        quatern += [float(header[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
        srow = [float(v) for k in ("srow_x", "srow_y", "srow_z") for v in header[k]]
        qform, sform = int(header["qform_code"]), int(header["sform_code"])
    except Exception:  # nibabel raises many types; SimpleITK then reports the damaged file
        return
    n = dim[0]
    if not 1 <= n <= 7:
        raise InputError(f"the header's dim[0] is {n}; a NIfTI image has 1 to 7 axes.", path)
    check_voxel_count(dim[1 : n + 1], path)
    spatial = pixdim[1 : min(n, 3) + 1]
    if not all(np.isfinite(p) and p != 0 for p in spatial):
        raise InputError(
            f"the header's voxel size (pixdim) {tuple(spatial)} mm is zero or not finite; "
            "the file's geometry is damaged (a reader would silently assume 1 mm). Re-export it.",
            path,
        )
    scaled = np.isfinite(slope) and slope != 0
    if np.isinf(slope) or (scaled and not np.isfinite(inter)):
        raise InputError(
            f"the header's value scaling (scl_slope {slope:g}, scl_inter {inter:g}) is not "
            "finite, so the voxels cannot be mapped to HU. Re-export the file.",
            path,
        )
    if (qform > 0 and not np.all(np.isfinite(quatern))) or (
        sform > 0 and not np.all(np.isfinite(srow))
    ):
        raise InputError(
            "the header's orientation (qform/sform) holds values that are not finite; the "
            "file's geometry is damaged. Re-export it.",
            path,
        )


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI CT volume as HU in canonical LPS.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU, spacing (z, y, x) mm; ``meta`` holds
        source_path, format ("nifti"), warnings and source_orientation.

    Raises:
        MissingInputError: the file does not exist.
        InputError: corrupt, truncated, NaN-containing, 4D or multi-channel files.
    """
    path = Path(path)
    if path.is_file():
        check_nifti_header(path)
        check_nifti_data(path)
    return read_sitk_volume(path, "nifti", "NIfTI")
