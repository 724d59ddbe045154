"""Read an enhanced (multi-frame) CT file into a canonical-LPS :class:`~lungcad.volume.Volume`.

An Enhanced CT Image (SOP class 1.2.840.10008.5.1.4.1.1.2.1) or a Legacy Converted Enhanced
CT Image (1.2.840.10008.5.1.4.1.1.2.2) holds a whole series in one file: every frame's
geometry and rescale live in functional-group macros (Plane Position, Plane Orientation, Pixel
Measures, Pixel Value Transformation), per frame or shared by all. :func:`read_multiframe_ct`
turns each frame into the same per-slice header a classic series has, so the frames go
through exactly the checks of :mod:`lungcad.io.dicom` (sorting along the normal, duplicate
positions, missing slices, mixed orientation or pixel spacing) and onto the same grid
(uneven spacing and gantry tilt resampled and reported).

Variants lungcad does not read are refused with the reason: another multi-frame SOP class,
a series split over several files (concatenations), several stacks or temporal positions in
one file (a 4D or multi-stack acquisition), colour frames, or pixel data that cannot be
decoded. :func:`lungcad.io.dicom.read_dicom_series` dispatches here when the chosen series
is multi-frame.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import UID

from lungcad.errors import InputError
from lungcad.io._dicom_grid import stack_to_volume
from lungcad.io.dicom import _Header, _meta, _sort_and_check
from lungcad.volume import Volume, to_canonical

__all__ = ["ENHANCED_CT_SOP_CLASSES", "read_multiframe_ct"]

#: Multi-frame CT SOP classes whose frames carry the geometry in functional groups.
ENHANCED_CT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)


def _group_item(ds: pydicom.Dataset, frame: pydicom.Dataset | None, keyword: str) -> Any:
    """The first item of functional group ``keyword`` for one frame: per-frame wins over shared
    (PS3.3 C.7.6.16: a macro is in one of the two)."""
    for holder in (frame, _shared(ds)):
        if holder is not None and keyword in holder and len(holder[keyword].value):
            return holder[keyword].value[0]
    return None


def _shared(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _vector(item: Any, keyword: str, length: int, where: Path) -> np.ndarray | None:
    value = None if item is None else item.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    values = np.array([float(v) for v in items])
    if values.size != length:
        raise InputError(f"{keyword} has {values.size} values; DICOM requires {length}.", where)
    return values


def _distinct(frames: list[pydicom.Dataset], keyword: str) -> set[str]:
    """Distinct values of a Frame Content attribute (StackID, TemporalPositionIndex)."""
    values = set()
    for frame in frames:
        content = frame.get("FrameContentSequence")
        if content and keyword in content[0]:
            values.add(str(content[0].get(keyword)))
    return values


def _frame_headers(
    ds: pydicom.Dataset, file_header: _Header, path: Path
) -> tuple[list[_Header], np.ndarray, np.ndarray]:
    """One classic-style header per frame, plus each frame's rescale slope and intercept.

    Returns:
        (headers in frame order, slopes (n,), intercepts (n,)). A header's ``path`` names the
        file and the frame (``ct.dcm[frame 3]``), so the geometry checks' messages point at it.
    """
    n = int(ds.get("NumberOfFrames") or 1)
    frames = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(frames) != n:
        raise InputError(
            f"enhanced CT with NumberOfFrames {n} but {len(frames)} items in "
            "PerFrameFunctionalGroupsSequence; the file is corrupt. Re-export it.",
            path,
        )
    stacks = _distinct(frames, "StackID")
    if len(stacks) > 1:
        raise InputError(
            f"multi-frame CT with {len(stacks)} stacks (StackID {', '.join(sorted(stacks))}) "
            "is not supported: lungcad reads one stack of parallel slices. Export each stack "
            "as its own series.",
            path,
        )
    times = _distinct(frames, "TemporalPositionIndex")
    if len(times) > 1:
        raise InputError(
            f"multi-frame CT with {len(times)} temporal positions (a 4D acquisition) is not "
            "supported: lungcad reads one 3D volume. Export one time point as its own series.",
            path,
        )
    headers, slopes, intercepts = [], np.ones(n), np.zeros(n)
    for k, frame in enumerate(frames):
        where = path.with_name(f"{path.name}[frame {k + 1}]")
        position = _vector(
            _group_item(ds, frame, "PlanePositionSequence"), "ImagePositionPatient", 3, where
        )
        orientation = _vector(
            _group_item(ds, frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, where
        )
        measures = _group_item(ds, frame, "PixelMeasuresSequence")
        spacing = _vector(measures, "PixelSpacing", 2, where)
        thickness = None if measures is None else measures.get("SliceThickness")
        rescale = _group_item(ds, frame, "PixelValueTransformationSequence")
        if rescale is not None:
            slopes[k] = float(rescale.get("RescaleSlope", 1.0) or 1.0)
            intercepts[k] = float(rescale.get("RescaleIntercept", 0.0) or 0.0)
        headers.append(
            replace(
                file_header,
                path=where,
                frames=1,
                position=position,
                orientation=orientation,
                pixel_spacing=spacing,
                slice_thickness=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return headers, slopes, intercepts


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored values (n_frames, rows, columns), before rescaling."""
    if int(ds.get("SamplesPerPixel") or 1) != 1 or not str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ).startswith("MONOCHROME"):
        raise InputError(
            f"multi-frame CT with {ds.get('PhotometricInterpretation')} pixels is not supported; "
            "CT frames must be greyscale (MONOCHROME1/2).",
            path,
        )
    try:
        array = np.asarray(ds.pixel_array)
    except Exception as exc:
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        raise InputError(
            f"cannot decode the multi-frame pixel data ({exc}; transfer syntax "
            f"{syntax.name or syntax}). The file is truncated or corrupt, or uses a compression "
            "pydicom cannot decode here; re-export it uncompressed.",
            path,
        ) from exc
    n, rows, columns = int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)
    if array.size != n * rows * columns:
        raise InputError(
            f"pixel data holds {array.size} values; NumberOfFrames x Rows x Columns = "
            f"{n}x{rows}x{columns} expected. The file is corrupt; re-export it.",
            path,
        )
    return array.reshape(n, rows, columns)


def read_multiframe_ct(folder: Path, headers: list[_Header], warnings: list[str]) -> Volume:
    """Read the one multi-frame file of a CT series as HU, canonical LPS.

    Args:
        folder: the folder the series was found in (named in errors and ``meta``).
        headers: the series' file headers from :mod:`lungcad.io.dicom` (one file expected).
        warnings: warnings gathered so far (series choice); the grid's are appended.

    Returns:
        Volume with ``array`` (z, y, x) float32 HU, spacing (mm) from the frame positions, and
        the ``meta`` of :func:`lungcad.io.dicom.read_dicom_series` with ``multiframe`` True,
        ``slice_files`` and ``sop_instance_uids`` naming the one file, and ``frame_numbers``
        (1-based) sorted along ``meta["slice_axis"]`` as the array's slices are.

    Raises:
        InputError: an unsupported variant (see the module docstring) or geometry that fails
            the checks of a classic series; the message names the file (and frame).
    """
    multi = [h for h in headers if h.frames > 1]
    if len(headers) > 1:
        raise InputError(
            f"series {headers[0].series_uid} mixes {len(multi)} multi-frame file(s) with "
            f"{len(headers) - len(multi)} other file(s) (a concatenation or a mixed export); "
            "lungcad reads one enhanced CT file per series. Export the series as one file or "
            "as one file per slice.",
            folder,
        )
    (file_header,) = headers
    path = file_header.path
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"cannot read the multi-frame DICOM file ({exc}).", path) from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in ENHANCED_CT_SOP_CLASSES:
        raise InputError(
            f"multi-frame DICOM of SOP class {UID(sop_class).name or sop_class} with "
            f"{file_header.frames} frames is not supported; lungcad reads classic CT (one file "
            "per slice) and Enhanced or Legacy Converted Enhanced CT. Convert it (e.g. with "
            "dcm2niix to NIfTI).",
            path,
        )
    frame_headers, slopes, intercepts = _frame_headers(ds, file_header, path)
    stack = _sort_and_check(folder, frame_headers)
    order = [frame_headers.index(h) for h in stack.headers]
    stored = _pixels(ds, path)[order].astype(np.float32)
    hu = stored * slopes[order, None, None].astype(np.float32) + intercepts[
        order, None, None
    ].astype(np.float32)
    first = stack.headers[0]
    volume, grid_warnings, resampled = stack_to_volume(
        hu,
        stack.positions,
        stack.row,
        stack.col,
        stack.pixel_spacing,
        single_slice_spacing=first.slice_thickness or 1.0,
        source=path,
    )
    warnings = warnings + grid_warnings
    volume.meta = _meta(folder, replace(first, path=path), warnings, resampled)
    canonical = to_canonical(volume)
    cosines = canonical.direction.T @ stack.normal
    axis = int(np.argmax(np.abs(cosines)))
    frame_numbers = [k + 1 for k in order]
    canonical.meta["slice_axis"] = 2 - axis
    canonical.meta["multiframe"] = True
    canonical.meta["frame_numbers"] = frame_numbers if cosines[axis] > 0 else frame_numbers[::-1]
    canonical.meta["sop_instance_uids"] = [file_header.sop_instance_uid]
    canonical.meta["slice_files"] = [str(path)]
    return canonical
