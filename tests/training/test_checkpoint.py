"""Checkpoints: atomic save + SHA-256 sidecar, weights-only loading, RNG state, model rebuild."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.errors import InputError, MissingInputError
from lungcad.training.checkpoint import (
    file_sha256,
    get_rng_state,
    initial_weights,
    load_checkpoint,
    model_from_config,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    software_versions,
)
from lungcad.training.config import config_from_dict, config_to_dict, load_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A run folder holding best.pt of a randomly initialised resnet18 LungCADNet."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["model.name=resnet18", "model.image_size=64", "train.stage=cls"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=1e-3)  # small file
    model(torch.rand(2, 1, 64, 64))["cls_logits"].mean().backward()
    optimizer.step()  # optimiser state with tensors, as in a real last.pt
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "config": config_to_dict(cfg),
        "metrics": {"val_mcc": 0.5, "val_auc": float("nan")},
        "versions": software_versions(),
        "rng": get_rng_state(),
        "threshold": 0.37,
        "early_stopping": {"best": -float("inf"), "best_epoch": 0, "bad_epochs": 2},
    }
    save_checkpoint(run / "best.pt", payload)
    return run, payload


def test_round_trip_with_weights_only(saved_run: tuple[Path, dict]) -> None:
    run, payload = saved_run
    sidecar = (run / "best.pt.sha256").read_text().split()
    assert sidecar == [file_sha256(run / "best.pt"), "best.pt"]
    # Every value is a tensor or a plain type: torch's own weights-only loader accepts it.
    raw = torch.load(run / "best.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["threshold"] == 0.37
    assert (
        raw["optimizer"]["state"][0]["exp_avg"].shape
        == payload["optimizer"]["state"][0]["exp_avg"].shape
    )
    assert isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)

    model, config, info = load_checkpoint(run)
    assert config.model.name == "resnet18" and config.train.stage == "cls"
    assert info["epoch"] == 3 and info["threshold"] == pytest.approx(0.37)
    assert info["versions"]["torch"] == str(torch.__version__)
    assert not model.training
    for key, value in payload["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert load_checkpoint(run / "best.pt").info["sha256"] == info["sha256"]


def test_sha_mismatch_and_missing_files(saved_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, payload = saved_run
    copy = tmp_path / "copy"
    copy.mkdir()
    data = bytearray((run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (copy / "best.pt").write_bytes(bytes(data))
    (copy / "best.pt.sha256").write_text((run / "best.pt.sha256").read_text())
    with pytest.raises(InputError, match="SHA-256 mismatch"):
        load_checkpoint(copy)
    (copy / "best.pt.sha256").unlink()
    with pytest.raises(MissingInputError, match="checksum file"):
        load_checkpoint(copy)
    with pytest.raises(MissingInputError, match=r"no best\.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(MissingInputError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")


def test_not_a_lungcad_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(InputError, match="not a lungcad checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {}, "config": {}, "path": Path("x")}, tmp_path / "code.pt")
    with pytest.raises(InputError, match="weights-only"):
        read_checkpoint(tmp_path / "code.pt", verify=False)


def test_unknown_stored_config_keys_are_skipped(
    saved_run: tuple[Path, dict], tmp_path: Path
) -> None:
    # A checkpoint written by a lungcad version with an extra setting still loads.
    run, payload = saved_run
    config = payload["config"] | {"train": {**payload["config"]["train"], "future_key": 1}}
    save_checkpoint(tmp_path / "best.pt", {**payload, "config": config})
    model, cfg, _ = load_checkpoint(tmp_path)
    assert cfg.model.name == "resnet18"
    with pytest.raises(InputError, match="future_key"):
        config_from_dict(config)


def test_rng_state_round_trip() -> None:
    state = get_rng_state()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(state)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert first == again


def test_initial_weights_from_a_run_or_nothing(saved_run: tuple[Path, dict]) -> None:
    run, payload = saved_run
    torch.manual_seed(1)
    cfg = load_config(None, ["model.name=resnet18", "train.stage=cls", f"train.init_from={run}"])
    model = model_from_config(cfg)
    provenance = initial_weights(model, cfg)
    assert provenance == {
        "init_from": str(run),
        "init_from_sha256": file_sha256(run / "best.pt"),
        "init_from_input_domain": None,  # an untrained run records no domain
    }
    for key, value in payload["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert initial_weights(model, load_config(None, ["model.name=resnet18"])) == {}
    other = load_config(None, ["model.name=resnet34", f"train.init_from={run}"])
    with pytest.raises(InputError, match="trained with model 'resnet18'.*model.name=resnet18"):
        initial_weights(model, other)  # checked before any weight is loaded


def test_a_classifier_from_a_segmentation_run_starts_its_mask_term_at_the_prior(
    tmp_path: Path,
) -> None:
    """From a stage-"seg" run the head's direct mask term starts at model.cls_mask_prior
    (the seg run never trained it); from a stage-"cls" run the head is kept as it was."""
    seg_cfg = load_config(None, ["model.name=resnet18", "train.stage=seg"])
    torch.manual_seed(0)
    seg_model = model_from_config(seg_cfg)
    save_checkpoint(
        tmp_path / "seg" / "best.pt",
        {"model": seg_model.state_dict(), "epoch": 1, "config": config_to_dict(seg_cfg)},
    )
    cfg = load_config(
        None,
        [
            "model.name=resnet18",
            "train.stage=cls",
            "model.cls_mask_prior=1.5",
            f"train.init_from={tmp_path / 'seg'}",
        ],
    )
    model = model_from_config(cfg)
    initial_weights(model, cfg)
    weight = model.classifier.mask_evidence.weight
    assert float(weight[0, 1]) == 1.5 and float(weight.abs().sum()) == 1.5
    with pytest.raises(InputError, match="cls_mask_prior"):
        load_config(None, ["model.cls_mask_prior=nan"])
    with pytest.raises(InputError, match="slice_pixel_mm"):
        load_config(None, ["data.slice_pixel_mm=-2"])
