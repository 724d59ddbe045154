"""Whole-study inference: preprocessing parity with training, geometry, outputs, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from skimage.transform import resize as sk_resize

from lungcad.cli import main as cli_main
from lungcad.data.dataset import SliceDataset, slice_to_model_input
from lungcad.data.manifest import SliceRecord
from lungcad.data.preprocessing import to_unit_range
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.inference.aggregate import aggregate_study
from lungcad.inference.lesions import find_lesions
from lungcad.inference.outputs import write_study_outputs
from lungcad.inference.predictor import Predictor
from lungcad.io import read_image
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.volume import reorient
from tests.dicom_conformance import assert_conformant, assert_seg_matches_nifti
from tests.inference_helpers import SIZE, shared_trained_run

torch.set_num_threads(1)  # 2 shared cores: more threads only contend


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run: Path) -> Predictor:
    return Predictor.from_checkpoint(run, batch_size=4)


@pytest.fixture(scope="module")
def phantom():
    # 8 slices of 64x64 (5.6 mm pixels, 2.5 mm slices) with one 20 mm tumour.
    return make_phantom(3, shape_zyx=(8, SIZE, SIZE), matrix=SIZE, n_nodules=1, size_mm=20.0)


@pytest.fixture(scope="module")
def studies(phantom, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The phantom as a DICOM series, a NIfTI in RAS orientation, an MHD and a PNG slice."""
    root = tmp_path_factory.mktemp("studies")
    volume = phantom.volume
    dicom = root / "ct_dicom"
    write_dicom_series(volume, dicom, patient_id="LUNGCAD-INF-1", uid_seed=3)
    nifti = root / "ct_ras.nii.gz"
    # RAS: x and y flipped relative to LPS, so a writer that ignored the file's orientation
    # would put the mask in the wrong place.
    sitk.WriteImage(reorient(volume, "RAS").to_sitk(), str(nifti))
    mhd = root / "ct.mhd"
    sitk.WriteImage(volume.to_sitk(), str(mhd))
    png = root / "slice.png"
    z = int(np.argmax(phantom.tumour_mask.sum(axis=(1, 2))))
    unit = to_unit_range(volume)[z]
    Image.fromarray(np.round(unit * 255).astype(np.uint8)).save(png)
    return {"dicom": dicom, "nifti": nifti, "mhd": mhd, "png": png}


def test_model_input_is_the_training_transform(phantom, predictor, tmp_path, monkeypatch) -> None:
    """Inference feeds the network exactly what SliceDataset feeds it in training: both call
    datasets.slice_to_model_input, whose output is a bilinear, anti-aliased resize."""
    import lungcad.data.dataset
    import lungcad.inference.predictor

    # One function, not a copy: inference imports the dataset module's function.
    assert lungcad.inference.predictor.slice_to_model_input is slice_to_model_input
    volume = phantom.volume
    unit = to_unit_range(volume)  # what `lungcad prepare` stores per slice (clipped)
    records = []
    for z in (2, 5):
        np.save(tmp_path / f"z{z}.npy", np.clip(unit[z], 0, 1).astype(np.float32))
        records.append(SliceRecord(f"z{z}", "p", z, f"z{z}.npy", "", 0, 1.0, 1.0, "t", "val"))
    for size in (SIZE, 32):  # no resize, and a shrinking resize
        dataset = SliceDataset(records, tmp_path, image_size=(size, size))
        for i, z in enumerate((2, 5)):
            expected = dataset[i]["image"].numpy()[0]
            assert np.array_equal(slice_to_model_input(unit[z], size), expected)
            # Computed by hand with scikit-image: bilinear, edge mode, anti-aliased.
            by_hand = (
                unit[z]
                if size == SIZE
                else sk_resize(
                    unit[z].astype(np.float32),
                    (size, size),
                    order=1,
                    mode="edge",
                    anti_aliasing=True,
                    preserve_range=True,
                )
            )
            assert np.allclose(expected, np.clip(by_hand, 0, 1), atol=1e-6)
    batch = predictor.preprocess(volume, [2, 5])
    assert batch.shape == (2, 1, SIZE, SIZE) and batch.dtype == np.float32
    assert np.array_equal(batch[1, 0], SliceDataset(records, tmp_path, (SIZE, SIZE))[1]["image"][0])

    # Both callers go through the one function: replacing it changes what each one feeds.
    def marked(image, size):
        return np.full((size, size) if isinstance(size, int) else size, 0.25, np.float32)

    monkeypatch.setattr(lungcad.data.dataset, "slice_to_model_input", marked)
    monkeypatch.setattr(lungcad.inference.predictor, "slice_to_model_input", marked)
    assert np.all(predictor.preprocess(volume, [2]) == 0.25)
    assert np.all(SliceDataset(records, tmp_path, (32, 32))[0]["image"].numpy() == 0.25)


def test_nifti_mask_has_the_input_geometry(predictor, studies, tmp_path) -> None:
    volume, result = predictor.predict_path(studies["nifti"], cam=False)
    assert volume.meta["source_orientation"] == "RAS"
    assert result.mask.same_geometry(volume) and result.mask.array.dtype == np.uint8
    assert result.probability.array.min() >= 0 and result.probability.array.max() <= 1
    # The mask is the thresholded probability, restricted to the lung field.
    assert np.all(result.mask.array <= (result.probability.array >= 0.5))
    assert len(result.slice_probabilities) == volume.shape[0]
    assert result.study_probability == pytest.approx(
        aggregate_study(result.slice_probabilities, volume.spacing[0])[0]
    )
    assert result.is_cancer == (result.study_probability >= result.threshold)
    paths = write_study_outputs(volume, result, tmp_path / "out")
    assert "seg.dcm" not in paths and "sr.dcm" not in paths
    source = sitk.ReadImage(str(studies["nifti"]))
    for name in ("mask.nii.gz", "probability.nii.gz"):
        written = sitk.ReadImage(str(paths[name]))
        assert written.GetSize() == source.GetSize()
        assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
        assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-5)
        assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    back = read_image(paths["mask.nii.gz"])  # canonical again: the same voxels
    assert np.array_equal(back.array, result.mask.array)
    # The file's own array is the RAS one: x and y flipped relative to the canonical result.
    file_array = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["probability.nii.gz"])))
    assert np.allclose(file_array, result.probability.array[:, ::-1, ::-1])


def test_dicom_outputs_reference_the_series(predictor, studies, phantom, tmp_path) -> None:
    """SEG/SR written from a DICOM prediction reference the source series and line up.

    The random network's own mask is usually empty, so the phantom's true tumour is put in
    its place to check that the frames land on the right source images.
    """
    volume, result = predictor.predict_path(studies["dicom"], cam=False)
    assert volume.meta["format"] == "dicom"
    result.mask = result.mask.with_array(phantom.tumour_mask.astype(np.uint8))
    result.lesions = find_lesions(result.mask, volume, result.probability)
    paths = write_study_outputs(volume, result, tmp_path / "out", report=False, cam=False)
    assert {"seg.dcm", "sr.dcm", "ko.dcm", "mask.nii.gz", "findings.json"} <= set(paths)
    assert "report.html" not in paths
    # The IHE AIR-style set passes dciodvfy, and dcmqi rebuilds the SEG as mask.nii.gz.
    assert_conformant(paths["seg.dcm"], paths["sr.dcm"], paths["ko.dcm"])
    assert_seg_matches_nifti(paths["seg.dcm"], paths["mask.nii.gz"], tmp_path / "dcmqi")
    seg = hd.seg.segread(paths["seg.dcm"])
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.meta["series_instance_uid"]
    assert seg.StudyInstanceUID == volume.meta["study_instance_uid"]
    uids = volume.meta["sop_instance_uids"]
    tumour_slices = set(np.flatnonzero(phantom.tumour_mask.any(axis=(1, 2))).tolist())
    seen = set()
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source_uid = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = uids.index(source_uid.ReferencedSOPInstanceUID)
        assert np.array_equal(frame, phantom.tumour_mask[z])
        seen.add(z)
    assert seen == tumour_slices
    sr = hd.sr.srread(paths["sr.dcm"])
    assert sr.StudyInstanceUID == volume.meta["study_instance_uid"]
    findings = json.loads(paths["findings.json"].read_text())
    # findings.json records the UIDs the DICOM results share.
    (segment,) = seg.SegmentSequence
    assert findings["dicom"]["tracking_uids"] == {"1": segment.TrackingUID}
    assert findings["dicom"]["files"] == ["ko.dcm", "seg.dcm", "sr.dcm"]
    assert findings["dicom"]["frame_of_reference_created"] is False
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_uid == segment.TrackingUID
    assert findings["input"]["input_files"] == volume.shape[0]
    assert len(findings["input"]["input_sha256"]) == 64
    assert findings["lesions"][0]["volume_ml"] == pytest.approx(result.lesions[0].volume_ml)
    # No lesion: no SEG (never an empty segment), but the SR and the key image of the most
    # suspicious slice.
    result.mask = result.mask.with_array(np.zeros_like(result.mask.array))
    result.lesions = []
    empty = write_study_outputs(volume, result, tmp_path / "empty", report=False, cam=False)
    assert "seg.dcm" not in empty and {"sr.dcm", "ko.dcm"} <= set(empty)
    assert_conformant(empty["sr.dcm"], empty["ko.dcm"])


def test_mhd_and_png_studies(predictor, studies, phantom) -> None:
    volume, result = predictor.predict_path(studies["mhd"], cam=False)
    assert result.mask.same_geometry(phantom.volume)
    assert len(result.lung_slices) > 0
    image, single = predictor.predict_path(studies["png"], cam=True, progress=False)
    assert image.shape == (1, SIZE, SIZE) and single.mask.shape == (1, SIZE, SIZE)
    assert single.study_probability == pytest.approx(single.slice_probabilities[0])
    assert single.cam_slices == [0] and single.cam.array.max() <= 1.0


def test_output_folder_is_not_clobbered(predictor, studies, tmp_path) -> None:
    volume, result = predictor.predict_path(studies["png"], cam=False)
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an earlier lungcad result"):
        write_study_outputs(volume, result, precious)
    assert (precious / "thesis.txt").read_text() == "keep me"
    first = write_study_outputs(volume, result, tmp_path / "res")
    again = write_study_outputs(volume, result, tmp_path / "res")  # an earlier result: replaced
    assert first == again


def test_cli_predict_single_study_end_to_end(run, studies, tmp_path, capsys) -> None:
    out = tmp_path / "result"
    assert (
        cli_main(
            [
                "predict",
                "--checkpoint",
                str(run),
                str(studies["dicom"]),
                "--out",
                str(out),
                "--cam-slices",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "probability" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {
        "mask.nii.gz",
        "probability.nii.gz",
        "seg.dcm",
        "sr.dcm",
        "findings.json",
        "preview.png",
        "report.html",
    } <= names
    assert len([n for n in names if n.startswith("cam_z")]) == 2
    findings = json.loads((out / "findings.json").read_text())
    assert findings["model"]["model_name"] == "resnet18"
    assert findings["study"]["threshold"] == pytest.approx(
        json.loads((run / "threshold.json").read_text())["threshold"]
    )
    assert sorted(findings["outputs"]) == sorted(names)
    html = (out / "report.html").read_text()
    assert "Research use only" in html and html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert Image.open(out / "preview.png").mode == "RGB"


def test_cli_batch_goes_on_after_a_corrupt_study(run, studies, tmp_path, capsys) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(studies["nifti"], batch / "a_ras.nii.gz")
    shutil.copy(studies["png"], batch / "b_slice.png")
    (batch / "c_corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    shutil.copytree(studies["dicom"], batch / "d_series")
    out = tmp_path / "out"
    code = cli_main(
        [
            "predict",
            "--checkpoint",
            str(run),
            str(batch),
            "--out",
            str(out),
            "--cam-slices",
            "0",
            "--no-report",
        ]
    )
    assert code == 1
    # The CLI logs to stderr (it configures logging itself): path and error of the bad study.
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "c_corrupt.nii.gz: failed:" in errors[0]
    summary = json.loads((out / "batch_summary.json").read_text())
    status = {row["study"]: row["status"] for row in summary["studies"]}
    assert status == {"a_ras": "ok", "b_slice": "ok", "c_corrupt": "failed", "d_series": "ok"}
    for name in ("a_ras", "b_slice", "d_series"):
        assert (out / name / "findings.json").is_file()
    assert (out / "d_series" / "seg.dcm").is_file()
    assert not (out / "c_corrupt").exists()


class _EverywhereTumour:
    """Wraps a Predictor's model runner so every pixel scores as tumour (logit +4)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seg, cls = self.predictor.__class__.run_model(self.predictor, inputs)
        return np.full_like(seg, 4.0), cls


def test_tumour_mask_stays_inside_the_lung_field(run, phantom, monkeypatch) -> None:
    predictor = Predictor.from_checkpoint(run, batch_size=4)
    monkeypatch.setattr(predictor, "run_model", _EverywhereTumour(predictor))
    result = predictor.predict_volume(phantom.volume, cam=False)
    mask = result.mask.array.astype(bool)
    probability = result.probability.array
    # The probability map is the model's own (tumour everywhere on evaluated slices) ...
    assert probability[result.lung_slices].min() > 0.9
    # ... but the reported mask never leaves the lungs' box, and does cover the lungs.
    lungs = phantom.lung_mask.any(axis=0)
    ys, xs = np.nonzero(mask.any(axis=0))
    assert mask.any() and mask.sum() < mask.size * 0.9
    lung_ys, lung_xs = np.nonzero(lungs)
    margin_px = int(np.ceil(predictor.lung_margin_mm / min(phantom.volume.spacing[1:]))) + 1
    assert ys.min() >= lung_ys.min() - margin_px and ys.max() <= lung_ys.max() + margin_px
    assert xs.min() >= lung_xs.min() - margin_px and xs.max() <= lung_xs.max() + margin_px


def test_no_decision_or_mask_from_untrained_parts(tmp_path, phantom) -> None:
    """A seg-stage run has no trained cancer head: it cannot assess a study. A cls run not
    started from a segmentation run has no trained decoder: it gives no tumour masks."""
    from tests.inference_helpers import make_run_folder

    seg_only = make_run_folder(tmp_path / "seg", stage="seg")
    with pytest.raises(InputError, match="cancer classifier is untrained"):
        Predictor.from_checkpoint(seg_only)
    cls_only = Predictor.from_checkpoint(make_run_folder(tmp_path / "cls"), batch_size=4)
    result = cls_only.predict_volume(phantom.volume, cam=False)
    assert not result.mask.array.any() and not result.probability.array.any()
    assert result.lesions == []
    assert any("decoder is untrained" in w for w in result.warnings)
    assert 0.0 <= result.study_probability <= 1.0  # the trained classifier still decides
