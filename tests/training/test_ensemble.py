"""Tests for lungcad.training.ensemble: k fold runs used as one model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError, MissingInputError
from lungcad.inference.predictor import Predictor
from lungcad.training.checkpoint import load_checkpoint
from lungcad.training.ensemble import ENSEMBLE_FILE, EnsembleNet, is_ensemble, load_ensemble
from tests.inference_helpers import SIZE, make_run_folder


def _ensemble(folder: Path, threshold: float = 0.4) -> Path:
    members = []
    for fold in range(2):
        make_run_folder(folder / f"fold{fold}" / "run", seed=fold, threshold=0.5)
        members.append({"fold": fold, "run": f"fold{fold}/run", "threshold": 0.5})
    (folder / ENSEMBLE_FILE).write_text(
        json.dumps({"members": members, "threshold": threshold, "threshold_source": "out-of-fold"})
    )
    return folder


def test_ensemble_averages_member_probabilities(tmp_path: Path) -> None:
    folder = _ensemble(tmp_path / "cv")
    assert is_ensemble(folder) and not is_ensemble(folder / "fold0" / "run")
    net, config, info = load_ensemble(folder)
    assert isinstance(net, EnsembleNet) and len(net.members) == 2
    assert info["threshold"] == 0.4 and info["ensemble"]["members"] == ["fold0/run", "fold1/run"]
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.inference_mode():
        out = net(x)
        singles = [load_checkpoint(folder / f"fold{f}" / "run").model(x) for f in range(2)]
    for key in ("seg_logits", "cls_logits"):
        expected = torch.stack([torch.sigmoid(s[key]) for s in singles]).mean(0)
        torch.testing.assert_close(torch.sigmoid(out[key]), expected, atol=1e-5, rtol=1e-4)


def test_ensemble_records_the_cross_validated_rows(tmp_path: Path) -> None:
    """folds.json beside ensemble.json names the manifest whose out-of-fold predictions chose
    the threshold (and whose rows trained the members); without it they are unknown."""
    folder = _ensemble(tmp_path / "cv")
    assert load_ensemble(folder)[2]["ensemble"]["threshold_chosen_on"] is None
    (folder / "folds.json").write_text(json.dumps({"manifest": "m.csv", "manifest_sha256": "ab"}))
    entry = load_ensemble(folder)[2]["ensemble"]
    rows = {"manifests": [{"path": "m.csv", "sha256": "ab"}], "split": "all"}
    assert entry["threshold_chosen_on"] == entry["trained_on"] == rows


def test_predictor_accepts_an_ensemble_folder(tmp_path: Path) -> None:
    folder = _ensemble(tmp_path / "cv", threshold=0.3)
    predictor = Predictor.from_checkpoint(folder, batch_size=2)
    assert predictor.threshold == pytest.approx(0.3)
    # A chest (the input checks give noise no decision: it has no lung).
    volume = make_phantom(3, shape_zyx=(4, SIZE, SIZE), matrix=SIZE, n_nodules=1).volume
    result = predictor.predict_volume(volume)
    assert result.finding.threshold == pytest.approx(0.3)
    assert 0.0 <= result.finding.probability <= 1.0
    with pytest.raises(InputError, match="torch backend"):
        Predictor.from_checkpoint(folder, backend="onnx")


def test_broken_ensembles_are_refused(tmp_path: Path) -> None:
    folder = _ensemble(tmp_path / "cv")
    with pytest.raises(MissingInputError):
        load_ensemble(tmp_path)
    spec = json.loads((folder / ENSEMBLE_FILE).read_text())
    spec["members"][1]["run"] = "../elsewhere"
    (folder / ENSEMBLE_FILE).write_text(json.dumps(spec))
    with pytest.raises(InputError, match="inside the ensemble folder"):
        load_ensemble(folder)
    make_run_folder(folder / "fold1" / "run", name="resnet34")
    spec["members"][1]["run"] = "fold1/run"
    (folder / ENSEMBLE_FILE).write_text(json.dumps(spec))
    with pytest.raises(InputError, match="share one configuration"):
        load_ensemble(folder)
    (folder / ENSEMBLE_FILE).write_text("{}")
    with pytest.raises(InputError, match="not a lungcad ensemble"):
        load_ensemble(folder)


def test_evaluate_accepts_an_ensemble_folder(tmp_path: Path, tiny_manifest) -> None:
    from lungcad.evaluation.evaluate import evaluate_run

    folder = _ensemble(tmp_path / "cv", threshold=0.3)
    result = evaluate_run(folder, tiny_manifest(), None, split="val", n_boot=0, device="cpu")
    assert result.info["threshold"]["value"] == pytest.approx(0.3)
    assert len(result.rows) > 0 and all(0.0 <= r.probability <= 1.0 for r in result.rows)


def test_evaluate_with_flip_tta(tmp_path: Path, tiny_manifest) -> None:
    from lungcad.evaluation.evaluate import evaluate_run

    run = make_run_folder(tmp_path / "run")
    data = tiny_manifest()
    plain = evaluate_run(run, data, None, split="val", n_boot=0, device="cpu")
    tta = evaluate_run(run, data, None, split="val", n_boot=0, device="cpu", tta=True)
    assert [r.sample_id for r in plain.rows] == [r.sample_id for r in tta.rows]
    assert any(
        abs(a.probability - b.probability) > 1e-6 for a, b in zip(plain.rows, tta.rows, strict=True)
    )
