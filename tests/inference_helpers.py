"""Test helpers shared by the inference tests: tiny run folders and tiny studies.

Not a test module (no ``test_`` prefix); imported by tests/test_inference.py,
test_calibration.py, test_export.py and test_explain.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lungcad.data.manifest import SliceRecord, write_manifest
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.training.checkpoint import (
    CONFIG_FILE,
    THRESHOLD_FILE,
    model_from_config,
    save_checkpoint,
    software_versions,
)
from lungcad.training.config import config_to_dict, config_to_yaml, load_config

SIZE = 64


def make_run_folder(
    folder: Path,
    *,
    name: str = "resnet18",
    image_size: int = SIZE,
    threshold: float = 0.5,
    seed: int = 0,
) -> Path:
    """A run folder like ``lungcad train`` writes (best.pt + sidecar, config.yaml,
    threshold.json) holding a randomly initialised network; fast (no training)."""
    torch.manual_seed(seed)
    config = load_config(
        None,
        [
            f"model.name={name}",
            f"model.image_size={image_size}",
            "train.stage=cls",
            f"train.out_dir={folder}",
        ],
    )
    model = model_from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / CONFIG_FILE, config_to_yaml(config))
    save_checkpoint(
        folder / "best.pt",
        {
            "model": model.state_dict(),
            "epoch": 1,
            "config": config_to_dict(config),
            "metrics": {},
            "versions": software_versions(),
            "threshold": threshold,
            "stage": "cls",
        },
    )
    write_json_atomic(folder / THRESHOLD_FILE, {"threshold": threshold, "method": "mcc"})
    return folder


def make_manifest(folder: Path, n: int = 24, seed: int = 0, size: int = SIZE) -> Path:
    """``n`` random slices; odd ones hold a bright disc (mask 1, label 1); the last third val."""
    rng = np.random.default_rng(seed)
    (folder / "slices").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    records = []
    for i in range(n):
        image = rng.uniform(0.0, 0.4, (size, size)).astype(np.float32)
        mask = np.zeros((size, size), np.uint8)
        label = i % 2
        if label:
            cy, cx, r = rng.integers(16, 48), rng.integers(16, 48), rng.integers(5, 12)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
            image[mask > 0] += 0.5
        np.save(folder / "slices" / f"s{i}.npy", image)
        np.save(folder / "slices" / f"s{i}_mask.npy", mask)
        records.append(
            SliceRecord(
                sample_id=f"s{i}",
                group_id=f"p{i // 2}",
                slice_index=i,
                image_path=f"slices/s{i}.npy",
                mask_path=f"slices/s{i}_mask.npy",
                label=label,
                spacing_y=1.0,
                spacing_x=1.0,
                source="test",
                split="train" if i < 2 * n // 3 else "val",
            )
        )
    return write_manifest(records, folder / "manifest.csv")


def shared_trained_run(tmp_path_factory) -> Path:
    """A tiny run made by the real ``lungcad.training.loop.train`` (stage cls, resnet18, 64x64,
    one step), trained once per test session and shared by the inference test modules."""
    from lungcad.training.loop import train

    base = tmp_path_factory.getbasetemp() / "lungcad_inference_shared"
    run = base / "run"
    if (run / "best.pt").is_file():
        return run
    manifest = make_manifest(base / "data")
    config = load_config(
        None,
        [
            f"data.manifest={manifest}",
            f"train.out_dir={run}",
            "model.name=resnet18",
            f"model.image_size={SIZE}",
            "data.batch_size=4",
            "data.num_workers=0",
            "optim.epochs=1",
            "train.max_steps_per_epoch=1",
            "train.device=cpu",
            "train.progress=false",
            "train.stage=cls",
        ],
    )
    train(config)
    return run
