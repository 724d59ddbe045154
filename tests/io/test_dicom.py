"""DICOM series reading: sorting, HU, geometry, series choice, and refusal of bad series.

Series are written here with pydicom (CT Image Storage, int16 + RescaleSlope/Intercept), in
shuffled order under random file names with misleading InstanceNumbers, so only
ImagePositionPatient can put the slices in order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungcad.errors import InputError, MissingInputError
from lungcad.io import read_image
from lungcad.io.dicom import list_dicom_series
from lungcad.volume import Volume, orientation_code, to_canonical

SPACING = (2.5, 0.7, 0.8)  # z, y, x mm
ORIGIN = (-40.0, -60.5, 100.25)  # LPS mm of the first slice's first pixel


def ct_hu(seed: int = 0, shape: tuple[int, int, int] = (6, 12, 16)) -> np.ndarray:
    """Integer-valued HU volume (z, y, x) so int16 storage with slope 1 is exact."""
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.float32)


def slice_geometry(
    n: int,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = ORIGIN,
    row: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col: tuple[float, float, float] = (0.0, 1.0, 0.0),
) -> list[dict]:
    """Per-slice ImagePositionPatient/ImageOrientationPatient of a regular stack."""
    normal = np.cross(row, col)
    return [
        {
            "position": np.asarray(origin) + k * spacing[0] * normal,
            "orientation": list(row) + list(col),
            "pixel_spacing": (spacing[1], spacing[2]),
        }
        for k in range(n)
    ]


def write_series(
    folder: Path,
    hu: np.ndarray,
    geometry: list[dict],
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    seed: int = 0,
) -> tuple[str, list[str]]:
    """Write ``hu[k]`` at ``geometry[k]``; returns (series UID, SOP UIDs in k order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    sop_uids = [generate_uid() for _ in hu]
    for k in rng.permutation(len(hu)):
        pixels = hu[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.Modality = modality
        ds.PatientID = "P001"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.InstanceNumber = int(rng.integers(1, 1000))  # deliberately meaningless
        ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry[k]["position"]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in geometry[k]["orientation"]]
        ds.PixelSpacing = [f"{v:g}" for v in geometry[k]["pixel_spacing"]]
        ds.SliceThickness = "9.9"  # not the spacing; the reader must ignore it
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = np.round((pixels - intercept) / slope).astype(np.int16).tobytes()
        ds.save_as(folder / f"{rng.integers(1 << 40):x}.dcm", enforce_file_format=True)
    return series_uid, sop_uids


def sitk_reference(folder: Path) -> Volume:
    """The same folder read by SimpleITK's GDCM series reader, reoriented to LPS."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return to_canonical(Volume.from_sitk(reader.Execute()))


@pytest.fixture
def axial_series(tmp_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    hu = ct_hu()
    folder = tmp_path / "axial"
    _, sops = write_series(folder, hu, slice_geometry(len(hu)))
    return folder, hu, sops


def test_axial_series_sorted_by_position_with_exact_geometry(axial_series) -> None:
    folder, hu, sops = axial_series
    volume = read_image(folder)
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.array.dtype == np.float32 and volume.intensity == "hu"
    np.testing.assert_allclose(volume.spacing, SPACING)  # from positions, not SliceThickness
    np.testing.assert_allclose(volume.origin, ORIGIN)
    np.testing.assert_allclose(volume.direction, np.eye(3))
    meta = volume.meta
    assert meta["format"] == "dicom" and meta["modality"] == "CT" and meta["patient_id"] == "P001"
    assert meta["frame_of_reference_uid"] == "1.2.826.0.1.3680043.8.498.2"
    assert meta["sop_instance_uids"] == sops and meta["slice_axis"] == 0
    assert [pydicom.dcmread(f).SOPInstanceUID for f in meta["slice_files"]] == sops
    assert meta["warnings"] == [] and meta["resampled"] is False
    reference = sitk_reference(folder)
    assert volume.same_geometry(reference, atol=1e-6)
    np.testing.assert_array_equal(volume.array, reference.array)


def test_single_file_reads_its_series(axial_series) -> None:
    folder, hu, _ = axial_series
    volume = read_image(sorted(folder.glob("*.dcm"))[0])
    np.testing.assert_array_equal(volume.array, hu)


def test_flipped_z_and_fractional_rescale(tmp_path: Path) -> None:
    """Column cosine (0, -1, 0) makes the normal point inferior: canonical LPS flips y and z."""
    hu = ct_hu(1) + 0.5  # slope 0.5 stores half-HU exactly
    folder = tmp_path / "flipped"
    _, sops = write_series(
        folder, hu, slice_geometry(len(hu), col=(0.0, -1.0, 0.0)), slope=0.5, intercept=-1000.5
    )
    volume = read_image(folder)
    assert orientation_code(volume) == "LPS" and volume.meta["source_orientation"] != "LPS"
    np.testing.assert_array_equal(volume.array, hu[::-1, ::-1, :])
    assert volume.meta["sop_instance_uids"] == sops[::-1]  # still matches array z order
    reference = sitk_reference(folder)
    assert volume.same_geometry(reference, atol=1e-6)
    np.testing.assert_array_equal(volume.array, reference.array)


def test_sagittal_series_reports_its_slice_axis(tmp_path: Path) -> None:
    hu = ct_hu(2, (5, 12, 10))
    folder = tmp_path / "sagittal"
    _, sops = write_series(folder, hu, slice_geometry(5, row=(0, 1, 0), col=(0, 0, -1)))
    volume = read_image(folder)
    assert volume.meta["slice_axis"] == 2  # the slices stack along x (normal = patient right)
    assert volume.meta["sop_instance_uids"] == sops[::-1]  # ascending x = towards the left
    reference = sitk_reference(folder)
    assert volume.same_geometry(reference, atol=1e-6)
    np.testing.assert_array_equal(volume.array, reference.array)


def test_mixed_folder_picks_largest_ct_series(tmp_path: Path, caplog) -> None:
    small_uid, _ = write_series(tmp_path / "a_small", ct_hu(3, (4, 8, 8)), slice_geometry(4))
    big_uid, _ = write_series(tmp_path / "b_big", ct_hu(4, (7, 8, 8)), slice_geometry(7))
    write_series(tmp_path / "c_mr", ct_hu(5, (9, 8, 8)), slice_geometry(9), modality="MR")
    (tmp_path / "notes.txt").write_text("not DICOM")
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.FileSetID = "TEST"
    dicomdir.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)

    with caplog.at_level(logging.INFO, logger="lungcad.io.dicom"):
        volume = read_image(tmp_path)
    assert volume.meta["series_instance_uid"] == big_uid and volume.shape[0] == 7
    assert big_uid in caplog.text and "2 CT series" in volume.meta["warnings"][0]
    chosen = read_image(tmp_path, series_uid=small_uid)
    assert chosen.meta["series_instance_uid"] == small_uid and chosen.shape[0] == 4
    assert {s.modality for s in list_dicom_series(tmp_path)} == {"CT", "MR"}


def test_uneven_spacing_is_resampled_with_a_warning(tmp_path: Path) -> None:
    depths = np.array([0.0, 2.0, 4.0, 6.6, 8.0, 10.0])  # one step 2.6 mm: uneven, not missing
    hu = np.broadcast_to((10 * depths)[:, None, None], (6, 8, 8)).astype(np.float32)
    geometry = slice_geometry(6, spacing=(2.0, 0.7, 0.8))
    for g, d in zip(geometry, depths, strict=True):
        g["position"] = np.asarray(ORIGIN) + [0, 0, d]
    write_series(tmp_path, np.round(hu), geometry, slope=1.0, intercept=-1024)
    volume = read_image(tmp_path)
    assert volume.meta["resampled"] is True and "uneven" in volume.meta["warnings"][0]
    assert volume.shape == (6, 8, 8)
    np.testing.assert_allclose(volume.spacing, (2.0, 0.7, 0.8))
    # Values were linear in depth, so linear interpolation recovers 10 * depth exactly.
    np.testing.assert_allclose(volume.array[:, 0, 0], 10 * np.round(np.arange(6) * 2.0), atol=1e-3)


def test_gantry_tilt_is_resampled_to_an_orthogonal_grid(tmp_path: Path) -> None:
    n, rows, cols = 5, 10, 8
    dz, dy, dx = 2.0, 0.5, 0.8
    hu = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    hu[:, 4, 3] = 500.0  # one bright pixel per slice at the same image position
    geometry = slice_geometry(n, spacing=(dz, dy, dx))
    for k, g in enumerate(geometry):
        g["position"] = g["position"] + [0, k * dy, 0]  # origins drift one pixel row per slice
    write_series(tmp_path, hu, geometry)
    volume = read_image(tmp_path)
    assert "gantry tilt" in volume.meta["warnings"][0] and volume.meta["resampled"] is True
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-9)
    assert volume.shape == (n, rows + n - 1, cols)  # grown to hold every shifted slice
    np.testing.assert_allclose(volume.spacing, (dz, dy, dx))
    image = volume.to_sitk()
    for k in range(n):
        physical = geometry[k]["position"] + np.array([3 * dx, 4 * dy, 0.0])
        x, y, z = image.TransformPhysicalPointToIndex(tuple(physical))
        assert volume.array[z, y, x] == pytest.approx(500.0)
    assert volume.array.min() == pytest.approx(-1024.0)  # outside the scan: air


def test_single_slice_series_uses_slice_thickness(tmp_path: Path) -> None:
    write_series(tmp_path, ct_hu(9, (1, 8, 8)), slice_geometry(1))
    volume = read_image(tmp_path)
    assert volume.shape == (1, 8, 8) and volume.spacing[0] == pytest.approx(9.9)
    assert "single-slice" in volume.meta["warnings"][0]


def test_dicom_volume_written_as_nifti_keeps_its_geometry(tmp_path: Path) -> None:
    from lungcad.io.writers import write_image

    hu = ct_hu(6)
    write_series(tmp_path / "dcm", hu, slice_geometry(len(hu), col=(0.0, -1.0, 0.0)))
    volume = read_image(tmp_path / "dcm")
    path = write_image(volume, tmp_path / "ct.nii.gz")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.same_geometry(volume, atol=1e-5)
    # The file keeps the series' own axes: first voxel at the first slice's position.
    np.testing.assert_allclose(sitk.ReadImage(str(path)).GetOrigin(), ORIGIN, atol=1e-4)


# ---- bad input -------------------------------------------------------------------------


def _series(tmp_path: Path, n: int = 5) -> tuple[Path, list[dict], np.ndarray]:
    hu = ct_hu(7, (n, 8, 8))
    return tmp_path / "series", slice_geometry(n), hu


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="not found"):
        read_image(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="empty") as info:
        read_image(tmp_path / "empty")
    assert "empty" in str(info.value.path)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(MissingInputError, match="no DICOM image"):
        read_image(tmp_path / "text")


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry)
    bad = folder / "broken.dcm"
    bad.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(InputError, match="broken.dcm"):
        read_image(folder)


def test_truncated_pixel_data_is_named(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry)
    victim = sorted(folder.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(InputError, match=victim.name):
        read_image(folder)


def test_non_ct_modality_is_refused(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry, modality="MR")
    with pytest.raises(InputError, match=r"found modality MR") as info:
        read_image(folder)
    assert str(folder) in str(info.value)


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path, 7)
    keep = [k for k in range(7) if k != 4]
    write_series(folder, hu[keep], [geometry[k] for k in keep])
    with pytest.raises(
        InputError, match=r"slices missing: a gap of 5\.000 mm between sorted slices 3 and 4"
    ):
        read_image(folder)


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    geometry[3] = geometry[2]
    write_series(folder, hu, geometry)
    with pytest.raises(InputError, match="duplicate slice position"):
        read_image(folder)


def test_inconsistent_orientation_is_refused(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    geometry[1] = {**geometry[1], "orientation": [1, 0, 0, 0, 0.8, -0.6]}
    write_series(folder, hu, geometry)
    with pytest.raises(InputError, match="inconsistent ImageOrientationPatient"):
        read_image(folder)


def test_inconsistent_slice_size_is_refused(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    uid, _ = write_series(folder, hu[:4], geometry[:4])
    write_series(folder, ct_hu(8, (1, 6, 8)), geometry[4:], series_uid=uid, seed=1)
    with pytest.raises(InputError, match="inconsistent slice size"):
        read_image(folder)


def test_unknown_series_uid_lists_what_is_there(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    uid, _ = write_series(folder, hu, geometry)
    with pytest.raises(InputError, match=uid):
        read_image(folder, series_uid="1.2.3.4")


# ---- damaged headers that used to end in a traceback, a huge allocation or wrong HU ---------


def _set_raw_value(path: Path, keyword: str, text: str, vr: str | None = None) -> None:
    """Store ``text`` as the raw bytes of an element, as a damaged file holds them."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    data = text.encode("ascii")
    data += b" " * (len(data) % 2)
    ds[tag] = RawDataElement(tag, vr or dictionary_VR(tag), len(data), data, 0, False, True)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("keyword", "text", "message"),
    [
        ("RescaleIntercept", "abc", r"RescaleIntercept 'abc' is not a finite number"),
        ("RescaleSlope", "inf", r"RescaleSlope 'inf' is not a finite number other than 0"),
        ("RescaleSlope", "0", r"RescaleSlope '0' is not a finite number other than 0"),
        ("ImagePositionPatient", "0\\0\\nan", r"ImagePositionPatient holds values that are not"),
    ],
)
def test_malformed_rescale_or_position_is_refused(tmp_path: Path, keyword, text, message) -> None:
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry)
    victim = sorted(folder.glob("*.dcm"))[1]
    _set_raw_value(victim, keyword, text)
    with pytest.raises(InputError, match=message) as info:
        read_image(folder)
    assert info.value.path == str(victim)


def test_rescale_overflow_is_refused(tmp_path: Path) -> None:
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry)
    victim = sorted(folder.glob("*.dcm"))[0]
    _set_raw_value(victim, "RescaleIntercept", "1e308")  # finite, but not in float32
    with pytest.raises(InputError, match="rescaled pixel values are not finite") as info:
        read_image(folder)
    assert info.value.path == str(victim)


def test_unknown_value_representation_is_refused(tmp_path: Path) -> None:
    """A flipped byte turns RescaleSlope's VR into 'ES', which pydicom cannot parse: it used
    to raise NotImplementedError (a traceback); now the file is named."""
    folder, geometry, hu = _series(tmp_path)
    write_series(folder, hu, geometry)
    victim = sorted(folder.glob("*.dcm"))[2]
    data = victim.read_bytes()
    tag = b"\x28\x00\x53\x10DS"  # (0028,1053) RescaleSlope, explicit VR little endian
    assert data.count(tag) == 1
    victim.write_bytes(data.replace(tag, b"\x28\x00\x53\x10ES"))
    with pytest.raises(InputError, match="malformed DICOM header") as info:
        read_image(folder)
    assert info.value.path == str(victim)


def test_damaged_positions_are_not_resampled_as_a_steep_tilt(tmp_path: Path) -> None:
    """Slice origins drifting 1.7 mm in-plane per mm of depth (a "60 degree tilt"): no CT
    gantry tilts so far, and a grid resampled for larger drifts is unbounded."""
    hu = ct_hu(5)
    geometry = slice_geometry(len(hu))
    for k, g in enumerate(geometry):
        g["position"] = g["position"] + np.array([0.0, 1.732 * SPACING[0] * k, 0.0])
    write_series(tmp_path, hu, geometry)
    with pytest.raises(InputError, match=r"gantry tilt of 60\.0 degrees"):
        read_image(tmp_path)
