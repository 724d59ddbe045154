"""Read a CT series from a DICOM folder into a canonical-LPS :class:`~lungcad.volume.Volume`.

How a folder is read (the field's usual pitfalls in brackets):

1. Every file under the folder (recursively) is tried as DICOM with pydicom, headers only.
   Files without a DICOM preamble are skipped unless their suffix claims DICOM (``.dcm``,
   ``.dicom``, ``.ima``); hidden files (e.g. macOS ``._*``), DICOMDIR and objects without
   pixels (RTSTRUCT, SR) are skipped.
2. Image files are grouped by SeriesInstanceUID and the CT series is used; with several CT
   series the one with most slices, or the one named by ``series_uid`` [a study folder often
   holds a scout plus thin and thick reconstructions].
3. Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product
   of the ImageOrientationPatient row and column cosines) [InstanceNumber and file names lie].
4. The z spacing comes from those positions [SliceThickness is not the spacing]. Missing
   slices, duplicate positions and mixed orientations or sizes are refused; uneven spacing and
   gantry tilt are resampled to a regular orthogonal grid and reported in ``meta["warnings"]``.
5. Uncompressed pixels are decoded by pydicom, compressed ones by SimpleITK's GDCM reader
   (pydicom is its fallback), and each slice's own RescaleSlope/RescaleIntercept (checked:
   finite, slope non-zero) maps them to HU, float32.
6. A series stored as one multi-frame file (Enhanced or Legacy Converted Enhanced CT) is read
   by :mod:`lungcad.io.dicom_multiframe`, whose frames go through steps 3 and 4 unchanged;
   unsupported multi-frame variants are refused with the reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale
from pydicom.uid import MediaStorageDirectoryStorage, UncompressedTransferSyntaxes

from lungcad.errors import InputError, MissingInputError
from lungcad.io._checks import check_voxel_count
from lungcad.io._dicom_grid import stack_to_volume
from lungcad.io._sitk import sitk_error_reason
from lungcad.volume import Volume, to_canonical

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Tolerances. Positions are decimal strings in the headers, so exact equality never holds.
_DUPLICATE_MM = 0.01  # slices closer than this along the normal share one position
_MISSING_FACTOR = 1.5  # a step over 1.5x the median spacing means slices are missing
_COSINE_ATOL = 1e-4  # direction cosines of two slices agree within this


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series found in a folder (see :func:`list_dicom_series`)."""

    series_instance_uid: str
    modality: str
    n_files: int
    description: str


@dataclass
class _Header:
    """The header fields lungcad needs from one image file."""

    path: Path
    series_uid: str
    sop_instance_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    position: np.ndarray | None  # ImagePositionPatient (3,) LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient (6,) row then column cosines
    pixel_spacing: np.ndarray | None  # PixelSpacing (2,) mm: between rows, between columns
    slice_thickness: float | None
    study_uid: str
    frame_of_reference_uid: str
    patient_id: str
    description: str


def _vector(ds: pydicom.Dataset, keyword: str, length: int, path: Path) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    values = np.array([float(v) for v in items])
    if values.size != length:
        raise InputError(f"{keyword} has {values.size} values; DICOM requires {length}.", path)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{keyword} holds values that are not finite numbers.", path)
    return values


def _check_rescale(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse a RescaleSlope/RescaleIntercept that is not a finite number (slope non-zero).

    GDCM reads a malformed value as the default (1 or 0) and pydicom's fallback raises a bare
    ValueError, so a damaged header would give HU of the wrong scale or a traceback.
    """
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(keyword)
        if raw is None or raw == "":
            continue
        try:
            value = float(raw if not isinstance(raw, MultiValue) else raw[0])
        except (TypeError, ValueError):
            value = float("nan")
        if (
            isinstance(raw, MultiValue)
            or not np.isfinite(value)
            or (keyword == "RescaleSlope" and value == 0.0)
        ):
            raise InputError(
                f"{keyword} {str(raw)[:24]!r} is not a finite number"
                + (" other than 0" if default == 1.0 else "")
                + "; the pixels cannot be mapped to HU. Re-export the series.",
                path,
            )


def _read_header(path: Path) -> _Header | None:
    """Header of one file; None for files that are not DICOM images (text, DICOMDIR, RTSTRUCT)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() not in DICOM_SUFFIXES:
            log.debug("skipping %s: not a DICOM file", path)
            return None
        # Old files without the 128-byte preamble are still DICOM: read them by force.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise InputError(
                f"not a readable DICOM file ({exc}); remove it or re-export it.", path
            ) from exc
    except Exception as exc:
        raise InputError(
            f"cannot read the DICOM header ({exc}); the file is corrupt or truncated. "
            "Re-export it or remove it from the folder.",
            path,
        ) from exc
    file_meta = getattr(ds, "file_meta", None) or {}
    if str(file_meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage:
        log.debug("skipping %s: DICOMDIR", path)
        return None
    if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
        raise InputError(
            "not a valid DICOM image: the header has no SOPClassUID or SeriesInstanceUID (the "
            "file is truncated, corrupt or not DICOM). Re-export it or remove it from the folder.",
            path,
        )
    if "Rows" not in ds or "Columns" not in ds:
        log.debug("skipping %s: DICOM %s object without pixels", path, ds.get("Modality", "?"))
        return None
    try:
        _check_rescale(ds, path)
        thickness = ds.get("SliceThickness")
        return _Header(
            path=path,
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            modality=str(ds.get("Modality", "")).upper(),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            frames=int(ds.get("NumberOfFrames") or 1),
            position=_vector(ds, "ImagePositionPatient", 3, path),
            orientation=_vector(ds, "ImageOrientationPatient", 6, path),
            pixel_spacing=_vector(ds, "PixelSpacing", 2, path),
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            study_uid=str(ds.get("StudyInstanceUID", "")),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            patient_id=str(ds.get("PatientID", "")),
            description=str(ds.get("SeriesDescription", "")),
        )
    except InputError:
        raise
    except Exception as exc:  # a malformed value, e.g. a position that is not a number
        raise InputError(f"malformed DICOM header ({exc}); re-export the file.", path) from exc


def _scan(folder: Path) -> dict[str, list[_Header]]:
    """Image headers under ``folder`` grouped by SeriesInstanceUID (file-name order)."""
    if not folder.exists():
        raise MissingInputError(
            "folder not found; expected a folder holding a DICOM series.", folder
        )
    # Hidden files are never slices; macOS "._x.dcm" resource forks would look corrupt.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MissingInputError(
            "the folder is empty; expected the DICOM files of a CT series (one file per slice).",
            folder,
        )
    groups: dict[str, list[_Header]] = defaultdict(list)
    for path in files:
        header = _read_header(path)
        if header is not None:
            groups[header.series_uid].append(header)
    if not groups:
        raise MissingInputError(
            f"no DICOM image files among the {len(files)} files found (searched recursively); "
            "expected the .dcm files of a CT series.",
            folder,
        )
    return dict(groups)


def _info(uid: str, headers: list[_Header]) -> DicomSeriesInfo:
    return DicomSeriesInfo(uid, headers[0].modality or "?", len(headers), headers[0].description)


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """The image series under ``folder`` (searched recursively), in file-name order.

    Raises:
        MissingInputError: the folder does not exist or holds no DICOM image.
        InputError: a file claims to be DICOM but cannot be read.
    """
    return [_info(uid, hs) for uid, hs in _scan(Path(folder)).items()]


def _choose_series(
    folder: Path, groups: dict[str, list[_Header]], series_uid: str | None, warnings: list[str]
) -> str:
    summary = "; ".join(
        f"{i.series_instance_uid} ({i.modality}, {i.n_files} files)"
        for i in (_info(u, hs) for u, hs in groups.items())
    )
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(
                f"series_uid {series_uid} is not in this folder; image series found: {summary}.",
                folder,
            )
        chosen = series_uid
    else:
        ct = [u for u, hs in groups.items() if hs[0].modality == "CT"]
        if not ct:
            found = ", ".join(sorted({hs[0].modality or "unknown" for hs in groups.values()}))
            raise InputError(
                f"no CT series here: found modality {found} ({summary}). lungcad reads CT "
                "only (values in HU); point it at a folder holding a CT series.",
                folder,
            )
        chosen = max(ct, key=lambda u: len(groups[u]))  # ties: the first in file-name order
        if len(ct) > 1:
            message = (
                f"{len(ct)} CT series found; used {chosen} ({len(groups[chosen])} slices, the "
                f"largest). Pass series_uid to choose another: {summary}"
            )
            log.info("%s: %s", folder, message)
            warnings.append(message)
    modality = groups[chosen][0].modality
    if modality != "CT":
        raise InputError(
            f"series {chosen} has modality {modality or 'unknown'}, not CT; lungcad reads CT "
            "only (values in HU). Choose a CT series.",
            folder,
        )
    return chosen


@dataclass
class _Stack:
    """Slices sorted along the normal, with the shared in-plane geometry."""

    headers: list[_Header]
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm
    row: np.ndarray  # (3,) direction of increasing column index (image x)
    col: np.ndarray  # (3,) direction of increasing row index (image y)
    normal: np.ndarray  # (3,) row x col
    pixel_spacing: np.ndarray  # (2,) mm between rows (y), between columns (x)


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"


def _geometry(h: _Header) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(position (3,), orientation (6,), pixel_spacing (2,))`` of a slice, or InputError."""
    position, orientation, spacing = h.position, h.orientation, h.pixel_spacing
    for name, value in (
        ("ImagePositionPatient", position),
        ("ImageOrientationPatient", orientation),
        ("PixelSpacing", spacing),
    ):
        if value is None:
            raise InputError(
                f"the slice has no {name}, so it cannot be placed in space; re-export the "
                "series with its geometry.",
                h.path,
            )
    if position is None or orientation is None or spacing is None:  # narrowed for the checker
        raise AssertionError("unreachable")
    return position, orientation, spacing


def _sort_and_check(folder: Path, slices: list[_Header]) -> _Stack:
    geometry = [_geometry(h) for h in slices]
    ref = slices[0]
    _, ref_orientation, ref_spacing = geometry[0]
    for h, (_, orientation, spacing) in zip(slices[1:], geometry[1:], strict=True):
        if (h.rows, h.columns) != (ref.rows, ref.columns):
            raise InputError(
                f"inconsistent slice size in series {ref.series_uid}: {ref.path.name} is "
                f"{ref.rows}x{ref.columns} but {h.path.name} is {h.rows}x{h.columns} (rows x "
                "columns); one series must have one size. Remove the odd files.",
                folder,
            )
        if not np.allclose(orientation, ref_orientation, atol=_COSINE_ATOL):
            raise InputError(
                f"inconsistent ImageOrientationPatient in series {ref.series_uid}: "
                f"{ref.path.name} has {_fmt(ref_orientation)} but {h.path.name} has "
                f"{_fmt(orientation)}; the slices do not form one volume. Remove the odd "
                "files (e.g. a localizer).",
                folder,
            )
        if not np.allclose(spacing, ref_spacing, rtol=1e-4, atol=1e-5):
            raise InputError(
                f"inconsistent PixelSpacing: {ref.path.name} has {_fmt(ref_spacing)} but "
                f"{h.path.name} has {_fmt(spacing)} mm. Remove the odd files.",
                folder,
            )
    row, col = ref_orientation[:3].copy(), ref_orientation[3:].copy()
    unit = abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
    if not unit or abs(row @ col) > 1e-3:
        raise InputError(
            f"ImageOrientationPatient {_fmt(ref_orientation)} is not two orthogonal unit vectors.",
            ref.path,
        )
    # Gram-Schmidt removes the rounding of the decimal strings so the direction is orthonormal.
    row /= np.linalg.norm(row)
    col -= (col @ row) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    if np.any(ref_spacing <= 0):
        raise InputError(f"PixelSpacing {_fmt(ref_spacing)} must be positive (mm).", ref.path)

    positions = np.array([g[0] for g in geometry])
    order = np.argsort(positions @ normal, kind="stable")
    headers = [slices[i] for i in order]
    positions = positions[order]
    depth = positions @ normal
    steps = np.diff(depth)
    same = np.flatnonzero(steps < _DUPLICATE_MM)
    if same.size:
        i = int(same[0])
        a, b = headers[i], headers[i + 1]
        raise InputError(
            f"duplicate slice position: {a.path.name} ({_fmt(positions[i])}) and {b.path.name} "
            f"({_fmt(positions[i + 1])}) lie at the same depth {depth[i]:.3f} mm along the "
            "slice normal. The series holds a slice twice or two acquisitions; remove the "
            "duplicates.",
            folder,
        )
    if len(steps) >= 2:  # with two slices there is no reference spacing to compare against
        median = float(np.median(steps))
        gaps = np.flatnonzero(steps > _MISSING_FACTOR * median)
        if gaps.size:
            i = int(gaps[0])
            a, b = headers[i], headers[i + 1]
            raise InputError(
                f"slices missing: a gap of {steps[i]:.3f} mm between sorted slices {i} and "
                f"{i + 1} of {len(headers)} ({a.path.name} at {_fmt(positions[i])} and "
                f"{b.path.name} at {_fmt(positions[i + 1])}), where the median spacing is "
                f"{median:.3f} mm (about {round(steps[i] / median) - 1} slice(s) missing). "
                "Re-export or re-download the complete series.",
                folder,
            )
    return _Stack(headers, positions, row, col, normal, ref_spacing)


def _native_pixels(path: Path) -> np.ndarray | None:
    """HU of an uncompressed slice decoded by pydicom, or None to let GDCM decode it.

    pydicom reads no more than the file holds; GDCM, given a file whose meta header is
    damaged, was measured allocating 4 GB and taking seconds (tests/io/test_fuzz_readers.py).
    Compressed transfer syntaxes still go to GDCM, which decodes them all.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax not in UncompressedTransferSyntaxes:
            return None
        with np.errstate(over="ignore"):  # an overflow to inf is refused by the caller
            return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot decode the pixel data ({str(exc)[:120]}); the file is truncated or "
            "corrupt. Re-export it or remove it from the folder.",
            path,
        ) from exc


def _decode(path: Path) -> np.ndarray:
    """One slice's pixels in HU (float32), rescaled with that slice's own slope and intercept.

    GDCM (through SimpleITK) decodes every common transfer syntax; pydicom is the fallback for
    the rare file GDCM rejects (e.g. some tiny RLE images), so a file is refused only when
    both decoders fail.
    """
    native = _native_pixels(path)
    if native is not None:
        return native
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32, imageIO="GDCMImageIO")
        return sitk.GetArrayFromImage(image)
    except RuntimeError as gdcm_error:
        try:
            ds = pydicom.dcmread(path)
            return apply_rescale(ds.pixel_array, ds).astype(np.float32)
        except Exception as exc:
            raise InputError(
                f"cannot decode the pixel data ({exc}; GDCM: {sitk_error_reason(gdcm_error)}). "
                "The file is truncated or corrupt, or uses an unsupported transfer syntax; "
                "re-export it or remove it from the folder.",
                path,
            ) from exc


def _read_pixels(headers: list[_Header]) -> np.ndarray:
    """(n, rows, columns) float32 HU in the order of ``headers``."""
    rows, columns = headers[0].rows, headers[0].columns
    check_voxel_count((len(headers), rows, columns), headers[0].path)
    out = np.empty((len(headers), rows, columns), dtype=np.float32)
    for k, h in enumerate(headers):
        pixels = _decode(h.path)
        if pixels.size != rows * columns:
            raise InputError(
                f"pixel data holds {pixels.size} values; Rows x Columns = {rows}x{columns} "
                "expected. The file is corrupt; re-export it.",
                h.path,
            )
        if not (np.isfinite(pixels.min()) and np.isfinite(pixels.max())):
            raise InputError(
                "the rescaled pixel values are not finite (RescaleSlope/RescaleIntercept "
                "overflow); re-export the series.",
                h.path,
            )
        out[k] = pixels.reshape(rows, columns)
    return out


def read_dicom_series(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read one CT series from a DICOM folder as HU, canonical LPS.

    Args:
        path: a folder (searched recursively), or one file of the series (its folder is read
            and the file's series chosen).
        series_uid: SeriesInstanceUID to read when the folder holds several series; by default
            the CT series with most slices.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU and spacing from the slice positions (mm).
        ``meta`` holds source_path, format ("dicom"), modality, patient_id,
        study/series/frame_of_reference UIDs, series_description, warnings,
        source_orientation, ``sop_instance_uids`` and ``slice_files`` (sorted along
        ``meta["slice_axis"]``, the array axis the DICOM slices stack along: 0 for axial
        series), and ``resampled`` (True when uneven spacing or gantry tilt was resampled, so
        the lists no longer match array slices one to one).

    Raises:
        MissingInputError: the path does not exist or holds no DICOM image.
        InputError: corrupt files, no CT series, missing or duplicate slices, inconsistent
            orientation or size.
    """
    path = Path(path)
    folder = path
    if path.is_file():
        header = _read_header(path)
        if header is None:
            raise InputError("not a DICOM image file; pass a DICOM series folder.", path)
        folder, series_uid = path.parent, series_uid or header.series_uid
    groups = _scan(folder)
    warnings: list[str] = []
    uid = _choose_series(folder, groups, series_uid, warnings)
    if any(h.frames > 1 for h in groups[uid]):  # enhanced CT: one file holds every slice
        from lungcad.io.dicom_multiframe import read_multiframe_ct

        return read_multiframe_ct(folder, groups[uid], warnings)
    stack = _sort_and_check(folder, groups[uid])
    first = stack.headers[0]
    volume, grid_warnings, resampled = stack_to_volume(
        _read_pixels(stack.headers),
        stack.positions,
        stack.row,
        stack.col,
        stack.pixel_spacing,
        single_slice_spacing=first.slice_thickness or 1.0,
        source=folder,
    )
    for message in grid_warnings:
        log.warning("%s: %s", folder, message)
    volume.meta = _meta(folder, first, warnings + grid_warnings, resampled)
    canonical = to_canonical(volume)
    # Which canonical array axis the slices stack along, and whether reorientation reversed it.
    cosines = canonical.direction.T @ stack.normal  # one per index axis (x, y, z)
    axis = int(np.argmax(np.abs(cosines)))
    order = stack.headers if cosines[axis] > 0 else stack.headers[::-1]
    canonical.meta["slice_axis"] = 2 - axis  # ITK index axis (x, y, z) -> numpy axis (z, y, x)
    canonical.meta["sop_instance_uids"] = [h.sop_instance_uid for h in order]
    canonical.meta["slice_files"] = [str(h.path) for h in order]
    return canonical


def _meta(folder: Path, first: _Header, warnings: list[str], resampled: bool) -> dict[str, Any]:
    return {
        "source_path": str(folder),
        "format": "dicom",
        "modality": first.modality,
        "patient_id": first.patient_id,
        "study_instance_uid": first.study_uid,
        "series_instance_uid": first.series_uid,
        "frame_of_reference_uid": first.frame_of_reference_uid,
        "series_description": first.description,
        "warnings": warnings,
        "resampled": resampled,
    }
