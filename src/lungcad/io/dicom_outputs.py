"""DICOM results a PACS stores and a viewer shows, after IHE AI Results (AIR): SEG, SR and KOS.

All three are built with highdicom, go into the source CT's study as new series, and
reference the CT series they were computed from:

* :func:`write_dicom_seg`: a DICOM Segmentation (BINARY) with one segment per lesion (label
  "Lesion n", tracking identifier and UID, a recommended display colour, AI algorithm
  identification, content creator). Frames are the CT's own images when the mask lies on them
  (each frame references its CT image); after resampling on reading (uneven spacing, gantry
  tilt) or for a multi-frame CT they are the mask's own grid, and Pixel Measures always state
  the spacing of the SEG's own frames. Empty frames are left out. There is never an empty
  segment: with no lesion no SEG is written.
* :func:`write_dicom_sr`: a Comprehensive 3D SR, TID 1500 Measurement Report. One TID 1411
  group per lesion references its SEG segment (same tracking UID) and gives volume (mL), long
  and short axis (mm), mean HU, the model's probability inside it and its location (lung, with
  the side when known; lungcad does not segment lobes). One TID 1501 group gives the study
  finding: a coded decision ("cancer suspected", "no cancer suspected", "cannot assess", "no
  classifier"), the probability and threshold when assessed, and the number of lesions found.
  Text items say why a study was not assessed, that no lesion was found, and that the result
  is not for standalone diagnosis.
* :func:`write_dicom_kos`: a Key Object Selection document ("Of Interest") of the key CT
  images: for each lesion the image through its long axis, or with no lesion the image of the
  most suspicious slice.

:func:`write_dicom_results` writes all three with shared UIDs. The observer of the SR and
KOS is the algorithm as a device with a stable Device Observer UID, derived from the
algorithm's name, version and configuration hash (:attr:`Algorithm.device_observer_uid`), so
every result of one model names the same device. Tracking UIDs derive from the source series,
the algorithm and the lesion, so an identical rerun gives the same identifiers.

Sparse headers are made good in memory, never in the source files: missing Type 2 patient and
study attributes (PatientName, AccessionNumber, ...) are written empty, as the standard
allows; a CT without FrameOfReferenceUID gets one derived from its SeriesInstanceUID, which
the results use and record. A missing Type 1 attribute (e.g. SOPInstanceUID) is an
:class:`~lungcad.errors.InputError` naming the file and the attribute.

Every object needs the source to have been read from DICOM (``source.meta["slice_files"]``);
for NIfTI/MHD inputs write the mask as NIfTI. Which mask slice goes with which CT image is
worked out from the files' own ImagePositionPatient/ImageOrientationPatient, so any slice
order, flipped pixel layouts and sagittal/coronal series map right. Outputs are marked
ContentQualification RESEARCH and written atomically.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungcad import __version__
from lungcad.errors import InputError, MissingInputError
from lungcad.finding import CANCER, CANNOT_ASSESS, NO_CANCER, NO_CLASSIFIER, StudyFinding
from lungcad.io.atomic import atomic_path
from lungcad.lesion import Lesion
from lungcad.volume import Volume, reorient

__all__ = [
    "DISCLAIMER",
    "Algorithm",
    "DicomResults",
    "derived_uid",
    "write_dicom_kos",
    "write_dicom_results",
    "write_dicom_seg",
    "write_dicom_sr",
]

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Produced automatically by a computer-aided detection algorithm for research use. "
    "Not for standalone diagnosis: findings must be reviewed by a qualified radiologist."
)
SEG_SERIES_NUMBER, SR_SERIES_NUMBER, KOS_SERIES_NUMBER = 901, 902, 903

# Segment semantics (DICOM CID 7150 / 7159): a morphologically abnormal structure, neoplasm.
_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_TYPE = codes.SCT.Neoplasm
_UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_UNIT_MM = codes.UCUM.Millimeter
_UNIT_HU = codes.UCUM.HounsfieldUnit
_UNIT_NONE = codes.UCUM.NoUnits
_ATTENUATION = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
_THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
# TID 1500 row "Qualitative Evaluations" (highdicom builds the rest of the template).
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_SIDES = {"right": codes.SCT.Right, "left": codes.SCT.Left}

# Concepts DICOM has no code for, in a private coding scheme ("99" designators are private,
# PS3.3 8.2); the SR declares it in its Coding Scheme Identification Sequence.
_SCHEME = "99LUNGCAD"


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, _SCHEME, meaning)


_FINDING_VALUES = {
    status: _local(value, status)
    for status, value in (
        (CANCER, "CA-SUSPECTED"),
        (NO_CANCER, "NO-CA-SUSPECTED"),
        (CANNOT_ASSESS, "CANNOT-ASSESS"),
        (NO_CLASSIFIER, "NO-CLASSIFIER"),
    )
}
_LESION_COUNT = _local("LESION-COUNT", "Number of lesions found")
# Not DCM 121071 "Finding": TID 1501 uses that row for the finding type.
_STUDY_FINDING = _local("STUDY-FINDING", "Study finding")
# Namespace of the name-based UUIDs behind lungcad's derived UIDs (a fixed random UUID).
_UID_NAMESPACE = uuid.UUID("5f0e6b1c-2a3d-4c8e-9b7a-1d2c3e4f5a6b")


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: ``2.25.`` + the integer of their UUID v5.

    PS3.5 B.2 allows UIDs made from a UUID under the root 2.25; a name-based UUID (RFC 4122,
    SHA-1 of the lungcad namespace and the parts joined by "|") makes the same parts always
    give the same UID, and other parts another one.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(('lungcad', *parts))).int}"


# Recommended display colours (sRGB), one per segment in turn: distinct on grey CT.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)

# A source slice must sit within this fraction of a voxel of a mask slice (DS rounding of
# ImagePositionPatient is far below it; a shifted or resampled mask is far above it).
_POSITION_TOLERANCE_VOXELS = 0.1
# Type 1 attributes the results copy from the CT; without them there is nothing to reference.
_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 patient and study attributes highdicom copies from the CT: written empty if absent.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Algorithm:
    """The algorithm that made a result, as the SEG, SR and KOS name it.

    Attributes:
        name: algorithm name (AlgorithmName, observer device name).
        version: algorithm version, e.g. ``"0.2.0+<checkpoint sha256[:12]>"``.
        configuration_hash: SHA-256 (hex) of the configuration the model was trained with
            (``lungcad.training.config.config_hash``), recorded as an algorithm parameter.
        manufacturer: Manufacturer of this software.
    """

    name: str = "lungcad"
    version: str = __version__
    configuration_hash: str = ""
    manufacturer: str = "lungcad"

    @property
    def device_observer_uid(self) -> str:
        """A UID for this algorithm as a device, the same wherever and whenever it runs.

        ``2.25.<n>`` (PS3.5 B.2), ``n`` the name-based (SHA-1, version 5) UUID of
        "device observer", the name, the version and the configuration hash
        (:func:`derived_uid`): one model gives one UID, another model another.
        """
        return derived_uid("device observer", self.name, self.version, self.configuration_hash)

    def parameters(self) -> list[str]:
        """Algorithm parameters recorded with the identification."""
        return [f"configuration sha256 {self.configuration_hash or 'unknown'}"]

    def for_seg(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG segments' Segmentation Algorithm Identification (family: AI)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.version,
            source=self.manufacturer,
            parameters={"configuration sha256": self.configuration_hash or "unknown"},
        )

    def for_sr(self) -> hd.sr.AlgorithmIdentification:
        """The SR groups' algorithm name, version and parameters (TID 4019)."""
        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version, parameters=self.parameters()
        )

    def observer(self) -> hd.sr.ObserverContext:
        """The SR's and KOS's observer: this algorithm as a device, with its stable UID."""
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_observer_uid,
                name=self.name,
                manufacturer_name=self.manufacturer,
                model_name=f"{self.name} {self.version}",
            ),
        )


@dataclass
class DicomResults:
    """What :func:`write_dicom_results` wrote (for findings.json).

    Attributes:
        paths: output name (``seg.dcm``, ``sr.dcm``, ``ko.dcm``) -> path.
        frame_of_reference_uid: the frame of reference the results use.
        frame_of_reference_created: True when the CT had none and lungcad derived it.
        device_observer_uid: the algorithm's stable Device Observer UID.
        tracking_uids: lesion id -> tracking UID shared by its SEG segment and SR group.
        key_images: SOPInstanceUIDs of the CT images in the KOS.
    """

    paths: dict[str, Path] = field(default_factory=dict)
    frame_of_reference_uid: str = ""
    frame_of_reference_created: bool = False
    device_observer_uid: str = ""
    tracking_uids: dict[int, str] = field(default_factory=dict)
    key_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON form (paths as file names)."""
        return {
            "files": sorted(self.paths),
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "frame_of_reference_created": self.frame_of_reference_created,
            "device_observer_uid": self.device_observer_uid,
            "tracking_uids": {str(k): v for k, v in self.tracking_uids.items()},
            "key_images": list(self.key_images),
        }


@dataclass
class _Source:
    """The CT's headers as the results use them: copies, sparse headers made good."""

    datasets: list[Dataset]
    frame_of_reference_uid: str
    frame_of_reference_created: bool
    where: str | None


def write_dicom_results(
    source: Volume,
    labels: Volume,
    lesions: Sequence[Lesion],
    finding: StudyFinding,
    out_dir: str | Path,
    *,
    algorithm: Algorithm | None = None,
    slice_probabilities: np.ndarray | None = None,
    seg: bool = True,
    sr: bool = True,
    kos: bool = True,
) -> DicomResults:
    """Write the AIR-style result of one study: SEG (if lesions), SR and KOS.

    Args:
        source: the CT Volume as read from a DICOM series.
        labels: label image on the source grid: voxel value = lesion id (0 elsewhere), as
            :func:`lungcad.inference.lesions.lesion_labels` makes it.
        lesions: the lesions (ids 1..n) the labels hold.
        finding: the study finding.
        out_dir: folder for ``seg.dcm``, ``sr.dcm`` and ``ko.dcm`` (it must exist).
        algorithm: the algorithm's name, version and configuration hash.
        slice_probabilities: ``(z,)`` cancer probability per canonical slice (NaN where not
            evaluated): picks the key image when there is no lesion.
        seg, sr, kos: which objects to write. Without a SEG the SR places each lesion by its
            centroid (a 3D point) instead of a segment.

    Returns:
        What was written, with the shared UIDs.

    Raises:
        InputError: the source is not DICOM or lacks a Type 1 attribute, the labels do not
            match the source grid or the lesions.
        MissingInputError: a source slice file no longer exists.
    """
    algorithm = algorithm or Algorithm()
    out_dir = Path(out_dir)
    src = _prepare_source(source, "DICOM results")
    uids = _tracking_uids(src, lesions, algorithm)
    result = DicomResults(
        frame_of_reference_uid=src.frame_of_reference_uid,
        frame_of_reference_created=src.frame_of_reference_created,
        device_observer_uid=algorithm.device_observer_uid,
        tracking_uids=uids,
    )
    segmentation = None
    if seg and lesions:
        segmentation = _build_seg(labels, lesions, source, src, algorithm, uids)
        result.paths["seg.dcm"] = _save(segmentation, out_dir / "seg.dcm")
    if sr:
        report = _build_sr(lesions, finding, source, src, algorithm, uids, segmentation)
        result.paths["sr.dcm"] = _save(report, out_dir / "sr.dcm")
    if kos:
        key = _key_images(source, src, lesions, slice_probabilities)
        if key:
            result.paths["ko.dcm"] = _save(
                _build_kos(key, src, algorithm, lesions), out_dir / "ko.dcm"
            )
            result.key_images = [str(ds.SOPInstanceUID) for ds in key]
    return result


def write_dicom_seg(
    labels: Volume,
    lesions: Sequence[Lesion],
    source: Volume,
    path: str | Path,
    *,
    algorithm: Algorithm | None = None,
) -> Path:
    """Write lesions as a DICOM Segmentation (one segment per lesion) of their source CT.

    Args:
        labels: label image (z, y, x) on the source's canonical grid, voxel value = lesion id.
        lesions: the lesions, ids 1..n; at least one (there is no empty segment).
        source: the CT Volume as read from a DICOM series (``meta["slice_files"]``).
        path: output file (e.g. ``seg.dcm``).
        algorithm: the algorithm's name, version and configuration hash.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: no lesions, the source is not DICOM, or the labels do not match the source
            grid or the lesions.
        MissingInputError: a source slice file no longer exists.
    """
    algorithm = algorithm or Algorithm()
    src = _prepare_source(source, "DICOM SEG")
    uids = _tracking_uids(src, lesions, algorithm)
    return _save(_build_seg(labels, lesions, source, src, algorithm, uids), path)


def write_dicom_sr(
    lesions: Sequence[Lesion],
    finding: StudyFinding,
    source: Volume,
    path: str | Path,
    *,
    algorithm: Algorithm | None = None,
) -> Path:
    """Write the lesions and the study finding as a Comprehensive 3D SR (TID 1500).

    Without a SEG to reference, each lesion is placed by its centroid (a SCOORD3D point);
    :func:`write_dicom_results` writes the SR that references SEG segments instead.

    Args:
        lesions: lesions of :func:`lungcad.inference.lesions.find_lesions` on the source grid.
        finding: the study finding.
        source: the CT Volume read from a DICOM series (``meta["slice_files"]``).
        path: output file (e.g. ``sr.dcm``).
        algorithm: the algorithm's name, version and configuration hash.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: the source is not DICOM or lacks a Type 1 attribute.
        MissingInputError: a source slice file no longer exists.
    """
    algorithm = algorithm or Algorithm()
    src = _prepare_source(source, "DICOM SR")
    uids = _tracking_uids(src, lesions, algorithm)
    return _save(_build_sr(lesions, finding, source, src, algorithm, uids, None), path)


def write_dicom_kos(
    source: Volume,
    lesions: Sequence[Lesion],
    path: str | Path,
    *,
    slice_probabilities: np.ndarray | None = None,
    algorithm: Algorithm | None = None,
) -> Path | None:
    """Write the key images as a Key Object Selection document ("Of Interest").

    Key images: for each lesion the CT image through its long axis (the image nearest to the
    lesion's centre on ``diameter_slice``); with no lesion the image of the slice with the
    highest cancer probability.

    Returns:
        ``path``, or None when there is no key image (no lesion and no slice probability).

    Raises:
        InputError: the source is not DICOM or lacks a Type 1 attribute.
        MissingInputError: a source slice file no longer exists.
    """
    algorithm = algorithm or Algorithm()
    src = _prepare_source(source, "DICOM KOS")
    key = _key_images(source, src, lesions, slice_probabilities)
    if not key:
        return None
    return _save(_build_kos(key, src, algorithm, lesions), path)


# ---------------------------------------------------------------------------- the source


def _prepare_source(source: Volume, what: str) -> _Source:
    """The source series' headers (no pixel data), in ``meta["slice_files"]`` order.

    In-memory copies: missing Type 2 attributes become empty, a missing FrameOfReferenceUID
    is derived from the SeriesInstanceUID (and PositionReferenceIndicator left empty).
    """
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
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as err:
            raise InputError(f"not a readable DICOM file ({err})", name) from err
        for keyword in _TYPE1:
            if not str(ds.get(keyword, "") or "").strip():
                raise InputError(
                    f"the CT image has no {keyword} (a Type 1 attribute), so {what} cannot "
                    "reference it; re-export the series from the scanner or PACS.",
                    name,
                )
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    first = datasets[0]
    for other, name in zip(datasets[1:], files[1:], strict=True):
        if other.StudyInstanceUID != first.StudyInstanceUID:
            raise InputError(
                f"the CT image belongs to study {other.StudyInstanceUID}, not to the series' study "
                f"{first.StudyInstanceUID}; one series must be in one study.",
                name,
            )
    uid = str(first.get("FrameOfReferenceUID", "") or "").strip()
    created = not uid
    if created:
        # Common after anonymisation. The results need one frame of reference for positions;
        # deriving it from the series makes SEG, SR and KOS (and a rerun) agree.
        uid = derived_uid("frame of reference", str(first.SeriesInstanceUID))
        log.warning(
            "%s: the CT has no FrameOfReferenceUID; the results use %s, derived from its "
            "SeriesInstanceUID",
            where,
            uid,
        )
    for item in datasets:
        if created or not str(item.get("FrameOfReferenceUID", "") or "").strip():
            item.FrameOfReferenceUID = uid
            if "PositionReferenceIndicator" not in item:
                item.PositionReferenceIndicator = ""
        if item.get("SliceThickness") in (None, ""):
            # Empty or absent is legal in CT (Type 2), but highdicom reads it for the SEG's
            # Pixel Measures (Type 1C there). The copy gets the series' slice spacing, and the
            # SEG states its own frames' measures in the end (_set_pixel_measures).
            item.SliceThickness = f"{source.spacing[int(source.meta.get('slice_axis', 0))]:.6g}"
    return _Source(datasets, uid, created, where)


def _tracking_uids(src: _Source, lesions: Sequence[Lesion], algorithm: Algorithm) -> dict[int, str]:
    """Lesion id -> tracking UID, derived from the series, the algorithm and the lesion."""
    series = str(src.datasets[0].SeriesInstanceUID)
    return {
        lesion.id: derived_uid(
            "lesion",
            series,
            algorithm.version,
            algorithm.configuration_hash,
            str(lesion.id),
            str(lesion.voxel_count),
            repr(lesion.anchor_zyx),
        )
        for lesion in lesions
    }


# ---------------------------------------------------------------------------- SEG


def _build_seg(
    labels: Volume,
    lesions: Sequence[Lesion],
    source: Volume,
    src: _Source,
    algorithm: Algorithm,
    uids: dict[int, str],
) -> hd.seg.Segmentation:
    where = source.meta.get("source_path")
    if not lesions:
        raise InputError(
            "no lesion to write: a DICOM SEG holds one segment per lesion and lungcad never "
            "writes an empty one (the SR says that none was found).",
            where,
        )
    ids = [lesion.id for lesion in lesions]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise InputError(f"lesion ids must be 1..n; got {sorted(ids)}", where)
    _check_same_grid(labels, source, "label image")
    array = np.asarray(labels.array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError("the label image must hold integer lesion ids", where)
    if array.min() < 0 or array.max() > len(ids):
        raise InputError(
            f"the label image holds values in [{array.min()}, {array.max()}] but there are "
            f"{len(ids)} lesions; make it with lungcad.inference.lesions.lesion_labels.",
            where,
        )
    grid = labels.with_array(array.astype(np.uint16 if len(ids) > 255 else np.uint8))
    datasets = src.datasets
    frames: hd.Volume | np.ndarray
    spacing = grid.spacing  # between frames, rows, columns (mm) of the SEG's own frames
    if source.meta.get("resampled") or source.meta.get("multiframe"):
        # Uneven spacing or gantry tilt was resampled on reading, so mask slices no longer sit
        # on the CT images (or the CT is one multi-frame file): store the mask on its own grid
        # (highdicom writes each frame's position and Pixel Measures from the grid's spacing)
        # in the CT's frame of reference, still referencing the source series.
        log.info(
            "%s: source series was resampled on reading or is multi-frame; SEG frames keep "
            "the mask's own grid instead of one frame per CT image",
            where,
        )
        frames = _as_highdicom_volume(grid, src.frame_of_reference_uid)
    else:
        # The frames are the CT's images; their spacing is the grid's in the files' layout.
        frames, spacing = _frames_in_source_order(grid, datasets)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=lesion.id,
            segment_label=f"Lesion {lesion.id}",
            segmented_property_category=_CATEGORY,
            segmented_property_type=_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.for_seg(),
            tracking_uid=uids[lesion.id],
            tracking_id=f"Lesion {lesion.id}",
            anatomic_regions=[codes.SCT.Lung],
            display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(lesion.id - 1) % len(_PALETTE)]),
        )
        for lesion in sorted(lesions, key=lambda les: les.id)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.name,
            software_versions=f"lungcad {__version__}",
            device_serial_number="0",
            content_description="AI result, not for standalone diagnosis",
            content_label="LESIONS",
            content_creator_name=f"{algorithm.name}^",  # PN: family-name component only
            omit_empty_frames=True,
            series_description="lungcad lesion segmentation (AI, research)",
            content_qualification=hd.ContentQualificationValues.RESEARCH,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise InputError(f"cannot build the DICOM SEG from this CT series: {err}", where) from err
    _set_pixel_measures(seg, spacing)
    return seg


def _set_pixel_measures(seg: hd.seg.Segmentation, spacing: tuple[float, float, float]) -> None:
    """State the SEG frames' own Pixel Measures: spacing (between frames, rows, columns; mm).

    highdicom copies the CT's measures whenever the pixel spacing agrees, SliceThickness and
    SpacingBetweenSlices included, which after resampling are not those of the SEG's frames
    (dcmqi then rebuilds the mask on the wrong grid). A SEG voxel is as thick as the frames
    are apart.
    """
    groups = [seg.SharedFunctionalGroupsSequence[0]]
    groups += list(seg.get("PerFrameFunctionalGroupsSequence", []))
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            measures.PixelSpacing = [f"{spacing[1]:.10g}", f"{spacing[2]:.10g}"]
            measures.SliceThickness = f"{spacing[0]:.10g}"
            measures.SpacingBetweenSlices = f"{spacing[0]:.10g}"


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


def _frames_in_source_order(
    grid: Volume, datasets: Sequence[pydicom.Dataset]
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One 2D frame per source dataset, in the datasets' row/column layout and order.

    The mask lives in lungcad's canonical LPS grid; the CT files may run feet-to-head or
    head-to-feet and store their pixels flipped. The mask is permuted/flipped (no resampling)
    into the files' own orientation, then each file's ImagePositionPatient picks its slice.

    Returns:
        ``(frames, spacing)``: (n_files, Rows, Columns) array matching ``datasets`` one to
        one, and the grid's spacing in that layout (between images, rows, columns; mm).
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
            f"{expected[1:]} pixels.",
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
    frames = np.ascontiguousarray(in_file_order.array[slices])
    return frames, in_file_order.spacing


# ---------------------------------------------------------------------------- SR


def _build_sr(
    lesions: Sequence[Lesion],
    finding: StudyFinding,
    source: Volume,
    src: _Source,
    algorithm: Algorithm,
    uids: dict[int, str],
    segmentation: hd.seg.Segmentation | None,
) -> hd.sr.Comprehensive3DSR:
    datasets = src.datasets
    first = datasets[0]
    algorithm_id = algorithm.for_sr()
    source_series = hd.sr.SourceSeriesForSegmentation(first.SeriesInstanceUID)
    groups: list = [
        _lesion_group(lesion, uids[lesion.id], src, source_series, algorithm_id, segmentation)
        for lesion in lesions
    ]
    groups.append(_study_group(finding, len(lesions), src, algorithm, algorithm_id))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=algorithm.observer()),
        procedure_reported=codes.SCT.ComputedTomography,
        imaging_measurements=groups,
    )
    notes = []
    if not finding.assessed:
        notes.append(f"Study not assessed ({finding.status}): {finding.reason}")
    if not lesions:
        notes.append("No lesion found: the algorithm's tumour mask is empty, so no SEG was made.")
    if src.frame_of_reference_created:
        notes.append(
            "The source CT has no FrameOfReferenceUID; lungcad created "
            f"{src.frame_of_reference_uid} for this result."
        )
    report[0].ContentSequence.append(_text_container([*notes, DISCLAIMER]))
    evidence = list(datasets) + ([segmentation] if segmentation is not None else [])
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=algorithm.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description="lungcad CAD findings (AI, research)",
            content_qualification=hd.ContentQualificationValues.RESEARCH,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise InputError(
            f"cannot build the DICOM SR from this CT series: {err}", src.where
        ) from err
    _declare_local_codes(sr)
    return sr


def _study_group(
    finding: StudyFinding,
    n_lesions: int,
    src: _Source,
    algorithm: Algorithm,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the study finding, probability and threshold, number of lesions."""
    measurements = []
    if finding.assessed and finding.probability is not None and finding.threshold is not None:
        measurements += [
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=float(finding.probability),
                unit=_UNIT_NONE,
                algorithm_id=algorithm_id,
            ),
            hd.sr.Measurement(
                name=_THRESHOLD,
                value=float(finding.threshold),
                unit=_UNIT_NONE,
                algorithm_id=algorithm_id,
            ),
        ]
    measurements.append(
        hd.sr.Measurement(
            name=_LESION_COUNT, value=float(n_lesions), unit=_UNIT_NONE, algorithm_id=algorithm_id
        )
    )
    study_uid = derived_uid(
        "study finding",
        str(src.datasets[0].SeriesInstanceUID),
        algorithm.version,
        algorithm.configuration_hash,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=study_uid, identifier="Study"),
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_STUDY_FINDING, value=_FINDING_VALUES[finding.status])
        ],
    )


def _lesion_group(
    lesion: Lesion,
    tracking_uid: str,
    src: _Source,
    source_series: hd.sr.SourceSeriesForSegmentation,
    algorithm_id: hd.sr.AlgorithmIdentification,
    segmentation: hd.seg.Segmentation | None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one lesion: its SEG segment (or centroid) and its measurements."""
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=lesion.volume_ml, unit=_UNIT_ML),
        hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=lesion.longest_axial_diameter_mm, unit=_UNIT_MM
        ),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=lesion.short_axis_mm, unit=_UNIT_MM),
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
    site = hd.sr.FindingSite(
        anatomic_location=codes.SCT.Lung,
        laterality=_SIDES.get(lesion.side) if lesion.side else None,
    )
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Lesion {lesion.id}")
    if segmentation is not None:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=lesion.id,
                source_series=source_series,
            ),
            finding_type=codes.SCT.Neoplasm,
            algorithm_id=algorithm_id,
            finding_sites=[site],
            measurements=measurements,
        )
    centroid = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.asarray([lesion.centroid_lps_mm], dtype=np.float64),
        frame_of_reference_uid=src.frame_of_reference_uid,
        source_series=source_series,
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_volume_surface=centroid,
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=algorithm_id,
        finding_sites=[site],
        measurements=measurements,
        geometric_purpose=codes.DCM.CenterOfMass,
    )


def _text_container(texts: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container of Comment text items."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
    return container


def _declare_local_codes(dataset: Dataset) -> None:
    """Coding Scheme Identification Sequence for the private scheme (required when used)."""
    item = Dataset()
    item.CodingSchemeDesignator = _SCHEME
    item.CodingSchemeName = "lungcad local concepts"
    item.CodingSchemeResponsibleOrganization = "lungcad"
    dataset.CodingSchemeIdentificationSequence = [item]


# ---------------------------------------------------------------------------- KOS


def _key_images(
    source: Volume,
    src: _Source,
    lesions: Sequence[Lesion],
    slice_probabilities: np.ndarray | None,
) -> list[Dataset]:
    """The CT images to flag: each lesion's long-axis image, or the most suspicious slice."""
    points = [
        source.index_to_physical(np.array([lesion.diameter_slice, *lesion.centroid_zyx[1:]]))[0]
        for lesion in lesions
    ]
    if not points and slice_probabilities is not None:
        probs = np.asarray(slice_probabilities, dtype=np.float64)
        if probs.size == source.shape[0] and np.isfinite(probs).any():
            z = int(np.nanargmax(probs))
            centre = np.array([z, (source.shape[1] - 1) / 2, (source.shape[2] - 1) / 2])
            points = [source.index_to_physical(centre)[0]]
    datasets = src.datasets
    if not points:
        return []
    if len(datasets) == 1:
        return [datasets[0]]  # one (multi-frame) image holds every slice
    # The image whose plane lies nearest to each point (works for any slice orientation).
    origins = np.asarray([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    row, col = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    normal = np.cross(row, col)
    chosen: list[int] = []
    for point in points:
        k = int(np.argmin(np.abs((point - origins) @ normal)))
        if k not in chosen:
            chosen.append(k)
    return [datasets[k] for k in chosen]


def _build_kos(
    key: list[Dataset], src: _Source, algorithm: Algorithm, lesions: Sequence[Lesion]
) -> hd.ko.KeyObjectSelectionDocument:
    description = (
        "Key images: the slice of each lesion's long axis (lungcad, AI, research)"
        if lesions
        else "Key image: the slice with the highest cancer probability (lungcad, AI, research)"
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=key,
        observer_device_context=algorithm.observer(),
        description=description,
    )
    try:
        return hd.ko.KeyObjectSelectionDocument(
            evidence=key,
            content=content,
            series_instance_uid=hd.UID(),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=algorithm.manufacturer,
            series_description="lungcad key images (AI, research)",
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise InputError(
            f"cannot build the DICOM KOS from this CT series: {err}", src.where
        ) from err


def _save(dataset: pydicom.Dataset, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    log.info("wrote %s (%s)", path, dataset.SOPClassUID.name)
    return path
