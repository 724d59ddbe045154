"""Whole-study evaluation and the study threshold: chosen on validation studies, used by predict."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.data.layouts.prepare import prepare_dataset
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.evaluation.study_folder import (
    PER_STUDY_FILE,
    STUDY_EVALUATION_FILE,
    STUDY_METRICS_FILE,
)
from lungcad.evaluation.study_threshold import (
    STUDY_THRESHOLD_FILE,
    read_study_threshold,
    save_study_threshold,
)
from lungcad.inference.predictor import Predictor
from lungcad.inference.study_evaluation import choose_run_study_threshold, evaluate_studies
from lungcad.io.writers import write_image, write_mask
from lungcad.training.checkpoint import file_sha256
from lungcad.volume import Volume
from tests.inference_helpers import SIZE, shared_trained_run

torch.set_num_threads(1)  # 2 shared cores: more threads only contend


def _msd_folder(root: Path, cases: list[tuple[int, bool]]) -> Path:
    """A small MSD-layout folder: 4-slice 64x64 phantoms, with a 20 mm tumour or none."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, (seed, tumour) in enumerate(cases, start=1):
        options = {"n_nodules": 1, "size_mm": 20.0} if tumour else {}
        phantom = make_phantom(
            seed, shape_zyx=(4, SIZE, SIZE), matrix=SIZE, tumour=tumour, **options
        )
        name = f"lung_{i:03d}.nii.gz"
        write_image(phantom.volume, root / "imagesTr" / name)
        write_mask(
            phantom.volume.with_array(phantom.tumour_mask.astype("float32")),
            root / "labelsTr" / name,
        )
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"training": training}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study_cohorts")
    return {
        "val": _msd_folder(root / "val", [(11, True), (12, False), (13, True), (14, False)]),
        "test": _msd_folder(root / "test", [(21, True), (22, False), (23, True)]),
        "one_class": _msd_folder(root / "one_class", [(31, True)]),
    }


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared trained run, without a study threshold."""
    copy = tmp_path_factory.mktemp("study_runs") / "plain"
    shutil.copytree(shared_trained_run(tmp_path_factory), copy)
    return copy


@pytest.fixture(scope="module")
def calibrated(shared_run: Path, cohorts: dict[str, Path]):
    """A copy of the run with a study threshold chosen on the validation studies."""
    run = shared_run.parent / "calibrated"
    shutil.copytree(shared_run, run)
    return run, choose_run_study_threshold(run, cohorts["val"], method="mcc", device="cpu")


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_study_threshold_chosen_on_validation_studies_is_used_by_predict(
    shared_run: Path, calibrated, cohorts: dict[str, Path], tmp_path: Path
) -> None:
    slice_predictor = Predictor.from_checkpoint(shared_run, batch_size=8)
    assert slice_predictor.study_threshold is None
    assert slice_predictor.info["study_threshold"]["source"] == slice_predictor.threshold_source

    run, chosen = calibrated
    assert chosen.path == run / STUDY_THRESHOLD_FILE
    stored = read_study_threshold(run)
    assert stored == chosen.threshold
    assert stored.chosen_on["n_studies"] == 4 and stored.chosen_on["n_positive"] == 2
    assert len(stored.study_hashes) == 4
    probabilities = sorted(r.probability for r in chosen.rows)
    assert probabilities[0] / 2 <= stored.threshold <= (probabilities[-1] + 1) / 2
    assert Predictor.from_checkpoint(run).study_threshold == stored

    # A recognisable value, so the test cannot pass by the slice threshold's coincidence.
    run = _copy(run, tmp_path)
    marked = dataclasses.replace(stored, threshold=0.987654)
    save_study_threshold(run, marked)
    predictor = Predictor.from_checkpoint(run, batch_size=8)
    assert predictor.study_threshold == marked
    assert predictor.info["study_threshold"]["source"] == STUDY_THRESHOLD_FILE
    assert predictor.info["study_threshold"]["n_studies"] == 4
    study = next(iter(sorted((cohorts["test"] / "imagesTr").iterdir())))
    volume, result = predictor.predict_path(study, cam=False)
    assert result.finding.is_cancer == (result.finding.probability >= 0.987654)
    assert result.aggregation["threshold_source"] == STUDY_THRESHOLD_FILE
    assert result.finding.threshold == pytest.approx(0.987654)
    # A 2D image's probability is one slice's: the slice threshold still decides it.
    one_slice = Volume(array=volume.array[2:3], spacing=volume.spacing, intensity="hu")
    flat = predictor.predict_volume(one_slice, cam=False)
    assert flat.finding.threshold == pytest.approx(predictor.threshold)


def test_a_stale_study_threshold_is_refused_and_calibrate_replaces_it(
    calibrated, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(calibrated[0], tmp_path)
    save_study_threshold(run, dataclasses.replace(calibrated[1].threshold, model_sha256="0" * 64))
    with pytest.raises(InputError, match="another model"):
        Predictor.from_checkpoint(run)
    # Choosing again replaces the stale file (it plays no part in the study probabilities).
    assert cli_main(["calibrate", "--checkpoint", str(run), "--studies", str(cohorts["val"])]) == 0
    printed = capsys.readouterr().out
    assert "study threshold" in printed and "4 validation studies" in printed
    renewed = Predictor.from_checkpoint(run).study_threshold
    assert renewed is not None and renewed.threshold == calibrated[1].threshold.threshold


def test_evaluate_studies_reports_decisions_masks_and_lesions(
    calibrated, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = calibrated[0]
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(run), "--studies", str(cohorts["test"])]
    assert cli_main([*args, "--out", str(out), "--n-boot", "20", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "3 studies (2 with tumour, split all)" in printed and "dice (3D)" in printed
    assert "study_threshold.json, study level" in printed
    for name in (STUDY_METRICS_FILE, PER_STUDY_FILE, STUDY_EVALUATION_FILE):
        assert (out / name).is_file(), name
    m = json.loads((out / STUDY_METRICS_FILE).read_text(encoding="utf-8"))
    for key in ("sensitivity", "specificity", "auc", "dice", "hd95_mm", "lesion_sensitivity"):
        assert key in m and f"{key}_ci_low" in m, key
    assert m["n_studies"] == 3 and m["n_with_tumour"] == 2 and "fp_per_study" in m
    rows = list(csv.DictReader((out / PER_STUDY_FILE).open(encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["lung_001", "lung_002", "lung_003"]
    for row in rows:
        if row["label"] == "1":  # a study with tumour always has a Dice and an HD95
            assert row["dice"] != "" and row["hd95_mm"] != ""
            if row["tumour_missed"] == "1":
                assert float(row["dice"]) == 0.0
        else:
            assert row["dice"] == ""
    assert m["dice"] is not None and m["hd95_mm"] is not None  # never NaN (null)
    info = json.loads((out / STUDY_EVALUATION_FILE).read_text(encoding="utf-8"))
    assert info["threshold"]["level"] == "study"
    assert info["threshold"]["source"] == STUDY_THRESHOLD_FILE
    assert info["threshold"]["tuned_on_evaluated_data"] is False
    assert "missed tumour" in info["conventions"]["hd95_mm"]
    # Evaluated on the studies the threshold was chosen on: said so, in the file and a note.
    again = evaluate_studies(run, cohorts["val"], None, n_boot=0, device="cpu")
    assert again.info["threshold"]["tuned_on_evaluated_data"] is True
    assert again.info["threshold"]["n_evaluated_studies_tuned_on"] == 4
    assert any("tuned on the evaluated data" in n for n in again.info["notes"])
    assert [r.probability for r in again.rows] == pytest.approx(
        calibrated[1].threshold.chosen_on["study_probabilities"]
    )


def test_without_a_study_threshold_the_slice_threshold_decides_and_says_so(
    shared_run: Path, cohorts: dict[str, Path]
) -> None:
    result = evaluate_studies(shared_run, cohorts["test"], None, n_boot=0, device="cpu")
    threshold = result.info["threshold"]
    assert threshold["level"] == "slice" and threshold["source"] != STUDY_THRESHOLD_FILE
    assert all(r.threshold == pytest.approx(threshold["value"]) for r in result.rows)
    assert any("no study_threshold.json" in n for n in result.info["notes"])
    assert all(math.isfinite(r.segmentation["dice"]) for r in result.rows if r.label == 1)


def test_cli_refuses_bad_study_inputs_and_writes_nothing(
    shared_run: Path, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    base = ["evaluate", "--checkpoint", str(shared_run), "--out", str(out)]
    assert cli_main([*base, "--studies", str(tmp_path / "absent")]) == 2
    assert cli_main([*base, "--studies", str(cohorts["test"]), "--data", str(tmp_path)]) == 2
    assert cli_main(base) == 2
    assert not out.exists()
    # One class only: no threshold can be chosen, and no file is written.
    calibrate = ["calibrate", "--checkpoint", str(shared_run), "--studies"]
    assert cli_main([*calibrate, str(cohorts["one_class"])]) == 2
    assert "with and without tumour" in capsys.readouterr().err
    assert not (shared_run / STUDY_THRESHOLD_FILE).exists()


def test_the_runs_own_dataset_keeps_its_splits(
    shared_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Studies the run was prepared from: evaluation scores its test cases, and the study
    threshold is never chosen on them."""
    own = _msd_folder(tmp_path / "own", [(41, True), (42, False), (43, True), (44, False)])
    settings = PrepareSettings(layout="msd", val_fraction=0.25, test_fraction=0.25, seed=0)
    prepare_dataset(own, tmp_path / "prep", settings)
    manifest = tmp_path / "prep" / "manifest.csv"
    groups = json.loads((tmp_path / "prep" / "summary.json").read_text("utf-8"))["group_ids"]
    run = _copy(shared_run, tmp_path)
    run_json = json.loads((run / "run.json").read_text("utf-8"))
    run_json["manifests"] = [{"path": str(manifest), "sha256": file_sha256(manifest)}]
    (run / "run.json").write_text(json.dumps(run_json), encoding="utf-8")

    result = evaluate_studies(run, own, None, n_boot=0, device="cpu")
    assert [r.case_id for r in result.rows] == sorted(groups["test"])
    assert result.info["data"]["split"] == "test"
    assert result.info["data"]["training_manifest"] == str(manifest)
    trained = evaluate_studies(run, own, None, split="train", n_boot=0, device="cpu")
    assert trained.info["data"]["overlaps_training_data"] is True
    assert any("trained the model" in n for n in trained.info["notes"])
    calibrate = ["calibrate", "--checkpoint", str(run), "--studies", str(own), "--split", "test"]
    assert cli_main(calibrate) == 2
    assert "never chosen" in capsys.readouterr().err
    assert not (run / STUDY_THRESHOLD_FILE).exists()


def test_a_segmentation_only_run_is_scored_on_its_masks_only(
    shared_run: Path, cohorts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    seg = tmp_path_factory.getbasetemp() / "lungcad_inference_shared" / "seg"
    assert (seg / "best.pt").is_file()  # made by shared_trained_run (the shared_run fixture)
    result = evaluate_studies(seg, cohorts["test"], None, n_boot=0, device="cpu")
    assert "dice" in result.metrics and "hd95_mm" in result.metrics
    assert "sensitivity" not in result.metrics and result.metrics["n_assessed"] == 0
    assert any("no cancer classifier" in n for n in result.info["notes"])
    with pytest.raises(InputError, match="segmentation-only"):
        choose_run_study_threshold(seg, cohorts["val"], device="cpu")
