"""lungcad evaluate: a tiny run trained for real, evaluated on tiny manifests with masks and
labels; metrics checked against predictions.csv with scikit-learn; threshold provenance."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)

from lungcad.cli import main as cli_main
from lungcad.data.manifest import manifest_csv, read_manifest, write_manifest
from lungcad.errors import InputError
from lungcad.evaluation.calibration import Calibration, calibrate_run, save_calibration
from lungcad.evaluation.evaluate import evaluate_run, predict_slices
from lungcad.evaluation.folder import EVALUATION_FILE, read_metrics
from lungcad.evaluation.scoring import PREDICTION_COLUMNS, predicted_mask
from lungcad.inference.predictor import Predictor
from lungcad.metrics.bootstrap import CI_KEYS
from lungcad.training.checkpoint import file_sha256, load_checkpoint
from lungcad.training.config import Config
from lungcad.training.loop import train
from tests.inference_helpers import SIZE, make_run_folder

torch.set_num_threads(1)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tiny_manifest: Callable[..., Path]) -> dict[str, Path]:
    return {
        "train": tiny_manifest({"train": 6, "val": 3, "test": 3}),
        # An "external" set: other patients, 48x48 at 2 mm, noisier.
        "external": tiny_manifest({"test": 4}, size=48, seed=1, spacing=2.0, noise=0.6),
    }


@pytest.fixture(scope="module")
def runs(
    data: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    tiny_config: Callable[..., Config],
) -> dict[str, Path]:
    """A real seg run and a cls run started from it (1 epoch, 2 steps each)."""
    out = tmp_path_factory.mktemp("eval_runs")
    seg = train(tiny_config(data["train"], out / "seg")).run_dir
    cls = train(
        tiny_config(
            data["train"],
            out / "cls",
            "train.stage=cls",
            f"train.init_from={seg}",
            "optim.freeze_encoder_epochs=-1",
        )
    ).run_dir
    return {"seg": seg, "cls": cls}


@pytest.fixture(scope="module")
def evaluated(
    runs: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The cls run evaluated through the CLI on the external set (all rows)."""
    out = tmp_path_factory.mktemp("evaluated") / "ext"
    argv = [
        "evaluate",
        "--checkpoint",
        str(runs["cls"]),
        "--data",
        str(data["external"]),
        "--out",
        str(out),
        "--split",
        "all",
        "--n-boot",
        "20",
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]
    assert cli_main(argv) == 0
    return out


def _predictions(folder: Path) -> list[dict[str, str]]:
    with (folder / "predictions.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_has_every_file_and_key(evaluated: Path) -> None:
    for name in (
        "metrics.json",
        "predictions.csv",
        EVALUATION_FILE,
        "confusion_matrix.png",
        "roc.png",
        "calibration.png",
        "dice.png",
        "examples.png",
    ):
        assert (evaluated / name).is_file(), name
        if name.endswith(".png"):
            assert (evaluated / name).read_bytes()[:8] == PNG
    metrics = json.loads((evaluated / "metrics.json").read_text())
    for key in (
        "accuracy",
        "precision",
        "sensitivity",
        "specificity",
        "f1",
        "mcc",
        "kappa",
        "auc",
        "pr_auc",
        "brier",
        "ece",
        "dice",
        "iou",
        "hd95",
        "lesion_sensitivity",
        "threshold",
        "n_slices",
        "n_groups",
    ):
        assert key in metrics, key
    for key in (*CI_KEYS, "dice", "iou", "hd95", "lesion_sensitivity"):
        assert f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics, key
    assert metrics["n_slices"] == 8 and metrics["n_groups"] == 4
    low, high, value = metrics["accuracy_ci_low"], metrics["accuracy_ci_high"], metrics["accuracy"]
    assert 0.0 <= low <= value <= high <= 1.0
    info = json.loads((evaluated / EVALUATION_FILE).read_text())
    assert info["tasks"] == {"classification": True, "segmentation": True}
    assert info["data"]["split"] == "all" and info["data"]["n_with_mask"] == 8
    assert info["hd95_unit"] == "mm" and not info["data"]["same_manifest_as_training"]
    assert len(info["checkpoint"]["sha256"]) == 64 and len(info["checkpoint"]["config_hash"]) == 64
    examples = info["examples"]
    assert examples and {e["category"] for e in examples} <= {"TP", "FP", "FN", "TN"}
    for example in examples:
        assert (evaluated / example["file"]).read_bytes()[:8] == PNG


def test_metrics_agree_with_predictions_csv(evaluated: Path) -> None:
    rows = _predictions(evaluated)
    assert list(rows[0]) == list(PREDICTION_COLUMNS)
    metrics = read_metrics(evaluated)
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows])
    np.testing.assert_array_equal(pred, (p >= metrics["threshold"]).astype(int))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["f1"] == pytest.approx(f1_score(y, pred, zero_division=np.nan), nan_ok=True)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y, pred), nan_ok=True)
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, p))
    dice = np.array([float(r["dice"]) if r["dice"] else np.nan for r in rows])
    assert np.isnan(dice[y == 0]).all()  # tumour-free slices: Dice undefined, not 0 or 1
    assert metrics["dice"] == pytest.approx(np.nanmean(dice))


def test_dice_is_scored_at_the_slices_own_resolution(
    evaluated: Path, runs: dict[str, Path], data: dict[str, Path]
) -> None:
    model, config, _ = load_checkpoint(runs["cls"])
    records = [r for r in read_manifest(data["external"]) if r.label == 1][:2]
    rows = {r["sample_id"]: r for r in _predictions(evaluated)}
    for out in predict_slices(model, records, data["external"], config.model.image_size):
        ref = np.load(data["external"] / out.record.mask_path) > 0
        assert out.seg_probability.shape == (SIZE, SIZE) and ref.shape == (48, 48)
        pred = predicted_mask(out.seg_probability, ref.shape)
        tp, size = np.sum(pred & ref), pred.sum() + ref.sum()
        expected = 2 * tp / size
        assert float(rows[out.record.sample_id]["dice"]) == pytest.approx(expected)
        assert float(rows[out.record.sample_id]["probability"]) == pytest.approx(
            out.probability, abs=1e-6
        )


def test_threshold_comes_from_the_run_not_the_data(
    evaluated: Path, runs: dict[str, Path], data: dict[str, Path]
) -> None:
    stored = json.loads((runs["cls"] / "threshold.json").read_text())["threshold"]
    assert load_checkpoint(runs["cls"]).info["threshold"] == pytest.approx(stored)
    assert read_metrics(evaluated)["threshold"] == pytest.approx(stored)
    info = json.loads((evaluated / EVALUATION_FILE).read_text())["threshold"]
    assert info["source"] == "threshold.json" and info["tuned_on_evaluated_data"] is False
    assert info["chosen_on_data"]["split"] == "val"
    assert info["chosen_on_data"]["manifests"][0]["sha256"] == file_sha256(
        manifest_csv(data["train"])
    )
    # Another set with other labels and probabilities: the same threshold, again.
    other = evaluate_run(runs["cls"], data["train"], None, split="val", n_boot=0, device="cpu")
    assert other.metrics["threshold"] == pytest.approx(stored)
    assert other.info["data"]["same_manifest_as_training"]
    assert other.info["data"]["overlaps_training_data"]  # val rows are not held out
    # ... and the threshold was chosen on exactly these rows: evaluation says so.
    assert other.info["threshold"]["tuned_on_evaluated_data"] is True
    test = evaluate_run(runs["cls"], data["train"], None, split="test", n_boot=0, device="cpu")
    assert test.info["threshold"]["tuned_on_evaluated_data"] is False


def test_calibration_fitted_on_the_evaluated_rows_is_reported(
    runs: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    """calibration.json records the manifest (path + SHA-256) and split it was fitted on;
    evaluating those rows reports the calibration and its threshold as tuned on them."""
    run = tmp_path / "run"
    shutil.copytree(runs["cls"], run)
    cal = calibrate_run(run, data["train"], "temperature", split="val")
    assert cal.info["manifests"] == [
        {
            "path": str(manifest_csv(data["train"])),
            "sha256": file_sha256(manifest_csv(data["train"])),
        }
    ]
    fitted = evaluate_run(run, data["train"], None, split="val", n_boot=0, device="cpu")
    assert fitted.info["calibration"]["applied"]
    assert fitted.info["calibration"]["fitted_on_evaluated_data"] is True
    assert fitted.info["threshold"]["source"] == "calibration.json"
    assert fitted.info["threshold"]["tuned_on_evaluated_data"] is True
    for split, manifest in (("test", data["train"]), ("all", data["external"])):
        held_out = evaluate_run(run, manifest, None, split=split, n_boot=0, device="cpu")
        assert held_out.info["calibration"]["fitted_on_evaluated_data"] is False, split
        assert held_out.info["threshold"]["tuned_on_evaluated_data"] is False, split
    # Every row of the manifest includes the calibration's val rows.
    everything = evaluate_run(run, data["train"], None, split="all", n_boot=0, device="cpu")
    assert everything.info["calibration"]["fitted_on_evaluated_data"] is True


def test_calibrated_run_is_scored_as_predict_scores_it(
    evaluated: Path, runs: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    """With calibration.json, evaluation uses the calibrated probabilities and the stored
    calibrated threshold: the decision rule of Predictor (calibration.run_decision)."""
    plain_info = json.loads((evaluated / EVALUATION_FILE).read_text())
    assert plain_info["calibration"]["applied"] is False
    run = tmp_path / "calibrated_run"
    shutil.copytree(runs["cls"], run)
    plain = evaluate_run(run, data["external"], None, split="all", n_boot=0, device="cpu")
    sha = load_checkpoint(run).info["sha256"]
    save_calibration(
        Calibration(
            "temperature",
            temperature=2.5,
            threshold=0.4321,
            info={"checkpoint_sha256": sha, "split": "val", "threshold_method": "mcc"},
        ),
        run,
    )
    out = tmp_path / "eval"
    result = evaluate_run(
        run, data["external"], out, split="all", n_boot=0, device="cpu", n_examples=0
    )
    p_plain = np.array([r.probability for r in plain.rows], dtype=np.float64)
    p_cal = np.array([r.probability for r in result.rows])
    logits = np.log(p_plain) - np.log1p(-p_plain)
    np.testing.assert_allclose(p_cal, 1.0 / (1.0 + np.exp(-logits / 2.5)), atol=1e-5)
    assert not np.allclose(p_cal, p_plain, atol=1e-3)  # the calibration changed something
    assert [r.prediction for r in result.rows] == [int(p >= 0.4321) for p in p_cal]
    predictor = Predictor.from_checkpoint(run)
    assert predictor.threshold == pytest.approx(0.4321)
    assert read_metrics(out)["threshold"] == pytest.approx(predictor.threshold)
    info = json.loads((out / EVALUATION_FILE).read_text())
    assert info["calibration"]["applied"] is True
    assert info["calibration"]["method"] == "temperature"
    assert info["threshold"]["source"] == predictor.threshold_source == "calibration.json"
    assert info["threshold"]["uncalibrated_value"] == pytest.approx(plain.metrics["threshold"])
    # A calibration fitted for another checkpoint is refused, as by `lungcad predict`.
    save_calibration(
        Calibration("temperature", temperature=2.5, info={"checkpoint_sha256": "0" * 64}), run
    )
    with pytest.raises(InputError, match="another best.pt"):
        evaluate_run(run, data["external"], None, split="all", n_boot=0, device="cpu")


def test_seg_run_reports_segmentation_only(runs: dict[str, Path], data: dict[str, Path]) -> None:
    result = evaluate_run(runs["seg"], data["train"], None, n_boot=0, device="cpu")
    assert result.info["data"]["split"] == "test"  # the default for prepared data
    assert "accuracy" not in result.metrics and "threshold" not in result.metrics
    assert 0.0 <= result.metrics["dice"] <= 1.0
    assert "dice_ci_low" not in result.metrics  # n_boot=0: no CIs
    assert any("classifier head is untrained" in n for n in result.info["notes"])
    assert all(math.isnan(r.probability) and r.prediction == -1 for r in result.rows)


def test_raw_dataset_is_prepared_on_the_fly(runs: dict[str, Path], tmp_path: Path) -> None:
    raw = tmp_path / "patches"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        image = rng.integers(0, 120, (40, 40), dtype=np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        if i % 2:
            mask[12:24, 15:27] = 255
            image[mask > 0] = 230
        Image.fromarray(image).save(raw / "images" / f"patch_{i:03d}.png")
        Image.fromarray(mask).save(raw / "masks" / f"patch_{i:03d}.png")
    out = tmp_path / "eval"
    result = evaluate_run(runs["cls"], raw, out, n_boot=0, device="cpu", n_examples=1)
    assert result.info["data"]["prepared_for_evaluation"] and result.info["data"]["split"] == "all"
    assert result.info["data"]["layout"] == "imagemask"
    assert result.metrics["n_slices"] == 6 and result.info["hd95_unit"] == "pixels"
    assert len(_predictions(out)) == 6


def test_refuses_to_overwrite_a_foreign_folder(
    runs: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an earlier evaluation"):
        evaluate_run(runs["cls"], data["external"], tmp_path, split="all")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    only_train = tmp_path / "only_train"
    write_manifest(
        [r for r in read_manifest(data["train"]) if r.split == "train"], only_train / "manifest.csv"
    )
    with pytest.raises(InputError, match="no 'test' rows"):
        evaluate_run(runs["cls"], only_train, None, n_boot=0)


def test_fold_ensemble_threshold_and_training_rows_are_reported(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """A fold ensemble's threshold was chosen on the out-of-fold predictions of every row of
    its cross-validated manifest (folds.json), which also trained its members: evaluating any
    split of that manifest is reported as such; another manifest is not."""
    folder = tmp_path / "cv"
    members = []
    for fold in range(2):
        make_run_folder(folder / f"fold{fold}" / "run", seed=fold)
        members.append({"fold": fold, "run": f"fold{fold}/run", "threshold": 0.5})
    (folder / "ensemble.json").write_text(
        json.dumps({"members": members, "threshold": 0.4, "threshold_source": "out-of-fold"})
    )
    csv_path = manifest_csv(data["train"])
    (folder / "folds.json").write_text(
        json.dumps({"manifest": str(csv_path), "manifest_sha256": file_sha256(csv_path)})
    )
    cv = evaluate_run(folder, data["train"], None, split="test", n_boot=0, device="cpu")
    assert cv.info["threshold"]["source"] == "ensemble.json"
    assert cv.info["threshold"]["tuned_on_evaluated_data"] is True
    assert cv.info["data"]["overlaps_training_data"] is True
    external = evaluate_run(folder, data["external"], None, split="all", n_boot=0, device="cpu")
    assert external.info["threshold"]["tuned_on_evaluated_data"] is False
    assert external.info["data"]["overlaps_training_data"] is False


def test_masked_slices_are_segmented_at_the_decoders_scale(tmp_path) -> None:
    """With a recorded decoder pixel size, a masked slice is segmented by sliding windows on
    its own grid (as `lungcad predict` does), not through the letterboxed model input."""
    from lungcad.data.manifest import read_manifest
    from lungcad.data.preprocessing import LUNG_WINDOW
    from lungcad.evaluation.evaluate import predict_slices
    from lungcad.training.checkpoint import load_checkpoint
    from lungcad.training.domain import HU, InputDomain
    from tests.inference_helpers import make_manifest, make_run_folder

    folder = make_manifest(tmp_path / "m", {"test": 1}, spacing=0.5)
    records = read_manifest(folder / "manifest.csv")
    model, _, _ = load_checkpoint(make_run_folder(tmp_path / "run", image_size=32))
    domain = InputDomain(HU, LUNG_WINDOW, 1.0, 32)
    at_scale = list(predict_slices(model, records, folder, 32, seg_scale=domain))
    plain = list(predict_slices(model, records, folder, 32))
    assert [o.seg_probability.shape for o in plain] == [(32, 32), (32, 32)]
    assert [o.seg_probability.shape for o in at_scale] == [(64, 64), (64, 64)]
    assert [o.probability for o in at_scale] == [o.probability for o in plain]


def test_a_classifier_trained_at_one_pixel_size_is_evaluated_and_applied_at_it(
    tmp_path: Path,
) -> None:
    """data.slice_pixel_mm travels with the run: the checkpoint records a resampled domain,
    evaluate feeds the slices at that pixel size and returns tumour maps on the slice grid,
    and the predictor scales a study by its spacing over that pixel size."""
    from tests.inference_helpers import make_manifest, make_tiny_config

    manifest = make_manifest(tmp_path / "data")  # 64x64 slices at 1 mm
    seg = tmp_path / "seg"
    train(make_tiny_config(manifest, seg, "train.stage=seg", "train.max_steps_per_epoch=1"))
    run = tmp_path / "cls"
    train(
        make_tiny_config(
            manifest,
            run,
            "train.stage=cls",
            "train.max_steps_per_epoch=1",
            f"train.init_from={seg}",
            "data.slice_pixel_mm=2.0",
        )
    )
    _, _, info = load_checkpoint(run)
    domain = info["input_domain"]
    assert domain["resampled"] is True and domain["model_pixel_mm"] == 2.0
    result = evaluate_run(run, manifest, None, split="val", n_boot=0, device="cpu")
    assert result.rows and all(math.isfinite(r.probability) for r in result.rows)
    model, config, info = load_checkpoint(run)
    records = [r for r in read_manifest(manifest_csv(manifest)) if r.split == "val"][:2]
    outputs = list(
        predict_slices(model, records, manifest, SIZE, pixel_mm=config.data.slice_pixel_mm)
    )
    assert all(o.seg_probability.shape == (64, 64) for o in outputs)
    predictor = Predictor(model, config, info, study_threshold=None)
    volume = _volume_like(records[0], manifest)
    assert predictor.input_scale(volume, []) == pytest.approx(0.5)
    # Without a pixel spacing, a 2D image is taken to span what the training slices spanned
    # (64 px at 1 mm here), not a chest CT's 350 mm.
    assert domain["field_of_view_mm"] == pytest.approx(64.0)
    unknown = dataclasses.replace(volume, meta={**volume.meta, "spacing_known": False})
    warnings: list[str] = []
    assert predictor.input_scale(unknown, warnings) == pytest.approx(0.5)
    assert predictor.segmentation_spacing(unknown, warnings) == pytest.approx((1.0, 1.0))
    assert all("median extent of the model's training images" in w for w in warnings)


def _volume_like(record, root: Path):
    from lungcad.volume import Volume

    image = np.load(Path(root) / record.image_path)
    return Volume(
        array=image[None].astype(np.float32), spacing=(1.0, 1.0, 1.0), intensity="windowed"
    )
