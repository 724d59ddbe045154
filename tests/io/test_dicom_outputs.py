"""Tests for lungcad.io.dicom_outputs: DICOM SEG and SR that reference their source CT.

The source series is written here with pydicom in two layouts so the canonical z order (feet to
head, LPS) differs from the files' own order and pixel layout:

* "axial": files head-to-feet (file 0 is the top slice), pixels in LPS row/column order;
* "flipped": files feet-to-head but ImageOrientationPatient (-1,0,0, 0,1,0), so each file's
  columns run right-to-left, the canonical x axis reversed.

The canonical Volume is built by hand (as lungcad.io.read_image returns it) and cross-checked
against SimpleITK's own reading of the files.
"""

from __future__ import annotations

import math
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
from lungcad.inference.lesions import find_lesions
from lungcad.io import read_image
from lungcad.io.dicom_outputs import DISCLAIMER, write_dicom_seg, write_dicom_sr
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.volume import Volume, to_canonical

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


def _check_seg(path: Path, mask: np.ndarray, truth: Volume) -> None:
    """The SEG at ``path`` holds canonical ``mask`` on the series ``truth`` was written as."""
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

    # One frame per slice holding tumour (empty slices omitted), each referencing the CT
    # image at the same position, with the mask's pixels in that image's own layout.
    flipped = float(pydicom.dcmread(truth.meta["slice_files"][0]).ImageOrientationPatient[0]) < 0
    seen_z = []
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
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
        expected = mask[z, :, ::-1] if flipped else mask[z]
        assert np.array_equal(frame, expected.astype(frame.dtype))
        seen_z.append(z)
    z_first, z_last = min(seen_z), max(seen_z)
    assert sorted(seen_z) == list(range(z_first, z_last + 1))
    assert not mask[:z_first].any() and not mask[z_last + 1 :].any()

    # highdicom's own geometry-aware reading, put in canonical (z=Head, y=Posterior, x=Left)
    # order, gives back the mask at the right place in patient space.
    volume = seg.get_volume(combine_segments=True).to_patient_orientation("HPL")
    assert np.array_equal(volume.array, mask[z_first : z_last + 1].astype(volume.array.dtype))
    assert np.allclose(volume.affine[:3, 3], truth.index_to_physical([z_first, 0, 0])[0])


def test_seg_frames_reference_the_right_source_slices(ct, tmp_path):
    mask = _marked_sphere()
    out = write_dicom_seg(
        ct.with_array(mask), ct, tmp_path / "out" / "seg.dcm", algorithm_version="9.9"
    )
    _check_seg(out, mask, ct)
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "BINARY"
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Tumour"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Neoplasm.value
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "lungcad"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"
    assert seg.ContentQualification == "RESEARCH"


def test_seg_from_a_series_read_by_lungcad_io(ct, tmp_path):
    source = read_image(Path(ct.meta["slice_files"][0]).parent)
    assert source.same_geometry(ct)
    mask = _marked_sphere()
    out = write_dicom_seg(source.with_array(mask), source, tmp_path / "seg.dcm")
    _check_seg(out, mask, ct)


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
    out = write_dicom_seg(source.with_array(mask), source, tmp_path / "seg.dcm")

    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == 3  # one per sagittal image the box touches
    assert all("DerivationImageSequence" in f for f in seg.PerFrameFunctionalGroupsSequence)
    # Every SEG voxel lands, in patient space, on a canonical mask voxel, and all are covered.
    volume = seg.get_volume(combine_segments=True)
    physical = volume.map_indices_to_reference(np.argwhere(volume.array > 0))
    xyz = np.linalg.solve(source.direction, (physical - source.origin).T).T / source.spacing[::-1]
    zyx = np.rint(xyz[:, ::-1]).astype(int)
    assert np.allclose(xyz[:, ::-1], zyx, atol=1e-3)
    back = np.zeros(source.shape, np.float32)
    back[tuple(zyx.T)] = 1
    assert np.array_equal(back, mask)


def test_seg_of_a_resampled_source_keeps_the_mask_grid(ct, tmp_path):
    # As the reader reports a series whose uneven spacing was resampled: the grid is shifted
    # off the DICOM slice positions, so frames carry the mask's own positions.
    meta = dict(ct.meta, resampled=True)
    origin = (ct.origin[0], ct.origin[1], ct.origin[2] + 1.0)
    source = Volume(array=ct.array, spacing=SPACING, origin=origin, meta=meta)
    mask = _marked_sphere()
    out = write_dicom_seg(source.with_array(mask), source, tmp_path / "seg.dcm")
    seg = hd.seg.segread(out)
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == ct.meta["series_instance_uid"]
    assert seg.FrameOfReferenceUID == ct.meta["frame_of_reference_uid"]
    volume = seg.get_volume(combine_segments=True).to_patient_orientation("HPL")
    assert np.array_equal(volume.array, mask[1:4].astype(volume.array.dtype))
    assert np.allclose(volume.affine[:3, 3], source.index_to_physical([1, 0, 0])[0])


def test_seg_needs_the_source_files(ct, tmp_path):
    Path(ct.meta["slice_files"][4]).unlink()
    with pytest.raises(MissingInputError, match="IM"):
        write_dicom_seg(ct.with_array(_marked_sphere()), ct, tmp_path / "seg.dcm")


def test_fractional_seg_stores_probabilities(ct, tmp_path):
    mask = _sphere_mask()
    prob = np.where(mask > 0, 0.8, 0.0).astype(np.float32)
    prob[2, 9, 12] = 1.0
    out = write_dicom_seg(
        ct.with_array(mask), ct, tmp_path / "frac.dcm", fractional_probability=ct.with_array(prob)
    )
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255
    stored = seg.pixel_array.astype(np.float64) / seg.MaximumFractionalValue
    assert stored.max() == pytest.approx(1.0)
    assert set(np.round(np.unique(stored), 2)) == {0.0, 0.8, 1.0}


def test_empty_mask_still_writes_a_valid_seg(ct, tmp_path):
    out = write_dicom_seg(ct.with_array(np.zeros(SHAPE, np.float32)), ct, tmp_path / "e.dcm")
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == SHAPE[0]
    assert not seg.pixel_array.any()


def test_seg_rejects_bad_inputs(ct, tmp_path):
    out = tmp_path / "bad.dcm"
    with pytest.raises(InputError, match="grid"):
        write_dicom_seg(
            Volume(array=np.zeros((7, 24, 21), np.float32), spacing=SPACING, origin=ORIGIN), ct, out
        )
    shifted = Volume(array=_sphere_mask(), spacing=SPACING, origin=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        write_dicom_seg(shifted, ct, out)
    with pytest.raises(InputError, match="binary"):
        write_dicom_seg(ct.with_array(_sphere_mask() * 0.5), ct, out)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        write_dicom_seg(
            ct.with_array(_sphere_mask()),
            ct,
            out,
            fractional_probability=ct.with_array(_sphere_mask() * 2),
        )
    nifti_source = Volume(
        array=ct.array,
        spacing=SPACING,
        origin=ORIGIN,
        meta={"format": "nifti", "source_path": "ct.nii.gz"},
    )
    with pytest.raises(InputError, match="needs a DICOM source.*NIfTI"):
        write_dicom_seg(nifti_source.with_array(_sphere_mask()), nifti_source, out)
    with pytest.raises(InputError, match="needs a DICOM source"):
        write_dicom_sr([], 0.5, nifti_source, out)
    assert not out.exists()


def test_sr_references_study_and_holds_measurements(ct, tmp_path):
    mask = _sphere_mask()
    mask[5:7, 18:22, 2:5] = 1  # a second, smaller lesion
    prob = np.where(mask > 0, 0.9, 0.01).astype(np.float32)
    lesions = find_lesions(ct.with_array(mask), hu=ct, probability=ct.with_array(prob))
    assert len(lesions) == 2
    out = write_dicom_sr(lesions, 0.87, ct, tmp_path / "sr.dcm", algorithm_version="1.2.3")
    sr = pydicom.dcmread(out)

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == ct.meta["study_instance_uid"]
    assert sr.PatientID == "LUNGCAD-TEST-1"
    assert sr.VerificationFlag == "UNVERIFIED"
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (ref_series,) = evidence.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == ct.meta["series_instance_uid"]
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedSOPSequence} == set(
        ct.meta["sop_instance_uids"]
    )

    report = hd.sr.srread(out).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for lesion, group in zip(lesions, groups, strict=True):
        assert group.tracking_identifier == f"Lesion {lesion.id}"
        assert _texts(group, "111001") == ["lungcad"]  # Algorithm Name
        assert _texts(group, "111003") == ["1.2.3"]  # Algorithm Version
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion.volume_ml)
        assert volume.unit.value == "ml"
        (diameter,) = group.get_measurements(name=codes.SCT.LongAxis)
        assert diameter.value == pytest.approx(lesion.longest_axial_diameter_mm)
        assert diameter.unit.value == "mm"
        probabilities = group.get_measurements(name=codes.DCM.Probability)
        assert [p.value for p in probabilities] == pytest.approx([0.9, 0.9])
        (attenuation,) = [m for m in group.get_measurements() if m.unit.value == "[hnsf'U]"]
        assert attenuation.value == pytest.approx(lesion.mean_hu, abs=1e-3)
        surface = group.roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == ct.meta["frame_of_reference_uid"]
        assert np.allclose(surface.graphic_data, [lesion.centroid_lps_mm], atol=1e-3)
        assert not surface.has_source_images()
        assert surface.source_series_for_segmentation.value == ct.meta["series_instance_uid"]
    # The first lesion is the sphere; its centroid is at canonical voxel (2, 9, 12).
    assert np.allclose(
        groups[0].roi.graphic_data[0], ct.index_to_physical([2, 9, 12])[0], atol=1e-3
    )

    (study_group,) = report.get_image_measurement_groups()
    (probability,) = study_group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.87)

    assert DISCLAIMER in _texts(sr, "121106")  # Comment
    assert sr.ContentQualification == "RESEARCH"


def test_sr_without_lesions_still_reports_probability(ct, tmp_path):
    out = write_dicom_sr([], 0.02, ct, tmp_path / "sr0.dcm")
    report = hd.sr.srread(out).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    (probability,) = group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.02)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        write_dicom_sr([], 1.5, ct, tmp_path / "bad.dcm")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        write_dicom_sr([], math.nan, ct, tmp_path / "bad.dcm")


def _walk(sequence):
    for item in sequence:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _texts(root, concept_code: str) -> list[str]:
    """TextValue of every TEXT item named ``concept_code`` below ``root``'s content."""
    items = _walk(root.ContentSequence if hasattr(root, "ContentSequence") else root)
    return [
        item.TextValue
        for item in items
        if "TextValue" in item and item.ConceptNameCodeSequence[0].CodeValue == concept_code
    ]
