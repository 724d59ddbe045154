"""Calibration: temperature scaling and isotonic regression, storage, CLI, Predictor use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.evaluation.calibration import (
    CALIBRATION_FILE,
    Calibration,
    binary_nll,
    calibrate_run,
    fit_calibration,
    load_calibration,
    save_calibration,
)
from lungcad.inference.predictor import Predictor
from lungcad.metrics.classification import expected_calibration_error
from tests.inference_helpers import make_manifest, make_run_folder

torch.set_num_threads(1)


def _overconfident(n: int, seed: int, factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the "model" reports factor * z (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return factor * z, labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_calibration_improves_held_out_nll_and_ece(method: str) -> None:
    fit_logits, fit_labels = _overconfident(3000, seed=0)
    test_logits, test_labels = _overconfident(3000, seed=1)
    cal = fit_calibration(fit_logits, fit_labels, method)
    before, after = _sigmoid(test_logits), cal.apply(test_logits)
    assert binary_nll(test_labels, after) < binary_nll(test_labels, before) - 0.1
    assert expected_calibration_error(test_labels, after) < 0.5 * expected_calibration_error(
        test_labels, before
    )
    assert cal.info["nll_after"] < cal.info["nll_before"] and cal.info["n"] == 3000
    if method == "temperature":
        assert cal.temperature == pytest.approx(4.0, rel=0.15)  # the true over-confidence
        # Temperature scaling is monotone: the ranking (and the AUC) is unchanged.
        assert np.array_equal(
            np.argsort(after, kind="stable"), np.argsort(test_logits, kind="stable")
        )


def test_isotonic_apply_equals_sklearn() -> None:
    logits, labels = _overconfident(500, seed=2)
    cal = fit_calibration(logits, labels, "isotonic")
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(logits, labels)
    probe = np.linspace(-20, 20, 101)
    assert np.allclose(cal.apply(probe), reference.predict(probe))


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_round_trip_to_dict_from_dict(method: str, tmp_path: Path) -> None:
    logits, labels = _overconfident(400, seed=3)
    cal = fit_calibration(logits, labels, method)
    cal.threshold = 0.42
    restored = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert restored == cal
    probe = np.linspace(-10, 10, 41)
    assert np.array_equal(restored.apply(probe), cal.apply(probe))
    save_calibration(cal, tmp_path)
    assert load_calibration(tmp_path) == cal
    assert load_calibration(tmp_path / "nowhere") is None


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="both classes"):
        fit_calibration(np.array([0.1, 2.0]), np.array([1, 1]))
    with pytest.raises(InputError, match="method"):
        fit_calibration(np.array([0.1, 2.0]), np.array([0, 1]), "platt")
    with pytest.raises(InputError, match="0/1"):
        fit_calibration(np.array([0.1, 2.0]), np.array([-1, 1]))
    with pytest.raises(InputError, match="finite"):
        fit_calibration(np.array([np.nan, 2.0]), np.array([0, 1]))
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(InputError, match="calibration"):
        load_calibration(tmp_path)


@pytest.fixture(scope="module")
def run_and_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calib")
    return make_run_folder(root / "run", threshold=0.3), make_manifest(root / "data")


def test_cli_calibrate_and_predictor_uses_it(run_and_manifest, capsys) -> None:
    run, manifest = run_and_manifest
    assert (
        cli_main(
            [
                "calibrate",
                "--checkpoint",
                str(run),
                "--manifest",
                str(manifest),
                "--method",
                "temperature",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "temperature" in printed and "threshold" in printed
    cal = load_calibration(run)
    assert cal.method == "temperature" and cal.info["n"] == 8  # the manifest's val slices
    assert 0.0 <= cal.threshold <= 1.0 and cal.info["threshold_uncalibrated"] == 0.3
    predictor = Predictor.from_checkpoint(run)
    assert predictor.threshold == cal.threshold
    assert predictor.info["threshold_source"] == "calibration.json"
    assert predictor.info["calibration"]["temperature"] == pytest.approx(cal.temperature)
    # Slice probabilities go through the calibration.
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = predictor.model(x)["cls_logits"].numpy()
    _, cls = predictor.run_model(x.numpy())
    assert np.allclose(cls, logits, atol=1e-5)
    assert np.allclose(cal.apply(cls), _sigmoid(logits / cal.temperature), atol=1e-6)


def test_calibration_of_another_checkpoint_is_refused(run_and_manifest, tmp_path) -> None:
    run, _ = run_and_manifest
    other = make_run_folder(tmp_path / "other", seed=1, threshold=0.8)
    cal = Calibration(
        "temperature", temperature=2.0, threshold=0.5, info={"checkpoint_sha256": "0" * 64}
    )
    save_calibration(cal, other)
    with pytest.raises(InputError, match="another best.pt"):
        Predictor.from_checkpoint(other)
    # Without a stored threshold the run's threshold is mapped through the calibration.
    save_calibration(Calibration("temperature", temperature=2.0), other)
    predictor = Predictor.from_checkpoint(other)
    assert predictor.threshold == pytest.approx(_sigmoid(np.log(0.8 / 0.2) / 2.0))


def test_cli_calibrate_refuses_the_test_split(run_and_manifest, tmp_path, capsys) -> None:
    """`lungcad calibrate --split test` is one line naming the option, exit 2, nothing written."""
    _, manifest = run_and_manifest
    run = make_run_folder(tmp_path / "run", threshold=0.3)
    argv = ["calibrate", "--checkpoint", str(run), "--manifest", str(manifest)]
    assert cli_main([*argv, "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--split" in err and "test split" in err
    assert not (run / CALIBRATION_FILE).exists()
    with pytest.raises(InputError, match="never fitted on the test split"):
        calibrate_run(run, manifest, split="test")
