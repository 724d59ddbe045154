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
from scipy import ndimage as ndi
from skimage.transform import resize as sk_resize

from lungcad.cli import main as cli_main
from lungcad.data.dataset import SliceDataset, slice_to_model_input
from lungcad.data.lung_mask import lung_mask
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
    def marked(image, size, scale=None):
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
    finding = result.finding
    assert finding.probability == pytest.approx(
        aggregate_study(result.slice_probabilities, volume.spacing[0])[0]
    )
    assert finding.is_cancer == (finding.probability >= finding.threshold)
    assert result.input_check is not None and result.input_check.status == "ok"
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
    assert single.finding.probability == pytest.approx(single.slice_probabilities[0])
    assert single.input_check.single_slice  # one slice: flagged, not a study's decision
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
    # The decoder segments the lung box (with its margin) at its own scale; the probability
    # there is the model's own (tumour everywhere on evaluated slices) ...
    _, box, field = predictor.select_slices(phantom.volume)
    assert field is not None
    assert probability[result.lung_slices][:, field[0], field[1]].min() > 0.9
    # ... but the reported mask never leaves the lungs' box, and does cover the lungs.
    lungs = phantom.lung_mask.any(axis=0)
    ys, xs = np.nonzero(mask.any(axis=0))
    assert mask.any() and mask.sum() < mask.size * 0.9
    lung_ys, lung_xs = np.nonzero(lungs)
    margin_px = int(np.ceil(predictor.lung_margin_mm / min(phantom.volume.spacing[1:]))) + 1
    assert ys.min() >= lung_ys.min() - margin_px and ys.max() <= lung_ys.max() + margin_px
    assert xs.min() >= lung_xs.min() - margin_px and xs.max() <= lung_xs.max() + margin_px


def test_seg_only_run_gives_masks_and_no_decision(tmp_path, phantom, capsys) -> None:
    """A seg-stage run's cancer head never learnt: masks, and the finding "no classifier"
    with no probability (issue 10 point 6)."""
    from tests.inference_helpers import make_run_folder

    seg_only = make_run_folder(tmp_path / "seg", stage="seg")
    predictor = Predictor.from_checkpoint(seg_only, batch_size=4)
    assert predictor.decoder_trained and not predictor.classifier_trained
    predictor.run_model = _EverywhereTumour(predictor)  # type: ignore[method-assign]
    result = predictor.predict_volume(phantom.volume, cam=True)
    finding = result.finding
    assert finding.status == "no classifier" and finding.probability is None
    assert finding.threshold is None and finding.is_cancer is None
    assert finding.reason == "segmentation-only run: no trained cancer classifier"
    assert np.isnan(result.slice_probabilities).all()  # not reported as meaningful
    assert result.cam is None and result.cam_slices == []  # where an untrained head looked
    assert result.mask.array.any() and result.lesions  # the decoder's masks are given
    paths = write_study_outputs(phantom.volume, result, tmp_path / "out")
    doc = json.loads(paths["findings.json"].read_text())
    assert doc["study"]["status"] == "no classifier" and doc["study"]["probability"] is None
    assert all(p is None for p in doc["slices"]["probabilities"])
    html = paths["report.html"].read_text()
    assert "no classifier: segmentation-only run" in html and "No cancer probability" in html
    # The CLI says so in its one line.
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom.volume.to_sitk(), str(nifti))
    code = cli_main(
        ["predict", "--checkpoint", str(seg_only), str(nifti), "--out", str(tmp_path / "cli")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "NO CLASSIFIER: segmentation-only run: no trained cancer classifier" in out
    assert "probability" not in out


def test_cls_run_without_trained_decoder_gives_no_masks(tmp_path, phantom) -> None:
    """A cls run not started from a segmentation run has no trained decoder: no tumour masks,
    and its trained classifier still decides."""
    from tests.inference_helpers import make_run_folder

    cls_only = Predictor.from_checkpoint(make_run_folder(tmp_path / "cls"), batch_size=4)
    assert cls_only.classifier_trained and not cls_only.decoder_trained
    cls_only.run_model = _EverywhereTumour(cls_only)  # type: ignore[method-assign]
    result = cls_only.predict_volume(phantom.volume, cam=False)
    assert not result.mask.array.any() and not result.probability.array.any()
    assert result.lesions == []
    assert any("decoder is untrained" in w for w in result.warnings)
    assert result.finding.assessed and 0.0 <= result.finding.probability <= 1.0


# ---- issue 12: malformed or non-chest input never gets a decision, and leaves nothing ------


def _nifti_with(path: Path, volume, **header: float) -> Path:
    """``volume`` as NIfTI with header fields overwritten after writing (as damage would)."""
    import struct

    sitk.WriteImage(volume.to_sitk(), str(path))
    data = bytearray(path.read_bytes())
    offsets = {"pixdim": 80, "scl_slope": 112}
    for name, value in header.items():
        count = 3 if name == "pixdim" else 1
        struct.pack_into(f"<{count}f", data, offsets[name], *([value] * count))
    path.write_bytes(bytes(data))
    return path


def _one_line_error(capsys, path: Path) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    assert str(path) in errors[0]
    return errors[0]


def _predict(run: Path, source: Path, out: Path) -> int:
    return cli_main(["predict", "--checkpoint", str(run), str(source), "--out", str(out)])


@pytest.mark.parametrize(
    "case",
    ["zero_spacing", "infinite_slope", "png_2x2", "png_one_row", "one_voxel", "dicom_bad_vr"],
)
def test_cli_refuses_malformed_input_with_one_line(run, phantom, studies, tmp_path, capsys, case):
    """Each of these used to print a cancer decision (or a traceback): now exit 2, one line
    naming the file and the problem, and no output folder (not even its parents)."""
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "zero_spacing":
        source, problem = _nifti_with(folder / "ct.nii", phantom.volume, pixdim=0.0), "pixdim"
    elif case == "infinite_slope":
        source = _nifti_with(folder / "ct.nii", phantom.volume, scl_slope=float("inf"))
        problem = "scl_slope inf"
    elif case in ("png_2x2", "png_one_row"):
        size = (2, 2) if case == "png_2x2" else (1, 64)
        source = folder / "slice.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, size).astype(np.uint8)).save(
            source
        )
        problem = f"{size[0]}x{size[1]} pixels in plane"
    elif case == "one_voxel":
        source, problem = folder / "one.nii.gz", "1x1 pixels in plane"
        sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 1, 1), 40, np.int16)), str(source))
    else:
        source = shutil.copytree(studies["dicom"], folder / "series")
        victim = sorted(source.iterdir())[3]
        data = victim.read_bytes()
        victim.write_bytes(data.replace(b"\x28\x00\x53\x10DS", b"\x28\x00\x53\x10ES", 1))
        problem = "malformed DICOM header"
    out = tmp_path / "new" / "results" / "study"
    assert _predict(run, source, out) == 2
    line = _one_line_error(capsys, source if case != "dicom_bad_vr" else victim)
    assert problem in line
    assert not (tmp_path / "new").exists()


def test_cli_an_abdominal_slice_cannot_be_assessed(run, tmp_path, capsys) -> None:
    """A single abdominal CT slice used to come out "CANCER SUSPECTED"."""
    from tests.inference.test_input_checks import abdomen_slice

    source = tmp_path / "abdomen.nii.gz"
    sitk.WriteImage(abdomen_slice().to_sitk(), str(source))
    assert _predict(run, source, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "CANNOT ASSESS: no lung in the image" in printed and "probability" not in printed
    doc = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert doc["study"]["status"] == "cannot assess" and doc["study"]["probability"] is None
    assert doc["study"]["reason"] == "no lung in the image"
    assert doc["input_check"]["status"] == "cannot assess"
    assert doc["input_check"]["assessable"] is False and doc["lesions"] == []
    html = (tmp_path / "out" / "report.html").read_text()
    assert "cannot assess: no lung in the image" in html


def _bad_metaimage(folder: Path, problem: str) -> Path:
    folder.mkdir(parents=True)
    fields = {"spacing": "1 1 1", "data": "ct.raw"}
    raw = np.zeros(6 * 64 * 64, "<i2").tobytes()
    if problem == "short data":
        raw = raw[:1000]
    elif problem == "nan spacing":
        fields["spacing"] = "nan 1 1"
    else:  # a data file outside the folder, of the right size
        (folder.parent / "outside.raw").write_bytes(raw)
        fields["data"] = "../outside.raw"
    (folder / "ct.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 64 64 6\nElementType = MET_SHORT\n"
        f"ElementSpacing = {fields['spacing']}\nElementDataFile = {fields['data']}\n"
    )
    (folder / "ct.raw").write_bytes(raw)
    return folder / "ct.mhd"


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("short data", "truncated or corrupt MetaImage data"),
        ("nan spacing", "ElementSpacing is 'nan 1 1'"),
        ("outside", "must lie beside its header"),
    ],
)
def test_cli_folder_whose_only_study_fails(run, tmp_path, capsys, problem, message) -> None:
    """A folder holding one bad MetaImage used to leave an output folder with a batch summary:
    when no study of a folder can be analysed, exit 2 with one line and write nothing."""
    header = _bad_metaimage(tmp_path / "in", problem)
    out = tmp_path / "out"
    assert _predict(run, tmp_path / "in", out) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert any(str(header) in line and message in line for line in errors), errors
    assert "no study could be analysed (1 of 1 failed)" in errors[-1]
    assert not out.exists()


def test_cli_batch_reports_failures_and_skips_symlink_loops(run, studies, tmp_path, capsys):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(studies["nifti"], batch / "a_good.nii.gz")
    _bad_metaimage(batch / "b_short", "short data")
    (batch / "c_loop").symlink_to(batch, target_is_directory=True)  # a loop back into it
    (batch / "d_up").symlink_to(tmp_path, target_is_directory=True)  # and one above it
    out = tmp_path / "out"
    assert _predict(run, batch, out) == 1
    summary = json.loads((out / "batch_summary.json").read_text())
    status = {row["study"]: row["status"] for row in summary["studies"]}
    assert status == {"a_good": "ok", "b_short": "failed"}
    failed = next(row for row in summary["studies"] if row["status"] == "failed")
    assert "truncated or corrupt MetaImage data" in failed["error"]
    good = next(row for row in summary["studies"] if row["status"] == "ok")
    assert good["finding"] in ("cancer suspected", "no cancer suspected")
    assert "c_loop" in capsys.readouterr().err  # the skip is said


def test_the_lung_mask_is_made_once_per_study(predictor, phantom, monkeypatch) -> None:
    """The input checks' coarse lung mask is reused for choosing the slices."""
    import lungcad.inference.input_checks as checks
    import lungcad.inference.predictor as predictor_module

    calls: list[tuple[int, ...]] = []
    original = checks.lung_mask

    def counting(volume, *args, **kwargs):
        calls.append(volume.shape)
        return original(volume, *args, **kwargs)

    monkeypatch.setattr(checks, "lung_mask", counting)
    monkeypatch.setattr(predictor_module, "lung_mask", counting)
    predictor.predict_volume(phantom.volume, cam=False)
    assert len(calls) == 1


def test_reported_tumour_stays_near_the_lungs(run, phantom, monkeypatch) -> None:
    """Inside the lung box too, a reported tumour lies in the lungs or within lung_margin_mm
    of them: a model that calls everything tumour reports no mediastinum or chest wall."""
    predictor = Predictor.from_checkpoint(run, batch_size=4)
    monkeypatch.setattr(predictor, "run_model", _EverywhereTumour(predictor))
    result = predictor.predict_volume(phantom.volume, cam=False)
    mask = result.mask.array.astype(bool)
    spacing = phantom.volume.spacing
    # The lungs as the predictor finds them (the classical mask; here it also takes in a
    # main bronchus between the lungs, as it may on real CT).
    classical = lung_mask(phantom.volume)
    assert result.input_check is not None and result.input_check.lung_mask_step == 1
    for z in result.lung_slices:
        lungs = ndi.binary_fill_holes(classical[z])
        if not lungs.any():
            continue
        distance = ndi.distance_transform_edt(~lungs, sampling=spacing[1:])
        # Margin plus the coarse mask's rounding (two pixels).
        far = distance > predictor.lung_margin_mm + 2 * max(spacing[1:])
        assert not (mask[z] & far).any(), z
    assert mask.any()


def test_flip_tta_averages_the_slice_with_its_mirror(run, phantom) -> None:
    """With tta the predictor's output is the mean probability of the slice and of its
    mirror (flipped back), on the torch backend; the result says so."""
    from lungcad.models.tta import FlipTTA

    plain = Predictor.from_checkpoint(run, batch_size=4)
    tta = Predictor.from_checkpoint(run, batch_size=4, tta=True)
    inputs = plain.preprocess(phantom.volume, [3, 4])
    seg, cls = tta.run_model(inputs)
    with torch.inference_mode():
        expected = FlipTTA(plain.model.float().to(memory_format=torch.contiguous_format))(
            torch.from_numpy(inputs)
        )
    np.testing.assert_allclose(seg, expected["seg_logits"].numpy(), atol=1e-3)
    np.testing.assert_allclose(cls, expected["cls_logits"].numpy(), atol=1e-4)
    seg_plain, _ = plain.run_model(inputs)
    assert not np.allclose(seg, seg_plain, atol=1e-4)  # the mirror changed something
    result = tta.predict_volume(phantom.volume, cam=False)
    assert result.model_info["tta"] == "flip"
    assert any("test-time augmentation" in w for w in result.warnings)
