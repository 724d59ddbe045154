"""lungcad validate: train on A, evaluate internally and externally, baselines, gap table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.evaluation.folder import read_metrics
from lungcad.training.config import load_config
from lungcad.validation.protocol import parse_externals, run_validation
from tests.inference_helpers import tiny_set_options

torch.set_num_threads(1)

TINY = tiny_set_options()  # the tiny training settings, as --set options


@pytest.fixture(scope="module")
def validated(tiny_manifest: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = tiny_manifest({"train": 6, "val": 3, "test": 3})
    b = tiny_manifest({"test": 4}, size=48, seed=1, spacing=2.0, noise=0.6)
    out = tmp_path_factory.mktemp("validate") / "out"
    argv = [
        "validate",
        "--train",
        str(a),
        "--external",
        f"hospB={b}",
        "--out",
        str(out),
        "--baselines",
        "logreg",
        "--roi",
        "whole",
        "--n-boot",
        "10",
        "--device",
        "cpu",
        *TINY,
    ]
    assert cli_main(argv) == 0
    return out


def test_protocol_writes_every_part(validated: Path) -> None:
    info = json.loads((validated / "validation.json").read_text())
    assert info["stages"] == ["seg", "cls"] and info["deep_model"] == "deep (resnet18)"
    assert set(info["evaluations"]) == {"train", "internal", "hospB"}
    for name in (
        "gap.md",
        "gap.json",
        "gap.png",
        "baselines/metrics.json",
        "baselines/metrics.md",
        "runs/seg/best.pt",
        "runs/cls/threshold.json",
    ):
        assert (validated / name).is_file(), name
    splits = {
        s: json.loads((validated / "eval" / s / "evaluation.json").read_text())["data"]
        for s in info["evaluations"]
    }
    assert (splits["train"]["split"], splits["internal"]["split"], splits["hospB"]["split"]) == (
        "train",
        "test",
        "all",
    )
    assert splits["hospB"]["n_slices"] == 8 and not splits["hospB"]["same_manifest_as_training"]


def test_every_evaluation_uses_the_validation_threshold(validated: Path) -> None:
    threshold = json.loads((validated / "runs/cls/threshold.json").read_text())["threshold"]
    for set_name in ("train", "internal", "hospB"):
        assert read_metrics(validated / "eval" / set_name)["threshold"] == pytest.approx(threshold)


def test_gap_table_holds_the_evaluated_metrics(validated: Path) -> None:
    gap = json.loads((validated / "gap.json").read_text())
    assert gap["sets"] == ["train", "internal", "hospB"]
    rows = {row["model"]: row for row in gap["rows"]}
    assert set(rows) == {"deep (resnet18)", "logreg"}
    for set_name in gap["sets"]:
        metrics = read_metrics(validated / "eval" / set_name)
        for key in ("accuracy", "f1", "mcc", "kappa", "dice"):
            value = rows["deep (resnet18)"][set_name][key]
            assert value == pytest.approx(metrics[key], nan_ok=True) or value is None
    baselines = json.loads((validated / "baselines/metrics.json").read_text())["metrics"]
    assert rows["logreg"]["hospB"]["mcc"] == pytest.approx(baselines["logreg"]["hospB"]["mcc"])
    assert rows["logreg"]["train"]["dice"] is None  # baselines do not segment
    drop = rows["logreg"]["drop"]["hospB"]["accuracy"]
    assert drop == pytest.approx(
        rows["logreg"]["internal"]["accuracy"] - rows["logreg"]["hospB"]["accuracy"]
    )
    assert "| deep (resnet18) |" in (validated / "gap.md").read_text()


def test_report_of_the_validation(validated: Path, tmp_path: Path) -> None:
    out = tmp_path / "validation.html"
    assert cli_main(["report", str(validated), "--out", str(out)]) == 0
    page = out.read_text()
    for text in (
        "Generalisation gap",
        "Deep model on &#x27;hospB&#x27;",
        "Baselines (all sets)",
        "Training run: seg",
        "Training run: cls",
        "Provenance",
        "data:image/png;base64,",
    ):
        assert text in page, text


def test_bad_arguments(tiny_manifest: Callable[..., Path], tmp_path: Path) -> None:
    assert parse_externals(["x", "siteC=y"]) == {"external": Path("x"), "siteC": Path("y")}
    with pytest.raises(InputError, match="reserved|NAME=MANIFEST"):
        parse_externals(["internal=x"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cfg = load_config(None, [])
    with pytest.raises(InputError, match="not empty"):
        run_validation(tmp_path / "a", {"b": tmp_path / "b"}, cfg, tmp_path / "out")
    only_train = tiny_manifest({"train": 2, "val": 2})
    with pytest.raises(InputError, match="no 'test' split"):
        run_validation(only_train, {"b": only_train}, cfg, tmp_path / "new")
    assert cli_main(["validate", "--out", str(tmp_path / "x")]) == 2  # no --train/--external


@pytest.mark.slow
def test_synthetic_site_shift_experiment(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    argv = [
        "validate",
        "--synthetic",
        "--cases",
        "12",
        "--matrix",
        "64",
        "--out",
        str(out),
        "--baselines",
        "logreg",
        "--n-boot",
        "10",
        *TINY,
    ]
    assert cli_main(argv) == 0
    info = json.loads((out / "validation.json").read_text())
    assert info["synthetic"]["sites"] == ["internal", "external"]
    assert (out / "synthetic/data/internal/manifest.csv").is_file()
    gap = json.loads((out / "gap.json").read_text())
    assert gap["sets"] == ["train", "internal", "external"]
    assert [row["model"] for row in gap["rows"]] == ["deep (resnet18)", "logreg"]
