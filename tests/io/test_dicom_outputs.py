"""Tests for lungcad.io.dicom_outputs: the IHE AIR-style SEG, SR and KOS of a CT series.

The source series is written here with pydicom in two layouts so the canonical z order (feet to
head, LPS) differs from the files' own order and pixel layout:

* "axial": files head-to-feet (file 0 is the top slice), pixels in LPS row/column order;
* "flipped": files feet-to-head but ImageOrientationPatient (-1,0,0, 0,1,0), so each file's
  columns run right-to-left, the canonical x axis reversed.

The canonical Volume is built by hand (as lungcad.io.read_image returns it) and cross-checked
against SimpleITK's own reading of the files. Series with uneven spacing or gantry tilt (which
the reader resamples) and sparse, anonymised headers are built with tests.io.test_dicom's
writer. Every SEG, SR and KOS written here is checked with dciodvfy (dicom3tools), and SEGs
are rebuilt with dcmqi and compared with lungcad's NIfTI mask (tests.dicom_conformance).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungcad.errors import InputError, MissingInputError
from lungcad.finding import CANNOT_ASSESS, NO_CLASSIFIER, StudyFinding
from lungcad.inference.lesions import find_lesions, lesion_labels
from lungcad.io import read_image
from lungcad.io.dicom_outputs import (
    DISCLAIMER,
    Algorithm,
    write_dicom_results,
    write_dicom_seg,
    write_dicom_sr,
)
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.io.writers import write_mask
from lungcad.volume import Volume, to_canonical
from tests.dicom_conformance import assert_conformant, assert_seg_matches_nifti
from tests.io.test_dicom import ct_hu, slice_geometry, write_series

SHAPE = (7, 24, 20)  # (z, y, x)
SPACING = (2.5, 0.7, 0.8)  # (z, y, x) mm
ORIGIN = (-7.6, -8.05, -30.0)  # LPS (x, y, z) of canonical voxel [0, 0, 0]


def _canonical_ct(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, size=SHAPE).astype(np.float32)


def _sphere_mask() -> np.ndarray:
    z, y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float64)
    dist = np.sqrt(
        ((z - 2) * SPACING[0]) ** 2 + ((y - 9) * SPACING[1]) ** 2 + ((x - 12) * SPACING[2]) ** 2
    )
    return (dist <= 4.0).astype(np.float32)  # slices 1..3: off-centre in z, y and x


def _write_series(folder: Path, hu: np.ndarray, layout: str) -> Volume:
    """Write canonical ``hu`` (z, y, x) as single-frame CT files; return the canonical Volume."""
    folder.mkdir(parents=True)
    nz, ny, nx = hu.shape
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    files_by_z: dict[int, str] = {}
    uids_by_z: dict[int, str] = {}
    for file_index in range(nz):
        if layout == "axial":
            z = nz - 1 - file_index  # head to feet
            pixels = hu[z]
            iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ipp = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + z * SPACING[0]]
        else:
            z = file_index  # feet to head, columns right to left
            pixels = hu[z, :, ::-1]
            iop = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ipp = [ORIGIN[0] + (nx - 1) * SPACING[2], ORIGIN[1], ORIGIN[2] + z * SPACING[0]]
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "LUNGCAD-TEST-1", "Test^Phantom"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "pytest", 1, file_index + 1
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [round(v, 4) for v in ipp]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = SPACING[0]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
        name = folder / f"IM{file_index:04d}.dcm"
        ds.save_as(name, enforce_file_format=True)
        files_by_z[z], uids_by_z[z] = str(name), ds.SOPInstanceUID
    return Volume(
        array=hu.astype(np.float32),
        spacing=SPACING,
        origin=ORIGIN,
        meta={
            "source_path": str(folder),
            "format": "dicom",
            "study_instance_uid": study,
            "series_instance_uid": series,
            "frame_of_reference_uid": frame_of_reference,
            "slice_files": [files_by_z[z] for z in range(nz)],
            "sop_instance_uids": [uids_by_z[z] for z in range(nz)],
        },
    )


@pytest.fixture(params=["axial", "flipped"])
def ct(request, tmp_path) -> Volume:
    volume = _write_series(tmp_path / "ct", _canonical_ct(), request.param)
    # The hand-built canonical Volume must be what a real reader makes of these files.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    read = to_canonical(Volume.from_sitk(reader.Execute()))
    assert read.same_geometry(volume) and np.array_equal(read.array, volume.array)
    return volume


def _position_to_z(volume: Volume, position) -> int:
    return int(round((float(position[2]) - volume.origin[2]) / volume.spacing[0]))


def _marked_sphere() -> np.ndarray:
    array = _sphere_mask()
    array[3, 20, 3] = 1  # a marker that tells slice 3 from slice 1 and left from right
    return array


def _lesions_and_labels(volume: Volume, mask: np.ndarray):
    """find_lesions (with HU) and the label image of ``mask`` on ``volume``'s grid."""
    mask_volume = volume.with_array(mask.astype(np.uint8))
    prob = volume.with_array(np.where(mask > 0, 0.9, 0.01).astype(np.float32))
    lesions = find_lesions(mask_volume, hu=volume, probability=prob)
    return lesions, mask_volume.with_array(lesion_labels(mask_volume, lesions))


STUDY_FINDING = hd.sr.CodedConcept("STUDY-FINDING", "99LUNGCAD", "Study finding")
ALGORITHM = Algorithm(version="9.9+abc", configuration_hash="c0ffee" * 10 + "abcd")


def _check_seg(path: Path, labels: np.ndarray, truth: Volume) -> None:
    """The SEG at ``path`` holds canonical ``labels`` (one segment per id) on ``truth``'s series."""
    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == truth.meta["study_instance_uid"]
    assert seg.FrameOfReferenceUID == truth.meta["frame_of_reference_uid"]
    assert seg.SeriesInstanceUID != truth.meta["series_instance_uid"]
    assert seg.PatientID == "LUNGCAD-TEST-1"
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == truth.meta["series_instance_uid"]
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(
        truth.meta["sop_instance_uids"]
    )

    # One frame per segment and slice holding it (empty frames omitted), each referencing the
    # CT image at the same position, with the segment's pixels in that image's own layout.
    flipped = float(pydicom.dcmread(truth.meta["slice_files"][0]).ImageOrientationPatient[0]) < 0
    seen: dict[int, list[int]] = {}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (derivation,) = item.DerivationImageSequence
        (src,) = derivation.SourceImageSequence
        z = truth.meta["sop_instance_uids"].index(src.ReferencedSOPInstanceUID)
        source_ds = pydicom.dcmread(truth.meta["slice_files"][z])
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(
            [float(v) for v in position],
            [float(v) for v in source_ds.ImagePositionPatient],
            atol=1e-4,
        )
        assert _position_to_z(truth, position) == z
        expected = (labels[z] == number)[:, ::-1] if flipped else labels[z] == number
        assert np.array_equal(frame, expected.astype(frame.dtype))
        seen.setdefault(number, []).append(z)
    for number, zs in seen.items():
        assert sorted(zs) == sorted(np.flatnonzero((labels == number).any(axis=(1, 2))).tolist())
    assert set(seen) == set(np.unique(labels)) - {0}

    # highdicom's own geometry-aware reading, put in canonical (z=Head, y=Posterior, x=Left)
    # order, gives back the labels at the right place in patient space.
    z_first = min(min(zs) for zs in seen.values())
    z_last = max(max(zs) for zs in seen.values())
    volume = seg.get_volume(combine_segments=True).to_patient_orientation("HPL")
    assert np.array_equal(volume.array, labels[z_first : z_last + 1].astype(volume.array.dtype))
    assert np.allclose(volume.affine[:3, 3], truth.index_to_physical([z_first, 0, 0])[0])
    # Pixel Measures: the frames' own grid (CT SliceThickness 2.5 is the spacing here too).
    (measures,) = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert float(measures.SpacingBetweenSlices) == pytest.approx(truth.spacing[0])
    assert float(measures.SliceThickness) == pytest.approx(truth.spacing[0])


def test_seg_has_one_segment_per_lesion_on_the_right_source_slices(ct, tmp_path):
    lesions, labels = _lesions_and_labels(ct, _marked_sphere())
    assert len(lesions) == 2  # the sphere and the one-voxel marker
    out = write_dicom_seg(labels, lesions, ct, tmp_path / "out" / "seg.dcm", algorithm=ALGORITHM)
    _check_seg(out, labels.array, ct)
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lesion 1", "Lesion 2"]
    for segment in seg.SegmentSequence:
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Neoplasm.value
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "lungcad"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmVersion == "9.9+abc"
        assert ALGORITHM.configuration_hash in algorithm.AlgorithmParameters
        assert segment.TrackingID == segment.SegmentLabel
        assert len(segment.RecommendedDisplayCIELabValue) == 3
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence}
    assert len(colours) == 2
    assert str(seg.ContentCreatorName) == "lungcad^"
    assert seg.ContentQualification == "RESEARCH"
    assert_conformant(out)


def test_seg_from_a_series_read_by_lungcad_io(ct, tmp_path):
    source = read_image(Path(ct.meta["slice_files"][0]).parent)
    assert source.same_geometry(ct)
    lesions, labels = _lesions_and_labels(source, _marked_sphere())
    out = write_dicom_seg(labels, lesions, source, tmp_path / "seg.dcm")
    _check_seg(out, labels.array, ct)


def test_seg_of_a_sagittal_series_maps_back_voxel_for_voxel(tmp_path):
    # Sagittal acquisition: rows run anterior-posterior, columns head-feet, slices right-left,
    # so the canonical array stacks the DICOM images along x, not z.
    direction = np.column_stack([[0, 1, 0], [0, 0, -1], [1, 0, 0]]).astype(float)
    acquired = Volume(
        array=_canonical_ct(), spacing=(2.0, 0.75, 0.9), origin=(10, -20, 30), direction=direction
    )
    write_dicom_series(acquired, tmp_path / "ct", uid_seed=3)
    source = read_image(tmp_path / "ct")
    assert source.shape == (SHAPE[1], SHAPE[2], SHAPE[0])
    mask = np.zeros(source.shape, np.float32)
    mask[8:14, 5:9, 2:5] = 1
    mask[13, 8, 4] = 0  # asymmetric along every axis
    lesions, labels = _lesions_and_labels(source, mask)
    out = write_dicom_seg(labels, lesions, source, tmp_path / "seg.dcm")

    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == 3  # one per sagittal image the box touches
    assert all("DerivationImageSequence" in f for f in seg.PerFrameFunctionalGroupsSequence)
    (measures,) = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.0)  # between sagittal images
    # Every SEG voxel lands, in patient space, on a canonical mask voxel, and all are covered.
    volume = seg.get_volume(combine_segments=True)
    physical = volume.map_indices_to_reference(np.argwhere(volume.array > 0))
    xyz = np.linalg.solve(source.direction, (physical - source.origin).T).T / source.spacing[::-1]
    zyx = np.rint(xyz[:, ::-1]).astype(int)
    assert np.allclose(xyz[:, ::-1], zyx, atol=1e-3)
    back = np.zeros(source.shape, np.float32)
    back[tuple(zyx.T)] = 1
    assert np.array_equal(back, mask)
    assert_conformant(out)
    write_mask(labels, tmp_path / "labels.nii.gz")
    assert_seg_matches_nifti(out, tmp_path / "labels.nii.gz", tmp_path / "dcmqi")


def test_seg_needs_the_source_files(ct, tmp_path):
    lesions, labels = _lesions_and_labels(ct, _marked_sphere())
    Path(ct.meta["slice_files"][4]).unlink()
    with pytest.raises(MissingInputError, match="IM"):
        write_dicom_seg(labels, lesions, ct, tmp_path / "seg.dcm")


def test_seg_rejects_bad_inputs(ct, tmp_path):
    out = tmp_path / "bad.dcm"
    lesions, labels = _lesions_and_labels(ct, _sphere_mask())
    with pytest.raises(InputError, match="no lesion"):
        write_dicom_seg(labels, [], ct, out)  # never an empty segment
    other = Volume(array=np.zeros((7, 24, 21), np.uint16), spacing=SPACING, origin=ORIGIN)
    with pytest.raises(InputError, match="grid"):
        write_dicom_seg(other, lesions, ct, out)
    shifted = Volume(array=labels.array, spacing=SPACING, origin=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        write_dicom_seg(shifted, lesions, ct, out)
    with pytest.raises(InputError, match="lesions"):
        write_dicom_seg(labels.with_array(labels.array * 3), lesions, ct, out)
    nifti_source = Volume(
        array=ct.array,
        spacing=SPACING,
        origin=ORIGIN,
        meta={"format": "nifti", "source_path": "ct.nii.gz"},
    )
    with pytest.raises(InputError, match="needs a DICOM source.*NIfTI"):
        write_dicom_seg(nifti_source.with_array(labels.array), lesions, nifti_source, out)
    with pytest.raises(InputError, match="needs a DICOM source"):
        write_dicom_sr([], StudyFinding.decide(0.5, 0.5), nifti_source, out)
    assert not out.exists()


def _results(ct: Volume, mask: np.ndarray, finding: StudyFinding, out: Path, **options):
    lesions, labels = _lesions_and_labels(ct, mask)
    out.mkdir(parents=True, exist_ok=True)
    result = write_dicom_results(ct, labels, lesions, finding, out, algorithm=ALGORITHM, **options)
    assert_conformant(*result.paths.values())
    return lesions, labels, result


def test_air_result_links_seg_segments_sr_groups_and_key_images(ct, tmp_path):
    mask = _sphere_mask()
    mask[5:7, 18:22, 2:5] = 1  # a second, smaller lesion
    finding = StudyFinding.decide(0.87, 0.4)
    lesions, labels, result = _results(ct, mask, finding, tmp_path / "out")
    assert len(lesions) == 2
    assert sorted(result.paths) == ["ko.dcm", "seg.dcm", "sr.dcm"]
    seg = hd.seg.segread(result.paths["seg.dcm"])
    sr = pydicom.dcmread(result.paths["sr.dcm"])
    ko = pydicom.dcmread(result.paths["ko.dcm"])

    # All in the source study, each in a new series of its own.
    series = {ct.meta["series_instance_uid"], seg.SeriesInstanceUID}
    series |= {sr.SeriesInstanceUID, ko.SeriesInstanceUID}
    assert len(series) == 4
    for ds in (seg, sr, ko):
        assert ds.StudyInstanceUID == ct.meta["study_instance_uid"]
        assert ds.PatientID == "LUNGCAD-TEST-1" and str(ds.PatientName) == "Test^Phantom"
        assert ds.AccessionNumber == "A1"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ko.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentQualification == "RESEARCH"
    # The SR's evidence: the CT series and the SEG.
    evidence = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
    }
    assert evidence == {
        ct.meta["series_instance_uid"]: set(ct.meta["sop_instance_uids"]),
        seg.SeriesInstanceUID: {seg.SOPInstanceUID},
    }

    # Each lesion group references its own segment, with the segment's tracking UID.
    report = hd.sr.srread(result.paths["sr.dcm"]).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    for lesion, group in zip(lesions, groups, strict=True):
        segment = segments[lesion.id]
        assert group.tracking_identifier == f"Lesion {lesion.id}" == segment.TrackingID
        assert group.tracking_uid == segment.TrackingUID == result.tracking_uids[lesion.id]
        referenced = group.referenced_segment
        assert referenced.referenced_segment_numbers == [lesion.id]
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert _texts(group, "111001") == ["lungcad"]  # Algorithm Name
        assert _texts(group, "111003") == ["9.9+abc"]  # Algorithm Version
        assert _texts(group, "111002") == [f"configuration sha256 {ALGORITHM.configuration_hash}"]
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion.volume_ml)
        assert volume.unit.value == "ml"
        (long_axis,) = group.get_measurements(name=codes.SCT.LongAxis)
        assert long_axis.value == pytest.approx(lesion.longest_axial_diameter_mm)
        (short_axis,) = group.get_measurements(name=codes.SCT.ShortAxis)
        assert short_axis.value == pytest.approx(lesion.short_axis_mm)
        assert 0 < short_axis.value <= long_axis.value
        assert long_axis.unit.value == short_axis.unit.value == "mm"
        probabilities = group.get_measurements(name=codes.DCM.Probability)
        assert [p.value for p in probabilities] == pytest.approx([0.9, 0.9])
        (attenuation,) = [m for m in group.get_measurements() if m.unit.value == "[hnsf'U]"]
        assert attenuation.value == pytest.approx(lesion.mean_hu, abs=1e-3)
        (site,) = group.finding_sites
        assert site.value == codes.SCT.Lung
        (laterality,) = [
            i for i in site.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "272741003"
        ]
        side = {"right": codes.SCT.Right, "left": codes.SCT.Left}[lesion.side]
        assert laterality.ConceptCodeSequence[0].CodeValue == side.value

    # The study finding: decision, probability, threshold, number of lesions.
    (study,) = report.get_image_measurement_groups()
    (probability,) = study.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.87)
    (threshold,) = [m for m in study.get_measurements() if m.name.value == "122411"]
    assert threshold.value == pytest.approx(0.4)
    (count,) = [m for m in study.get_measurements() if m.name.value == "LESION-COUNT"]
    assert count.value == 2
    (decision,) = study.get_qualitative_evaluations(name=STUDY_FINDING)
    assert decision.value.meaning == "cancer suspected"
    assert decision.value.scheme_designator == "99LUNGCAD"
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99LUNGCAD"
    assert DISCLAIMER in _texts(sr, "121106")  # Comment

    # The device observer: one stable UID for this algorithm, in the SR and the KOS.
    assert _uids(sr, "121012") == [ALGORITHM.device_observer_uid]  # Device Observer UID
    assert _uids(ko, "121012") == [ALGORITHM.device_observer_uid]
    assert ALGORITHM.device_observer_uid == Algorithm(**vars(ALGORITHM)).device_observer_uid
    assert Algorithm(version="other").device_observer_uid != ALGORITHM.device_observer_uid
    assert result.device_observer_uid == ALGORITHM.device_observer_uid

    # Key images: the CT image of each lesion's long axis.
    keys = {
        i.ReferencedSOPInstanceUID
        for s in ko.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert keys == {ct.meta["sop_instance_uids"][les.diameter_slice] for les in lesions}
    (description,) = _texts(ko, "113012")  # Key Object Description
    assert description.startswith("Key images")
    assert result.key_images and set(result.key_images) == keys

    # A rerun gives the same tracking UIDs (new SOP instances).
    _, _, again = _results(ct, mask, finding, tmp_path / "again")
    assert again.tracking_uids == result.tracking_uids
    assert pydicom.dcmread(again.paths["seg.dcm"]).SOPInstanceUID != seg.SOPInstanceUID


def test_no_lesion_means_no_seg_and_an_sr_that_says_so(ct, tmp_path):
    probabilities = np.array([0.1, 0.2, 0.9, 0.3, np.nan, 0.2, 0.1])
    _, _, result = _results(
        ct,
        np.zeros(SHAPE, np.float32),
        StudyFinding.decide(0.02, 0.4),
        tmp_path,
        slice_probabilities=probabilities,
    )
    assert sorted(result.paths) == ["ko.dcm", "sr.dcm"]  # no SEG: there is no empty segment
    assert not (tmp_path / "seg.dcm").exists()
    sr = pydicom.dcmread(result.paths["sr.dcm"])
    report = hd.sr.srread(result.paths["sr.dcm"]).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (study,) = report.get_image_measurement_groups()
    (count,) = [m for m in study.get_measurements() if m.name.value == "LESION-COUNT"]
    assert count.value == 0
    (decision,) = study.get_qualitative_evaluations(name=STUDY_FINDING)
    assert decision.value.meaning == "no cancer suspected"
    assert any(text.startswith("No lesion found") for text in _texts(sr, "121106"))
    # The key image is the most suspicious slice (z = 2).
    ko = pydicom.dcmread(result.paths["ko.dcm"])
    (key,) = ko.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in key.ReferencedSOPSequence] == [
        ct.meta["sop_instance_uids"][2]
    ]


@pytest.mark.parametrize("status", [CANNOT_ASSESS, NO_CLASSIFIER])
def test_sr_without_a_decision_says_why(ct, status, tmp_path):
    finding = StudyFinding.not_assessed(status, "no lung in the image")
    _, _, result = _results(ct, _sphere_mask(), finding, tmp_path)
    sr = pydicom.dcmread(result.paths["sr.dcm"])
    (study,) = hd.sr.srread(result.paths["sr.dcm"]).content.get_image_measurement_groups()
    assert study.get_measurements(name=codes.DCM.ProbabilityOfCancer) == []
    assert [m for m in study.get_measurements() if m.name.value == "122411"] == []
    (decision,) = study.get_qualitative_evaluations(name=STUDY_FINDING)
    assert decision.value.meaning == status
    assert f"Study not assessed ({status}): no lung in the image" in _texts(sr, "121106")


def test_sr_alone_places_lesions_by_their_centroid(ct, tmp_path):
    lesions, _ = _lesions_and_labels(ct, _sphere_mask())
    out = write_dicom_sr(lesions, StudyFinding.decide(0.5, 0.5), ct, tmp_path / "sr.dcm")
    (group,) = hd.sr.srread(out).content.get_volumetric_roi_measurement_groups()
    surface = group.roi
    assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
    assert surface.frame_of_reference_uid == ct.meta["frame_of_reference_uid"]
    assert np.allclose(surface.graphic_data[0], ct.index_to_physical([2, 9, 12])[0], atol=1e-3)
    assert_conformant(out)


# ------------------------------------------------------------ resampled, tilted, flipped


def _uneven_series(folder: Path) -> None:
    geometry = slice_geometry(8)
    for g, z in zip(geometry, [0, 2.5, 5, 7.5, 10.5, 13, 15.5, 18], strict=True):
        g["position"] = np.asarray(g["position"]) + [0.0, 0.0, z - g["position"][2] + 100.25]
    write_series(folder, ct_hu(shape=(8, 20, 24)), geometry)
    _edit_series(folder, _nominal_spacing)


def _tilted_series(folder: Path) -> None:
    geometry = slice_geometry(8)
    for k, g in enumerate(geometry):
        g["position"] = g["position"] + [0, k * 0.35, 0]  # gantry tilt: origins drift in y
    write_series(folder, ct_hu(shape=(8, 20, 24)), geometry)
    _edit_series(folder, _nominal_spacing)


def _nominal_spacing(ds: pydicom.Dataset) -> None:
    # Scanners state the nominal spacing, which highdicom would copy into the SEG; after
    # resampling (2.5714 mm for the uneven series) it is not the SEG frames' spacing.
    ds.SpacingBetweenSlices = "2.5"


def _flipped_series(folder: Path) -> None:
    # Rows and columns both reversed (IOP -1,0,0 / 0,-1,0) and files feet-to-head.
    write_series(
        folder,
        ct_hu(shape=(8, 20, 24)),
        slice_geometry(8, row=(-1.0, 0.0, 0.0), col=(0.0, -1.0, 0.0)),
    )


@pytest.mark.parametrize(
    "build",
    [_uneven_series, _tilted_series, _flipped_series],
    ids=["uneven-spacing", "gantry-tilt", "flipped"],
)
def test_seg_round_trips_through_dcmqi_to_the_nifti_mask(build, tmp_path):
    build(tmp_path / "ct")
    source = read_image(tmp_path / "ct")
    resampled = bool(source.meta.get("resampled"))
    assert resampled == (build is not _flipped_series)
    mask = np.zeros(source.shape, np.uint8)
    mask[2:6, 5:12, 6:15] = 1
    mask[1:3, 14:18, 18:22] = 1  # a second lesion, sharing slices with the first
    lesions, labels = _lesions_and_labels(source, mask)
    finding = StudyFinding.decide(0.7, 0.5)
    result = write_dicom_results(source, labels, lesions, finding, tmp_path, algorithm=ALGORITHM)
    assert_conformant(*result.paths.values())
    seg_path = result.paths["seg.dcm"]
    seg = hd.seg.segread(seg_path)
    # Pixel Measures of the SEG's own frames: the resampled grid's spacing, not the CT's
    # SliceThickness (9.9 mm in these files), SpacingBetweenSlices (2.5) or uneven steps.
    (measures,) = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert float(measures.SpacingBetweenSlices) == pytest.approx(source.spacing[0], rel=1e-6)
    assert float(measures.SliceThickness) == pytest.approx(source.spacing[0], rel=1e-6)
    # highdicom's reader accepts it and puts the labels where they were, in patient space.
    volume = seg.get_volume(combine_segments=True).to_patient_orientation("HPL")
    z = np.flatnonzero(labels.array.any(axis=(1, 2)))
    assert np.array_equal(volume.array, labels.array[z[0] : z[-1] + 1].astype(volume.array.dtype))
    # dcmqi rebuilds every segment on lungcad's NIfTI grid, voxel for voxel.
    write_mask(source.with_array(mask), tmp_path / "mask.nii.gz")
    write_mask(labels, tmp_path / "labels.nii.gz")
    assert_seg_matches_nifti(seg_path, tmp_path / "mask.nii.gz", tmp_path / "dcmqi-mask")
    assert_seg_matches_nifti(seg_path, tmp_path / "labels.nii.gz", tmp_path / "dcmqi-labels")


# ------------------------------------------------------------ sparse, anonymised headers


def _edit_series(folder: Path, edit) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)


def _delete(*keywords: str):
    def edit(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return edit


def _empty_slice_thickness(ds: pydicom.Dataset) -> None:
    ds.SliceThickness = ""


SPARSE = {
    "no FrameOfReferenceUID": _delete("FrameOfReferenceUID"),
    "empty SliceThickness": _empty_slice_thickness,
    "no PatientName": _delete("PatientName"),
    "no AccessionNumber": _delete("AccessionNumber"),
    "no Type 2 attributes": _delete(
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "SliceThickness",
        "FrameOfReferenceUID",
    ),
}


@pytest.mark.parametrize("case", list(SPARSE))
def test_sparse_headers_still_give_a_complete_conformant_result(case, tmp_path):
    _write_series(tmp_path / "ct", _canonical_ct(), "flipped")
    _edit_series(tmp_path / "ct", SPARSE[case])
    source = read_image(tmp_path / "ct")
    lesions, labels = _lesions_and_labels(source, _marked_sphere())
    result = write_dicom_results(
        source, labels, lesions, StudyFinding.decide(0.6, 0.5), tmp_path, algorithm=ALGORITHM
    )
    assert sorted(result.paths) == ["ko.dcm", "seg.dcm", "sr.dcm"]
    assert_conformant(*result.paths.values())
    seg = hd.seg.segread(result.paths["seg.dcm"])
    sr = pydicom.dcmread(result.paths["sr.dcm"])
    no_frame_of_reference = "FrameOfReferenceUID" not in pydicom.dcmread(
        source.meta["slice_files"][0]
    )
    assert result.frame_of_reference_created == no_frame_of_reference
    if no_frame_of_reference:
        # Created once, derived from the series, used by the SEG and recorded in the SR.
        assert seg.FrameOfReferenceUID == result.frame_of_reference_uid
        assert result.frame_of_reference_uid.startswith("2.25.")
        assert any(result.frame_of_reference_uid in text for text in _texts(sr, "121106"))
        (tmp_path / "again").mkdir()
        finding = StudyFinding.decide(0.6, 0.5)
        again = write_dicom_results(source, labels, lesions, finding, tmp_path / "again")
        assert again.frame_of_reference_uid == result.frame_of_reference_uid
    else:
        assert seg.FrameOfReferenceUID == source.meta["frame_of_reference_uid"]
    # The SEG still lines up with the CT images, and dcmqi still rebuilds the mask.
    (measures,) = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert float(measures.SliceThickness) == pytest.approx(SPACING[0])
    write_mask(labels, tmp_path / "labels.nii.gz")
    assert_seg_matches_nifti(result.paths["seg.dcm"], tmp_path / "labels.nii.gz", tmp_path / "q")


def test_a_missing_type1_attribute_is_one_clear_error(tmp_path):
    _write_series(tmp_path / "ct", _canonical_ct(), "axial")
    source = read_image(tmp_path / "ct")
    broken = source.meta["slice_files"][3]
    ds = pydicom.dcmread(broken)
    del ds.SOPInstanceUID
    ds.save_as(broken, enforce_file_format=True)
    lesions, labels = _lesions_and_labels(source, _marked_sphere())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="SOPInstanceUID") as info:
        write_dicom_results(source, labels, lesions, StudyFinding.decide(0.6, 0.5), out)
    assert Path(broken).name in str(info.value)
    assert list(out.iterdir()) == []  # nothing half-written


def _walk(sequence):
    for item in sequence:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _items(root):
    return _walk(root.ContentSequence if hasattr(root, "ContentSequence") else root)


def _texts(root, concept_code: str) -> list[str]:
    """TextValue of every TEXT item named ``concept_code`` below ``root``'s content."""
    return [
        item.TextValue
        for item in _items(root)
        if "TextValue" in item and item.ConceptNameCodeSequence[0].CodeValue == concept_code
    ]


def _uids(root, concept_code: str) -> list[str]:
    """UID of every UIDREF item named ``concept_code`` below ``root``'s content."""
    return [
        item.UID
        for item in _items(root)
        if "UID" in item and item.ConceptNameCodeSequence[0].CodeValue == concept_code
    ]
