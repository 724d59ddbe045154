"""Tests for lungcad.validation.crossval and ``lungcad validate --folds``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lungcad.cli import main
from lungcad.data.manifest import SliceRecord, write_manifest
from lungcad.errors import InputError
from lungcad.inference.predictor import Predictor
from lungcad.validation.crossval import cross_validate, metadata_table
from tests.inference_helpers import SIZE, tiny_set_options


def _patients(folder: Path, per_label: int = 6, slices: int = 2) -> Path:
    """Patients that are wholly cancerous (bright disc on each slice) or wholly not."""
    rng = np.random.default_rng(0)
    (folder / "slices").mkdir(parents=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    records = []
    for p in range(2 * per_label):
        label = p % 2
        for s in range(slices):
            image = rng.uniform(0, 0.3, (SIZE, SIZE)).astype(np.float32)
            if label:
                image[(yy - 32) ** 2 + (xx - 30 - 2 * s) ** 2 <= 64] += 0.6
            sid = f"p{p}_{s}"
            np.save(folder / "slices" / f"{sid}.npy", np.clip(image, 0, 1))
            records.append(
                SliceRecord(sid, f"p{p}", s, f"slices/{sid}.npy", "", label, 1.0, 1.0, "t", "train")
            )
    return write_manifest(records, folder / "manifest.csv").parent


def test_cross_validation_scores_every_patient_once(tmp_path: Path, tiny_config) -> None:
    data = _patients(tmp_path / "data")
    config = tiny_config(None, None, "train.stage=cls")
    result = cross_validate(data, tmp_path / "cv", config, k=2, baselines=["logreg"], n_boot=20)
    assert set(result.metrics) == {"deep", "logreg", "shortcut_logreg", "shortcut_rf"}
    for rows in result.predictions.values():
        assert sorted(r.sample_id for r in rows) == sorted(
            f"p{p}_{s}" for p in range(12) for s in range(2)
        )
    folds = json.loads((tmp_path / "cv" / "folds.json").read_text())
    deep = result.predictions["deep"]
    # Each slice was scored by the fold that held its patient out.
    assert all(folds["fold_of"][r.group_id] == r.fold for r in deep)
    with (tmp_path / "cv" / "oof_predictions.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4 * 24
    table = (tmp_path / "cv" / "results.md").read_text()
    assert "shortcut audit (logreg, metadata only)" in table and "| deep |" in table
    assert "accuracy_ci_low" in result.metrics["deep"]
    ensemble = json.loads((tmp_path / "cv" / "ensemble.json").read_text())
    assert [m["run"] for m in ensemble["members"]] == ["fold0/run", "fold1/run"]
    predictor = Predictor.from_checkpoint(tmp_path / "cv")
    assert predictor.threshold == pytest.approx(ensemble["threshold"])
    with pytest.raises(InputError, match="not empty"):
        cross_validate(data, tmp_path / "cv", config, k=2, baselines=[])


def test_metadata_table_holds_size_aspect_and_intensity(tmp_path: Path) -> None:
    data = _patients(tmp_path / "data", per_label=1, slices=1)
    from lungcad.data.manifest import read_manifest

    table = metadata_table(read_manifest(data), data)
    assert table.shape == (2, 5)
    assert table[0, :3].tolist() == [SIZE, SIZE, 1.0]
    assert table[1, 3] > table[0, 3]  # the cancerous slice's disc is brighter


def test_validate_folds_cli(tmp_path: Path, capsys) -> None:
    data = _patients(tmp_path / "data")

    def validate(out: str, *extra: str) -> int:
        return main(
            ["validate", "--train", str(data), "--folds", "2", "--out", str(tmp_path / out), *extra]
        )

    tiny_cls = tiny_set_options("train.stage=cls")
    assert validate("cv", "--baselines", "none", "--n-boot", "0", *tiny_cls) == 0
    out = capsys.readouterr().out
    assert "| deep |" in out and "--checkpoint" in out
    assert validate("cv2", "--synthetic") == 2
    assert validate("cv3", *tiny_set_options()) == 2  # a seg config


def test_a_failed_cross_validation_leaves_nothing(tmp_path: Path, tiny_config, monkeypatch) -> None:
    import lungcad.validation.crossval as crossval

    data = _patients(tmp_path / "data")
    calls = []
    real_train = crossval.train

    def train_then_fail(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C during the second fold
        return real_train(cfg)

    monkeypatch.setattr(crossval, "train", train_then_fail)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(
            data, tmp_path / "cv", tiny_config(None, None, "train.stage=cls"), k=2, baselines=[]
        )
    assert not (tmp_path / "cv").exists()
    (tmp_path / "empty").mkdir()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cross_validate(
            data, tmp_path / "empty", tiny_config(None, None, "train.stage=cls"), k=2, baselines=[]
        )
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
