"""Test helpers shared by the test packages: tiny manifests, configs and run folders.

Not a test module (no ``test_`` prefix); imported as ``tests.inference_helpers`` by the
evaluation, validation, inference, service and training tests. ``make_manifest`` is also the
``tiny_manifest`` fixture of tests/conftest.py, ``make_tiny_config`` its ``tiny_config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from lungcad.data.manifest import SliceRecord, write_manifest
from lungcad.training.checkpoint import write_untrained_run
from lungcad.training.config import Config, load_config

SIZE = 64
#: Patients per split of :func:`make_manifest`'s default: 24 slices, the first 2/3 train.
DEFAULT_SPLITS: Mapping[str, int] = MappingProxyType({"train": 8, "val": 4})


def make_run_folder(
    folder: Path,
    *,
    name: str = "resnet18",
    image_size: int = SIZE,
    threshold: float = 0.5,
    seed: int = 0,
    stage: str = "cls",
) -> Path:
    """A run folder like ``lungcad train`` writes (best.pt + sidecar, config.yaml,
    threshold.json) holding a randomly initialised network; fast (no training). Its config
    has no ``init_from``, so for inference its decoder counts as untrained."""
    config = load_config(
        None,
        [
            f"model.name={name}",
            f"model.image_size={image_size}",
            f"train.stage={stage}",
            f"train.out_dir={folder}",
        ],
    )
    return write_untrained_run(folder, config, threshold=threshold, seed=seed)


def make_manifest(
    folder: Path,
    splits: Mapping[str, int] = DEFAULT_SPLITS,
    *,
    size: int = SIZE,
    seed: int = 0,
    spacing: float = 1.0,
    noise: float = 0.4,
) -> Path:
    """A tiny prepared folder: ``folder/manifest.csv`` and ``folder/slices/*.npy``.

    Each patient ``p<k>`` has two slices in a row: ``s<2k>`` tumour-free (empty mask,
    label 0) and ``s<2k+1>`` with a bright disc (its mask, label 1), on uniform noise in
    ``[0, noise)``. Patients are assigned to splits in the order of ``splits``; the default
    (8 train, 4 val) gives 24 slices, the first two thirds train.

    Args:
        folder: new folder to write.
        splits: patients per split, e.g. ``{"train": 6, "val": 3, "test": 3}``.
        size: slice height and width in pixels.
        seed: seed of the noise and the discs.
        spacing: pixel spacing in mm (both axes).
        noise: upper bound of the background intensity, in [0, 1).

    Returns:
        ``folder`` (a prepared folder; ``manifest_csv(folder)`` is its manifest).
    """
    rng = np.random.default_rng(seed)
    (folder / "slices").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    records = []
    i = 0
    patient = 0
    for split, n_patients in splits.items():
        for _ in range(n_patients):
            for label in (0, 1):
                image = rng.uniform(0.0, noise, (size, size)).astype(np.float32)
                mask = np.zeros((size, size), np.uint8)
                if label:
                    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                    r = rng.integers(size // 12, size // 5)
                    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
                    image[mask > 0] += 0.5
                np.save(folder / "slices" / f"s{i}.npy", np.clip(image, 0.0, 1.0))
                np.save(folder / "slices" / f"s{i}_mask.npy", mask)
                records.append(
                    SliceRecord(
                        sample_id=f"s{i}",
                        group_id=f"p{patient}",
                        slice_index=i,
                        image_path=f"slices/s{i}.npy",
                        mask_path=f"slices/s{i}_mask.npy",
                        label=label,
                        spacing_y=spacing,
                        spacing_x=spacing,
                        source="test",
                        split=split,
                    )
                )
                i += 1
            patient += 1
    return write_manifest(records, folder / "manifest.csv").parent


#: The settings of every tiny training run of the tests: ResNet18 at 64x64 on the CPU, batches
#: of 4, one epoch of at most 2 steps (seconds on two CPU cores), no progress bar.
TINY_SETTINGS: tuple[str, ...] = (
    "model.name=resnet18",
    f"model.image_size={SIZE}",
    "data.batch_size=4",
    "data.num_workers=0",
    "optim.epochs=1",
    "optim.lr=1e-3",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "train.progress=false",
)


def make_tiny_config(
    manifest: str | Path | None = None, out: str | Path | None = None, *overrides: str
) -> Config:
    """A tiny training config (:data:`TINY_SETTINGS`), also the ``tiny_config`` fixture.

    Args:
        manifest: ``data.manifest`` (None: unset).
        out: ``train.out_dir`` (None: the default).
        *overrides: further ``section.key=value`` settings; they win over the tiny ones.
    """
    paths = [f"data.manifest={manifest}"] if manifest is not None else []
    paths += [f"train.out_dir={out}"] if out is not None else []
    return load_config(None, [*paths, *TINY_SETTINGS, *overrides])


def tiny_set_options(*overrides: str) -> list[str]:
    """:data:`TINY_SETTINGS` plus ``overrides`` as ``--set`` options of ``lungcad train``."""
    return [arg for setting in (*TINY_SETTINGS, *overrides) for arg in ("--set", setting)]


def shared_trained_run(tmp_path_factory) -> Path:
    """A tiny two-stage run made by the real ``lungcad.training.loop.train`` (resnet18, 64x64,
    one step of stage seg, then one of stage cls started from it, so both the decoder and the
    classifier are trained parts), made once per test session and shared by the inference
    test modules."""
    from lungcad.training.loop import train

    base = tmp_path_factory.getbasetemp() / "lungcad_inference_shared"
    run = base / "run"
    if (run / "best.pt").is_file():
        return run
    manifest = make_manifest(base / "data")
    seg = base / "seg"
    train(make_tiny_config(manifest, seg, "train.max_steps_per_epoch=1", "train.stage=seg"))
    train(
        make_tiny_config(
            manifest,
            run,
            "train.max_steps_per_epoch=1",
            "train.stage=cls",
            f"train.init_from={seg}",
        )
    )
    return run
