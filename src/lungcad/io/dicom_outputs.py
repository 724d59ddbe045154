"""DICOM outputs a PACS can store and a viewer can overlay: Segmentation (SEG) and an SR.

Both are built with highdicom and reference the CT series they were computed from, so a
viewer shows the tumour mask on the right slices and links the measurements to the study:

* :func:`write_dicom_seg` writes the tumour mask as a DICOM Segmentation (BINARY, or
  FRACTIONAL when a probability map is given), one frame per source slice that holds tumour,
  each frame pointing at its source CT image (ReferencedSOPInstanceUID, same position).
* :func:`write_dicom_sr` writes a Comprehensive 3D SR (TID 1500 Measurement Report): per lesion
  its volume, longest axial diameter and centroid (a 3D point), plus the study-level
  probability of cancer. It says that an algorithm produced it and that it is not for
  standalone diagnosis.

Both need the source to have been read from a DICOM series (``source.meta["slice_files"]``, one
single-frame file per image); for NIfTI/MHD inputs write the mask as NIfTI. The mask is on
lungcad's canonical LPS grid; which mask slice goes with which CT image is worked out from the
files' own ImagePositionPatient/ImageOrientationPatient, so any slice order, flipped pixel
layouts and sagittal/coronal series map right. Outputs are marked ContentQualification
RESEARCH and written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungcad import __version__
from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import atomic_path
from lungcad.lesion import Lesion
from lungcad.volume import Volume, reorient

__all__ = ["DISCLAIMER", "write_dicom_seg", "write_dicom_sr"]

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Produced automatically by a computer-aided detection algorithm for research use. "
    "Not for standalone diagnosis: findings must be reviewed by a qualified radiologist."
)

# Segment semantics (DICOM CID 7150 / 7159): a morphologically abnormal structure, neoplasm.
_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_TYPE = codes.SCT.Neoplasm
_UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_UNIT_MM = codes.UCUM.Millimeter
_UNIT_HU = codes.UCUM.HounsfieldUnit
_UNIT_NONE = codes.UCUM.NoUnits
_ATTENUATION = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
# TID 1500 row "Qualitative Evaluations" (highdicom builds the rest of the template).
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

# A source slice must sit within this fraction of a voxel of a mask slice (DS rounding of
# ImagePositionPatient is far below it; a shifted or resampled mask is far above it).
_POSITION_TOLERANCE_VOXELS = 0.1


def write_dicom_seg(
    mask: Volume,
    source: Volume,
    path: str | Path,
    *,
    segment_label: str = "Tumour",
    algorithm_name: str = "lungcad",
    algorithm_version: str = __version__,
    series_description: str = "lungcad tumour segmentation (AI, research)",
    series_number: int = 901,
    manufacturer: str = "lungcad",
    fractional_probability: Volume | None = None,
) -> Path:
    """Write a tumour mask as a DICOM Segmentation referencing its source CT series.

    Args:
        mask: binary tumour mask (z, y, x) of 0/1 on the source's canonical grid.
        source: the CT Volume as read from a DICOM series (``meta["slice_files"]``; when
            ``meta["resampled"]`` is set, frames keep the mask's grid instead of one per image).
        path: output file (e.g. ``seg.dcm``); its folder is created.
        segment_label: the segment's label shown by viewers.
        algorithm_name: algorithm name recorded in the segment's AlgorithmIdentification.
        algorithm_version: algorithm (model) version recorded with it.
        series_description: SeriesDescription of the new SEG series.
        series_number: SeriesNumber of the new SEG series.
        manufacturer: Manufacturer of the "device" (this software).
        fractional_probability: optional probability map (z, y, x) in [0, 1] on the same grid;
            when given the SEG is FRACTIONAL (PROBABILITY, 8-bit) and stores it instead of the
            binary mask (which is then only checked).

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: the source is not DICOM, or mask/probability do not match the source grid.
        MissingInputError: a source slice file no longer exists.
    """
    datasets = _source_datasets(source, "DICOM SEG")
    _check_same_grid(mask, source, "mask")
    mask_array = np.asarray(mask.array)
    if np.any((mask_array != 0) & (mask_array != 1)):
        raise InputError(
            "write_dicom_seg needs a binary mask of 0/1; threshold the probability map first "
            "or pass it as fractional_probability.",
            path,
        )
    if fractional_probability is None:
        grid = mask.with_array(mask_array.astype(np.uint8))
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
    else:
        _check_same_grid(fractional_probability, source, "fractional_probability")
        prob = np.asarray(fractional_probability.array, dtype=np.float32)
        if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1:
            raise InputError(
                "fractional_probability must hold probabilities in [0, 1] (no NaN); "
                f"got values in [{np.nanmin(prob)}, {np.nanmax(prob)}]. Apply a sigmoid to logits.",
                path,
            )
        grid = mask.with_array(prob)
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL

    # A highdicom Volume (the mask's own grid) or an array of frames in source order.
    frames: hd.Volume | np.ndarray
    if source.meta.get("resampled") or source.meta.get("multiframe"):
        # Uneven spacing or gantry tilt was resampled on reading, so mask slices no longer sit
        # on the CT images (or the CT is one multi-frame file): store the mask on its own grid
        # (highdicom writes each frame's position) in the CT's frame of reference, still
        # referencing the source series.
        log.warning(
            "%s: source series was resampled on reading or is multi-frame; SEG frames keep "
            "the mask's own grid instead of one frame per CT image",
            source.meta.get("source_path"),
        )
        frames = _as_highdicom_volume(grid, _frame_of_reference_uid(datasets[0], source, "SEG"))
        has_tumour = bool(np.any(grid.array))
    else:
        frames = _frames_in_source_order(grid, datasets)
        has_tumour = bool(np.any(frames))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
        source=manufacturer,
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=_CATEGORY,
        segmented_property_type=_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=f"{algorithm_name} {segment_label}",
        anatomic_regions=[codes.SCT.Lung],
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=segmentation_type,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=f"lungcad {__version__}",
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        content_description="AI result, not for standalone diagnosis",
        content_label="TUMOUR",
        # An empty mask still makes a valid SEG (all frames kept) that says "nothing found".
        omit_empty_frames=has_tumour,
        series_description=series_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    return _save(seg, path)


def write_dicom_sr(
    lesions: Sequence[Lesion],
    study_probability: float,
    source: Volume,
    path: str | Path,
    *,
    algorithm_name: str = "lungcad",
    algorithm_version: str = __version__,
    series_description: str = "lungcad CAD findings (AI, research)",
    series_number: int = 902,
    manufacturer: str = "lungcad",
) -> Path:
    """Write lesion measurements and the study probability as a Comprehensive 3D SR.

    The report is a TID 1500 Measurement Report: one TID 1411 volumetric group per lesion
    (volume mL, longest axial diameter mm, mean HU and probabilities when known, centroid as a
    SCOORD3D point in the source's frame of reference), one TID 1501 group with the study's
    "Probability of cancer", and a text item saying it is not for standalone diagnosis. The
    observer is the algorithm (a device); the document is complete but not final or verified.

    Args:
        lesions: lesions from :func:`lungcad.inference.lesions.find_lesions` on the source's grid.
        study_probability: the model's probability (0..1) that the study shows cancer.
        source: the CT Volume read from a DICOM series (``meta["slice_files"]``).
        path: output file (e.g. ``sr.dcm``); its folder is created.
        algorithm_name: algorithm name (AlgorithmIdentification and observer device name).
        algorithm_version: algorithm (model) version.
        series_description: SeriesDescription of the new SR series.
        series_number: SeriesNumber of the new SR series.
        manufacturer: Manufacturer of this software.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: the source is not DICOM or the probability is not in [0, 1].
        MissingInputError: a source slice file no longer exists.
    """
    if not np.isfinite(study_probability) or not 0.0 <= study_probability <= 1.0:
        raise InputError(f"study_probability must be in [0, 1]; got {study_probability}", path)
    datasets = _source_datasets(source, "DICOM SR")
    first = datasets[0]
    frame_of_reference_uid = _frame_of_reference_uid(first, source, "SR")
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm_name, version=algorithm_version, manufacturer=manufacturer
    )
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(),
                name=algorithm_name,
                manufacturer_name=manufacturer,
                model_name=f"{algorithm_name} {algorithm_version}",
            ),
        )
    )
    source_series = hd.sr.SourceSeriesForSegmentation(first.SeriesInstanceUID)
    groups: list = [
        _lesion_group(lesion, frame_of_reference_uid, source_series, algorithm_id)
        for lesion in lesions
    ]
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Study"),
            algorithm_id=algorithm_id,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.ProbabilityOfCancer,
                    value=float(study_probability),
                    unit=_UNIT_NONE,
                    algorithm_id=algorithm_id,
                )
            ],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=codes.SCT.ComputedTomography,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_disclaimer_item())
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    return _save(sr, path)


def _lesion_group(
    lesion: Lesion,
    frame_of_reference_uid: str,
    source_series: hd.sr.SourceSeriesForSegmentation,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one lesion: its centroid as a 3D point and its measurements."""
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=lesion.volume_ml, unit=_UNIT_ML),
        hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=lesion.longest_axial_diameter_mm, unit=_UNIT_MM
        ),
    ]
    if lesion.mean_hu is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_ATTENUATION, value=lesion.mean_hu, unit=_UNIT_HU, derivation=codes.SCT.Mean
            )
        )
    for value, derivation in (
        (lesion.max_probability, codes.SCT.Maximum),
        (lesion.mean_probability, codes.SCT.Mean),
    ):
        if value is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=value, unit=_UNIT_NONE, derivation=derivation
                )
            )
    centroid = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.asarray([lesion.centroid_lps_mm], dtype=np.float64),
        frame_of_reference_uid=frame_of_reference_uid,
        source_series=source_series,
    )
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Lesion {lesion.id}")
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_volume_surface=centroid,
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=measurements,
        geometric_purpose=codes.DCM.CenterOfMass,
    )


def _disclaimer_item() -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=DISCLAIMER,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def _source_datasets(source: Volume, what: str) -> list[pydicom.Dataset]:
    """The source series' DICOM headers (no pixel data), in ``meta["slice_files"]`` order."""
    files = source.meta.get("slice_files")
    where = source.meta.get("source_path")
    if not files:
        fmt = source.meta.get("format", "a non-DICOM file")
        raise InputError(
            f"{what} needs a DICOM source series, but this image was read from {fmt}. "
            "Write the mask as NIfTI instead (e.g. a .nii.gz output).",
            where,
        )
    datasets: list[Dataset] = []
    for name in files:
        if not Path(name).is_file():
            raise MissingInputError(
                f"source DICOM slice is gone; {what} must reference the original files", name
            )
        try:
            datasets.append(pydicom.dcmread(name, stop_before_pixels=True))
        except pydicom.errors.InvalidDicomError as err:
            raise InputError(f"not a readable DICOM file ({err})", name) from err
    return datasets


def _frame_of_reference_uid(first: pydicom.Dataset, source: Volume, what: str) -> str:
    uid = getattr(first, "FrameOfReferenceUID", None)
    if not uid:
        raise InputError(
            f"the source CT has no FrameOfReferenceUID, so positions cannot be recorded in a "
            f"DICOM {what}; write the NIfTI mask / JSON report instead.",
            source.meta.get("source_path"),
        )
    return str(uid)


def _as_highdicom_volume(grid: Volume, frame_of_reference_uid: str) -> hd.Volume:
    """``grid`` as a highdicom Volume: same array (z, y, x), affine from its LPS geometry."""
    affine = np.eye(4)
    # highdicom's affine maps array indices (slice, row, column) = (z, y, x) to LPS mm;
    # lungcad's direction columns are the index axes (x, y, z).
    affine[:3, :3] = grid.direction[:, ::-1] * np.asarray(grid.spacing)
    affine[:3, 3] = grid.origin
    return hd.Volume(
        array=grid.array,
        affine=affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=frame_of_reference_uid,
    )


def _check_same_grid(volume: Volume, source: Volume, name: str) -> None:
    if volume.shape != source.shape or not volume.same_geometry(source, atol=1e-3):
        raise InputError(
            f"the {name} must be on the source CT's grid: expected shape {source.shape}, "
            f"spacing {source.spacing}, origin {source.origin}; got shape {volume.shape}, "
            f"spacing {volume.spacing}, origin {volume.origin}. Predict on the source Volume "
            "as read (canonical orientation, no cropping or resampling), or map the mask back.",
            volume.meta.get("source_path"),
        )


def _frames_in_source_order(grid: Volume, datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """One 2D frame per source dataset, in the datasets' row/column layout and order.

    The mask lives in lungcad's canonical LPS grid; the CT files may run feet-to-head or
    head-to-feet and store their pixels flipped. The mask is permuted/flipped (no resampling)
    into the files' own orientation, then each file's ImagePositionPatient picks its slice.

    Returns:
        (n_files, Rows, Columns) array matching ``datasets`` one to one.
    """
    first = datasets[0]
    row_cos, col_cos = np.asarray(first.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    normal = np.cross(row_cos, col_cos)
    file_direction = np.column_stack([row_cos, col_cos, normal])
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        tuple(float(d) for d in file_direction.ravel())
    )
    in_file_order = reorient(grid, code)
    where = grid.meta.get("source_path")
    if not np.allclose(in_file_order.direction[:, :2], file_direction[:, :2], atol=1e-3):
        raise InputError(
            "the mask's axes do not follow the source slices' rows and columns "
            f"(ImageOrientationPatient {list(first.ImageOrientationPatient)}); it was resampled "
            "or the source series is not the one the mask was computed on.",
            where,
        )
    expected = (len(datasets), int(first.Rows), int(first.Columns))
    if in_file_order.shape != expected:
        raise InputError(
            f"the mask, in the source files' orientation, is {in_file_order.shape} (slices, "
            f"rows, columns) but the source series has {expected[0]} images of "
            f"{expected[1:]} pixels (multi-frame sources are not supported).",
            where,
        )
    # Index of each file's top-left pixel in the reoriented grid: it must be (k, 0, 0).
    positions = np.asarray([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    scale = np.asarray(in_file_order.spacing[::-1])
    ijk = np.linalg.solve(in_file_order.direction, (positions - in_file_order.origin).T).T / scale
    zyx = ijk[:, ::-1]
    slices = np.rint(zyx[:, 0]).astype(int)
    off_grid = np.abs(zyx - np.column_stack([slices, np.zeros((len(slices), 2))])).max(axis=1)
    if (
        (off_grid > _POSITION_TOLERANCE_VOXELS).any()
        or (slices < 0).any()
        or (slices >= in_file_order.shape[0]).any()
    ):
        bad = int(np.argmax(off_grid))
        raise InputError(
            f"source slice position {list(positions[bad])} does not fall on a mask slice "
            f"(off by {off_grid[bad]:.2f} voxels); the mask does not share the source's geometry.",
            getattr(datasets[bad], "filename", where),
        )
    if len(set(slices.tolist())) != len(slices):
        raise InputError("two source slices share one position; the series is not a volume", where)
    return np.ascontiguousarray(in_file_order.array[slices])


def _save(dataset: pydicom.Dataset, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    log.info("wrote %s (%s)", path, dataset.SOPClassUID.name)
    return path
