"""The training run's records and loaders (lungcad.training.data)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from lungcad.data.manifest import read_manifest, write_manifest
from lungcad.errors import InputError
from lungcad.training.config import Config
from lungcad.training.data import build_data
from lungcad.training.distributed import DistInfo, ShardedWeightedSampler


@pytest.fixture(scope="module")
def manifest(tiny_manifest: Callable[..., Path]) -> Path:
    return tiny_manifest({"train": 4, "val": 3})  # 8 train + 6 val slices, half with a disc


def test_seg_keeps_masked_slices(manifest: Path, tiny_config: Callable[..., Config]) -> None:
    data = build_data(tiny_config(manifest, None, "data.batch_size=3"), DistInfo())
    assert len(data.train_records) == 8 and len(data.val_records) == 6  # every slice has one
    assert all(r.mask_path for r in data.train_records) and data.pos_weight is None
    assert isinstance(data.sampler, DistributedSampler)
    assert len(data.train_loader) == 2  # 8 slices in batches of 3: the incomplete one dropped
    assert len(data.val_loader) == 2  # validation keeps every slice
    batch = next(iter(data.val_loader))
    assert batch["image"].shape == (3, 1, 64, 64) and batch["mask"].shape == (3, 1, 64, 64)
    assert data.manifests == [str(manifest / "manifest.csv")]


def test_cls_weights_the_positive_class(manifest: Path, tiny_config: Callable[..., Config]) -> None:
    data = build_data(tiny_config(manifest, None, "train.stage=cls"), DistInfo())
    assert len(data.train_records) == 8 and data.pos_weight == 1.0  # 4 of each label
    balanced = tiny_config(manifest, None, "train.stage=cls", "data.balanced_sampling=true")
    data = build_data(balanced, DistInfo())
    assert isinstance(data.sampler, ShardedWeightedSampler) and data.pos_weight is None


def test_ranks_get_disjoint_validation_shards(
    manifest: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(manifest, None, "train.stage=cls", "data.batch_size=8")
    shards = [build_data(cfg, DistInfo(rank=r, world=2)) for r in (0, 1)]
    ids = [[float(x) for b in d.val_loader for x in b["image"].flatten(1).sum(1)] for d in shards]
    assert len(ids[0]) == len(ids[1]) == 3 and not set(ids[0]) & set(ids[1])


def test_bad_data(manifest: Path, tiny_config: Callable[..., Config]) -> None:
    with pytest.raises(InputError, match="no manifest given"):
        build_data(tiny_config(None, None), DistInfo())
    with pytest.raises(InputError, match="no 'train' slices with a tumour mask"):
        build_data(tiny_config(manifest, None, "data.sources=[elsewhere]"), DistInfo())
    positives = [r for r in read_manifest(manifest / "manifest.csv") if r.label == 1]
    one_class = write_manifest(positives, manifest / "positives.csv")  # same slice folder
    with pytest.raises(InputError, match="the train split has only label 1"):
        build_data(tiny_config(one_class, None, "train.stage=cls"), DistInfo())
