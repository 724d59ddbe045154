"""The run folder's lifecycle (lungcad.training.run_folder), without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungcad.errors import InputError, MissingInputError
from lungcad.training.checkpoint import read_checkpoint
from lungcad.training.config import config_to_yaml, load_config
from lungcad.training.run_folder import (
    RESUMABLE_KEYS,
    check_run_dir,
    finish_run,
    read_run_info,
    save_epoch,
    start_run,
    tensorboard_writer,
)


def test_new_run_folder_must_not_hold_a_run(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.out_dir={tmp_path / 'run'}"])
    assert check_run_dir(cfg, None) == tmp_path / "run"  # not created yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(InputError, match="--resume"):
        check_run_dir(cfg, None)


def test_resume_needs_last_pt_and_the_same_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, ["optim.lr=0.01", f"train.out_dir={run}"])
    with pytest.raises(MissingInputError, match="no last.pt"):
        check_run_dir(cfg, run)
    (run / "last.pt").write_bytes(b"")
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    assert "data.num_workers" in RESUMABLE_KEYS
    assert check_run_dir(load_config(None, ["optim.lr=0.01", "data.num_workers=7"]), run) == run
    with pytest.raises(InputError, match=r"optim\.lr: run has 0\.01, given 0\.5"):
        check_run_dir(load_config(None, ["optim.lr=0.5"]), run)


def test_run_info_start_resume_and_finish(tmp_path: Path) -> None:
    run = tmp_path / "run"
    info = read_run_info(run, resumed=False, provenance={"pretrained": "w.pth"})
    assert info["pretrained"] == "w.pth" and "started_at" in info
    cfg = load_config(None, [f"train.out_dir={run}"])
    start_run(run, cfg, {**info, "status": "running"})
    assert load_config(run / "config.yaml") == cfg
    resumed = read_run_info(run, resumed=True, provenance={})
    assert resumed["started_at"] == info["started_at"] and len(resumed["resumed_at"]) == 1
    finish_run(run, resumed, status="finished", epochs_completed=3, best_epoch=2, best_metric=0.5)
    stored = json.loads((run / "run.json").read_text())
    assert stored["status"] == "finished" and stored["best_epoch"] == 2 and "finished_at" in stored
    assert tensorboard_writer(run, cfg, main=True) is None  # train.tensorboard is off


def test_save_epoch_writes_best_only_when_improved(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.stage=cls", f"train.out_dir={tmp_path}"])
    model = torch.nn.Linear(2, 1)
    row = {"epoch": 1, "val_mcc": 0.2, "val_mcc_at_threshold": 0.3}
    state = {"optimizer": {"x": 1}, "early_stopping": {"best": 0.2}}
    save_epoch(
        tmp_path,
        cfg,
        model,
        [row],
        improved=True,
        threshold=0.4,
        versions={"lungcad": "x"},
        resume_state=state,
    )
    best, last = read_checkpoint(tmp_path / "best.pt"), read_checkpoint(tmp_path / "last.pt")
    assert best["threshold"] == 0.4 and "optimizer" not in best and "rng" not in best
    assert last["optimizer"] == {"x": 1} and last["history"] == [row] and "rng" in last
    assert json.loads((tmp_path / "threshold.json").read_text())["threshold"] == 0.4
    row2 = {**row, "epoch": 2}
    save_epoch(
        tmp_path,
        cfg,
        model,
        [row, row2],
        improved=False,
        threshold=0.4,
        versions={},
        resume_state=state,
    )
    assert read_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 2
