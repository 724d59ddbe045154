"""Synthetic phantoms, sites, the DICOM series writer, cohort layouts and ``lungcad synth``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from lungcad.cli import main
from lungcad.data.synthetic.cohort import write_cohort
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.data.synthetic.sites import SITES, SiteParams, get_site
from lungcad.errors import InputError
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.volume import Volume

SIZES = [30.0, 20.0, 6.0]
SHAPES = ["lobulated", "round", "spiculated"]
DENSITIES = ["solid", "ground-glass", "part-solid"]


@pytest.fixture(scope="module")
def internal():
    return make_phantom(7, "internal", size_mm=SIZES, shape=SHAPES, density=DENSITIES)


@pytest.fixture(scope="module")
def external():
    return make_phantom(7, "external", size_mm=SIZES, shape=SHAPES, density=DENSITIES)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _classical_lung_mask(hu: np.ndarray) -> np.ndarray:
    """Threshold at -400 HU, drop air touching the image border, fill holes per slice."""
    labels, _ = ndimage.label(hu < -400)
    border = np.unique(
        np.concatenate(
            [
                labels[:, 0].ravel(),
                labels[:, -1].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    mask = (labels > 0) & ~np.isin(labels, border)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


# ------------------------------------------------------------------------------- phantoms


def test_same_seed_same_phantom_other_seed_differs() -> None:
    a = make_phantom(3, matrix=40)
    b = make_phantom(3, matrix=40)
    c = make_phantom(4, matrix=40)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.tumour_mask, b.tumour_mask)
    assert a.nodules == b.nodules and a.volume.same_geometry(b.volume)
    assert not np.array_equal(a.volume.array, c.volume.array)


def test_tumour_and_tumour_free_cases() -> None:
    free = make_phantom(5, matrix=40, tumour=False)
    assert free.nodules == [] and not free.has_tumour and free.tumour_mask.sum() == 0
    sick = make_phantom(5, matrix=40, tumour=True)
    assert sick.has_tumour and 1 <= len(sick.nodules) <= 3
    for i, nod in enumerate(sick.nodules):
        assert 3.0 <= nod.diameter_mm <= 40.0
        assert nod.voxels == int((sick.nodule_labels == i + 1).sum()) > 0
        centre = tuple(int(round(v)) for v in nod.centre_zyx)
        assert sick.lung_mask[centre], "nodule centre must lie in the lung"
    with pytest.raises(InputError, match="tumour=False"):
        make_phantom(5, tumour=False, n_nodules=2)
    with pytest.raises(InputError, match="shape"):
        make_phantom(5, shape="cubic")


def test_nodule_sizes_measured_from_mask(internal) -> None:
    volume = internal.volume
    voxel_mm3 = float(np.prod(volume.spacing))
    for i, nod in enumerate(internal.nodules):
        voxels = internal.nodule_labels == i + 1
        equivalent = (6.0 * voxels.sum() * voxel_mm3 / np.pi) ** (1 / 3)
        assert 3.0 <= equivalent <= 40.0
        assert 0.5 * nod.diameter_mm <= equivalent <= 1.3 * nod.diameter_mm, (nod, equivalent)
        # The world centre maps back to the nodule's voxel index.
        back = (np.asarray(nod.centre_lps) - volume.origin) / np.asarray(volume.spacing[::-1])
        np.testing.assert_allclose(back[::-1], nod.centre_zyx, atol=1e-6)
        assert voxels[tuple(int(round(v)) for v in nod.centre_zyx)]
    assert [n.density for n in internal.nodules] == DENSITIES


def test_tissue_hu_ranges(internal) -> None:
    hu, labels = internal.volume.array, internal.labels
    assert internal.volume.intensity == "hu" and np.all(hu == np.round(hu))
    median = {k: float(np.median(hu[labels == k])) for k in (0, 1, 2, 3, 4)}
    assert median[0] < -950  # air
    assert -130 < median[1] < -60  # fat
    assert 20 < median[2] < 75  # soft tissue
    assert median[3] > 250  # bone
    assert -900 < median[4] < -760  # lung
    solid, ggo = (internal.nodule_labels == 1), (internal.nodule_labels == 2)
    assert -40 < np.median(hu[solid]) < 90
    assert -650 < np.median(hu[ggo]) < -350


def test_site_shift(internal, external) -> None:
    assert set(SITES) >= {"internal", "external"}
    vi, ve = internal.volume, external.volume
    assert ve.spacing[0] > vi.spacing[0] and ve.spacing[1] != vi.spacing[1]
    assert vi.shape[0] != ve.shape[0]
    # Same seed = same patient: nodules at the same world positions.
    np.testing.assert_allclose(
        [n.centre_lps for n in internal.nodules], [n.centre_lps for n in external.nodules]
    )
    noise_i = vi.array[:, :12, :12].std()
    noise_e = ve.array[:, :12, :12].std()
    assert noise_e > 1.8 * noise_i
    soft_i = np.median(vi.array[internal.labels == 2])
    soft_e = np.median(ve.array[external.labels == 2])
    assert soft_e - soft_i > 10  # calibration offset
    with pytest.raises(InputError, match="unknown site"):
        get_site("nowhere")
    with pytest.raises(InputError):
        SiteParams("bad", slice_thickness_mm=0)


@pytest.mark.parametrize("which", ["internal", "external"])
def test_classical_lung_mask_finds_the_lungs(which, internal, external) -> None:
    phantom = internal if which == "internal" else external
    found = _classical_lung_mask(phantom.volume.array)
    assert _dice(found, phantom.lung_mask) > 0.9
    try:
        from lungcad.data.lung_mask import lung_mask
    except ImportError:  # the preprocessing module is optional for this test
        return
    assert _dice(lung_mask(phantom.volume), phantom.lung_mask) > 0.85


# ---------------------------------------------------------------------------- DICOM writer


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])],
)
def test_dicom_series_round_trip(tmp_path: Path, direction: np.ndarray) -> None:
    phantom = make_phantom(2, matrix=40, shape_zyx=(10, 40, 40))
    vol = phantom.volume
    vol = Volume(
        vol.array,
        spacing=vol.spacing,
        origin=(-12.5, 30.25, -200.0),
        direction=direction,
        meta=dict(vol.meta),
    )
    files = write_dicom_series(vol, tmp_path / "ct", patient_id="P1", uid_seed="s")
    assert len(files) == 10 and all(f.is_file() for f in files)

    datasets = [pydicom.dcmread(f) for f in files]
    ds = datasets[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert len({d.SOPInstanceUID for d in datasets}) == 10
    assert [d.InstanceNumber for d in datasets] == list(range(1, 11))
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PatientID) == (40, 40, 16, "P1")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, vol.array[0])

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    back = Volume.from_sitk(reader.Execute())
    assert back.same_geometry(vol, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 1.0

    # Deterministic UIDs for the same uid_seed.
    again = write_dicom_series(vol, tmp_path / "ct2", uid_seed="s")
    assert pydicom.dcmread(again[3]).SOPInstanceUID == datasets[3].SOPInstanceUID


def test_dicom_series_is_a_valid_seg_source(tmp_path: Path) -> None:
    import highdicom as hd  # a dependency of lungcad (the SEG and SR writers)

    phantom = make_phantom(2, matrix=40, shape_zyx=(8, 40, 40), size_mm=[20.0])
    files = write_dicom_series(phantom.volume, tmp_path / "ct")
    sources = [pydicom.dcmread(f) for f in files]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=phantom.tumour_mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="tumour",
                segmented_property_category=hd.sr.CodedConcept(
                    "49755003", "SCT", "Morphologically Altered Structure"
                ),
                segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID


def test_dicom_writer_refuses_bad_input(tmp_path: Path) -> None:
    vol = Volume(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="windowed"):
        write_dicom_series(vol.with_array(vol.array, intensity="windowed"), tmp_path / "a")
    with pytest.raises(InputError, match="NaN"):
        write_dicom_series(vol.with_array(np.full((2, 4, 4), np.nan, np.float32)), tmp_path / "b")
    other = tmp_path / "c"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="non-DICOM"):
        write_dicom_series(vol, other)
    assert (other / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------- cohort


def test_cohort_layout(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    cohort = write_cohort(out, 3, seed=1, tumour_fraction=0.67, matrix=64)
    assert json.loads((out / "cohort.json").read_text()) == cohort
    cases = cohort["cases"]
    assert sum(c["has_tumour"] for c in cases) == 2

    dataset = json.loads((out / "msd" / "dataset.json").read_text())
    assert set(dataset) >= {
        "name",
        "description",
        "modality",
        "labels",
        "numTraining",
        "training",
        "test",
    }
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["labels"] == {"0": "background", "1": "cancer"}
    assert dataset["numTraining"] == 3 and len(dataset["training"]) == 3
    for item in dataset["training"]:
        assert (out / "msd" / item["image"]).is_file() and (out / "msd" / item["label"]).is_file()

    with (out / "luna16" / "annotations.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c["nodules"]) for c in cases) > 0
    by_uid = {c["series_instance_uid"]: c for c in cases}
    for row in rows:
        case = by_uid[row["seriesuid"]]
        image = sitk.ReadImage(str(out / "luna16" / "subset0" / f"{row['seriesuid']}.mhd"))
        label = sitk.ReadImage(str(out / case["files"]["msd_label"]))
        world = tuple(float(row[k]) for k in ("coordX", "coordY", "coordZ"))
        index = image.TransformPhysicalPointToIndex(world)
        assert label[index] == 1, row
        assert 3.0 <= float(row["diameter_mm"]) <= 40.0
    assert (
        (out / "luna16" / "candidates.csv")
        .read_text()
        .startswith("seriesuid,coordX,coordY,coordZ,class")
    )

    dicom_dirs = sorted((out / "dicom").iterdir())
    assert [d.name for d in dicom_dirs] == [c["case_id"] for c in cases]
    assert len(list(dicom_dirs[0].glob("*.dcm"))) == cases[0]["shape_zyx"][0]

    for cls, stem in (("Malignant cases", "Malignant case"), ("Normal cases", "Normal case")):
        files = list((out / "slices2d" / cls).glob("*.jpg"))
        entries = [e for e in cohort["slices2d"] if cls in e["file"]]
        assert len(files) == len(entries) > 0
        assert {f.name for f in files} == {f"{stem} ({n}).jpg" for n in range(1, len(files) + 1)}
        image = Image.open(files[0])
        assert image.mode == "L" and image.size == (64, 64)
    patches = cohort["patches2d"]
    assert any(p["has_tumour"] for p in patches)
    image = np.array(Image.open(out / patches[0]["image"]))
    mask = np.array(Image.open(out / patches[0]["mask"]))
    assert image.dtype == np.uint16 and image.shape == (48, 48)
    assert set(np.unique(mask)) <= {0, 255}


def test_cohort_refuses_to_replace_other_folders(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="cohort.json"):
        write_cohort(tmp_path, 1, formats=("msd",))
    with pytest.raises(InputError, match="formats"):
        write_cohort(tmp_path / "new", 1, formats=("png",))
    assert (tmp_path / "mine.txt").exists()


def test_cli_synth_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--cases",
            "2",
            "--size",
            "32",
            "--seed",
            "3",
            "--site",
            "external",
            "--formats",
            "dicom,luna16",
            "--tumour-fraction",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "wrote 2 external cases (2 with tumour" in printed[0]
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["site"]["name"] == "external" and cohort["formats"] == ["dicom", "luna16"]
    assert (out / "luna16" / "annotations.csv").is_file() and not (out / "msd").exists()
    assert main(["synth", "--out", str(tmp_path), "--cases", "1"]) == 2  # not a cohort folder
