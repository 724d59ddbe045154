"""Enhanced (multi-frame) CT: read like the classic series it came from, or refused with why.

The multi-frame files are made here from classic series (``tests.io.test_dicom.write_series``)
by highdicom's Legacy Converted Enhanced CT conversion; an Enhanced CT Image is the same file
relabelled with that SOP class (its frames carry the same functional groups). Variants are
made by editing the functional groups with pydicom.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage

from lungcad.errors import InputError
from lungcad.finding import StudyFinding
from lungcad.inference.lesions import find_lesions, lesion_labels
from lungcad.io import read_image
from lungcad.io.dicom_outputs import write_dicom_seg, write_dicom_sr
from lungcad.io.writers import write_mask
from tests.dicom_conformance import assert_conformant, assert_seg_matches_nifti
from tests.io.test_dicom import SPACING, ct_hu, slice_geometry, write_series


def to_multiframe(
    classic: Path, out: Path, *, enhanced: bool = False, reverse: bool = False
) -> pydicom.Dataset:
    """The classic series in ``classic`` as one multi-frame file ``out/ct.dcm``."""
    datasets = sorted(
        (pydicom.dcmread(p) for p in classic.glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
        reverse=reverse,
    )
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=hd.UID(),
        series_number=7,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    if enhanced:
        mf.SOPClassUID = EnhancedCTImageStorage
        mf.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    return save(mf, out)


def save(ds: pydicom.Dataset, out: Path) -> pydicom.Dataset:
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(out / "ct.dcm", enforce_file_format=True)
    return ds


def frame(ds: pydicom.Dataset, k: int) -> pydicom.Dataset:
    return ds.PerFrameFunctionalGroupsSequence[k]


def frame_z(ds: pydicom.Dataset) -> np.ndarray:
    """Each frame's z position (mm), in frame order (the conversion chooses that order)."""
    return np.array(
        [
            float(f.PlanePositionSequence[0].ImagePositionPatient[2])
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
    )


@pytest.fixture
def classic(tmp_path: Path) -> tuple[Path, np.ndarray]:
    hu = ct_hu(3, shape=(6, 12, 16))
    folder = tmp_path / "classic"
    write_series(folder, hu, slice_geometry(len(hu)), slope=0.5, intercept=-1024.0)
    return folder, hu


@pytest.mark.parametrize("enhanced", [False, True], ids=["legacy-converted", "enhanced-ct"])
def test_enhanced_ct_reads_like_its_classic_series(classic, tmp_path: Path, enhanced) -> None:
    folder, hu = classic
    mf = to_multiframe(folder, tmp_path / "mf", enhanced=enhanced, reverse=True)
    volume, reference = read_image(tmp_path / "mf"), read_image(folder)
    np.testing.assert_array_equal(volume.array, reference.array)  # HU with the frames' rescale
    assert volume.same_geometry(reference, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, SPACING)  # from the frame positions
    meta = volume.meta
    assert meta["multiframe"] is True and meta["format"] == "dicom" and meta["modality"] == "CT"
    assert meta["frame_numbers"] == [int(k) + 1 for k in np.argsort(frame_z(mf))]  # feet first
    assert meta["slice_files"] == [str(tmp_path / "mf" / "ct.dcm")]
    assert meta["frame_of_reference_uid"] == reference.meta["frame_of_reference_uid"]
    assert meta["warnings"] == [] and meta["resampled"] is False


def test_flipped_orientation_and_uneven_frames_get_the_classic_treatment(tmp_path: Path) -> None:
    hu = ct_hu(4, shape=(5, 10, 8))
    geometry = slice_geometry(len(hu), row=(-1.0, 0.0, 0.0), col=(0.0, -1.0, 0.0))
    geometry[4]["position"] = geometry[4]["position"] + np.array([0.0, 0.0, 1.0])  # uneven
    write_series(tmp_path / "classic", hu, geometry)
    to_multiframe(tmp_path / "classic", tmp_path / "mf")
    volume, reference = read_image(tmp_path / "mf"), read_image(tmp_path / "classic")
    assert volume.meta["resampled"] is True and "uneven slice spacing" in volume.meta["warnings"][0]
    assert volume.same_geometry(reference, atol=1e-6)
    np.testing.assert_allclose(volume.array, reference.array, atol=1e-4)


def test_seg_and_sr_reference_the_multiframe_ct(classic, tmp_path: Path) -> None:
    folder, _ = classic
    source_ds = to_multiframe(folder, tmp_path / "mf", enhanced=True)
    volume = read_image(tmp_path / "mf")
    mask = np.zeros(volume.shape, np.uint8)
    mask[2:4, 3:7, 4:9] = 1
    lesions = find_lesions(volume.with_array(mask))
    labels = volume.with_array(lesion_labels(volume.with_array(mask), lesions))
    seg_path = write_dicom_seg(labels, lesions, volume, tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_ds.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == source_ds.FrameOfReferenceUID
    # The frames sit on the CT's slices: rebuild the mask on the CT grid from their positions.
    z_of = {
        round(float(p), 3): k for k, p in enumerate(volume.origin[2] + SPACING[0] * np.arange(6))
    }
    got = np.zeros_like(mask)
    pixels = seg.pixel_array
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        z = round(float(item.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
        got[z_of[z]] |= pixels[k].astype(np.uint8)
    np.testing.assert_array_equal(got, mask)
    finding = StudyFinding.decide(0.25, 0.5)
    sr_path = write_dicom_sr([], finding, volume, tmp_path / "sr.dcm")
    assert_conformant(seg_path, sr_path)
    write_mask(labels, tmp_path / "labels.nii.gz")
    assert_seg_matches_nifti(seg_path, tmp_path / "labels.nii.gz", tmp_path / "dcmqi")
    sr = pydicom.dcmread(sr_path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_ds.SOPInstanceUID


def test_geometry_faults_are_refused_as_in_a_classic_series(classic, tmp_path: Path) -> None:
    folder, _ = classic
    order = np.argsort(frame_z(to_multiframe(folder, tmp_path / "base")))  # frames by z
    # Two frames at one position: the classic duplicate check, naming the frames.
    dup = pydicom.dcmread(tmp_path / "base" / "ct.dcm")
    frame(dup, order[3]).PlanePositionSequence[0].ImagePositionPatient = list(
        frame(dup, order[2]).PlanePositionSequence[0].ImagePositionPatient
    )
    save(dup, tmp_path / "dup")
    with pytest.raises(InputError, match=r"duplicate slice position: ct\.dcm\[frame \d\]"):
        read_image(tmp_path / "dup")
    # A frame missing from the middle of the stack.
    gap = pydicom.dcmread(tmp_path / "base" / "ct.dcm")
    for k in order[3:]:
        position = frame(gap, k).PlanePositionSequence[0].ImagePositionPatient
        frame(gap, k).PlanePositionSequence[0].ImagePositionPatient = [
            *position[:2],
            float(position[2]) + 2 * SPACING[0],
        ]
    save(gap, tmp_path / "gap")
    with pytest.raises(InputError, match="slices missing"):
        read_image(tmp_path / "gap")
    # One frame in another orientation (per-frame Plane Orientation overrides the shared one).
    tilted = pydicom.dcmread(tmp_path / "base" / "ct.dcm")
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    frame(tilted, order[4]).PlaneOrientationSequence = [orientation]
    save(tilted, tmp_path / "tilted")
    with pytest.raises(
        InputError, match=rf"inconsistent ImageOrientationPatient.*frame {order[4] + 1}"
    ):
        read_image(tmp_path / "tilted")
    # No position at all for a frame.
    lost = pydicom.dcmread(tmp_path / "base" / "ct.dcm")
    del frame(lost, 1).PlanePositionSequence
    save(lost, tmp_path / "lost")
    with pytest.raises(InputError, match=r"frame 2\].*no ImagePositionPatient"):
        read_image(tmp_path / "lost")


def test_unsupported_variants_are_refused_with_the_reason(classic, tmp_path: Path) -> None:
    folder, _ = classic
    to_multiframe(folder, tmp_path / "base")
    base = tmp_path / "base" / "ct.dcm"
    stacks = pydicom.dcmread(base)
    for k in range(3):
        frame(stacks, k).FrameContentSequence[0].StackID = "2"
    save(stacks, tmp_path / "stacks")
    with pytest.raises(InputError, match=r"ct\.dcm: multi-frame CT with 2 stacks"):
        read_image(tmp_path / "stacks")
    temporal = pydicom.dcmread(base)
    for k in range(6):
        frame(temporal, k).FrameContentSequence[0].TemporalPositionIndex = 1 + k % 2
    save(temporal, tmp_path / "temporal")
    with pytest.raises(InputError, match="2 temporal positions"):
        read_image(tmp_path / "temporal")
    other = pydicom.dcmread(base)
    other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    save(other, tmp_path / "other")
    with pytest.raises(InputError, match="SOP class CT Image Storage with 6 frames"):
        read_image(tmp_path / "other")
    split = tmp_path / "split"
    save(pydicom.dcmread(base), split)
    (split / "ct.dcm").rename(split / "a.dcm")
    second = pydicom.dcmread(split / "a.dcm")
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    second.save_as(split / "b.dcm")
    with pytest.raises(InputError, match="2 multi-frame file"):
        read_image(split)
    short = pydicom.dcmread(base)
    short.PerFrameFunctionalGroupsSequence = short.PerFrameFunctionalGroupsSequence[:5]
    save(short, tmp_path / "short")
    with pytest.raises(InputError, match="NumberOfFrames 6 but 5 items"):
        read_image(tmp_path / "short")
