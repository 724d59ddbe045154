"""lungcad report: self-contained pages for run and evaluation folders.

The run folder here is written with the checkpoint module's own writers around an untrained
network (the report only reads files; real training is covered in test_evaluation.py).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.evaluate import evaluate_run
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.training.checkpoint import model_from_config, save_checkpoint, software_versions
from lungcad.training.config import config_hash, config_to_dict, config_to_yaml, load_config
from lungcad.validation.report import (
    build_report,
    folder_kind,
    write_report,
)
from tests.inference_helpers import SIZE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(
    tiny_manifest: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    data = tiny_manifest({"train": 2, "val": 1, "test": 3})
    run = root / "run"
    cfg = load_config(
        None,
        [
            "model.name=resnet18",
            f"model.image_size={SIZE}",
            "train.stage=cls",
            f"train.out_dir={run}",
        ],
    )
    torch.manual_seed(0)
    model = model_from_config(cfg)
    save_checkpoint(
        run / "best.pt",
        {
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "epoch": 2,
            "threshold": 0.5,
            "stage": "cls",
            "versions": software_versions(),
        },
    )
    write_text_atomic(run / "config.yaml", config_to_yaml(cfg))
    write_json_atomic(
        run / "threshold.json",
        {"threshold": 0.5, "method": "mcc", "epoch": 2, "chosen_on": "validation split"},
    )
    write_json_atomic(
        run / "run.json",
        {
            "stage": "cls",
            "status": "finished",
            "best_epoch": 2,
            "config_hash": config_hash(cfg),
            "init_from": "seg/best.pt",
            "versions": software_versions(),
            "manifests": [{"path": "train.csv", "sha256": "ab" * 32}],
        },
    )
    write_text_atomic(
        run / "metrics.csv",
        "epoch,lr,train_loss,val_loss,val_mcc\n1,0.001,0.7,0.69,0.1\n2,1e-05,0.5,0.6,0.3\n",
    )
    evaluation = root / "eval"
    evaluate_run(run, data, evaluation, n_boot=10, device="cpu", n_examples=1)
    return {"run": run, "eval": evaluation, "data": data}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_evaluation_report_has_every_section(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert cli_main(["report", str(folders["eval"]), "--out", str(out)]) == 0
    page = out.read_text()
    for heading in (
        "Summary",
        "Classification (per slice)",
        "Segmentation (per slice)",
        "Plots",
        "Example cases",
        "Errors",
        "Provenance",
    ):
        assert f"<h2>{heading}</h2>" in page, heading
    info = json.loads((folders["eval"] / "evaluation.json").read_text())
    # Provenance: config hash, checkpoint and manifest hashes, versions, split summary.
    for text in (
        info["checkpoint"]["config_hash"],
        info["checkpoint"]["sha256"],
        info["data"]["manifest_sha256"],
        torch.__version__,
        "Split summary",
        "ab" * 32,
        "95% CI",
    ):
        assert text in page, text
    images = _images(page)
    assert len(images) >= 5 and all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    # Self-contained: nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_run_report(folders: dict[str, Path]) -> None:
    assert folder_kind(folders["run"]) == "run"
    assert cli_main(["report", str(folders["run"])]) == 0  # default: FOLDER/report.html
    page = (folders["run"] / "report.html").read_text()
    for text in (
        "<h2>Training run</h2>",
        "<h2>Learning curves</h2>",
        "config.yaml",
        "resnet18",
        "1.00e-05",
        "0.500 (mcc, chosen on validation split, epoch 2)",
    ):
        assert text in page, text
    assert len(_images(page)) == 1


def test_folder_kinds_and_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    assert folder_kind(folders["eval"]) == "evaluation"
    with pytest.raises(MissingInputError):
        folder_kind(tmp_path / "missing")
    with pytest.raises(InputError, match="not a lungcad output folder"):
        build_report(folders["data"])
    with pytest.raises(InputError, match=r"\.html"):
        write_report(folders["eval"], tmp_path / "report.txt")
