"""Write a HU Volume as a DICOM CT series (CT Image Storage, one file per z slice).

The files carry everything a reader needs to rebuild the exact geometry (ImagePositionPatient
per slice, ImageOrientationPatient from the direction columns, PixelSpacing, slice spacing)
and the modules a PACS and highdicom expect of CT source images (patient, study, series,
frame of reference, equipment, image plane, image pixel, CT image, SOP common).

Pixels are stored as signed 16-bit integers with ``RescaleSlope`` 1 and ``RescaleIntercept``
-1024 (the common CT convention), so ``HU = stored - 1024`` and any HU in [-31744, 31743]
round-trips to the nearest integer.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from lungcad import __version__
from lungcad.errors import InputError
from lungcad.io.atomic import atomic_dir
from lungcad.volume import Volume

log = logging.getLogger(__name__)

#: Stored value = HU - RESCALE_INTERCEPT (signed int16 storage).
RESCALE_INTERCEPT = -1024.0
_STORED_MIN, _STORED_MAX = -32768, 32767


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as close to ``value`` as fits."""
    return format_number_as_ds(float(value))


def _uid(seed: str | int | None, *parts: object) -> str:
    """A fresh UID, or a reproducible one derived from ``seed`` and ``parts``."""
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(seed), *(str(p) for p in parts)])


def _check_geometry(volume: Volume, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and slice unit vectors (LPS) of the volume; refuse sheared stacks."""
    direction = volume.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(
            "volume direction is not orthonormal; DICOM can only store orthogonal axes. "
            "Resample the volume onto an orthogonal grid first.",
            folder,
        )
    row, col, slc = direction[:, 0], direction[:, 1], direction[:, 2]
    normal = np.cross(row, col)
    if abs(float(normal @ slc)) < 1 - 1e-4:
        raise InputError(
            "the volume's slice axis is not perpendicular to its image plane (a sheared or "
            "gantry-tilted stack) which a CT series cannot describe; resample it first.",
            folder,
        )
    return row, col, slc


def _stored_pixels(volume: Volume, folder: Path) -> np.ndarray:
    """HU array (z, y, x) -> int16 stored values (HU rounded, minus the intercept)."""
    hu = np.asarray(volume.array, dtype=np.float64)
    if not np.all(np.isfinite(hu)):
        raise InputError("volume contains NaN or infinite values; expected finite HU.", folder)
    stored = np.rint(hu) - RESCALE_INTERCEPT
    lo, hi = float(stored.min()), float(stored.max())
    if lo < _STORED_MIN or hi > _STORED_MAX:
        raise InputError(
            f"HU range [{lo + RESCALE_INTERCEPT:.0f}, {hi + RESCALE_INTERCEPT:.0f}] does not fit "
            f"16-bit CT storage (expected HU within [{_STORED_MIN + RESCALE_INTERCEPT:.0f}, "
            f"{_STORED_MAX + RESCALE_INTERCEPT:.0f}]); is this really a HU volume?",
            folder,
        )
    return stored.astype("<i2")


def _prepare_folder(folder: Path) -> None:
    """Refuse to replace a folder that holds anything but a previous DICOM series."""
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder; choose a new output folder.", folder)
    if folder.is_dir():
        others = [p.name for p in folder.iterdir() if p.suffix.lower() != ".dcm"]
        if others:
            raise InputError(
                f"folder exists and holds non-DICOM files ({', '.join(sorted(others)[:3])}); "
                "it would be replaced. Choose an empty or new folder.",
                folder,
            )


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    patient_id: str = "ANON",
    patient_name: str = "Anonymous^Patient",
    patient_birth_date: str = "",
    patient_sex: str = "O",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_id: str = "1",
    accession_number: str = "",
    study_description: str = "Chest CT",
    series_description: str = "lungcad CT",
    series_number: int = 1,
    study_date: str | None = None,
    study_time: str | None = None,
    modality: str = "CT",
    manufacturer: str = "lungcad",
    image_type: tuple[str, ...] = ("DERIVED", "SECONDARY", "AXIAL"),
    uid_seed: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume`` as a CT series, one ``NNNN.dcm`` file per z slice, atomically.

    Slice ``k`` of the array (``volume.array[k]``, rows = y, columns = x) becomes instance
    ``k + 1`` at ``ImagePositionPatient = origin + k * spacing_z * direction[:, 2]``;
    ``ImageOrientationPatient`` is ``direction[:, 0]`` (rows run along index x) followed by
    ``direction[:, 1]``. ``SliceThickness`` is ``volume.meta["slice_thickness_mm"]`` when set,
    else the slice spacing. The folder appears complete or not at all; an existing folder is
    replaced only if it holds nothing but ``.dcm`` files.

    Args:
        volume: HU volume ``(z, y, x)``; ``intensity`` must be ``"hu"``.
        folder: output folder (created).
        patient_id, patient_name, patient_birth_date, patient_sex: patient module values.
        study_instance_uid, series_instance_uid, frame_of_reference_uid: UIDs to use; generated
            when None (reproducibly when ``uid_seed`` is given).
        study_id, accession_number, study_description, series_description, series_number:
            study and series identification.
        study_date, study_time: ``YYYYMMDD`` / ``HHMMSS``; default: now.
        modality: the Modality value (CT Image Storage is written either way).
        manufacturer: equipment module Manufacturer.
        image_type: ImageType value; synthetic or processed images should say DERIVED.
        uid_seed: makes every generated UID (study, series, frame of reference, SOP
            instances) a deterministic function of this seed.
        extra: further keyword -> value pairs set on every slice (e.g. ``{"KVP": 120}``).

    Returns:
        The written file paths in slice (instance) order.

    Raises:
        InputError: windowed (non-HU) volume, non-finite values, HU outside 16-bit storage,
            non-orthogonal geometry, or an output folder holding other files.
    """
    folder = Path(folder)
    if volume.intensity != "hu":
        raise InputError(
            f"cannot write a {volume.intensity!r} volume as CT: DICOM CT stores Hounsfield "
            "units, and windowed [0, 1] display intensities are not HU. Write the original "
            "HU volume instead.",
            folder,
        )
    row, col, slc = _check_geometry(volume, folder)
    stored = _stored_pixels(volume, folder)
    _prepare_folder(folder)

    now = _dt.datetime.now()
    study_date = study_date or now.strftime("%Y%m%d")
    study_time = study_time or now.strftime("%H%M%S")
    study_uid = study_instance_uid or _uid(uid_seed, "study")
    series_uid = series_instance_uid or _uid(uid_seed, "series", study_uid)
    for_uid = frame_of_reference_uid or _uid(uid_seed, "frame-of-reference", study_uid)
    sz, sy, sx = volume.spacing
    thickness = float(volume.meta.get("slice_thickness_mm", sz))
    origin = np.asarray(volume.origin, dtype=np.float64)
    orientation = [_ds(v) for v in (*row, *col)]

    names = [f"{k + 1:04d}.dcm" for k in range(volume.shape[0])]
    with atomic_dir(folder) as tmp:
        for k, name in enumerate(names):
            position = origin + k * sz * slc
            sop_uid = (
                _uid(uid_seed, "sop", series_uid, k) if uid_seed is not None else generate_uid()
            )
            ds = _slice_dataset(sop_uid)
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = patient_birth_date
            ds.PatientSex = patient_sex
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
            ds.ReferringPhysicianName = ""
            ds.StudyID = study_id
            ds.AccessionNumber = accession_number
            ds.StudyDescription = study_description
            ds.Modality = modality
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = int(series_number)
            ds.SeriesDescription = series_description
            ds.BodyPartExamined = "CHEST"
            ds.PatientPosition = "HFS"
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.Manufacturer = manufacturer
            ds.SoftwareVersions = f"lungcad {__version__}"
            ds.ImageType = list(image_type)
            ds.InstanceNumber = k + 1
            ds.AcquisitionNumber = 1
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing (along y), column spacing (x)
            ds.SliceThickness = _ds(thickness)
            ds.SpacingBetweenSlices = _ds(sz)
            ds.SliceLocation = _ds(float(position @ np.cross(row, col)))
            ds.KVP = ""
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1  # signed
            ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = ["-600", "40"]  # lung and mediastinal windows
            ds.WindowWidth = ["1500", "400"]
            ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
            for key, value in (extra or {}).items():
                setattr(ds, key, value)
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
    log.debug("wrote %d CT slices to %s (series %s)", len(names), folder, series_uid)
    return [folder / name for name in names]


def _slice_dataset(sop_instance_uid: str) -> FileDataset:
    """An empty CT Image Storage dataset with its file meta (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"LUNGCAD_{__version__}"[:16]
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    return ds
